"""orchestrator.compare on synthetic run directories: a run against itself, a clearly better run, mismatched runs,
prompt-grouped intervals and the seed-noise verdict."""

import json

import numpy as np
import pytest

from orchestrator.compare import main as compare_main
from orchestrator.reporting import bootstrap
from tests.orchestrator.synthetic_runs import bundled_rows, make_run, noisy_probs, softmax

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
    assert res["verdict"] == "within seed noise" and res["fold_wins"] == {"A": 0, "B": 0, "tie": 5}


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


def test_rows_that_share_a_prompt_are_resampled_together():
    # 20 prompts of 10 rows each; a prompt's rows move together, so there are 20 pieces of evidence, not 200
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(20)], 10)
    values = np.repeat(rng.normal(0, 1, 20), 10) + rng.normal(0, 0.05, 200)
    row_low, row_high = bootstrap.mean_ci95(values)
    low, high = bootstrap.grouped_mean_ci95(values, groups)
    assert low < values.mean() < high
    assert (high - low) > 2.5 * (row_high - row_low)  # about sqrt(10) wider
    assert bootstrap.grouped_mean_ci95(values, np.arange(200)) == pytest.approx([row_low, row_high], abs=0.03)


def test_the_interval_groups_the_bundled_rows_by_prompt(runs, capsys):
    code, res, _ = run_json(capsys, runs["strong"], runs["weak"])
    assert code == 0 and res["grouped_by"] == "prompts" and res["n_groups"] < res["n_rows"] == N_ROWS
    assert "prompts of 200 rows" in (compare_main([str(runs["strong"]), str(runs["weak"])]) == 0
                                     and capsys.readouterr().out)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Recipe A at three seeds and recipe B at three seeds, B a hair better than A on every row (A's logit of the true
    label raised by 0.01: far below seed-to-seed spread, yet consistent over rows)."""
    root = tmp_path_factory.mktemp("seeds")
    rows = bundled_rows(N_ROWS)
    y = rows["label"].to_numpy()
    out = {}
    for s in (1, 2, 3):
        p = noisy_probs(y, 0.6, seed=10 + s)
        out[f"a{s}"] = make_run(root / f"a{s}", rows, p)
        out[f"b{s}"] = make_run(root / f"b{s}", rows, softmax(np.log(p) + 0.01 * np.eye(3)[y]))
    return out


def test_a_consistent_but_tiny_difference_is_within_seed_noise(seeds, capsys):
    code, res, _ = run_json(capsys, seeds["a1"], seeds["b1"])
    assert code == 0
    low, high = res["difference_ci95"]
    assert low > 0 and 0 < res["difference"] < 0.010  # the rows alone would call B better ...
    assert res["verdict"] == "within seed noise" and res["seed_spread"] == 0.010  # ... the seeds would not
    assert "docs/QUALITY.md" in res["seed_spread_source"]
    code, res, _ = run_json(capsys, seeds["a1"], seeds["b1"], "--seed-spread", "0")
    assert res["verdict"] == "B is better"


def test_several_runs_per_side_measure_the_seed_spread(seeds, capsys):
    side_a = ",".join(str(seeds[f"a{s}"]) for s in (1, 2, 3))
    side_b = ",".join(str(seeds[f"b{s}"]) for s in (1, 2, 3))
    code, res, _ = run_json(capsys, side_a, side_b)
    assert code == 0 and len(res["log_losses_a"]) == 3 and res["runs_b"] == side_b.split(",")
    spread = max(max(x) - min(x) for x in (res["log_losses_a"], res["log_losses_b"]))
    assert res["seed_spread"] == pytest.approx(spread) and "measured" in res["seed_spread_source"]
    assert res["log_loss_a"] == pytest.approx(np.mean(res["log_losses_a"]))
    assert res["verdict"] == ("within seed noise" if abs(res["difference"]) <= spread else res["verdict"])
    assert abs(res["difference"]) < spread and res["verdict"] == "within seed noise"
    assert compare_main([side_a, side_b]) == 0 and "mean of 3 runs" in capsys.readouterr().out
