"""A fold's TensorBoard event files read back (the report's loss curve, ``efficiency``'s timeline) through
TensorBoard's public ``EventAccumulator``, quietly: TensorBoard logs "No path found after <file>" at INFO for every file
it finishes, which the commands' INFO console would otherwise print once per fold at the end of every run."""

from __future__ import annotations

import logging
from pathlib import Path


def scalars(path: str | Path, tag: str) -> list | None:
    """Every point of the scalar ``tag`` in the events file or folder ``path`` (TensorBoard's ``ScalarEvent``s:
    ``wall_time``, ``step``, ``value``), none sampled away; None when ``tag`` is not there."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0 = keep every point, not a sample
    acc.Reload()
    if tag not in acc.Tags().get(SCALARS, []):
        return None
    return acc.Scalars(tag)
