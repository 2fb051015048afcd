"""predict's progress line: rows/s from the first scored batch on (the model load does not count), an ETA over both
TTA passes, and no line more often than asked."""

from trainer_core.fold import inference
from trainer_core.fold.inference import RowMeter


def test_rate_eta_and_the_swapped_pass(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(inference.time, "perf_counter", lambda: now[0])
    lines = []
    meter = RowMeter("run fold 0", total=400, log=lines.append, every=10.0)
    meter(50, 200)  # the first batch starts the clock
    now[0] += 5.0
    meter(100, 200)
    assert lines == []  # within 10 s of the last line
    now[0] += 5.0
    meter(150, 200)  # 100 rows in 10 s since the first batch
    assert meter.rate() == 15.0  # 150 rows scored / 10 s
    assert lines == ["run fold 0: 150/400 rows, 15.0 rows/s, eta 17s"]
    meter.offset = 200  # the swapped pass counts on from the first pass's rows
    now[0] += 10.0
    meter(100, 200)
    assert lines[-1] == "run fold 0: 300/400 rows, 15.0 rows/s, eta 7s"
