"""Reading an arena test file and turning its rows into token ids, exactly as the project trained on them.

The text rules themselves (JSON turns, the U+FFFD repair, the template, truncation, the pairwise layout) are in
``arena_text.py`` beside this file: the project's own ``trainer_core/data/text.py``, copied into the export, so the
predictor reads text by the very code that training did. The settings (``max_length``, truncation, prompt share, EOS)
come from ``export_config.json``. Needs pandas and numpy only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from arena_text import TEXT_COLUMNS, length_features, parse_turns, read_frame, repair_text
from arena_text import encode as encode_text


class InputError(ValueError):
    """A test file that cannot be scored; the message is one line naming the file, column and ids."""


def read_test(path: str | Path) -> pd.DataFrame:
    """id (int64), prompt, response_a, response_b (joined text) of a CSV or parquet in the arena format."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    df = read_frame(path)
    missing = [c for c in ("id", *TEXT_COLUMNS) if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    ids = pd.to_numeric(df["id"], errors="coerce")
    if ids.isna().any() or not (ids == ids.round()).all():
        raise InputError(f"{path}: column 'id': missing or non-integer values")
    out = pd.DataFrame({"id": ids.astype("int64").values})
    for col in TEXT_COLUMNS:
        parsed = [parse_turns(v) for v in df[col].values]
        bad = [int(out["id"].iat[i]) for i, p in enumerate(parsed) if p is None]
        if bad:
            raise InputError(f"{path}: column '{col}': ids {bad[:5]}: not a JSON list of strings")
        out[col] = [repair_text(p)[0] for p in parsed]
    return out


def swap_responses(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with response a and b exchanged (test-time augmentation)."""
    out = rows.copy()
    out["response_a"], out["response_b"] = rows["response_b"].values, rows["response_a"].values
    return out


def encode(df: pd.DataFrame, tok, spec: dict, head: str) -> list:
    """Rows as the exported head reads them; ``spec``: export_config.json's ``text``."""
    return encode_text(df, tok, head, spec["max_length"], spec["truncation"], spec["prompt_share"],
                       spec["add_eos_token"])


def features(df: pd.DataFrame, tok, spec: dict):
    """(N, 6) untruncated length features of the rows for a run with ``model.length_features`` (export_config.json's
    ``length_features``), else None: arena_text.length_features, the function training used."""
    return length_features(df, tok) if spec.get("length_features") else None
