"""Which rows a fold trains on: the other folds' rows, plus ``data.extra_train_path`` rows, plus (with
``train.swap_augment``) every one of those again with responses a/b swapped.

Honest CV is decided here, so it is one pure function with no model in it (tests check it directly): a held-out row
never enters its fold's training, not as itself, not swapped, and not as an extra row that shares its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from trainer_core.data.arena import load_rows, prompt_key
from trainer_core.data.tta import swap_responses

TRAIN_COLUMNS = ["id", "prompt", "response_a", "response_b", "label"]


@dataclass
class TrainRows:
    rows: pd.DataFrame  # id, prompt, response_a, response_b, label, source (fold | extra | swapped), origin
    # (fold | extra: where a swapped row came from)
    n_fold_rows: int  # rows of the other folds
    n_extra: int  # extra rows kept for this fold
    n_extra_dropped: int  # extra rows dropped: their prompt is also in the held-out fold

    def counts(self) -> dict:
        """The fold metrics that say what the fold trained on."""
        return {"n_extra_train_rows": self.n_extra, "extra_dropped_shared_prompt": self.n_extra_dropped,
                "n_swapped_train_rows": int((self.rows["source"] == "swapped").sum())}


def load_extra_rows(path: str | None) -> pd.DataFrame | None:
    """The validated extra training rows (the same checks and errors as the main file), or None without a path."""
    return load_rows(path) if path else None


def fold_training_rows(rows: pd.DataFrame, fold: int, extra: pd.DataFrame | None, swap_augment: bool) -> TrainRows:
    """The training rows of ``fold``: ``rows`` outside the fold, ``extra`` rows whose prompt no held-out row has, and
    with ``swap_augment`` each of those once more with responses and labels a/b swapped (ties stay ties)."""
    own = rows[rows["fold"] != fold][TRAIN_COLUMNS].assign(source="fold")
    parts, n_extra, dropped = [own], 0, 0
    if extra is not None and len(extra):
        held_out = set(prompt_key(rows.loc[rows["fold"] == fold, "prompt"]))
        shared = prompt_key(extra["prompt"]).isin(held_out)
        dropped = int(shared.sum())
        kept = extra.loc[~shared, TRAIN_COLUMNS].assign(source="extra")
        n_extra = len(kept)
        parts.append(kept)
    train = pd.concat(parts, ignore_index=True)
    train["origin"] = train["source"]  # fold | extra, kept by the swapped copies (distillation targets need it)
    if swap_augment:
        train = pd.concat([train, swap_responses(train).assign(source="swapped")], ignore_index=True)
    return TrainRows(rows=train, n_fold_rows=len(own), n_extra=n_extra, n_extra_dropped=dropped)
