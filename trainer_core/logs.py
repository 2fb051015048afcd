"""Libraries that log the same line at every call, kept to one line each (standard library only: the exported predictor
carries this file as ``arena_logs.py``, as it carries ``trainer_core/data/text.py``).

bitsandbytes' int8 matmul logs "MatMul8bitLt: inputs will be cast from <dtype> to float16 during quantization" at every
call whose input is not fp16 (the fp32 norms and bf16 activations feed it): 9,822 lines for 400 rows of a 9B model on
an H100, and one line a matmul for the whole of an int8 fold's training and prediction, into the Ray workers' logs.
"""

from __future__ import annotations

import logging

CHATTY_LOGGERS = ("bitsandbytes.autograd._functions",)


class OnceFilter(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_repeated_logs() -> None:
    """Each of :data:`CHATTY_LOGGERS` logs a repeated line once: a process-wide filter, added once (idempotent)."""
    for name in CHATTY_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, OnceFilter) for f in log.filters):
            log.addFilter(OnceFilter())
