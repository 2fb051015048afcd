"""``cluster.compile_helpers`` (trainer_core.fold.warm_compile): helpers compile a fold's training graphs on a small
replica of its model while the fold loads its own; the fold's precompilation then reads every graph back from the
compile cache, and a helper that fails changes nothing but time."""

import fcntl
import json
import os
import threading
import time

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import CONFIGS, DATA
from trainer_core.config import ConfigError, apply_overrides, load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.fold import replica, warm_compile
from trainer_core.fold.replica import VOCAB, replica_architecture, replica_config, replica_ids, replica_layers
from trainer_core.fold.state import FoldMetrics
from trainer_core.fold.warm_compile import helper_count

# The smoke model with 8 layers (a replica keeps 6), the fast config's compiled path, rows up to 1,024 tokens.
COMPILED = ["data.max_rows=60", "data.max_length=1024", "model.random_config.max_position_embeddings=1024",
            "model.random_config.num_hidden_layers=8", "train.batch_size=4", "train.eval_batch_size=4",
            "model.compile=on", "model.pooled_last_layer=true", "lora.shared_dropout=true", "model.dequant_cache=on",
            "model.gradient_checkpointing=off"]

FINISHED = dict(fold=0, log_loss=1.0, accuracy=0.5, n_rows=1, n_train_rows=1, prior_log_loss=1.1, steps=1,
                train_seconds=1.0, train_samples_per_s=1.0, fold_seconds=1.0, last_run_seconds=1.0,
                last_run_train_seconds=1.0, resumed_from_step=0, precision="fp32", device="cpu", world_size=1,
                fingerprint="x")


def kinds(n: int, frozen: int, layers: list[int]) -> set[tuple]:
    """The kinds of layer among ``layers`` (indices of an ``n``-layer model, the bottom ``frozen`` frozen): frozen or
    adapted, first adapted, top, and attention parity (Gemma-2's sliding/global alternation)."""
    return {(i < frozen, i == frozen, i == n - 1, i % 2) for i in layers}


def test_a_replica_keeps_every_kind_of_layer_at_its_parity():
    assert replica_layers(42, 16) == [14, 15, 16, 17, 18, 41]  # Gemma-2 9B, the fast config
    for n in range(2, 47):
        for frozen in range(n):
            keep = replica_layers(n, frozen)
            assert keep == sorted(set(keep)) and len(keep) <= min(n, 8), (n, frozen, keep)
            assert kinds(n, frozen, keep) == kinds(n, frozen, list(range(n))), (n, frozen, keep)
            # replica layer j stands for layer keep[j]: same parity, same frozen/adapted split
            assert all(j % 2 == i % 2 for j, i in enumerate(keep)), (n, frozen, keep)
            assert sum(i < frozen for i in keep) == min(frozen, 2 + frozen % 2)


def test_the_replica_architecture_cuts_layers_and_vocabulary_and_keeps_the_rest():
    cfg = load_config(CONFIGS / "gemma2_9b_fast.yaml", ["model.init=random", "model.tokenizer=bytes"])
    arch, frozen = replica_architecture(cfg)
    full = cfg.model.random_config
    assert (arch["num_hidden_layers"], frozen, arch["vocab_size"]) == (6, 2, VOCAB)
    assert {k: v for k, v in arch.items() if k not in ("num_hidden_layers", "vocab_size")} == \
        {k: v for k, v in full.items() if k not in ("num_hidden_layers", "vocab_size")}
    replica = replica_config(cfg, arch, frozen)
    assert (replica.model.init, replica.lora.freeze_layers, replica.cluster.compile_helpers) == ("random", 2, 0)
    assert replica.model.compile_options == cfg.model.compile_options and replica.lora == \
        apply_overrides(cfg, {"lora.freeze_layers": 2}).lora
    # Gemma-2's explicit layer types follow the layers kept
    typed = apply_overrides(cfg, {"model.random_config.layer_types": [f"t{i}" for i in range(42)]})
    assert replica_architecture(typed)[0]["layer_types"] == ["t14", "t15", "t16", "t17", "t18", "t41"]
    assert replica_architecture(load_config(CONFIGS / "smoke.yaml")) is None  # 4 layers: no smaller replica


