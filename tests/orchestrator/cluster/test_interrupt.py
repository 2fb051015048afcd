"""A run stopped three ways and resumed each time, in one run directory: the whole run killed at once (driver, Ray and
workers: SIGKILL), then Ctrl-C (SIGINT) to the driver, then SIGTERM to the driver, each followed by the same command;
the last rerun finishes with a complete OOF file although a Ray Train worker is killed by pid mid-fold (Ray Train
restarts it from the fold's last checkpoint). Every rerun continues each fold from the checkpoint the stop left.

On SIGINT or SIGTERM the folds stop, finished work and the last checkpoints stay, Ray shuts down, the console says that
the same command resumes, exit status 130, and no later phase starts. Before, a SIGINT in the first phase cancelled
its folds, then the next phase trained in full and the run blamed the stopped folds.

One chain rather than one run per kind of stop (three cluster start-ups and three full resumes saved, about a minute
and a half on 2 cores; the killed worker was its own run too): each stop is asserted on its own, with the kind of stop
in every message."""

import json
import os
import signal
import time

import pytest

from tests.orchestrator.cluster.faults import (
    check_oof,
    checkpoints,
    cleaned_up,
    kill_run,
    start_cv,
    train_workers,
    wait_for,
)

# Three folds on two CPUs: folds 0 and 1 train together, then fold 2 alone on both CPUs (a second phase). 50 steps
# leave room for three stops, each a checkpoint or two (every 5 steps) past the one before (a run stopped at steps
# 10, 15 and 20 when measured); fold 2 trains only in the last run.
STEPS = 50
RUN = [f"train.max_steps={STEPS}", "cluster.num_cpus=2"]
FIRST_PHASE = (0, 1)


def latest_checkpoint(out, fold) -> dict:
    """The metrics of the newest checkpoint Ray Train registered for ``fold`` ({} before the first): ``step``, and
    ``start_step``, the step the training process that wrote it had resumed from."""
    snap = out / "ray" / f"fold={fold}" / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def checkpointed_steps(out) -> dict[int, int]:
    return {k: latest_checkpoint(out, k).get("step", 0) for k in FIRST_PHASE}


@pytest.mark.slow  # four runs of orchestrator.cv on a local Ray cluster, one run directory
def test_a_run_killed_then_interrupted_twice_resumes_each_time_and_finishes(tmp_path):
    out = tmp_path / "run"
    stops = dict.fromkeys(FIRST_PHASE, 0)  # each first-phase fold's checkpointed step when the run last stopped
    for how in ("SIGKILL", "SIGINT", "SIGTERM"):
        proc = start_cv(out, "0-2", *RUN)
        with cleaned_up(proc):
            wait_for(lambda before=stops: any(steps > before[k] for k, steps in checkpointed_steps(out).items()), 240,
                     f"a checkpoint past {stops} ({how})", proc)
            if how == "SIGKILL":
                kill_run(proc)  # driver, Ray and workers: the whole run dies at once
                proc.wait(timeout=60)
                stdout, took = "", 0.0
            else:
                proc.send_signal(getattr(signal, how))  # to the driver alone, as `kill` does
                t0 = time.time()
                stdout, _ = proc.communicate(timeout=120)
                took = time.time() - t0
        for k in FIRST_PHASE:  # this piece continued each fold from the checkpoint the last stop left
            ckpt = latest_checkpoint(out, k)
            if ckpt.get("step", 0) > stops[k]:
                assert ckpt["start_step"] == stops[k], f"{how}: fold {k} did not resume from step {stops[k]}: {ckpt}"
        assert not (out / "report.json").exists(), f"{how}: a stopped run wrote a report"
        assert not (out / "ray" / "fold=2").exists(), f"{how}: the second phase started after the stop"
        if how != "SIGKILL":
            assert proc.returncode == 130, f"{how}: exit {proc.returncode}: {stdout[-3000:]}"
            assert took < 60, f"{how}: took {took:.0f} s to stop: {stdout[-3000:]}"
            assert "interrupted; the same command resumes" in stdout, f"{how}: {stdout[-3000:]}"
            assert "training folds [2]" not in stdout and "failed" not in stdout, f"{how}: {stdout[-3000:]}"
        stops = checkpointed_steps(out)

    unfinished = [k for k in FIRST_PHASE if not (out / f"fold={k}" / "metrics.json").exists()]
    assert unfinished, "both first-phase folds finished before the last stop: nothing left to resume"
    # The last rerun finishes, through one more fault: fold 2's Ray Train worker killed by pid (SIGKILL) once the fold
    # has a checkpoint. Ray Train restarts the worker group, which resumes from that checkpoint.
    proc = start_cv(out, "0-2", *RUN)
    with cleaned_up(proc):
        wait_for(lambda: checkpoints(out, 2), 400, "fold 2's first checkpoint in the last rerun", proc)
        victims = train_workers(proc.pid)  # the first phase is over: fold 2's worker alone
        assert victims, "no Ray Train worker process found"
        for v in victims:
            os.kill(v.pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-4000:]
    restarted = json.loads((out / "fold=2" / "metrics.json").read_text())
    assert restarted["steps"] == STEPS and restarted["resumed_from_step"] >= 5, (restarted, stdout[-3000:])
    for k in unfinished:
        metrics = json.loads((out / f"fold={k}" / "metrics.json").read_text())
        assert metrics["steps"] == STEPS, (k, metrics)
        assert metrics["resumed_from_step"] == stops[k], f"fold {k}: the last rerun did not resume from {stops[k]}"
    assert max(stops.values()) >= 15, stops  # three stops, each past a newer checkpoint (every 5 steps)
    check_oof(out, {0, 1, 2})
