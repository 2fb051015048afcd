"""A fold's TensorBoard event files read back (the report's loss curve, ``efficiency``'s timeline) through
TensorBoard's public ``EventAccumulator``, quietly: TensorBoard logs "No path found after <file>" at INFO for every file
it finishes, which the commands' INFO console would otherwise print once per fold at the end of every run."""

from __future__ import annotations

import logging
from pathlib import Path


def scalars(path: str | Path, tag: str) -> list | None:
    """Every point of the scalar ``tag`` in the events file or folder ``path`` (TensorBoard's ``ScalarEvent``s:
    ``wall_time``, ``step``, ``value``), none sampled away; None when ``tag`` is not there."""
    return scalars_of(path, (tag,))[tag]


def scalars_of(path: str | Path, tags: tuple[str, ...]) -> dict[str, list | None]:
    """:func:`scalars` of each of ``tags``, from one read of ``path``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0 = keep every point, not a sample
    acc.Reload()
    present = set(acc.Tags().get(SCALARS, []))
    return {tag: acc.Scalars(tag) if tag in present else None for tag in tags}
