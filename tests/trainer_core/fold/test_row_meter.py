"""predict's progress line: rows/s from the start of scoring (the model load does not count; the first batch, which
compiles, does), an ETA over both TTA passes, and no line more often than asked."""

from trainer_core.fold import inference
from trainer_core.fold.inference import RowMeter


def test_rate_eta_and_the_swapped_pass(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(inference.time, "perf_counter", lambda: now[0])
    lines = []
    meter = RowMeter("run fold 0", total=400, log=lines.append, every=10.0)  # scoring starts: the clock too
    now[0] += 4.0  # the first batch compiles its graphs
    meter(50, 200)
    now[0] += 3.0
    meter(100, 200)
    assert lines == []  # within 10 s of the meter's start
    now[0] += 3.0
    meter(150, 200)
    assert meter.rate() == 15.0  # 150 rows scored / 10 s since scoring started, the first batch's compiling included
    assert lines == ["run fold 0: 150/400 rows, 15.0 rows/s, eta 17s"]
    meter.offset = 200  # the swapped pass counts on from the first pass's rows
    now[0] += 10.0
    meter(100, 200)
    assert lines[-1] == "run fold 0: 300/400 rows, 15.0 rows/s, eta 7s"
