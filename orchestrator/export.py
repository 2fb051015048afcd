"""Export a finished run for an offline notebook: its fold models (or their average), the tokenizer, the heads, the
fitted temperatures and a standalone ``predict.py`` that needs torch, transformers, peft, bitsandbytes and pandas only.

Examples::

    python -m orchestrator.export runs/g9b --out export/g9b                      # every fold's adapter, as predict
    python -m orchestrator.export runs/g9b --out export/g9b-avg --folds average --merge --quantize int8
    python export/g9b-avg/predict.py --data test.csv --out submission.csv --time-budget 30000

``--folds each`` keeps every fold's adapter and head on one copy of the base weights; the predictor averages the
folds' probabilities as ``orchestrator.predict`` does (the same numbers). ``--folds average`` averages the folds'
LoRA updates into one adapter (the mean of the five fold models' weights; see orchestrator/runs/adapters.py);
``--merge`` adds it into the base weights (peft's merge_and_unload; safetensors), one plain model that costs what one
fold model costs. ``--quantize`` is how the predictor loads the weights (bitsandbytes, at load time): ``int8``, as
the arena winners ran a merged Gemma-2 9B on 16 GB T4s; the default is the run's own ``model.quantization``.

DIR holds: predict.py and its helpers (arena_text.py is the project's own trainer_core/data/text.py: the template,
parsing and truncation rules training used; arena_logs.py is trainer_core/logs.py), export_config.json (truncation
settings, head, temperatures, files), run_config.yaml, requirements.txt (the predictor's five libraries with the
project's version ranges), tokenizer/, base/ + adapters/ (or model/ merged, or models/ for full fine-tuning), EXPORT.md
and manifest.json (sha256 of every file). It is written to a temporary folder beside DIR and renamed at the end: bad
input (a run that is not finished, a missing adapter file, a DIR that is not empty) is one line and leaves nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from orchestrator.runs.adapters import ADAPTER_FILES, AdapterError, average_adapters, check_same_recipe
from orchestrator.runs.staging import on_staged_run, staged, with_adapters
from trainer_core import logs
from trainer_core.config import BLOCK_CAUSAL, ConfigError, load_config, to_yaml
from trainer_core.data import text
from trainer_core.model.weights import WeightsError, check_weights

TEMPLATE = Path(__file__).parent / "export_template"
# the project's text rules, copied whole under this name: the template imports them from it (no second copy to drift)
TEXT_MODULE = "arena_text.py"
LOGS_MODULE = "arena_logs.py"  # trainer_core/logs.py, likewise (one line for a library's repeated line)
QUANTIZE = ("none", "int8", "nf4")
# What DIR/predict.py needs, written to DIR/requirements.txt: pyproject.toml's ranges for these five, word for word
# (tests/test_versions.py checks they agree). Nothing else: not Ray, not this project.
PREDICTOR_REQUIREMENTS = ("torch>=2.11,<2.14", "transformers>=5.17,<5.26", "peft>=0.21,<0.22",
                          "bitsandbytes>=0.50,<0.51", "pandas>=2.1")


class ExportError(ValueError):
    """The run cannot be exported as asked; one line saying why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run directory (report.json, every fold's adapter/): a folder or a URI "
                               "(s3://bucket/prefix, gs://...)")
    p.add_argument("--out", type=Path, required=True, help="the export folder to create (must not exist or be empty)")
    p.add_argument("--folds", choices=("each", "average"), default="each",
                   help="each: every fold's model, probabilities averaged (default); average: the folds' LoRA "
                        "adapters averaged into one (no honest CV exists for it)")
    p.add_argument("--merge", action="store_true",
                   help="with --folds average: merge the averaged adapter into the base weights (one plain model)")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="how predict.py loads the weights: none, int8 or nf4 (bitsandbytes; default: the run's "
                        "model.quantization, or none for full fine-tuning)")
    return p


def _fail(msg: str):
    raise ExportError(msg)


