"""One fold in-process on the tiny Gemma-2 smoke config (real nf4 + LoRA + 8-bit AdamW on the CPU)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core.config import BLOCK_CAUSAL, TrainConfig, load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.data.batching import epoch_batches, padding_waste, rank_slice
from trainer_core.fold.loop import train_fold
from trainer_core.fold.optim import lr_at
from trainer_core.metrics import log_loss


@pytest.fixture(scope="module")
def smoke_rows():
    return assign_folds(load_rows(DATA, max_rows=60), 5)


def smoke_cfg(*overrides):
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.max_rows=60", "data.max_length=64", *overrides])
    validate(cfg)
    return cfg


def test_fold_writes_the_contract_files(tmp_path, smoke_rows):
    cfg = smoke_cfg("train.max_steps=3", "train.log_every=1")
    reports = []
    res = train_fold(cfg, 1, smoke_rows, tmp_path / "fold=1", report=lambda m, c: reports.append((m, c)),
                     tb_dir=tmp_path / "tb")
    held = smoke_rows[smoke_rows["fold"] == 1]
    oof = pd.read_parquet(tmp_path / "fold=1" / "oof.parquet")
    assert list(oof.columns) == ["id", "fold", "label", "p_a", "p_b", "p_tie"]
    assert sorted(oof["id"]) == sorted(held["id"]) and (oof["fold"] == 1).all()
    assert np.allclose(oof[["p_a", "p_b", "p_tie"]].sum(1), 1.0)
    assert res.metrics.log_loss == pytest.approx(log_loss(oof["label"], oof[["p_a", "p_b", "p_tie"]].to_numpy()))
    assert res.metrics.steps == 3 and res.metrics.n_rows == len(held)
    adapter = tmp_path / "fold=1" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer.json").exists()
    assert (tmp_path / "fold=1" / "config.yaml").exists() and (tmp_path / "fold=1" / "metrics.json").exists()
    assert [m["step"] for m, _ in reports[:-1]] == [1, 2, 3] and reports[-1][0]["done"]
    assert all("train_loss" in m and "cpu_rss_gib" in m for m, _ in reports[:-1])
    assert list((tmp_path / "tb").iterdir()), "TensorBoard events written"


def test_interim_scores_go_with_their_steps_and_tta_goes_beside_the_plain_figures(tmp_path, smoke_rows):
    cfg = smoke_cfg("train.max_steps=3", "train.log_every=1", "train.eval_every=2", "train.interim_eval_rows=4",
                    "train.eval_tta=true")
    reports = []
    res = train_fold(cfg, 3, smoke_rows, tmp_path / "fold=3", report=lambda m, c: reports.append(m))
    interim = {m["step"]: m for m in reports if "interim_log_loss" in m}
    assert list(interim) == [2] and interim[2]["interim_rows"] == 4  # not at the last step: the final score is there
    assert 0 < interim[2]["interim_log_loss"] < 5 and 0 <= interim[2]["interim_accuracy"] <= 1
    oof = pd.read_parquet(tmp_path / "fold=3" / "oof.parquet")
    plain, tta = oof[["p_a", "p_b", "p_tie"]].to_numpy(), oof[["p_a_tta", "p_b_tta", "p_tie_tta"]].to_numpy()
    assert res.metrics.log_loss == pytest.approx(log_loss(oof["label"], plain))
    assert res.metrics.log_loss_tta == pytest.approx(log_loss(oof["label"], tta)) and not np.allclose(plain, tta)
    held = smoke_rows[smoke_rows["fold"] == 3]
    assert res.metrics.n_rows == len(held) and res.metrics.n_train_rows == len(smoke_rows) - len(held)


def test_lora_only_on_layers_from_freeze_layers(smoke_rows):
    from trainer_core.data.tokenization import build_tokenizer
    from trainer_core.model.build import build_model

    cfg = smoke_cfg()
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, cfg.lora, pad_token_id=tok.pad_token_id, precision="fp32",
                        device=torch.device("cpu"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n in names if "lora_" in n}
    assert lora_layers == {2, 3}  # smoke: 4 layers, freeze_layers=2
    assert {n.split(".lora_A")[0].split(".")[-1] for n in names if "lora_A" in n} == {"q_proj", "k_proj", "v_proj"}
    assert any("score" in n for n in names)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.parametrize("shared_dropout", [False, True], ids=["peft-dropout", "shared-dropout"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, smoke_rows, shared_dropout):
    """Also with lora.shared_dropout (the fast config's): a resumed fold draws the masks the uninterrupted one drew."""
    cfg = smoke_cfg("train.max_steps=4", "train.checkpoint_every=2", "train.log_every=100",
                    f"lora.shared_dropout={str(shared_dropout).lower()}")
    saved = {}

    def keep(m, ckpt):
        if ckpt is not None:
            saved[m["step"]] = shutil.copytree(ckpt, tmp_path / f"ckpt{m['step']}")

    full = train_fold(cfg, 0, smoke_rows, tmp_path / "a", report=keep)
    assert sorted(saved) == [2]
    resumed = train_fold(cfg, 0, smoke_rows, tmp_path / "b", resume_from=saved[2])
    assert resumed.metrics.steps == 4
    np.testing.assert_allclose(resumed.oof[["p_a", "p_b", "p_tie"]].to_numpy(),
                               full.oof[["p_a", "p_b", "p_tie"]].to_numpy(), rtol=1e-5, atol=1e-6)
    other = smoke_cfg("train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-2")
    with pytest.raises(ValueError, match="different config"):
        train_fold(other, 0, smoke_rows, tmp_path / "c", resume_from=saved[2])


def test_a_fold_trained_in_pieces_matches_one_run(tmp_path, smoke_rows):
    """A rotated schedule trains a fold in pieces (stop_at): each piece ends with a checkpoint at its share of the
    steps and writes nothing else; the next piece resumes from it. The OOF equals an uninterrupted run's, and the
    final metrics add up the pieces' seconds."""
    cfg = smoke_cfg("train.max_steps=6", "train.checkpoint_every=null", "train.log_every=100")
    full = train_fold(cfg, 0, smoke_rows, tmp_path / "a")
    reports, saved = [], []

    def keep(m, ckpt):
        reports.append(m)
        if ckpt is not None:
            saved.append(shutil.copytree(ckpt, tmp_path / f"ckpt{m['step']}"))

    first = train_fold(cfg, 0, smoke_rows, tmp_path / "b", report=keep, stop_at=0.5)
    assert first is None and not (tmp_path / "b").exists()  # paused: no fold files yet
    paused = reports[-1]
    assert paused["step"] == 3 and paused["paused"] is True and len(saved) == 1
    state = json.loads((saved[0] / "state.json").read_text())
    assert state["totals"]["train_seconds"] >= paused["elapsed_s"] and state["totals"]["samples"] > 0
    state["totals"]["train_seconds"] = 1000.0  # as if the first piece had taken 1000 s: it must be carried over
    (saved[0] / "state.json").write_text(json.dumps(state))
    second = train_fold(cfg, 0, smoke_rows, tmp_path / "b", report=keep, resume_from=saved[0])
    assert second.metrics.steps == 6 and second.metrics.resumed_from_step == 3
    assert 1000.0 < second.metrics.train_seconds < 1000.0 + 600
    np.testing.assert_allclose(second.oof[["p_a", "p_b", "p_tie"]].to_numpy(),
                               full.oof[["p_a", "p_b", "p_tie"]].to_numpy(), rtol=1e-5, atol=1e-6)


def test_lr_schedule_is_a_pure_function_of_step():
    t = TrainConfig(lr=1.0, warmup_steps=4)
    lrs = [lr_at(s, 14, t) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    t.schedule = "cosine"
    assert lr_at(9, 14, t) == pytest.approx(0.5)


def test_batches_are_deterministic_cover_every_row_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 0.8, size=2000).astype(int) + 20, 1024)
    a = epoch_batches(lengths, 4, 1, seed=1, epoch=0, group_by_length=True)
    b = epoch_batches(lengths, 4, 1, seed=1, epoch=0, group_by_length=True)
    assert all((x == y).all() for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(2000))
    grouped = padding_waste([lengths[x].tolist() for x in a])
    plain = padding_waste([lengths[x].tolist() for x in epoch_batches(lengths, 4, 1, 1, 0, False)])
    assert grouped < 0.05 < plain
    two = epoch_batches(lengths[:7], 2, 2, seed=0, epoch=0, group_by_length=False)
    assert all(len(g) == 4 for g in two)  # ranks always get full, equal batches
    assert len(rank_slice(two[0], 0, 2)) == len(rank_slice(two[0], 1, 2)) == 2