def test_a_hub_checkpoints_architecture_makes_a_replica_its_random_build_accepts(tmp_path):
    """A pre-quantized checkpoint in the Hub's layout (unsloth/gemma-2-9b-it-bnb-4bit's): its config.json, less what
    belongs to the stored weights (quantization, labels, dtype), is the replica's architecture."""
    from transformers import AutoConfig

    from tests.tiny_gemma import save_prequantized_gemma2

    folder = save_prequantized_gemma2(tmp_path / "hub")
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.init=pretrained", f"model.name_or_path={folder}"])
    assert replica_architecture(cfg) is None  # 4 layers: a replica would be as large
    arch = replica._pretrained_architecture(cfg)
    assert arch["num_hidden_layers"] == 4 and "quantization_config" not in arch and "id2label" not in arch
    keep = [0, 1, 3]
    arch.update(num_hidden_layers=3, layer_types=[arch["layer_types"][i] for i in keep], vocab_size=VOCAB)
    built = AutoConfig.for_model(arch.pop("model_type"), **arch, num_labels=3, pad_token_id=0)
    assert (built.hidden_size, built.num_hidden_layers, built.layer_types) == (64, 3, [
        "sliding_attention", "full_attention", "full_attention"])


def test_replica_token_ids_stay_in_its_vocabulary_and_padding_stays_padding():
    ids = torch.tensor([[5, 517, 1029, 7, 7], [2000, 512, 0, 7, 7]])
    out = replica_ids(ids, pad_id=7)
    assert out.max() < VOCAB and out.shape == ids.shape
    assert torch.equal(out == 7, ids == 7)  # 519 % 512 == 7 would have become padding: moved to 8
    assert replica_ids(torch.tensor([519]), pad_id=7).item() == 8


def test_a_padding_id_past_the_replica_vocabulary_grows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cfg = load_config(CONFIGS / "smoke.yaml", COMPILED)
    ids = torch.tensor([[5, 1029, 600, 600]] * 4)  # right-padded with id 600
    helpers = warm_compile.start(cfg, [(ids, torch.ones_like(ids), torch.zeros(4).long())], pad_id=600,
                                 device=torch.device("cpu"), helpers=1)
    try:
        replica = json.loads((helpers.folder / "config.json").read_text())
        assert replica["model"]["random_config"]["vocab_size"] == 601
        handed = torch.load(helpers.folder / "batches0.pt")[0][0]
        assert handed[0].tolist() == [5, 1029 % VOCAB, 600, 600]
    finally:
        helpers.close()
    assert not helpers.folder.exists()


def test_how_many_helpers_a_fold_starts(monkeypatch):
    cfg = load_config(CONFIGS / "smoke.yaml", [*COMPILED, "cluster.compile_helpers=auto"])
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(warm_compile, "_cpus", lambda: 16)
    monkeypatch.setattr(warm_compile, "_gpu_gib", lambda device: 79.1)  # an H100
    assert helper_count(cfg, 4, cpu, 1) == 0  # auto: none on a CPU
    assert helper_count(cfg, 4, gpu, 1) == 4 and helper_count(cfg, 2, gpu, 1) == 2
    monkeypatch.setattr(warm_compile, "_gpu_gib", lambda device: 15.9)  # a T4: none with auto, as many as asked else
    assert helper_count(cfg, 4, gpu, 1) == 0
    assert helper_count(apply_overrides(cfg, {"cluster.compile_helpers": 2}), 4, gpu, 1) == 2
    monkeypatch.setattr(warm_compile, "_gpu_gib", lambda device: 79.1)
    monkeypatch.setattr(warm_compile, "_cpus", lambda: 8)
    assert helper_count(cfg, 4, gpu, 1) == 2  # a quarter of the CPUs
    assert helper_count(apply_overrides(cfg, {"cluster.compile_helpers": 3}), 2, cpu, 1) == 2  # never past the lengths
    assert helper_count(cfg, 4, gpu, 2) == 0  # a fold of several ranks
    for off in ({"model.compile": "dynamic"}, {"model.precompile": False}, {"model.length_bucket": 0},
                {"cluster.compile_helpers": 0}):
        assert helper_count(apply_overrides(cfg, off), 4, gpu, 1) == 0, off


def test_compile_helpers_is_a_documented_cluster_key_outside_the_fingerprint():
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert cfg.cluster.compile_helpers == "auto"  # on a GPU only: measured there (docs/PERFORMANCE.md, session 20)
    assert apply_overrides(cfg, {"cluster.compile_helpers": 2}).fingerprint() == cfg.fingerprint()
    with pytest.raises(ConfigError, match="cluster.compile_helpers"):
        validate(apply_overrides(cfg, {"cluster.compile_helpers": -1}))


