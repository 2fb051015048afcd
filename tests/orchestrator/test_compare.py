"""orchestrator.compare on synthetic run directories: a run against itself, a clearly better run, mismatched runs."""

import json

import pytest

from orchestrator.compare import main as compare_main
from tests.orchestrator.synthetic_runs import bundled_rows, make_run, noisy_probs

N_ROWS = 200


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    rows = bundled_rows(N_ROWS)
    y = rows["label"].to_numpy()
    return {"weak": make_run(root / "weak", rows, noisy_probs(y, 0.3, seed=1)),
            "strong": make_run(root / "strong", rows, noisy_probs(y, 2.0, seed=2)),
            "fewer": make_run(root / "fewer", rows.iloc[:150], noisy_probs(y[:150], 0.3, seed=1)),
            "four_folds": make_run(root / "four", bundled_rows(N_ROWS, n_folds=4), noisy_probs(y, 0.3, seed=1))}


def run_json(capsys, *args):
    code = compare_main([*map(str, args), "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_a_run_against_itself_is_a_zero_difference(runs, capsys):
    code, res, _ = run_json(capsys, runs["weak"], runs["weak"])
    assert code == 0
    assert res["difference"] == 0.0 and res["difference_ci95"] == [0.0, 0.0]
    assert res["verdict"] == "no clear difference" and res["fold_wins"] == {"A": 0, "B": 0, "tie": 5}


def test_a_clearly_better_run_wins_with_an_interval_around_the_difference(runs, capsys):
    code, res, _ = run_json(capsys, runs["strong"], runs["weak"])
    assert code == 0
    rep_a = json.loads((runs["strong"] / "report.json").read_text())
    rep_b = json.loads((runs["weak"] / "report.json").read_text())
    assert res["difference"] == pytest.approx(rep_a["cv_log_loss"] - rep_b["cv_log_loss"], abs=1e-12)
    low, high = res["difference_ci95"]
    assert low < res["difference"] < high < 0
    assert res["verdict"] == "A is better"
    for f, fa, fb in zip(res["folds"], rep_a["folds"], rep_b["folds"]):
        assert f["difference"] == pytest.approx(fa["log_loss"] - fb["log_loss"], abs=1e-12)
    assert res["fold_wins"]["A"] == sum(f["difference"] < 0 for f in res["folds"])
    # the same pair the other way round: the sign flips and so does the verdict
    _, rev, _ = run_json(capsys, runs["weak"], runs["strong"])
    assert rev["difference"] == pytest.approx(-res["difference"]) and rev["verdict"] == "B is better"
    assert compare_main([str(runs["strong"]), str(runs["weak"])]) == 0
    assert "verdict: A is better" in capsys.readouterr().out


@pytest.mark.parametrize("other, words", [("fewer", "cover different rows"), ("four_folds", "different folds")])
def test_runs_over_other_rows_or_folds_are_refused_in_one_line(runs, capsys, other, words):
    code, _, err = run_json(capsys, runs["weak"], runs[other])
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert str(runs["weak"]) in err and str(runs[other]) in err


def test_a_directory_without_a_report_is_refused(runs, tmp_path, capsys):
    code, _, err = run_json(capsys, runs["weak"], tmp_path)
    assert code == 2 and "not a finished run" in err and len(err.strip().splitlines()) == 1