def check_export(run_dir: Path, out: Path, mode: str, merge: bool, quantize: str | None):
    """Everything checked before anything is written: (config, report, folds, quantize)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(f"{out}: exists and is not an empty folder; choose a new --out")
    if (run_dir / "ensemble.json").exists():
        _fail(f"{run_dir}: an ensemble directory; export one of its member runs")
    for name in ("run.json", "config.yaml", "report.json"):
        if not (run_dir / name).is_file():
            _fail(f"{run_dir}: not a finished run (no {name}); finish it with orchestrator.cv")
    cfg = load_config(run_dir / "config.yaml")
    report = json.loads((run_dir / "report.json").read_text())
    folds = [int(f["fold"]) for f in report["folds"]]
    need = list(ADAPTER_FILES) if cfg.lora.enabled else ["config.json"]
    if cfg.model.head == "pairwise":
        need.append("pairwise_head.pt")
    for k in folds:
        for path in [run_dir / f"fold={k}" / "metrics.json", *(run_dir / f"fold={k}" / "adapter" / n for n in need)]:
            if not path.is_file():
                _fail(f"{path}: missing; fold {k} is not finished (or its files were moved)")
    if merge and mode != "average":
        _fail("--merge goes with --folds average (one adapter to merge)")
    if mode == "average" and not cfg.lora.enabled:
        _fail("--folds average needs LoRA adapters; this run fine-tuned whole models (lora.enabled=false)")
    default = cfg.model.quantization if cfg.lora.enabled else "none"
    quantize = quantize or default
    if cfg.model.head == "joint" and (cfg.model.head_mlp_hidden or cfg.model.length_features):
        _fail("model.head_mlp_hidden / model.length_features with model.head=joint: the standalone predictor does not "
              "rebuild that classifier yet; score with python -m orchestrator.predict")
    if cfg.model.head == "pairwise" and quantize != "none":
        _fail("--quantize: the pairwise head's encoder is exported unquantized (--quantize none)")
    if mode == "average":
        check_same_recipe({k: run_dir / f"fold={k}" / "adapter" for k in folds})
    if cfg.lora.enabled and cfg.model.init == "pretrained":
        check_weights(cfg.model, tokenizer=False)
    return cfg, report, folds, quantize


def _base_dir(cfg, run_dir: Path, fold: int) -> Path:
    """The base weights the adapters were trained on: the run's checkpoint folder, or the random-weights folder
    that training built (same architecture, seed, pad id and storage dtype as then)."""
    if cfg.model.init == "random":
        import torch

        from trainer_core.data.tokenization import build_tokenizer
        from trainer_core.model.build import random_weights_dir

        precision = json.loads((run_dir / f"fold={fold}" / "metrics.json").read_text())["precision"]
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return random_weights_dir(cfg.model, build_tokenizer(cfg.model).pad_token_id, cfg.train.seed, dtype)
    from trainer_core.paths import resolve_model_path

    path = Path(resolve_model_path(cfg.model.name_or_path)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(cfg.model.name_or_path, local_files_only=True))


def _copy_base(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(f, dst / f.name)  # follows the Hugging Face cache's symlinks


def text_spec(cfg) -> dict:
    """The run's text settings, which submission_text.py hands to arena_text.py (the rules themselves)."""
    return {"max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
            "prompt_share": cfg.data.prompt_share, "add_eos_token": cfg.model.add_eos_token}


def copy_predictor(dst: Path) -> None:
    """The standalone predictor into ``dst``: the template's files, trainer_core/data/text.py as TEXT_MODULE and
    trainer_core/logs.py as LOGS_MODULE."""
    for f in TEMPLATE.glob("*.py"):
        shutil.copy(f, dst / f.name)
    shutil.copy(text.__file__, dst / TEXT_MODULE)
    shutil.copy(logs.__file__, dst / LOGS_MODULE)


