"""Time the seed notebook's exact training path: Hugging Face ``Trainer`` with the notebook's ``TrainingArguments``.

The notebook loads the 4-bit model with fp16 compute, calls ``prepare_model_for_kbit_training(model)`` with peft's
defaults (gradient checkpointing on, input gradients on), wraps it with ``get_peft_model`` and trains through
``Trainer``: per-device batch 4, gradient accumulation 1, ``optim="adamw_8bit"``, ``fp16=True``, lr 2e-4, 20 warm-up
steps, loss computed inside the model from ``labels``. This module builds exactly that (the random weights of the
config's architecture, as :mod:`orchestrator.perf.step_bench` does) and times full-length steps with a
``TrainerCallback``.
What is left out: evaluation and checkpoint saving (``eval_strategy``/``save_strategy`` "no"): they are not part of a
training step. On the CPU, fp16 is off (a GPU feature), as for the bench's own seed setup.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from trainer_core.config import Config
from trainer_core.model.build import NUM_LABELS, random_weights_dir


class _Rows(torch.utils.data.Dataset):
    """Synthetic full-length rows as the notebook's tokenized dataset hands them to the collator."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        self.ids = torch.as_tensor(rng.integers(4, vocab, size=(n, seq_len)))
        self.labels = torch.as_tensor(rng.integers(0, NUM_LABELS, size=n))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def build_notebook_model(cfg: Config, device: torch.device, fp16: bool):
    """The notebook's model: nf4 load, ``prepare_model_for_kbit_training`` with peft's defaults, LoRA on top."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    dtype = torch.float16 if fp16 else torch.float32
    path = random_weights_dir(cfg.model, 0, cfg.train.seed, torch.bfloat16 if fp16 else torch.float32)
    kwargs = {}
    if cfg.model.quantization == "nf4":
        kwargs = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.model.double_quant,
            bnb_4bit_compute_dtype=dtype), device_map={"": device})
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=NUM_LABELS, dtype=dtype,
                                                               **kwargs)
    model.config.use_cache = False
    model.config.pad_token_id = 0
    if not kwargs:
        model.to(device)
    model = prepare_model_for_kbit_training(model)  # the notebook's call: checkpointing + input grads
    n_layers = model.config.num_hidden_layers
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.target_modules),
                      layers_to_transform=list(range(cfg.lora.freeze_layers, n_layers)), lora_dropout=cfg.lora.dropout,
                      bias=cfg.lora.bias, task_type=TaskType.SEQ_CLS)
    return get_peft_model(model, lora)


def run_seed_hf(cfg: Config, device: torch.device, *, steps: int, warmup: int) -> dict:
    """Samples/s of the notebook's Trainer path on full-length rows: ``warmup`` untimed steps, then ``steps`` timed
    (host clock after a device sync at each end, from a callback)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    cuda = device.type == "cuda"
    warmup = max(warmup, 1)  # the clock starts at the end of a step
    seq_len, batch = cfg.data.max_length, 4
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.train.seed)
    model = build_notebook_model(cfg, device, fp16=cuda)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                if cuda:
                    torch.cuda.synchronize(device)
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, report_to="none", num_train_epochs=1,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, per_device_eval_batch_size=batch,
            logging_steps=10, eval_strategy="no", save_strategy="no", optim="adamw_8bit", fp16=cuda,
            learning_rate=2e-4, warmup_steps=20, max_steps=warmup + steps, use_cpu=not cuda,
            dataloader_num_workers=0, seed=cfg.train.seed)
        rows = _Rows((warmup + steps) * batch, seq_len, model.config.vocab_size, cfg.train.seed)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                          callbacks=[Clock()])
        trainer.train()
    secs = marks[warmup + steps] - marks[warmup]
    row = {"setup": "seed-hf", "precision": "fp16" if cuda else "fp32", "checkpointing": "peft default",
           "attention": "default", "micro_batch": batch, "grad_accum": 1, "samples_per_s": steps * batch / secs,
           "tokens_per_s": steps * batch * seq_len / secs, "s_per_step": secs / steps}
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del trainer, model
    return row
