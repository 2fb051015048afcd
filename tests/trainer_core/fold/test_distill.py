"""Distillation in the fold loop (train.soft_labels): the loss, the soft labels' checks, and the proof that a student's
fold k learns only from its in-fold soft labels, never from rows a model that saw fold k's labels produced."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CONFIGS, DATA
from trainer_core.config import ConfigError, load_config, validate
from trainer_core.data.arena import DataError, assign_folds, load_rows
from trainer_core.data.soft_labels import IN_FOLD, OOF, check_soft_labels, fold_targets
from trainer_core.fold.distill import distill_loss
from trainer_core.fold.loop import train_fold

N_ROWS, FOLD = 40, 1
P = ["p_a", "p_b", "p_tie"]


@pytest.fixture(scope="module")
def rows():
    return assign_folds(load_rows(DATA, max_rows=N_ROWS), 5)


def in_fold_table(rows, seed=0):
    """Random but valid in-fold soft labels: a row (id, k) for every fold k and each of fold k's training rows."""
    rng = np.random.default_rng(seed)
    parts = [pd.DataFrame({"id": rows.loc[rows["fold"] != k, "id"].to_numpy(), "fold": k}) for k in range(5)]
    table = pd.concat(parts, ignore_index=True)
    table[P] = rng.dirichlet([1, 1, 1], size=len(table))
    return table


