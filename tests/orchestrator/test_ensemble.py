"""orchestrator.ensemble on synthetic run directories (no model): cross-fitted weights, the run-like directory it
writes, and refusals. Prediction through an ensemble's members' fold models is tested in test_predict.py."""

import json

import numpy as np
import pandas as pd
import pytest

from orchestrator.ensemble import build_ensemble
from orchestrator.ensemble import main as ensemble_main
from orchestrator.reporting.reducer import PROB_COLUMNS
from orchestrator.runs.ensemble_weights import combine
from tests.orchestrator.synthetic_runs import bundled_rows, make_run, noisy_probs
from trainer_core import metrics

N_ROWS = 200


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members (informative and over-confident; weak), and the same two with fold 0's labels changed."""
    root = tmp_path_factory.mktemp("ensemble")
    rows = bundled_rows(N_ROWS)
    y = rows["label"].to_numpy()
    strong, weak = noisy_probs(y, 1.5, seed=1, sharpness=2.0), noisy_probs(y, 0.6, seed=2)
    relabelled = rows.copy()
    in_fold0 = (relabelled["fold"] == 0).to_numpy()
    relabelled.loc[in_fold0, "label"] = (relabelled.loc[in_fold0, "label"] + 1) % 3
    return {"strong": make_run(root / "strong", rows, strong, "strong"),
            "weak": make_run(root / "weak", rows, weak, "weak"),
            "strong_relabelled": make_run(root / "strong_r", relabelled, strong),
            "weak_relabelled": make_run(root / "weak_r", relabelled, weak),
            "four_folds": make_run(root / "four", bundled_rows(N_ROWS, n_folds=4), weak)}


@pytest.mark.parametrize("method", ["weights", "logit"])
def test_fold_weights_do_not_depend_on_their_own_folds_labels(members, method):
    _, _, rep, _ = build_ensemble([members["strong"], members["weak"]], method)
    _, _, rep_r, _ = build_ensemble([members["strong_relabelled"], members["weak_relabelled"]], method)
    w, w_r = rep["ensemble"]["weights_by_fold"], rep_r["ensemble"]["weights_by_fold"]
    # fold 0's labels changed: the weights used on fold 0 are fitted without them, so they are unchanged ...
    assert w["0"] == pytest.approx(w_r["0"], abs=1e-9)
    assert rep["folds"][0]["weights"] == w["0"]
    # ... while every other fold's weights were fitted on fold 0's rows and move (the test can fail)
    for k in ("1", "2", "3", "4"):
        assert max(abs(a - b) for a, b in zip(w[k], w_r[k])) > 1e-4
    assert rep["ensemble"]["weights"] != rep_r["ensemble"]["weights"]


def test_ensemble_directory_holds_an_honest_oof_and_each_members_score(members, tmp_path, capsys):
    out = tmp_path / "ens"
    assert ensemble_main([str(members["strong"]), str(members["weak"]), "--out", str(out)]) == 0
    assert "ensemble (weights, cross-fitted)" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    oof = pd.read_parquet(out / "oof.parquet")
    strong = pd.read_parquet(members["strong"] / "oof.parquet").sort_values("id")
    weak = pd.read_parquet(members["weak"] / "oof.parquet").sort_values("id")
    y = strong["label"].to_numpy()
    # the OOF rows are the members combined with the weights fitted on the other folds, fold by fold
    expect = np.zeros((len(y), 3))
    for k, w in rep["ensemble"]["weights_by_fold"].items():
        sel = strong["fold"].to_numpy() == int(k)
        expect[sel] = combine([strong[PROB_COLUMNS].to_numpy()[sel], weak[PROB_COLUMNS].to_numpy()[sel]], w, "weights")
    assert np.allclose(oof[PROB_COLUMNS].to_numpy(), expect)
    assert rep["cv_log_loss"] == pytest.approx(metrics.log_loss(y, expect), abs=1e-12)
    for m, name in zip(rep["ensemble"]["members"], ("strong", "weak")):
        assert m["cv_log_loss"] == pytest.approx(json.loads((members[name] / "report.json").read_text())["cv_log_loss"])
    assert sum(rep["ensemble"]["weights"]) == pytest.approx(1.0)
    assert rep["ensemble"]["weights"][0] > rep["ensemble"]["weights"][1]  # the informative member weighs more
    assert "length_baseline_log_loss" in rep and rep["cv_log_loss_ci95"][0] < rep["cv_log_loss"]
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["weights"] == rep["ensemble"]["weights"] and spec["method"] == "weights"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "Ensemble" in text and f"{rep['ensemble']['weights'][0]:.3f}" in text
        for f in rep["folds"]:
            assert all(f"{x:.4f}" in text for x in f["member_log_losses"])


