"""A sweep trial's status from Tune's public Result (metrics and error): Tune marks the last result ``done`` when a
trial ended, by itself or stopped by the scheduler; the reducer's final report says ``complete``. The real sweep in
test_tune.py shows both on Tune's own results; here each case, including those it cannot easily produce."""

from types import SimpleNamespace

import pytest

from orchestrator.cluster.sweep_trials import trial_records, trial_status


@pytest.mark.parametrize("metrics, error, status", [
    ({"trial_id": "a", "complete": True, "done": True, "loss": 0.9}, None, "complete"),
    ({"trial_id": "b", "interim_log_loss": 3.1, "done": True}, None, "stopped"),    # ASHA ended it early
    ({"trial_id": "c", "interim_log_loss": 1.0, "done": False}, None, "unfinished"),  # the sweep was interrupted
    ({"trial_id": "d"}, None, "unfinished"),                                         # never started
    ({"trial_id": "e", "done": True}, RuntimeError("boom"), "error"),
])
def test_trial_status(metrics, error, status):
    assert trial_status(SimpleNamespace(metrics=metrics, error=error)) == status


def test_trial_records_carry_id_overrides_and_root_cause():
    error = RuntimeError("Traceback ...\nray.exceptions.RayTaskError: wrapper\nValueError: lr must be > 0")
    results = [SimpleNamespace(metrics={"trial_id": "t1", "config": {"train.lr": -1.0}, "done": True}, error=error,
                               config={"train.lr": -1.0})]
    [record] = trial_records(results)
    assert record["trial_id"] == "t1" and record["overrides"] == {"train.lr": -1.0} and record["status"] == "error"
    assert record["error"] == "ValueError: lr must be > 0"
