"""Per-run wall-time breakdown read back from TensorBoard events and metrics.json (synthetic, known timings)."""

import os

import pytest
from torch.utils.tensorboard import SummaryWriter

from orchestrator.perf.fold_timeline import breakdown, format_breakdown, mean_overheads, read_run_logs


def write_run(tb_dir, train_start: float, steps: list[int], first_extra: float, pace: float, start_step: int = 0,
              compiles: list[int] | None = None):
    """Log elapsed_s as fold.py does: the first window costs first_extra seconds more than the steady pace; with
    ``compiles``, the recompilation count at each step too."""
    w = SummaryWriter(str(tb_dir))
    for i, s in enumerate(steps):
        elapsed = first_extra + (s - start_step) * pace
        w.add_scalar("elapsed_s", elapsed, s, walltime=train_start + elapsed)
        if compiles is not None:
            w.add_scalar("compiles", compiles[i], s, walltime=train_start + elapsed)
    w.close()
    return train_start + first_extra + (steps[-1] - start_step) * pace


def test_breakdown_of_a_plain_fold_and_a_fold_in_two_pieces(tmp_path):
    t0 = 1_000_000.0
    # fold 0: one run, trial + load 30 s, 20 s of compilation, 40 steps at 0.5 s, then 12 s of prediction and files
    end0 = write_run(tmp_path / "tensorboard" / "fold=0", t0 + 30, [10, 20, 30, 40], 20.0, 0.5)
    (tmp_path / "fold=0").mkdir()
    (tmp_path / "fold=0" / "metrics.json").write_text("{}")
    os.utime(tmp_path / "fold=0" / "metrics.json", (end0 + 12, end0 + 12))
    # fold 1: a first piece alongside fold 0 (steps 1-20), a second piece after fold 0 ended (steps 21-40)
    tb1 = tmp_path / "tensorboard" / "fold=1"
    write_run(tb1, t0 + 31, [10, 20], 19.0, 0.5)
    end1 = write_run(tb1, end0 + 12 + 25, [30, 40], 5.0, 0.5, start_step=20)
    (tmp_path / "fold=1").mkdir()
    (tmp_path / "fold=1" / "metrics.json").write_text("{}")
    os.utime(tmp_path / "fold=1" / "metrics.json", (end1 + 10, end1 + 10))

    runs = breakdown(read_run_logs(tmp_path), t0)
    assert [r["fold"] for r in runs] == [0, 1, 1]
    plain, piece1, piece2 = runs
    assert plain["start_s"] == pytest.approx(30, abs=0.01) and plain["compile_s"] == pytest.approx(20, abs=0.01)
    assert plain["train_s"] == pytest.approx(20, abs=0.01) and plain["after_s"] == pytest.approx(12, abs=0.01)
    assert plain["s_per_step"] == pytest.approx(0.5) and plain["steps"] == 40
    assert piece1["start_s"] == pytest.approx(31, abs=0.01) and piece1["after_s"] is None and piece1["steps"] == 20
    # the second piece starts from the end of fold 0's run (the last run that ended before it)
    assert piece2["start_s"] == pytest.approx(25, abs=0.01) and piece2["compile_s"] == pytest.approx(5, abs=0.01)
    assert piece2["steps"] == 20 and piece2["after_s"] == pytest.approx(10, abs=0.01)
    means = mean_overheads(runs)
    assert means["after_s"] == pytest.approx(11, abs=0.01) and means["start_s"] == pytest.approx(86 / 3, abs=0.01)
    assert "compile s" in format_breakdown(runs)


def test_a_fold_that_compiled_before_its_first_step_shows_that_time_as_compile(tmp_path):
    """model.precompile: the fold's first report is at its start step, after the passes (25 s here); every step after
    it runs at the steady pace, so the whole 25 s is the run's compile time and none of it is in train."""
    t0 = 1_000_000.0
    end = write_run(tmp_path / "tensorboard" / "fold=0", t0 + 30, [0, 10, 20, 30, 40], 25.0, 0.5,
                    compiles=[12, 12, 12, 12, 12])
    (tmp_path / "fold=0").mkdir()
    (tmp_path / "fold=0" / "metrics.json").write_text("{}")
    os.utime(tmp_path / "fold=0" / "metrics.json", (end + 12, end + 12))
    (run,) = breakdown(read_run_logs(tmp_path), t0)
    assert run["start_s"] == pytest.approx(30, abs=0.01) and run["compile_s"] == pytest.approx(25, abs=0.01)
    assert run["train_s"] == pytest.approx(20, abs=0.01) and run["s_per_step"] == pytest.approx(0.5)
    assert run["steps"] == 40 and run["after_s"] == pytest.approx(12, abs=0.01)
    assert run["steady_at_s"] == pytest.approx(25, abs=0.01)  # nothing compiled after the passes


def test_steady_at_is_the_first_step_after_the_last_compilation(tmp_path):
    """Without precompilation a length first seen at step 30 compiles there: the fold is steady from step 30's report
    on; a fold that did not count its recompilations has no figure."""
    t0 = 1_000_000.0
    write_run(tmp_path / "tensorboard" / "fold=0", t0, [10, 20, 30, 40], 20.0, 0.5, compiles=[3, 3, 5, 5])
    write_run(tmp_path / "tensorboard" / "fold=1", t0, [10, 20], 20.0, 0.5)
    counted, uncounted = breakdown(read_run_logs(tmp_path), t0)
    assert counted["steady_at_s"] == pytest.approx(20.0 + 30 * 0.5, abs=0.01) and uncounted["steady_at_s"] is None
    assert "steady at s" in format_breakdown([counted, uncounted])