def test_a_fold_whose_config_another_fold_is_compiling_waits_for_that_fold(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cfg = load_config(CONFIGS / "smoke.yaml", COMPILED)
    arch, frozen = replica_architecture(cfg)
    held = open(warm_compile._lock_path(replica_config(cfg, arch, frozen)), "w")
    fcntl.flock(held, fcntl.LOCK_EX)  # the other fold's helpers are running
    batch = (torch.zeros(4, 256, dtype=torch.long), torch.ones(4, 256, dtype=torch.long), torch.zeros(4).long())
    helpers = warm_compile.start(cfg, [batch], pad_id=0, device=torch.device("cpu"), helpers=1)
    assert helpers is not None and not helpers.owner and helpers.procs == []
    threading.Timer(1.0, held.close).start()
    t0 = time.perf_counter()
    assert helpers.wait()["compile_helpers"] == 0
    assert time.perf_counter() - t0 >= 0.9


def test_helpers_run_below_the_folds_cpu_priority(tmp_path, monkeypatch):
    """Their compilation yields the cores to the fold loading its model (each helper stopped at once here)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cfg = load_config(CONFIGS / "smoke.yaml", COMPILED)
    batch = (torch.zeros(4, 256, dtype=torch.long), torch.ones(4, 256, dtype=torch.long), torch.zeros(4).long())
    helpers = warm_compile.start(cfg, [batch, batch], pad_id=0, device=torch.device("cpu"), helpers=2)
    try:
        lower = min(19, os.getpriority(os.PRIO_PROCESS, 0) + warm_compile.NICE)
        assert [os.getpriority(os.PRIO_PROCESS, p.pid) for p in helpers.procs] == [lower, lower]
    finally:
        helpers.close()


@pytest.mark.slow  # two helper processes build the replica; inductor compiles on the CPU
def test_helpers_compile_the_folds_training_graphs_before_the_fold_needs_them(tmp_path, monkeypatch):
    """The fold trains, and is not evaluated: its held-out rows' graphs are not this test's subject."""
    from trainer_core.fold.loop import FoldRun

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile_cache"))  # empty: a fresh machine
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "compile_cache" / "triton"))
    cfg = load_config(CONFIGS / "smoke.yaml", [*COMPILED, "data.max_length=512", "cluster.compile_helpers=2"])
    validate(cfg)
    rows = assign_folds(load_rows(DATA, max_rows=60), 5)
    torch.compiler.reset()
    counters.clear()
    at_first_step = {}

    def report(metrics, _ckpt):
        if "precompiled_lengths" in metrics:  # every training graph compiled or read back: what the fold did itself
            at_first_step.update(lengths=metrics["precompiled_lengths"], graphs=dict(counters["inductor"]),
                                 autograd=dict(counters["aot_autograd"]))

    run = FoldRun(cfg, 0, device=None, report=report)
    try:
        run.setup(rows, None, None)
        assert run.train(stop_at=None)
    finally:
        run.close()
    assert at_first_step["lengths"] == 2  # 256 and 512 tokens, one per helper
    graphs, autograd = at_first_step["graphs"], at_first_step["autograd"]
    # every graph of every length and kind of layer, forward and backward, came from the helpers
    assert graphs.get("fxgraph_cache_miss", 0) == 0 and graphs.get("fxgraph_cache_hit", 0) >= 2 * 2, graphs
    assert autograd.get("autograd_cache_miss", 0) == 0 and autograd.get("autograd_cache_hit", 0) >= 2, autograd
    assert run.helpers.done["compile_helpers"] == 2 and run.helpers.done["compile_helpers_failed"] == 0
    # what a finished fold writes to metrics.json
    assert FoldMetrics(**{**FINISHED, "compile_helpers": run.helpers.done}).to_dict()["compile_helpers"] == \
        run.helpers.done
    assert "compile_helpers" not in FoldMetrics(**FINISHED).to_dict()


@pytest.mark.slow  # a helper process starts (imports torch and transformers) and fails
def test_a_helper_that_fails_is_reported_and_changes_nothing_else(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cfg = load_config(CONFIGS / "smoke.yaml", COMPILED)
    batch = (torch.zeros(4, 256, dtype=torch.long), torch.ones(4, 256, dtype=torch.long), torch.zeros(4).long())
    helpers = warm_compile.start(cfg, [batch], pad_id=0, device=torch.device("cuda", 7), helpers=1)  # no such GPU
    with caplog.at_level("WARNING", logger="trainer_core.fold.warm_compile"):
        done = helpers.wait()
    assert done["compile_helpers"] == 1 and done["compile_helpers_failed"] == 1
    assert "compile helper 0 ended with 1" in caplog.text and "Traceback" in caplog.text
    assert not helpers.folder.exists()  # its batches and log removed once read
    # the lock is free again: the next fold of this config starts its own helpers
    again = warm_compile.start(cfg, [batch], pad_id=0, device=torch.device("cpu"), helpers=1)
    assert again.owner
    again.close()
