"""Soft labels for distillation (``train.soft_labels``): read, checked against the run's rows and folds, and each
fold's targets picked.

Two kinds of file, told apart by their ``fold`` column:

- **in-fold** (``orchestrator.predict --soft-labels PATH --in-fold``): rows keyed by (id, fold); the row (i, k) is
  fold k's teacher model's prediction on row i, one of fold k's *training* rows (so i's own fold is never k). The
  student's fold k uses exactly the rows with fold == k: predictions of a model that never saw a fold-k label. Honest.
- **OOF** (no ``fold`` column, or ``fold`` equal to each row's own held-out fold, as ``predict --soft-labels`` writes):
  one row per id, predicted by the teacher fold that held it out, a model trained on every *other* fold, fold k
  included. A student's fold k learning from them learns from fold-k labels at one remove, so its CV is optimistic
  (what the Kaggle winners did; the report says so).

Probabilities must be finite, non-negative and sum to 1 per row. Everything here is checked before Ray starts.

Provenance: ``orchestrator.predict`` writes, in the parquet file's schema metadata (key :data:`PROVENANCE_KEY`), which
run made the file, the kind, that run's data file (sha256), ``fold_by``, ``n_folds``, a hash of its (id, fold)
assignment and the reasons its own CV is optimistic (a teacher that learned from OOF soft labels, an ensemble with
such a member, ...). A student refuses a file made on other data or other folds (:func:`check_provenance`), and a
teacher's optimism passes on to every student down the chain: in-fold labels of a teacher whose fold-k model had seen
fold k's labels at one remove carry them on. A file without the metadata (a CSV, a file made elsewhere) is accepted as
before; the report then says its teacher is unknown.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from trainer_core.data.arena import DataError, read_table
from trainer_core.data.tta import SWAP_CLASSES

SOFT_COLUMNS = ["p_a", "p_b", "p_tie"]
IN_FOLD, OOF = "in_fold", "oof"
SUM_TOLERANCE = 1e-4  # parquet float32 round trips and CSV text keep sums within this
PROVENANCE_KEY = b"gemma2_cv.soft_labels.provenance"  # parquet schema metadata: JSON, see the module docstring


def _ids(ids, limit: int = 5) -> str:
    ids = sorted(set(int(i) for i in ids))
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return f"id{'s' if len(ids) > 1 else ''} " + ", ".join(map(str, ids[:limit])) + more


def read_soft_labels(path: str | Path) -> pd.DataFrame:
    """The file's id, p_a, p_b, p_tie [, fold] columns, typed and checked row by row (DataError, one line each)."""
    path = Path(path)
    table = read_table(path)
    missing = [c for c in ["id", *SOFT_COLUMNS] if c not in table.columns]
    if missing:
        raise DataError(f"{path}: soft labels need columns id, p_a, p_b, p_tie; missing {', '.join(missing)}")
    cols = ["id", *SOFT_COLUMNS] + (["fold"] if "fold" in table.columns else [])
    out = table[cols].apply(pd.to_numeric, errors="coerce")
    errs = []
    for col in cols:
        if col in ("id", "fold") and (out[col].isna().any() or (out[col] % 1 != 0).any()):
            errs.append(f"{path}: column '{col}': missing or non-integer values at rows "
                        f"{', '.join(map(str, np.flatnonzero(out[col].isna() | (out[col] % 1 != 0))[:5]))}")
    if errs:
        raise DataError("\n".join(errs))
    out[["id", *cols[4:]]] = out[["id", *cols[4:]]].astype("int64")
    p = out[SOFT_COLUMNS].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(p).all(1) | (p < 0).any(1) | (np.abs(np.nan_to_num(p).sum(1) - 1) > SUM_TOLERANCE)
    if bad.any():
        raise DataError(f"{path}: columns p_a, p_b, p_tie: {_ids(out['id'][bad])}: probabilities must be finite, "
                        f">= 0 and sum to 1")
    return out


