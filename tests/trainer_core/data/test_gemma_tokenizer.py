"""The seed template, EOS, truncation and last-token pooling with a real Gemma tokenizer class (transformers'
GemmaTokenizer with Gemma's special tokens and byte fallback, saved and loaded through AutoTokenizer), not only the
byte tokenizer."""

import pandas as pd
import pytest
import torch

from tests.tiny_gemma import save_gemma_tokenizer, tiny_gemma2_classifier
from trainer_core.config import DataConfig, ModelConfig
from trainer_core.data.batching import collate
from trainer_core.data.tokenization import build_tokenizer, encode_rows, format_text

PAD, EOS, BOS, UNK = 0, 1, 2, 3
ROW = {"prompt": "Which is the better answer? 😀", "response_a": "the café opens at 9",
       "response_b": "Ünïcode and emoji 🎉 are kept"}


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return save_gemma_tokenizer(tmp_path_factory.mktemp("gemma-tok"))


@pytest.fixture(scope="module")
def tok(gemma_dir):
    return build_tokenizer(ModelConfig(tokenizer=str(gemma_dir)))


def rows(*dicts):
    return pd.DataFrame(list(dicts) or [ROW])


def test_loads_through_autotokenizer_with_gemma_conventions(gemma_dir, tok):
    from transformers import AutoTokenizer, GemmaTokenizer

    raw = AutoTokenizer.from_pretrained(str(gemma_dir))
    assert isinstance(raw, GemmaTokenizer) and raw.padding_side == "left"  # as Gemma ships it
    assert isinstance(tok, GemmaTokenizer) and tok.padding_side == "right"  # what last-token pooling needs
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (PAD, EOS, BOS, UNK)
    assert tok("a b")["input_ids"][0] == BOS and tok("a b")["input_ids"][-1] != EOS  # Gemma adds <bos> only


def test_template_gets_bos_first_and_one_eos_last(tok):
    (ids,) = encode_rows(rows(), tok, DataConfig(max_length=1024), add_eos=True)
    text = format_text(ROW["prompt"], ROW["response_a"], ROW["response_b"])
    assert ids == [BOS] + tok(text, add_special_tokens=False)["input_ids"] + [EOS]
    assert ids.count(BOS) == 1 and ids.count(EOS) == 1 and PAD not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte fallback: accents and emoji survive


@pytest.mark.parametrize("truncation", ["end", "balanced"])
def test_truncated_rows_keep_bos_first_and_eos_last(tok, truncation):
    long = {"prompt": "why " * 300, "response_a": "because " * 300, "response_b": "no"}
    (ids,) = encode_rows(rows(long), tok, DataConfig(max_length=64, truncation=truncation), add_eos=True)
    assert len(ids) == 64 and ids[0] == BOS and ids[-1] == EOS and ids.count(EOS) == 1
    if truncation == "balanced":
        assert tok.decode(ids, skip_special_tokens=True).endswith("<response_b>: no")


def test_a_tokenizer_that_appends_eos_itself_gets_no_second_one(tmp_path):
    tok = build_tokenizer(ModelConfig(tokenizer=str(save_gemma_tokenizer(tmp_path, add_eos_token=True))))
    for add_eos in (True, False):
        (ids,) = encode_rows(rows(), tok, DataConfig(max_length=1024), add_eos=add_eos)
        assert ids[0] == BOS and ids[-1] == EOS and ids.count(EOS) == 1


def test_last_token_pooling_reads_the_eos_of_each_right_padded_row(tok):
    """Gemma2ForSequenceClassification pools the right-most non-pad token: in a right-padded batch that is each row's
    EOS, so a row scores the same alone and beside longer rows."""
    model = tiny_gemma2_classifier()
    short = {"prompt": "hi", "response_a": "a", "response_b": "b"}
    ids = encode_rows(rows(ROW, short), tok, DataConfig(max_length=128), add_eos=True)
    assert len(ids[0]) > len(ids[1])
    input_ids, mask = collate(ids, tok.pad_token_id, torch.device("cpu"))
    assert (input_ids[1, len(ids[1]):] == PAD).all()
    with torch.no_grad():
        batch = model(input_ids=input_ids, attention_mask=mask).logits
        alone = torch.cat([model(input_ids=torch.tensor([x])).logits for x in ids])
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        at_eos = model.score(torch.stack([hidden[i, len(x) - 1] for i, x in enumerate(ids)]))
    assert all(x[-1] == EOS for x in ids)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch, at_eos)
