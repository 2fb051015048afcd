"""The console's ETA tells the truth: no number while a fold warms up or compiles, the steady rate once there is one
(not an average over compilation), a restarted fold starts afresh, and the run's ETA counts the phases still to come."""

import io
import math
from types import SimpleNamespace

import pytest

from orchestrator.cluster.eta import FoldPace, later_fold_times, run_eta_s
from orchestrator.cluster.progress import Progress
from orchestrator.cluster.schedule import Placement, phase_shares
from tests.conftest import CONFIGS


def feed(progress: Progress, fold: int, elapsed: float, step: int, total: int = 1000, start: int = 0,
         compiles: int = 0, **extra) -> str:
    result = {"step": step, "total_steps": total, "elapsed_s": elapsed, "start_step": start, "compiles": compiles,
              **extra}
    progress.last_print = 0.0  # print every report
    progress.on_trial_result(0, [], SimpleNamespace(config={"fold": fold}), result)
    return progress.stream.getvalue().splitlines()[-1]


def test_a_slow_start_gives_no_eta_then_the_steady_rate():
    """The H100 case: compilation, then 1 s a step while recompiling, then 0.26 s a step. An average would have said
    hours; the console says "compiling"/"warming up" and then the steady rate's ETA."""
    p = Progress(n_folds=1, concurrency=1, stream=io.StringIO(), compiled=True)
    assert "compiling" in feed(p, 0, elapsed=150.0, step=10, compiles=3)
    assert p.eta(0) is None
    t, line = 150.0, ""
    for step, compiles in [(20, 4), (30, 5), (40, 6)]:  # each interval recompiled something
        t += 10.0
        line = feed(p, 0, elapsed=t, step=step, compiles=compiles)
        assert p.eta(0) is None and "compiling" in line and "after warm-up" in line
    t += 2.6  # nothing compiled since: 0.26 s a step
    line = feed(p, 0, elapsed=t, step=50, compiles=6)
    assert "warming up" in line and p.eta(0) is None  # one quiet interval is not a rate yet
    t += 2.6
    line = feed(p, 0, elapsed=t, step=60, compiles=6)
    assert p.eta(0) == pytest.approx(0.26 * (1000 - 60))
    assert "eta 4m04s" in line and "all folds: 4m04s" in line
    # A length first seen late compiles its graph (step 390 of 404 on an H100): the ETA keeps the steady rate
    # instead of going back to "warming up", and the next quiet intervals measure it again.
    t += 9.0
    line = feed(p, 0, elapsed=t, step=70, compiles=7)
    assert p.eta(0) == pytest.approx(0.26 * (1000 - 70)) and "warming up" not in line and "eta 4m01s" in line
    for step in (80, 90):
        t += 2.0
        feed(p, 0, elapsed=t, step=step, compiles=7)
    assert p.eta(0) == pytest.approx(0.2 * (1000 - 90))


def test_a_fold_that_compiled_before_its_first_step_is_steady_from_its_first_reports():
    """model.precompile: the fold reports after each batch length it compiled, and at its start step when its training
    graphs are compiled (85 s here); the console says so, and two quiet intervals later the ETA is the steady rate's,
    while the fold's whole time still counts the 85 s."""
    p = Progress(n_folds=2, concurrency=1, stream=io.StringIO(), compiled=True)
    for done, t, shown in ((1, 30.0, "0m30s"), (2, 48.0, "0m48s"), (3, 67.0, "1m07s")):  # a long phase moves
        line = feed(p, 0, elapsed=t, step=0, total=400, compiles=3 * done, precompile_done=done, precompile_total=4)
        assert line.endswith(f"fold 0: compiling its training graphs: {done} of 4 batch lengths in {shown}")
        assert p.eta(0) is None and p.overall_eta() is None
    line = feed(p, 0, elapsed=85.0, step=0, total=400, compiles=12, precompiled_lengths=4)
    assert line.endswith("fold 0: compiled its training graphs for 4 batch lengths in 1m25s; training from step 0/400")
    assert p.eta(0) is None
    feed(p, 0, elapsed=87.0, step=10, total=400, compiles=12)
    line = feed(p, 0, elapsed=89.0, step=20, total=400, compiles=12)
    assert p.eta(0) == pytest.approx(0.2 * 380) and "eta 1m16s" in line
    assert p.pace[0].fold_s() == pytest.approx(85.0 + 0.2 * 400)
    assert p.overall_eta() == pytest.approx(0.2 * 380 + 85.0 + 0.2 * 400)  # then fold 1, as long


@pytest.mark.parametrize(("helpers", "failed", "said"), [
    (4, 0, " (4 compile helpers compiled them while the model loaded)"),
    (1, 1, " (1 compile helper compiled them while the model loaded, 1 failed)")])