def test_distill_loss_is_ce_at_w0_and_kl_at_w1():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    teacher = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert torch.allclose(distill_loss(logits, (labels, teacher), 0.0), F.cross_entropy(logits, labels))
    kl = (teacher * (teacher.log() - torch.log_softmax(logits, -1))).sum(-1).mean()
    assert torch.allclose(distill_loss(logits, (labels, teacher), 1.0), kl)
    # T = 2: both sides softened, scaled by T^2
    t2 = torch.softmax(teacher.log() / 2, -1)
    kl2 = (t2 * (t2.log() - torch.log_softmax(logits / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(distill_loss(logits, (labels, teacher), 1.0, 2.0), kl2)
    student_as_teacher = (labels, torch.softmax(logits, -1))
    assert distill_loss(logits, student_as_teacher, 1.0).abs() < 1e-6  # KL of a distribution with itself


def test_rows_that_only_fill_a_short_batch_count_in_neither_term():
    """Compiled folds fill a short last batch with a repeated row whose label is ignored (fold_data.fill_batch): the
    distillation loss of the filled batch equals that of the real rows alone."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 3, generator=gen)
    teacher = torch.softmax(torch.randn(3, 3, generator=gen), dim=-1)
    labels = torch.tensor([0, 2, 1])
    real = distill_loss(logits, (labels, teacher), weight=0.5, temperature=2.0)
    filled = distill_loss(torch.cat([logits, logits[:1]]), (torch.cat([labels, torch.tensor([-100])]),
                                                            torch.cat([teacher, teacher[:1]])), weight=0.5,
                          temperature=2.0)
    torch.testing.assert_close(filled, real)


def test_swapped_and_extra_training_rows_get_matching_targets(rows, tmp_path):
    """With train.swap_augment a swapped copy learns the teacher's p_a and p_b exchanged; an extra row (which no
    teacher scored) learns its own label; the other folds' rows learn the teacher's probabilities as written."""
    from trainer_core.data.soft_labels import training_targets
    from trainer_core.data.train_rows import fold_training_rows

    table = pd.DataFrame({"id": rows["id"].to_numpy()})  # OOF-shaped: one teacher row per id
    table[P] = np.random.default_rng(1).dirichlet([1, 1, 1], size=len(table))
    path = tmp_path / "soft.parquet"
    table.to_parquet(path)
    extra = rows.head(2).assign(id=[10_000, 10_001], prompt=["an extra prompt", "another one"])
    train = fold_training_rows(rows, 0, extra, swap_augment=True).rows
    got = training_targets(path, 0, rows, train)
    teacher = table.set_index("id")[["p_a", "p_b", "p_tie"]]
    for i, r in train.iterrows():
        if r["origin"] == "extra":
            want = np.eye(3)[r["label"]]
        else:
            want = teacher.loc[r["id"]].to_numpy()
            want = want[[1, 0, 2]] if r["source"] == "swapped" else want
        np.testing.assert_allclose(got[i], want)
    assert (train["source"] == "swapped").sum() == len(train) // 2 and (train["origin"] == "extra").sum() == 4


def test_soft_labels_are_checked_one_line_per_problem(rows, tmp_path):
    good = in_fold_table(rows)
    good.to_parquet(tmp_path / "in_fold.parquet")
    assert check_soft_labels(tmp_path / "in_fold.parquet", rows, [0, 1, 2, 3, 4], 5) == IN_FOLD
    oof = rows[["id", "fold"]].copy()  # what predict --soft-labels writes: each row under its own held-out fold
    oof[P] = 1 / 3
    oof.to_csv(tmp_path / "oof.csv", index=False)
    assert check_soft_labels(tmp_path / "oof.csv", rows, [0, 1], 5) == OOF
    cases = {
        "missing": (good.drop(index=good.index[(good["fold"] == 2)][:3]), "no soft label for fold 2's training ids"),
        "other_folds": (pd.concat([good, good.head(2).assign(fold=7)]), "outside 0..4"),
        "own_fold": (pd.concat([good, oof.head(2)]), "listed under their own held-out fold"),
        "not_one": (good.assign(p_tie=good["p_tie"] + 0.01 * (good.index == 7)), "must be finite, >= 0 and sum to 1"),
    }
    for name, (table, words) in cases.items():
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        with pytest.raises(DataError) as e:
            check_soft_labels(tmp_path / f"{name}.csv", rows, [0, 1, 2, 3, 4], 5)
        assert words in str(e.value) and len(str(e.value).splitlines()) == 1 and f"{name}.csv" in str(e.value)


def test_distill_config_is_validated():
    for bad, words in (("train.distill_weight=1.5", "distill_weight"), ("train.distill_temperature=0", "temperature")):
        with pytest.raises(ConfigError, match=words):
            validate(load_config(CONFIGS / "smoke.yaml", [bad]))


def test_fold_targets_are_exactly_the_files_rows_for_that_fold(rows, tmp_path):
    table = in_fold_table(rows)
    table.to_parquet(tmp_path / "s.parquet")
    train_ids = rows.loc[rows["fold"] != FOLD, "id"].to_numpy()
    got = fold_targets(tmp_path / "s.parquet", FOLD, rows, train_ids)
    own = table[table["fold"] == FOLD].set_index("id").loc[train_ids, P].to_numpy()
    assert np.allclose(got, own)
    for k in (0, 2):  # the same ids under another fold carry other (random) values: none of them was picked
        other = table[table["fold"] == k].set_index("id")
        shared = [i for i in train_ids if i in other.index]
        assert not np.isclose(got[np.isin(train_ids, shared)], other.loc[shared, P].to_numpy()).all(1).any()


def test_student_fold_never_reads_soft_labels_of_other_folds(rows, tmp_path):
    """Train fold 1 with in-fold soft labels; replacing every row of the file whose fold != 1 (the predictions of
    teacher models that trained on fold 1's labels) leaves its OOF bit for bit the same, while changing the rows
    with fold == 1 changes it (so the soft labels are really used)."""
    table = in_fold_table(rows, seed=1)
    mine = table["fold"] == FOLD

    def student(tag, t):
        t.to_parquet(tmp_path / f"{tag}.parquet")
        cfg = load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}", "data.max_length=32", "train.max_steps=3",
                                                   f"train.soft_labels={tmp_path / f'{tag}.parquet'}",
                                                   "train.distill_weight=1.0"])
        validate(cfg)
        train_fold(cfg, FOLD, rows, tmp_path / tag)
        return pd.read_parquet(tmp_path / tag / "oof.parquet")[P].to_numpy()

    base = student("base", table)
    others_changed = table.copy()
    others_changed.loc[~mine, P] = np.random.default_rng(9).dirichlet([1, 1, 1], size=(~mine).sum())
    assert np.array_equal(student("others_changed", others_changed), base)
    own_changed = table.copy()
    own_changed.loc[mine, P] = np.random.default_rng(9).dirichlet([1, 1, 1], size=mine.sum())
    assert not np.allclose(student("own_changed", own_changed), base, atol=1e-6)
