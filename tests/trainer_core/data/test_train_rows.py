"""Honest CV with the training-row levers: neither train.swap_augment nor data.extra_train_path lets a held-out row,
its prompt or its label into its own fold's training."""

import numpy as np
import pandas as pd
import pytest

from tests.conftest import CONFIGS, DATA, arena_row
from trainer_core.config import load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.data.train_rows import fold_training_rows, load_extra_rows
from trainer_core.fold import data as fold_data
from trainer_core.fold import loop as fold_module

FOLD = 1


@pytest.fixture(scope="module")
def rows():
    return assign_folds(load_rows(DATA, max_rows=60), 5)


@pytest.fixture
def extra_path(tmp_path, rows):
    """Six extra rows: three reuse a held-out row's prompt (one with outer whitespace added), three are new."""
    held = rows[rows["fold"] == FOLD].head(3)
    shared = [arena_row(1000 + i, "tie", prompt=[p + (" " if i == 0 else "")])
              for i, p in enumerate(held["prompt"])]
    new = [arena_row(2000 + i, "b", prompt=[f"a prompt nobody held out {i}"]) for i in range(3)]
    path = tmp_path / "extra.csv"
    pd.DataFrame(shared + new).to_csv(path, index=False)
    return path


def held_out_keys(rows):
    held = rows[rows["fold"] == FOLD]
    return set(held["prompt"].str.strip()), set(zip(held["prompt"], held["response_a"], held["response_b"]))


def assert_no_held_out_row(train, rows):
    prompts, triples = held_out_keys(rows)
    assert not set(train["prompt"].str.strip()) & prompts
    seen = set(zip(train["prompt"], train["response_a"], train["response_b"]))
    swapped = {(p, b, a) for p, a, b in triples}
    assert not seen & (triples | swapped), "a held-out row (as given or swapped) is in its fold's training"


def test_swap_augment_adds_every_training_row_swapped_and_nothing_held_out(rows):
    plain = fold_training_rows(rows, FOLD, None, swap_augment=False)
    aug = fold_training_rows(rows, FOLD, None, swap_augment=True)
    assert len(aug.rows) == 2 * len(plain.rows) == 2 * (rows["fold"] != FOLD).sum()
    assert_no_held_out_row(aug.rows, rows)
    swapped = aug.rows[aug.rows["source"] == "swapped"].reset_index(drop=True)
    own = plain.rows.reset_index(drop=True)
    assert (swapped["response_a"] == own["response_b"]).all() and (swapped["response_b"] == own["response_a"]).all()
    assert (swapped["label"].to_numpy() == np.array([1, 0, 2])[own["label"].to_numpy()]).all()  # ties stay ties
    assert aug.counts()["n_swapped_train_rows"] == len(own)


def test_extra_rows_sharing_a_held_out_prompt_are_dropped_and_counted(rows, extra_path):
    extra = load_extra_rows(str(extra_path))
    for swap in (False, True):
        got = fold_training_rows(rows, FOLD, extra, swap_augment=swap)
        assert got.n_extra == 3 and got.n_extra_dropped == 3
        assert_no_held_out_row(got.rows, rows)
        assert set(got.rows.loc[got.rows["source"] == "extra", "id"]) == {2000, 2001, 2002}
    other = fold_training_rows(rows, (FOLD + 1) % 5, extra, swap_augment=False)
    assert other.n_extra == 6 and other.n_extra_dropped == 0  # those prompts are held out only in FOLD


def test_train_fold_encodes_only_honest_rows_and_reports_the_counts(tmp_path, rows, extra_path, monkeypatch):
    """The real fold loop, levers on: the rows it encodes for training hold no held-out row, prompt or label."""
    encoded = []
    real_encode = fold_data.encode
    monkeypatch.setattr(fold_data, "encode",
                        lambda df, tok, cfg: encoded.append(df.copy()) or real_encode(df, tok, cfg))
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.max_rows=60", "data.max_length=64", "train.max_steps=2",
                                               "train.swap_augment=true", f"data.extra_train_path={extra_path}"])
    validate(cfg)
    res = fold_module.train_fold(cfg, FOLD, rows, tmp_path / "fold")
    train, val = encoded[0], encoded[1]
    assert_no_held_out_row(train, rows)
    assert sorted(val["id"]) == sorted(rows.loc[rows["fold"] == FOLD, "id"])
    m = res.metrics.to_dict()
    assert m["n_train_rows"] == (rows["fold"] != FOLD).sum()
    assert (m["n_extra_train_rows"], m["extra_dropped_shared_prompt"]) == (3, 3)
    assert m["n_swapped_train_rows"] == m["n_train_rows"] + 3 == len(train) // 2


def test_extra_rows_file_is_validated_like_the_main_file(tmp_path):
    bad = tmp_path / "extra.csv"
    pd.DataFrame([arena_row(1), {**arena_row(2), "winner_model_a": 3}]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"extra.csv: columns winner_model_a.*id 2"):
        load_extra_rows(str(bad))


def test_one_prompt_normaliser_serves_fold_by_prompt_and_the_extra_rows_drop(tmp_path):
    # 20 prompts, each twice: once as is, once with outer whitespace. fold_by=prompt must keep each pair in one fold
    # (raw text would see 40 prompts and split pairs), and an extra row of either spelling must be dropped from the
    # fold that holds the prompt out: both decisions read prompts through arena.prompt_key.
    raw = [arena_row(2 * i + j, ("a", "b", "tie")[(i + j) % 3], prompt=[f"question {i}" + ("  \n" if j else "")])
           for i in range(20) for j in (0, 1)]
    pd.DataFrame(raw).to_csv(tmp_path / "d.csv", index=False)
    rows = assign_folds(load_rows(tmp_path / "d.csv"), 5, "prompt")
    assert (rows.groupby(rows["prompt"].str.strip())["fold"].nunique() == 1).all()
    extra = pd.DataFrame([arena_row(500 + i, "a", prompt=[f" question {i}"]) for i in range(20)])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    extra = load_extra_rows(tmp_path / "extra.csv")
    for k in range(5):
        held = set(rows.loc[rows["fold"] == k, "prompt"].str.strip())
        tr = fold_training_rows(rows, k, extra, swap_augment=False)
        assert tr.n_extra_dropped == sum(f"question {i}" in held for i in range(20)) > 0
        assert not set(tr.rows.loc[tr.rows["source"] == "extra", "prompt"].str.strip()) & held