def soft_label_kind(path: str | Path, table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """IN_FOLD or OOF (module docstring), refusing a file whose ``fold`` column fits neither or repeats a key."""
    key = ["id", "fold"] if "fold" in table.columns else ["id"]
    dup = table[table.duplicated(key, keep=False)]
    if len(dup):
        same = " for the same fold" if len(key) > 1 else ""
        raise DataError(f"{path}: {_ids(dup['id'])} appear more than once{same}")
    if "fold" not in table.columns:
        return OOF
    own_fold = table["id"].map(rows.set_index("id")["fold"])
    known = own_fold.notna()
    own = (table["fold"] == own_fold) & known
    if own[known].all() and table.groupby("id").size().max() == 1:
        return OOF  # predict --soft-labels: each row under the fold that held it out
    if own.any():
        raise DataError(f"{path}: column 'fold': {_ids(table['id'][own])} are listed under their own held-out fold "
                        f"while other rows are in-fold soft labels; a fold's soft labels must come from its own "
                        f"training rows (predict --soft-labels PATH --in-fold)")
    return IN_FOLD


def check_soft_labels(path: str | Path, rows: pd.DataFrame, folds: list[int], n_folds: int) -> str:
    """Refuse (DataError, one line per problem) soft labels that do not cover every training row of every requested
    fold, or that name other folds; returns their kind (IN_FOLD or OOF). ``rows``: the run's rows with folds."""
    table = read_soft_labels(path)
    kind = soft_label_kind(path, table, rows)
    errs = []
    if kind == IN_FOLD:
        other = table[~table["fold"].between(0, n_folds - 1)]
        if len(other):
            errs.append(f"{path}: column 'fold': {_ids(other['id'])} name folds outside 0..{n_folds - 1} "
                        f"(the teacher used other folds; its data.n_folds must be {n_folds})")
    for k in folds:
        needed = set(rows.loc[rows["fold"] != k, "id"])
        have = set(table.loc[table["fold"] == k, "id"]) if kind == IN_FOLD else set(table["id"])
        if needed - have:
            errs.append(f"{path}: no soft label for fold {k}'s training {_ids(needed - have)}"
                        + (" (in-fold soft labels need a row (id, fold=k) for each)" if kind == IN_FOLD else ""))
    if errs:
        raise DataError("\n".join(errs))
    return kind


def fold_targets(path: str | Path, fold: int, rows: pd.DataFrame, train_ids: np.ndarray) -> np.ndarray:
    """(len(train_ids), 3) soft targets of fold ``fold``'s training rows: in-fold files give only their rows with
    fold == ``fold`` (never a prediction of a model that saw fold ``fold``'s labels); OOF files give every row."""
    table = read_soft_labels(path)
    if soft_label_kind(path, table, rows) == IN_FOLD:
        table = table[table["fold"] == fold]
    by_id = table.set_index("id")[SOFT_COLUMNS]
    missing = np.setdiff1d(train_ids, by_id.index.to_numpy())
    if len(missing):
        raise DataError(f"{path}: no soft label for fold {fold}'s training {_ids(missing)}")
    return by_id.loc[train_ids].to_numpy(dtype=np.float64)


def training_targets(path: str | Path, fold: int, rows: pd.DataFrame, train: pd.DataFrame) -> np.ndarray:
    """(len(train), 3) soft targets of a fold's training rows (``trainer_core.data.train_rows.fold_training_rows``): the
    teacher's for the other folds' rows (``fold_targets``), the same with p_a and p_b exchanged for their a/b-swapped
    copies, and for extra rows, which no teacher scored, their own label (one-hot: the KL term becomes plain
    cross-entropy)."""
    out = np.eye(3)[train["label"].to_numpy()]
    from_folds = (train["origin"] == "fold").to_numpy()
    teacher = np.array(fold_targets(path, fold, rows, train.loc[from_folds, "id"].to_numpy()))  # a writable copy
    swapped = (train.loc[from_folds, "source"] == "swapped").to_numpy()
    teacher[swapped] = teacher[swapped][:, list(SWAP_CLASSES)]
    out[from_folds] = teacher
    return out


def folds_sha256(rows: pd.DataFrame) -> str:
    """SHA-256 of a run's (id, fold) assignment, sorted by id: equal exactly when two runs split the same ids alike."""
    pairs = rows[["id", "fold"]].sort_values("id").to_numpy(dtype=np.int64)
    return hashlib.sha256(np.ascontiguousarray(pairs).tobytes()).hexdigest()


def write_soft_labels(path: str | Path, table: pd.DataFrame, provenance: dict) -> None:
    """Write ``table`` as parquet at ``path`` (the caller makes it atomic), ``provenance`` in its schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(provenance).encode()
    pq.write_table(arrow.replace_schema_metadata(meta), str(path))


def read_provenance(path: str | Path) -> dict | None:
    """The provenance a parquet soft-label file carries (:func:`write_soft_labels`), or None (CSV, no metadata)."""
    import pyarrow.parquet as pq

    if Path(path).suffix.lower() != ".parquet":
        return None
    try:
        meta = pq.read_schema(str(path)).metadata or {}
    except (OSError, ValueError):
        return None
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


def check_provenance(path: str | Path, data_sha256: str, fold_by: str, n_folds: int,
                     rows: pd.DataFrame) -> dict | None:
    """The file's provenance, refused (DataError, one line per problem) when its teacher was trained on another data
    file or split its rows into other folds than this run (``rows``: this run's rows with folds); None when the file
    records none."""
    prov = read_provenance(path)
    if prov is None:
        return None
    teacher = prov.get("teacher_run", "its teacher")
    errs = []
    if prov.get("data_sha256") and prov["data_sha256"] != data_sha256:
        errs.append(f"{path}: made by {teacher} on another data file (sha256 {prov['data_sha256'][:12]}, this run's "
                    f"{data_sha256[:12]}); a student must learn from a teacher of its own rows")
    if (prov.get("fold_by"), prov.get("n_folds")) != (fold_by, n_folds):
        errs.append(f"{path}: made by {teacher} with data.fold_by={prov.get('fold_by')}, data.n_folds="
                    f"{prov.get('n_folds')}; this run has data.fold_by={fold_by}, data.n_folds={n_folds}: other folds")
    elif prov.get("folds_sha256") and prov["folds_sha256"] != folds_sha256(rows):
        errs.append(f"{path}: made by {teacher} on rows split into other folds than this run's (another "
                    f"data.max_rows?); a student's fold k must hold out exactly its teacher's fold k")
    if errs:
        raise DataError("\n".join(errs))
    return prov