def write_export(run_dir: Path, tmp: Path, cfg, report: dict, folds: list[int], mode: str, merge: bool,
                 quantize: str, log=print) -> dict:
    """Fill ``tmp`` with everything but manifest.json; returns export_config."""
    adapters = {k: run_dir / f"fold={k}" / "adapter" for k in folds}
    attn = cfg.model.attn_implementation
    spec = {"format": 1, "run": str(run_dir.resolve()), "folds_mode": mode, "folds": folds, "merged": merge,
            "head": cfg.model.head, "quantize": quantize, "double_quant": cfg.model.double_quant,
            "attn_implementation": "eager" if attn in BLOCK_CAUSAL else attn,  # the same numbers, plain transformers
            "text": text_spec(cfg), "length_features": cfg.model.length_features, "temperature": report["temperature"],
            "temperature_tta": report.get("temperature_tta"),
            "temperatures_by_fold": report.get("temperatures_by_fold")}
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    for f in adapters[folds[0]].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            shutil.copy(f, tok_dir / f.name)
    if not cfg.lora.enabled:  # whole fine-tuned models (joint or pairwise), one per fold
        for k in folds:
            shutil.copytree(adapters[k], tmp / "models" / f"fold={k}")
        spec["models"] = [{"name": f"fold{k}", "model": f"models/fold={k}"} for k in folds]
    elif mode == "each":
        _copy_base(_base_dir(cfg, run_dir, folds[0]), tmp / "base")
        for k in folds:
            (tmp / "adapters" / f"fold={k}").mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copy(adapters[k] / name, tmp / "adapters" / f"fold={k}" / name)
        spec["base"] = "base"
        spec["models"] = [{"name": f"fold{k}", "adapter": f"adapters/fold={k}"} for k in folds]
    else:
        average_adapters([adapters[k] for k in folds], tmp / "adapters" / "average")
        log(f"averaged the LoRA adapters of folds {folds}")
        if merge:
            _merge(cfg, run_dir, folds[0], tmp, spec)
            log("merged the averaged adapter into the base weights")
        else:
            _copy_base(_base_dir(cfg, run_dir, folds[0]), tmp / "base")
            spec["base"] = "base"
            spec["models"] = [{"name": "average", "adapter": "adapters/average"}]
    copy_predictor(tmp)
    (tmp / "requirements.txt").write_text("\n".join(PREDICTOR_REQUIREMENTS) + "\n")
    (tmp / "run_config.yaml").write_text(to_yaml(cfg))
    (tmp / "export_config.json").write_text(json.dumps(spec, indent=2))
    from orchestrator.runs.export_report import export_markdown

    (tmp / "EXPORT.md").write_text(export_markdown(spec, report))
    return spec


def _merge(cfg, run_dir: Path, fold: int, tmp: Path, spec: dict) -> None:
    import importlib.util

    import torch

    from orchestrator.runs.adapters import merge_into_base
    from trainer_core.data.tokenization import build_tokenizer

    loader_spec = importlib.util.spec_from_file_location("submission_model", TEMPLATE / "submission_model.py")
    loader = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(loader)
    precision = json.loads((run_dir / f"fold={fold}" / "metrics.json").read_text())["precision"]
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    base, pad_id = _base_dir(cfg, run_dir, fold), build_tokenizer(cfg.model).pad_token_id
    # the base exactly as the run trained on it (its own quantization), in fp32 on the CPU: the merge adds to the
    # values its layers computed with
    merge_into_base(lambda: loader.load_classifier(base, spec, cfg.model.quantization, dtype, torch.device("cpu"),
                                                   pad_id),
                    tmp / "adapters" / "average", tmp / "model", dtype)
    shutil.rmtree(tmp / "adapters")
    spec["models"] = [{"name": "average", "model": "model"}]


def write_manifest(root: Path) -> None:
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        files[str(f.relative_to(root))] = {"sha256": h.hexdigest(), "bytes": f.stat().st_size}
    (root / "manifest.json").write_text(json.dumps({"files": files}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a run at a URI: downloaded with its adapters
    return on_staged_run(staged(args.run, keep=with_adapters), lambda run_dir: _export(args, run_dir))


def _export(args, run_dir: Path) -> int:
    try:
        cfg, report, folds, quantize = check_export(run_dir, args.out, args.folds, args.merge, args.quantize)
    except (ExportError, AdapterError, ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would follow the folder through the rename
    try:
        write_export(run_dir, tmp, cfg, report, folds, args.folds, args.merge, quantize)
        write_manifest(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported {args.run} ({args.folds}{', merged' if args.merge else ''}, quantize {quantize}) to {out}; "
          f"run: python {out / 'predict.py'} --data test.csv --out submission.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