def test_the_compiled_line_names_the_compile_helpers_that_ran(helpers, failed, said):
    """cluster.compile_helpers: the fold's report at its start step carries what its helpers did (trainer_core.fold.
    warm_compile.summary), and the console says it beside the short compile phase."""
    p = Progress(n_folds=1, concurrency=1, stream=io.StringIO(), compiled=True)
    line = feed(p, 0, elapsed=10.0, step=0, total=400, compiles=12, precompiled_lengths=4, compile_helpers=helpers,
                compile_helpers_s=39.4, compile_helpers_failed=failed)
    assert line.endswith(f"fold 0: compiled its training graphs for 4 batch lengths in 0m10s{said}; training from "
                         "step 0/400")


@pytest.mark.parametrize("setting, says_compile", [("off", False), ("on", True), ("dynamic", True)])
def test_the_start_line_speaks_of_compilation_only_when_the_folds_compile(setting, says_compile, monkeypatch,
                                                                         tmp_path):
    """cv's folds get a Progress whose start line follows the config's model.compile (it said "a compiled model's
    first steps compile" to every run, the eager default included)."""
    import orchestrator.cluster.folds as folds
    from trainer_core.config import load_config

    made = []

    class Stop(Exception):
        pass

    def tuner(trainable, *, param_space, tune_config, run_config):
        made.extend(c for c in run_config.callbacks if isinstance(c, Progress))
        raise Stop

    monkeypatch.setattr(folds.ray.tune, "Tuner", tuner)
    monkeypatch.setattr(folds.ray.tune, "with_parameters", lambda fn, **kw: fn)
    cfg = load_config(CONFIGS / "smoke.yaml", [f"model.compile={setting}"])
    from orchestrator.runs.staging import RunDir

    with pytest.raises(Stop):
        folds._tune_folds(cfg, {0: None}, RunDir(tmp_path), 1, 0.0)
    made[0].stream = io.StringIO()
    made[0].on_trial_start(0, [], SimpleNamespace(config={"fold": 0}))
    line = made[0].stream.getvalue()
    assert "fold 0: started (loading the model; " in line and "the ETA shows once the step rate is steady" in line
    assert ("compile" in line) == says_compile


def test_without_a_compile_count_two_agreeing_intervals_make_a_rate():
    pace = FoldPace(total_steps=100)
    for t, step in [(60.0, 10), (70.0, 20), (71.0, 30), (72.0, 40)]:  # 1 s a step, then 0.1 s
        pace.add(t, step)
    assert pace.steady_s_per_step() == pytest.approx(0.1)
    assert pace.eta_s() == pytest.approx(6.0)
    # the fold's whole time: the 70 s spent before the steady rate beyond that rate, plus every step at it
    assert pace.fold_s() == pytest.approx(72.0 - 0.1 * 40 + 0.1 * 100)


def test_a_restarted_fold_starts_its_clock_again():
    pace = FoldPace(total_steps=1000)
    for i in range(1, 5):
        pace.add(1.0 * i, 10 * i)  # 0.1 s a step
    pace.add(30.0, 25, start_step=20)  # restarted from step 20, 30 s spent loading
    assert pace.start_step == 20 and pace.steady_s_per_step() is None
    pace.add(31.0, 35)
    pace.add(32.0, 45)
    assert pace.steady_s_per_step() == pytest.approx(0.1)


def test_the_run_eta_counts_waves_and_later_phases():
    fold = FoldPace(total_steps=100)
    for t, step in [(20.0, 10), (30.0, 20), (40.0, 30)]:  # 1 s a step, 10 s of warm-up
        fold.add(t, step)
    whole = fold.fold_s()
    assert whole == pytest.approx(110.0)
    # 70 s left on the running fold, 3 more folds of this phase in waves of 2 (2 waves), then 1.5 fold-times later
    assert run_eta_s([fold], 3, 2, 1.5) == pytest.approx(70.0 + 2 * 110.0 + 1.5 * 110.0)
    assert run_eta_s([fold, FoldPace(total_steps=100)], 0, 2, 0.0) is None  # one fold still warming up


def test_later_fold_times_of_waves_and_rotated_pieces():
    whole = Placement(gpus=1, cpu_workers=0, cpus_per_worker=1.0)
    piece = Placement(gpus=1, cpu_workers=0, cpus_per_worker=1.0, stop_at=0.25)
    # two phases of whole folds: 4 folds on 2 slots (2 waves), then 1 fold
    assert later_fold_times([[1.0] * 4, [1.0]], [2, 1]) == 3.0
    shares = phase_shares([{0: piece, 1: whole}, {0: whole}])
    assert shares == [[0.25, 1.0], [0.75]]
    assert later_fold_times(shares[1:], [1]) == 0.75
    assert math.isclose(later_fold_times([[0.25, 1.0]], [2]), 1.0)