def test_fold_with_the_fast_paths_exact_keys_predicts_what_the_plain_fold_predicts(tmp_path, smoke_rows):
    """The fast config's exact keys (model.pooled_last_layer, attn_implementation one of the block-causal ones; both
    run here, block_causal_triton's CPU path being its plain-torch reference) through a whole fold - 3 steps,
    prediction with the A/B swap, files - give the plain fold's held-out probabilities (fp32, LoRA dropout 0 so both
    draw no random masks)."""
    fast_cfg = load_config(CONFIGS / "gemma2_9b_fast.yaml")
    assert fast_cfg.model.pooled_last_layer and fast_cfg.model.attn_implementation in BLOCK_CAUSAL
    common = ("train.max_steps=3", "lora.dropout=0.0", "train.eval_tta=true")
    plain = train_fold(smoke_cfg(*common), 2, smoke_rows, tmp_path / "plain")
    for attn in BLOCK_CAUSAL:
        fast = train_fold(smoke_cfg(*common, "model.pooled_last_layer=true", f"model.attn_implementation={attn}"), 2,
                          smoke_rows, tmp_path / attn)
        check_same_predictions(tmp_path / "plain", tmp_path / attn, plain, fast)


def check_same_predictions(a_dir, b_dir, plain, fast) -> None:
    """Two folds wrote the same held-out probabilities and log loss."""
    a = pd.read_parquet(a_dir / "oof.parquet")
    b = pd.read_parquet(b_dir / "oof.parquet")
    assert list(a["id"]) == list(b["id"]) and len(a) > 0
    np.testing.assert_allclose(b[["p_a", "p_b", "p_tie"]], a[["p_a", "p_b", "p_tie"]], rtol=1e-4, atol=1e-5)
    assert fast.metrics.log_loss == pytest.approx(plain.metrics.log_loss, rel=1e-4)
