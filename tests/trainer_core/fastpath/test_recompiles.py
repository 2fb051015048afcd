"""What torch.compile compiles again: counted (trainer_core.fastpath.recompiles), recorded in a fold's metrics.json,
and bounded - each kind of decoder layer compiles once per grad mode and shape regime, not once per layer or length.

Recompilations are decided by dynamo's guards, before any backend runs; the fold test compiles with the aot_eager
backend instead of inductor to stay within a few minutes on a CPU (inductor adds no guard of its own there)."""

import json
import logging

import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core.config import load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.fastpath import attention
from trainer_core.fastpath.recompiles import RecompileCounter


def test_the_counter_counts_recompilations_and_turns_the_log_off_again(monkeypatch):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    with RecompileCounter() as counter:
        for shape in ((3,), (3,), (4,), (5,), (3, 3)):  # static, same, dynamic, same, another rank
            f(torch.ones(shape))
    assert counter.count == 2 and counter.functions == {"<lambda>": 2}
    assert counter.summary() == "2 recompilations (<lambda> 2)"
    after = RecompileCounter()
    logging.getLogger("torch._dynamo").addHandler(after)  # listening, but the switch is off again
    try:
        f(torch.ones(3, 3, 3))
    finally:
        logging.getLogger("torch._dynamo").removeHandler(after)
    assert after.count == 0
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks")  # TORCH_LOGS decides, without recompiles: not counted
    with RecompileCounter() as hidden:
        f(torch.ones(2, 2, 2, 2))
    assert hidden.count is None and "not counted" in hidden.summary()


@pytest.mark.slow
def test_a_fold_compiles_each_kind_of_layer_once_per_grad_mode_and_shape_regime(tmp_path, monkeypatch):
    """A whole fold of the tiny Gemma-2 with the fast config's keys (dequantized weights, pooled top layer, shared
    dropout draws, compiled layers; eager attention) over rows of 155 to 1,024 tokens, evaluated in batches of the
    training size with a short last one: every batch the layers see is a multiple of model.length_bucket (256) long,
    and the layers compile once per kind, length bucket and grad mode, written to metrics.json.

    Decoder-layer code: 2 kinds of layer (frozen; adapted, whose input needs no grad) per bucket in training and again
    in evaluation (grad mode off); the pooled top layer's function once per bucket and mode. With at most 4 buckets
    (256 to 1,024 tokens) in each mode that is at most 3 x 8 versions, 22 recompilations past the two first
    compilations - however many distinct row lengths there are (there are dozens here).

    model.precompile (on by default): the training graphs of every length the steps use compile before the first
    step (one report at step 0 says how many lengths), and the steps compile nothing more."""
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    real = torch.compile

    def aot_eager(target, *args, dynamic=None, options=None, **kwargs):
        return real(target, *args, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", aot_eager)
    from trainer_core.fold.loop import train_fold

    cfg = load_config(CONFIGS / "smoke.yaml", [
        "data.max_rows=60", "data.max_length=1024", "train.batch_size=4", "train.eval_batch_size=4",
        "train.max_steps=8", "train.log_every=1", "model.compile=on", "model.pooled_last_layer=true",
        "lora.shared_dropout=true",
        "model.dequant_cache=on", "model.gradient_checkpointing=off",
        "model.random_config.max_position_embeddings=1024"])
    validate(cfg)
    rows = assign_folds(load_rows(DATA, max_rows=60), 5)
    assert (rows["fold"] == 0).sum() % 4 != 0  # a short last evaluation batch
    seen = []
    from trainer_core.fold import data as fold_data
    from trainer_core.fold import inference

    for module in (fold_data, inference):
        def recording(ids, pad_id, device, multiple=0, _collate=module.collate):
            out = _collate(ids, pad_id, device, multiple)
            seen.append(out[0].shape[1])
            return out
        monkeypatch.setattr(module, "collate", recording)
    torch.compiler.reset()  # versions compiled by earlier tests of this process would count against this fold
    reports = []
    result = train_fold(cfg, 0, rows, tmp_path / "fold=0",
                        report=lambda m, ckpt: reports.append({**m, "lengths": set(seen)}))
    first = next(r for r in reports if "precompiled_lengths" in r)
    steps = [r for r in reports if "train_loss" in r]
    assert first["step"] == 0 and first["precompiled_lengths"] >= 2 and "train_loss" not in first
    # a report after each length but the last, before the one that ends the phase
    n = first["precompiled_lengths"]
    assert [(r.get("precompile_done"), r.get("precompile_total")) for r in reports[:n]] == [
        *[(k, n) for k in range(1, n)], (None, None)]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {r["compiles"] for r in steps} == {first["compiles"]}, [r["compiles"] for r in steps]
    # the passes' batches had every length the steps then used, the longest first (a length that does not fit in
    # memory fails before any step)
    assert len(first["lengths"]) == n and steps[-1]["lengths"] == first["lengths"]
    assert seen[:n] == sorted(first["lengths"], reverse=True)
    recorded = json.loads((tmp_path / "fold=0" / "metrics.json").read_text())["recompilations"]
    assert recorded == result.metrics.recompilations
    assert seen and all(t % 256 == 0 for t in seen), sorted(set(seen))
    buckets = len(set(seen))
    assert 0 < recorded <= 3 * 2 * buckets - 2 <= 22, (recorded, buckets)


def test_block_causal_attention_compiles_once_per_block_count(monkeypatch):
    """Lengths 300, 400 and 450 are two blocks of 256 queries each: one static graph, then one dynamic graph."""
    monkeypatch.delenv("TORCH_LOGS", raising=False)

    class Attention:
        is_causal, head_dim, training = True, 16, False

    f = torch.compile(lambda q, k, m: attention.block_causal_attention(Attention(), q, k, k, m, softcap=50.0)[0],
                      backend="aot_eager")
    with RecompileCounter() as counter:
        for length in (300, 400, 450):
            f(torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16), torch.zeros(2, 1, length, length))
    assert counter.count == 1


