"""Load and validate Chatbot Arena preference data; assign folds.

The text columns hold JSON lists of turns (``["Hi", "How are you?"]``). They are parsed with ``json`` only: the seed
notebook used Python ``eval``, which runs whatever a CSV cell contains. ``null`` turns become empty strings.

Text that UTF-8 cannot encode - lone UTF-16 surrogates from JSON escapes such as ``"\\ud83d"`` (half an emoji; the
real Kaggle train.csv has them) and bytes of the file that are not valid UTF-8 - becomes U+FFFD; the row is kept and
its id reported once as a warning (:attr:`Dataset.repaired_ids`). A U+FFFD that the file itself holds is ordinary text
and is not reported.

Folds (:func:`assign_folds`, ``data.fold_by``): ``id`` (``id % n_folds``), ``row`` (row position % n_folds, what the
seed notebook's code does) or ``prompt`` (scikit-learn's StratifiedGroupKFold: stratified by label, rows that share a
prompt text in one fold).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# the text rules (JSON turns, the U+FFFD repair, how a file is read) are shared with an export's predictor
from trainer_core.data.text import TEXT_COLUMNS, parse_turns, read_frame, repair_text

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
LABEL_NAMES = ("a", "b", "tie")  # label 0, 1, 2
FOLD_BY = ("id", "row", "prompt")
FOLD_SEED = 0  # fold_by=prompt: fixed, so train.seed or a sweep never moves rows between folds


def prompt_key(text: pd.Series) -> pd.Series:
    """The one prompt normaliser: what makes two prompts "the same prompt" for ``data.fold_by=prompt`` and for
    dropping extra training rows that share a held-out prompt (trainer_core.data.train_rows). Outer whitespace is
    ignored: a prompt copied with another trailing newline is the same prompt, and both places must agree, or a row
    kept apart by one would be let through by the other."""
    return text.str.strip()


class DataError(ValueError):
    """Input data that cannot be used; one line per problem, naming the file, column and row ids."""


def _list_text(items: list, limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def _ids_text(ids: list, limit: int = 5) -> str:
    return f"id{'s' if len(ids) > 1 else ''} {_list_text(ids, limit)}"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or parquet file as-is (all CSV cells as strings); raises DataError if unreadable or empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a CSV or parquet file")
    try:
        df = read_frame(path)  # invalid bytes arrive as surrogate escapes, replaced (and counted) in load_dataset
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file for the user
        raise DataError(f"{path}: cannot read as {'parquet' if path.suffix.lower() in ('.parquet', '.pq') else 'CSV'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if len(df) == 0:
        raise DataError(f"{path}: file has a header but no rows")
    return df


def _parse_ids(df: pd.DataFrame, path: Path, errs: list[str]) -> pd.Series | None:
    raw = df["id"]
    bad_rows, ids = [], []
    for i, v in enumerate(raw):
        try:
            if isinstance(v, str):
                v = v.strip()
                iv = int(v) if v and v.lstrip("-").isdigit() else None
            elif isinstance(v, (int, np.integer)):
                iv = int(v)
            elif isinstance(v, (float, np.floating)) and not math.isnan(v) and float(v).is_integer():
                iv = int(v)
            else:
                iv = None
        except (TypeError, ValueError):
            iv = None
        if iv is None:
            bad_rows.append(i + 2 if path.suffix.lower() not in (".parquet", ".pq") else i)
        ids.append(iv)
    if bad_rows:
        where = "lines" if path.suffix.lower() not in (".parquet", ".pq") else "rows"
        errs.append(f"{path}: column 'id': missing or non-integer values at {where} {_list_text(bad_rows)}")
        return None
    s = pd.Series(ids, dtype="int64")
    dup = s[s.duplicated(keep=False)].unique().tolist()
    if dup:
        errs.append(f"{path}: column 'id': duplicate {_ids_text(dup)}")
    neg = s[s < 0].tolist()
    if neg:
        errs.append(f"{path}: column 'id': negative {_ids_text(neg)} (folds are id % n_folds)")
    return s


@dataclass
class Dataset:
    """Validated rows plus what loading changed in them."""

    rows: pd.DataFrame
    repaired_ids: list[int]  # rows whose text held characters UTF-8 cannot encode, now U+FFFD


def load_rows(path: str | Path, *, require_labels: bool = True, max_rows: int | None = None) -> pd.DataFrame:
    """The rows of :func:`load_dataset` (the repaired ids are only logged)."""
    return load_dataset(path, require_labels=require_labels, max_rows=max_rows).rows


def load_dataset(path: str | Path, *, require_labels: bool = True, max_rows: int | None = None) -> Dataset:
    """Validated rows: ``id`` (int64), ``prompt``/``response_a``/``response_b`` (joined text) and, with labels,
    ``label`` (0 = a, 1 = b, 2 = tie). Raises DataError listing every problem found, one per line. Text UTF-8 cannot
    encode becomes U+FFFD; the affected ids are logged once as a warning and returned."""
    path = Path(path)
    df = read_table(path)
    if max_rows is not None:
        df = df.iloc[:max_rows].reset_index(drop=True)
    needed = ("id", *TEXT_COLUMNS, *(LABEL_COLUMNS if require_labels else ()))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(found: {', '.join(map(str, df.columns))})")
    errs: list[str] = []
    ids = _parse_ids(df, path, errs)
    ref = ids if ids is not None else pd.Series(range(len(df)))
    out = pd.DataFrame({"id": ref.values})
    repaired = np.zeros(len(df), dtype=bool)
    for col in TEXT_COLUMNS:
        parsed = [parse_turns(v) for v in df[col].values]
        bad = [ref.iat[i] for i, p in enumerate(parsed) if p is None]
        if bad:
            errs.append(f"{path}: column '{col}': {_ids_text(bad)}: not a JSON list of strings")
        texts = []
        for i, p in enumerate(parsed):
            text, changed = repair_text("" if p is None else p)
            repaired[i] |= changed
            texts.append(text)
        out[col] = texts
    if require_labels:
        onehot = np.zeros((len(df), 3), dtype=np.int64)
        bad_vals: list = []
        for j, col in enumerate(LABEL_COLUMNS):
            vals = pd.to_numeric(df[col], errors="coerce")
            ok = vals.isin([0, 1])
            bad_vals += [ref.iat[i] for i in np.flatnonzero(~ok.values)]
            onehot[:, j] = np.where(ok, vals.fillna(0), 0).astype(np.int64)
        if bad_vals:
            bad_vals = sorted(set(bad_vals), key=list(ref).index)
            errs.append(f"{path}: columns {', '.join(LABEL_COLUMNS)}: {_ids_text(bad_vals)}: values must be 0 or 1")
        not_one = [ref.iat[i] for i in np.flatnonzero(onehot.sum(1) != 1) if ref.iat[i] not in bad_vals]
        if not_one:
            errs.append(f"{path}: columns {', '.join(LABEL_COLUMNS)}: {_ids_text(not_one)}: exactly one must be 1")
        out["label"] = onehot.argmax(1)
    if errs:
        raise DataError("\n".join(errs))
    repaired_ids = [int(i) for i in out["id"].values[repaired]]
    if repaired_ids:
        log.warning("warning: %s: %d row%s held text that UTF-8 cannot encode (lone UTF-16 surrogates such as half an "
                    "emoji, or invalid bytes), replaced by U+FFFD and kept: %s", path, len(repaired_ids),
                    "s" if len(repaired_ids) > 1 else "", _ids_text(repaired_ids, limit=20))
    return Dataset(out, repaired_ids)


def assign_folds(df: pd.DataFrame, n_folds: int, by: str = "id") -> pd.DataFrame:
    """Adds ``fold``, a pure function of the data, so every run and trial sees the same splits. ``by``: ``id`` (id %
    n_folds), ``row`` (row position % n_folds) or ``prompt`` (StratifiedGroupKFold: stratified by label, grouped by
    prompt text as :func:`prompt_key` reads it, seed FOLD_SEED; needs ``label``). DataError when ``prompt`` cannot
    fill every fold."""
    out = df.copy()
    if by == "id":
        out["fold"] = (out["id"] % n_folds).astype("int64")
    elif by == "row":
        out["fold"] = np.arange(len(out), dtype=np.int64) % n_folds
    elif by == "prompt":
        out["fold"] = _prompt_group_folds(out, n_folds)
    else:
        raise ValueError(f"fold_by {by!r} is not one of {', '.join(FOLD_BY)}")
    return out


def _prompt_group_folds(df: pd.DataFrame, n_folds: int) -> np.ndarray:
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    groups = pd.factorize(prompt_key(df["prompt"]))[0]
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < n_folds:
        raise DataError(f"data.fold_by=prompt: {n_groups} distinct prompt{'s' if n_groups != 1 else ''} cannot fill "
                        f"{n_folds} folds")
    folds = np.empty(len(df), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=FOLD_SEED)
    with warnings.catch_warnings():  # "least populated class has only N members": ties in tiny files; folds still fill
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(df)), df["label"].to_numpy(), groups)):
            folds[held_out] = k
    empty = sorted(set(range(n_folds)) - set(folds.tolist()))
    if empty:
        raise DataError(f"data.fold_by=prompt: folds {empty} got no rows ({n_groups} distinct prompts)")
    return folds


def parse_folds(spec: str, n_folds: int) -> list[int]:
    """``'0-4'``, ``'0,2,4'``, ``'3'`` or ``'all'`` -> sorted fold list, each in [0, n_folds)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_folds))
    folds: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                folds.update(range(lo, hi + 1))
            else:
                folds.add(int(part))
        except ValueError:
            raise ValueError(f"--folds {spec!r}: expected e.g. 0-4, 0,2,4 or 3") from None
    bad = sorted(f for f in folds if not 0 <= f < n_folds)
    if bad:
        raise ValueError(f"--folds {spec!r}: fold{'s' if len(bad) > 1 else ''} {bad} outside 0..{n_folds - 1}")
    return sorted(folds)
