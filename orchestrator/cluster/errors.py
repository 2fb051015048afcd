"""The line of a Ray error worth printing: the exception that started it, not Ray's wrappers around it."""

from __future__ import annotations

from pathlib import Path


def root_cause(text: str) -> str:
    """The innermost exception line of a Ray error text, e.g. "ValueError: ..." rather than Ray's wrappers."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    causes = [ln for ln in lines if ":" in ln and ln.split(":", 1)[0].replace(".", "").isidentifier()
              and ln.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception", "Interrupt"))
              and "WorkerGroupError" not in ln and "RayTaskError" not in ln]
    if not causes:
        return lines[-1] if lines else "unknown error"
    cause = causes[-1]
    after = lines[lines.index(cause) + 1:]
    if cause.endswith(":") and after:
        # a wrapper whose message is the next line, e.g. Ray Train's "ControllerError: Training failed due to
        # controller error:" then "The worker group startup timed out after 60.0 seconds ..."
        return after[0]
    return cause


def trial_root_cause(trial) -> str | None:
    """The root cause of a failed Tune trial, from the error file Tune wrote for it (None when there is none yet)."""
    path = getattr(trial, "error_file", None)
    if not path or not Path(path).is_file():
        return None
    return root_cause(Path(path).read_text(errors="replace"))