def predict_twice(keys: list[str], seed: int, change, dim: int) -> tuple:
    """A tiny fast-path model predicts 7 rows of 9-64 tokens in batches of 4, plainly and again after ``change``
    (called with ``predict_probs``'s keyword arguments to fill in); returns (plain, changed, the size of dimension
    ``dim`` of each batch the changed pass fed the model)."""
    from tests.trainer_core.fastpath.fast_model import build_fast
    from trainer_core.fold.inference import predict_probs
    from trainer_core.model.precision import make_autocast

    model = build_fast(load_config(CONFIGS / "smoke.yaml", keys))
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, 260, (n,), generator=gen).tolist() for n in (40, 64, 17, 33, 9, 50, 21)]
    autocast = make_autocast("fp32", torch.device("cpu"))
    plain = predict_probs(model, ids, 4, 0, torch.device("cpu"), autocast)
    sizes, kwargs = [], {}
    model.register_forward_pre_hook(lambda m, args, kw: sizes.append(kw["input_ids"].shape[dim]), with_kwargs=True)
    change(kwargs)
    changed = predict_probs(model, ids, 4, 0, torch.device("cpu"), autocast, **kwargs)
    return plain, changed, sizes


def test_a_filled_last_prediction_batch_gives_the_same_probabilities(monkeypatch):
    """Prediction with compiled layers fills the short last batch with copies of its first row: every row's
    probabilities are the ones predicted without filling, and the filled rows' are dropped."""
    from trainer_core import fastpath

    plain, filled, rows = predict_twice(["model.dequant_cache=on"], 3, lambda kwargs: monkeypatch.setattr(
        fastpath, "compiled", lambda model: True), dim=0)
    assert rows == [4, 4] and filled.shape == (7, 3)
    torch.testing.assert_close(torch.as_tensor(filled), torch.as_tensor(plain), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attn", ["eager", "block_causal"])
def test_batches_padded_to_a_length_bucket_give_the_same_probabilities(attn):
    """model.length_bucket right-pads each batch to a multiple of the bucket: padded positions are masked and come
    after every real token (causal attention), and the classifier reads the last real token, so each row's
    probabilities are its own - with the pooled top layer and block-causal attention too."""
    keys = ["model.dequant_cache=on", "model.pooled_last_layer=true", f"model.attn_implementation={attn}"]
    plain, padded, lengths = predict_twice(keys, 5, lambda kwargs: kwargs.update(multiple=48), dim=1)
    assert lengths == [96, 48]  # longest 64 -> 96, then 33 -> 48
    torch.testing.assert_close(torch.as_tensor(padded), torch.as_tensor(plain), rtol=1e-5, atol=1e-6)


def test_the_bucket_applies_to_layers_compiled_with_static_shapes_only():
    from trainer_core.config import pad_multiple

    assert pad_multiple(load_config(CONFIGS / "gemma2_9b_fast.yaml").model) == 256
    assert pad_multiple(load_config(CONFIGS / "gemma2_9b_fast.yaml", ["model.compile=dynamic"]).model) == 0
    assert pad_multiple(load_config(CONFIGS / "gemma2_9b_fast.yaml", ["model.compile=off"]).model) == 0
    assert pad_multiple(load_config(CONFIGS / "gemma2_9b_fast.yaml", ["model.length_bucket=0"]).model) == 0
    with pytest.raises(Exception, match="model.length_bucket: must be >= 0"):
        validate(load_config(CONFIGS / "smoke.yaml", ["model.length_bucket=-1"]))
