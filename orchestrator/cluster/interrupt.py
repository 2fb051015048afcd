"""Ctrl-C and SIGTERM stop a run: the folds stop, their checkpoints and every finished fold stay, Ray shuts down, and
the command says that rerunning it resumes (exit status 130, as a shell reports an interrupted command).

The handler here takes both signals (Tune's own SIGINT handler is turned off with its documented
``TUNE_DISABLE_SIGINT_HANDLER``: it leaves no trace the caller could read, and a phase it stopped looked like a phase
whose folds had ended, so the next phase started). It records the request, and while Tune runs a phase it passes the
request on as SIGUSR1, which Tune handles exactly as its own Ctrl-C: the experiment's state is saved with the running
trials still unfinished (a rerun's ``Tuner.restore`` resumes them) and the trials are stopped. Between phases the
request is checked before the next one starts. A second signal stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_CODE = 130  # 128 + SIGINT
MESSAGE = "interrupted; the same command resumes (finished folds and the last checkpoints are kept)"
_state: dict = {"signal": None}


def install() -> None:
    """Handle SIGINT and SIGTERM in this (main) thread. Call it after ``ray.init``, which sets its own SIGTERM handler
    (``sys.exit``: the run would die without a word and with status 15)."""
    _state["signal"] = None
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by every Tuner.fit; the local cluster has started already
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _on_signal(signum, frame) -> None:
    if _state["signal"] is not None:
        raise KeyboardInterrupt  # asked twice: stop now
    _state["signal"] = signal.Signals(signum).name
    print(f"{_state['signal']} received: stopping the folds (checkpoints are kept; send it again to stop at once)",
          file=sys.stderr, flush=True)
    if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's stop handler, installed by Tuner.fit
        os.kill(os.getpid(), signal.SIGUSR1)


def requested() -> bool:
    """Whether the run was asked to stop."""
    return _state["signal"] is not None


def reset() -> None:
    """Forget a request (tests call several runs in one process)."""
    _state["signal"] = None
