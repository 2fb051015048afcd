"""Real-format Gemma-2 artefacts built offline, for tests: a Gemma tokenizer (transformers' own GemmaTokenizer class:
BPE with byte fallback, spaces as "▁", <pad>=0 <eos>=1 <bos>=2 <unk>=3, <bos> added, left padding as Gemma ships it)
and a tiny Gemma-2 sequence classifier stored pre-quantized to nf4 (``quantization_config`` in its config.json, the
layout of unsloth/gemma-2-9b-it-bnb-4bit), both written with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
# A few English merges, so the vocabulary has multi-character pieces like the real one.
MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("e", "r"), ("▁", "a"), ("o", "n"), ("r", "e"),
          ("▁", "s"), ("a", "n"), ("e", "n"), ("▁", "w"), ("o", "r"), ("e", "s"), ("a", "t"), ("in", "g")]
VOCAB_SIZE = 384  # 5 specials + 256 byte pieces + 95 characters + 16 merges = 372, rounded up

TINY_GEMMA2 = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                   sliding_window=32)


def gemma_vocab() -> dict[str, int]:
    pieces = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
    pieces += [a + b for a, b in MERGES]
    return {p: i for i, p in enumerate(pieces)}


def save_gemma_tokenizer(folder: str | Path, add_eos_token: bool = False) -> Path:
    """Write a Gemma tokenizer to ``folder`` (tokenizer.json + tokenizer_config.json) and return the folder."""
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer(vocab=gemma_vocab(), merges=MERGES, add_bos_token=True, add_eos_token=add_eos_token)
    tok.save_pretrained(str(folder))
    return Path(folder)


def tiny_gemma2_classifier(seed: int = 0):
    """A randomly initialised tiny Gemma2ForSequenceClassification (3 labels, pad id 0) in fp32."""
    import torch
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = Gemma2Config(**TINY_GEMMA2, num_labels=3, pad_token_id=0, attn_implementation="eager")
    return Gemma2ForSequenceClassification(cfg).eval()


def save_prequantized_gemma2(folder: str | Path, *, load_in_8bit: bool = False, double_quant: bool = True) -> Path:
    """A tiny Gemma-2 checkpoint stored quantized (nf4, or int8), with a Gemma tokenizer beside it, as a Hub repo
    like unsloth/gemma-2-9b-it-bnb-4bit holds it. Quantization happens only in ``from_pretrained``, hence the
    save, quantized reload and second save."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as plain:
        tiny_gemma2_classifier().save_pretrained(plain)
        quant = (BitsAndBytesConfig(load_in_8bit=True) if load_in_8bit else
                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16))
        model = AutoModelForSequenceClassification.from_pretrained(plain, quantization_config=quant,
                                                                   device_map={"": "cpu"})
        model.save_pretrained(str(folder))
    save_gemma_tokenizer(folder)
    return folder