def test_mean_is_the_plain_average(members, tmp_path):
    oof, _, rep, _ = build_ensemble([members["strong"], members["weak"]], "mean")
    parts = [pd.read_parquet(members[n] / "oof.parquet").sort_values("id")[PROB_COLUMNS].to_numpy()
             for n in ("strong", "weak")]
    assert np.allclose(oof[PROB_COLUMNS].to_numpy(), metrics.clip_probs((parts[0] + parts[1]) / 2))
    assert all(w == [0.5, 0.5] for w in rep["ensemble"]["weights_by_fold"].values())


def test_members_over_other_folds_are_refused_and_nothing_is_written(members, tmp_path, capsys):
    out = tmp_path / "ens"
    assert ensemble_main([str(members["strong"]), str(members["four_folds"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different folds" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert ensemble_main([str(members["strong"]), str(members["weak"]), "--out", str(members["weak"])]) == 2
    assert "is the member" in capsys.readouterr().err
    assert (members["weak"] / "fold=0" / "oof.parquet").exists()  # the run it would have overwritten is intact


def test_an_ensemble_never_writes_over_or_inside_a_member(members, tmp_path, capsys):
    first = tmp_path / "ens"
    assert ensemble_main([str(members["strong"]), str(members["weak"]), "--out", str(first)]) == 0
    before = (first / "ensemble.json").read_text()
    # an ensemble of that ensemble written over it would list itself as a member (RecursionError when read)
    for out, words in ((first, "is the member"), (first / "inner", "lies inside the member"),
                       (members["weak"] / "ens", "lies inside the member"), (tmp_path, "holds the member")):
        capsys.readouterr()
        assert ensemble_main([str(first), str(members["weak"]), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
    assert (first / "ensemble.json").read_text() == before and not (members["weak"] / "ens").exists()


def test_member_paths_are_stored_relative_to_the_ensemble(members, tmp_path):
    from orchestrator.runs.provenance import member_dirs

    out = tmp_path / "ens"
    assert ensemble_main([str(members["strong"]), str(members["weak"]), "--out", str(out)]) == 0
    spec = json.loads((out / "ensemble.json").read_text())
    assert not any(m.startswith("/") for m in spec["members"])
    assert [d.resolve() for d in member_dirs(out)] == [members["strong"].resolve(), members["weak"].resolve()]
    spec["members"] = [str(members["strong"].resolve()), str(members["weak"].resolve())]  # an older, absolute file
    assert member_dirs(out, spec) == [members["strong"].resolve(), members["weak"].resolve()]


def test_an_ensemble_inherits_its_members_folds_and_optimism(tmp_path, capsys):
    from orchestrator.reporting.reducer import format_table

    rows = bundled_rows(60)
    y = rows["label"].to_numpy()
    oof_student = {"path": "oof_soft.parquet", "kind": "oof", "sha256": "0", "distill_weight": 0.5}
    honest = make_run(tmp_path / "honest", rows, noisy_probs(y, 1.0, seed=3), "honest", fold_by="prompt")
    student = make_run(tmp_path / "student", rows, noisy_probs(y, 1.0, seed=4), "student", fold_by="prompt",
                       soft_labels=oof_student)
    other = make_run(tmp_path / "other", rows, noisy_probs(y, 1.0, seed=5), "other", fold_by="id")
    out = tmp_path / "ens"
    assert ensemble_main([str(honest), str(student), "--out", str(out)]) == 0
    assert "WARNING" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["fold_by"] == "prompt" and len(rep["optimistic_because"]) == 1
    assert rep["optimistic_because"][0].startswith(f"member {student}: it learned from plain OOF soft labels")
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text()):
        assert "Optimistic CV" in text and "grouped by prompt" in text and "id % n_folds" not in text
    assert "WARNING: This CV log loss is optimistic" in format_table(rep)
    assert json.loads((out / "ensemble.json").read_text())["provenance"]["optimistic_because"]
    # an honest pair stays honest; members split by other rules are refused in one line
    assert ensemble_main([str(honest), str(make_run(tmp_path / "h2", rows, noisy_probs(y, 1.0, seed=6), "h2",
                                                    fold_by="prompt")), "--out", str(tmp_path / "e3")]) == 0
    assert json.loads((tmp_path / "e3" / "report.json").read_text())["optimistic_because"] == []
    capsys.readouterr()
    assert ensemble_main([str(honest), str(other), "--out", str(tmp_path / "e4")]) == 2
    err = capsys.readouterr().err
    assert "fold_by prompt vs id" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "e4").exists()


@pytest.mark.parametrize("kind, teacher, words", [
    ("oof", [], "is optimistic"), ("in_fold", [], "stays honest"), ("in_fold", None, "cannot be checked"),
    ("in_fold", ["it learned from plain OOF soft labels of /g"], "whose own CV is optimistic")])
def test_a_students_report_says_whether_its_cv_is_optimistic(tmp_path, kind, teacher, words):
    from orchestrator.reporting.reducer import format_table, reduce_run

    rows = bundled_rows(60)
    run = make_run(tmp_path / "student", rows, noisy_probs(rows["label"].to_numpy(), 1.0, seed=3))
    meta = json.loads((run / "run.json").read_text())
    prov = None if teacher is None else {"teacher_run": "/t", "kind": kind, "teacher_optimistic_because": teacher}
    meta["soft_labels"] = {"path": "soft.parquet", "kind": kind, "sha256": "0", "distill_weight": 0.5,
                           "provenance": prov}
    (run / "run.json").write_text(json.dumps(meta))
    rep = reduce_run(run, [0, 1, 2, 3, 4])
    optimistic = kind == "oof" or bool(teacher)
    assert rep["distillation"]["optimistic"] == optimistic and bool(rep["optimistic_because"]) == optimistic
    for text in ((run / "report.md").read_text(), (run / "report.html").read_text(), format_table(rep)):
        assert words in text and ("stays honest" in text) == (words == "stays honest")


def test_the_length_baseline_joins_one_run_as_a_cross_fitted_member(members, tmp_path, capsys):
    from orchestrator.runs.scoring import length_baseline_predictions

    run = members["strong"]  # informative but over-confident
    assert ensemble_main([str(run), "--out", str(tmp_path / "alone")]) == 2
    assert "--with-length-baseline" in capsys.readouterr().err
    out = tmp_path / "ens"
    assert ensemble_main([str(run), "--with-length-baseline", "--out", str(out)]) == 0
    assert "length baseline" in capsys.readouterr().out
    rep, spec = json.loads((out / "report.json").read_text()), json.loads((out / "ensemble.json").read_text())
    run_rep = json.loads((run / "report.json").read_text())
    run_member, length_member = rep["ensemble"]["members"]
    assert length_member["experiment"] == "length baseline" and spec["length_baseline"] is True
    assert len(spec["members"]) == 1 and len(spec["weights"]) == 2
    # the member is the report's own cross-fitted baseline, on the same folds
    assert length_member["cv_log_loss"] == pytest.approx(run_rep["length_baseline_log_loss"], abs=1e-12)
    assert run_member["cv_log_loss"] == pytest.approx(run_rep["cv_log_loss"], abs=1e-12)
    # the over-confident member gains from length: the ensemble is below both (cross-fitted weights)
    assert rep["cv_log_loss"] < min(run_member["cv_log_loss"], length_member["cv_log_loss"])
    assert all(0 < w[1] < 1 for w in rep["ensemble"]["weights_by_fold"].values())
    # predict refits fold k's regression on the other folds' rows: on fold k's own rows that is its OOF figure
    data = pd.read_parquet(out / "data.parquet")
    from orchestrator.reporting.baselines import cross_fitted

    oof_length = cross_fitted(data[["id", "fold"]], data, [0, 1, 2, 3, 4])
    for k, p in length_baseline_predictions(out, data, [0, 1, 2, 3, 4]):
        sel = (data["fold"] == k).to_numpy()
        assert np.allclose(p[sel], oof_length[sel], atol=1e-12)
