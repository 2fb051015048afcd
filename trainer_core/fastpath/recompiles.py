"""Counting what ``torch.compile`` compiles again while a fold runs (``recompilations`` in its ``metrics.json``).

Through torch's documented logging switch only: ``torch._logging.set_logs(recompiles=True)`` turns on dynamo's
"recompiles" log, one record per recompilation, naming the function and the guards that failed (what
``TORCH_LOGS=recompiles`` prints); a ``logging.Handler`` on the ``torch._dynamo`` logger counts those records. The
first compilation of a function is not counted; every later version of it is, so a model whose layers all share
their graphs counts one per grad mode and shape regime (trainer_core.fastpath.compile).

Scoped: the switch is turned on by the first counter that starts and back to torch's defaults
(``torch._logging.set_logs()``) by the last that stops. ``TORCH_LOGS`` set in the environment takes precedence over
``set_logs`` (torch's rule): then the count is only known when it names ``recompiles`` (or ``recompiles_verbose``),
else :attr:`RecompileCounter.count` is None.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter

import torch

_MESSAGE = re.compile(r"Recompiling function (\S+)")
_lock = threading.Lock()
_active = 0  # counters running in this process: the switch is on while any runs


def _env_decides() -> bool:
    return bool(os.environ.get("TORCH_LOGS"))


def _env_logs_recompiles() -> bool:
    names = {n.strip().lstrip("+") for n in os.environ.get("TORCH_LOGS", "").split(",")}
    return bool(names & {"recompiles", "recompiles_verbose"})


class RecompileCounter(logging.Handler):
    """Counts recompilations between :meth:`start` and :meth:`stop` (or inside ``with``). ``count``: how many (None
    when ``TORCH_LOGS`` hides them); ``functions``: how many per function name."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.functions: Counter[str] = Counter()
        self.running = False

    @property
    def count(self) -> int | None:
        if _env_decides() and not _env_logs_recompiles():
            return None
        return sum(self.functions.values())

    def emit(self, record: logging.LogRecord) -> None:
        match = _MESSAGE.match(record.getMessage())
        if match:
            self.functions[match.group(1)] += 1

    def start(self) -> RecompileCounter:
        global _active
        if self.running:
            return self
        with _lock:
            if _active == 0 and not _env_decides():
                torch._logging.set_logs(recompiles=True)
            _active += 1
        logging.getLogger("torch._dynamo").addHandler(self)
        self.running = True
        return self

    def stop(self) -> None:
        global _active
        if not self.running:
            return
        logging.getLogger("torch._dynamo").removeHandler(self)
        self.running = False
        with _lock:
            _active -= 1
            if _active == 0 and not _env_decides():
                torch._logging.set_logs()  # torch's defaults: recompiles off

    def summary(self) -> str:
        """``N recompilations (function k, ...)`` for logs."""
        if self.count is None:
            return "recompilations not counted (TORCH_LOGS is set without recompiles)"
        parts = ", ".join(f"{name} {n}" for name, n in self.functions.most_common())
        return f"{self.count} recompilations" + (f" ({parts})" if parts else "")

    def __enter__(self) -> RecompileCounter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
