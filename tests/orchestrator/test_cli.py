"""The commands' command lines. What a user reads (--help-config, the examples in each command's docstring, the
README's flag lists) and the config merge are checked in this process through each command's ``main(argv)``; a
subprocess runs only where the process boundary is the point: the exit code and one-line error of bad input, before
Ray is imported, with nothing written."""

import argparse
import ast
import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pandas as pd
import pytest
import yaml

from orchestrator import cv
from tests.conftest import CONFIGS, REPO, arena_row
from trainer_core.config import Config, load_config, validate

COMMANDS = ["cv", "tune", "predict", "report", "ensemble", "compare", "bench", "efficiency"]
# README sections that document a command's flags (heading text -> command)
README_SECTIONS = {"## `python -m orchestrator.cv`": "cv", "## `python -m orchestrator.tune`": "tune",
                   "### Predicting and soft labels: `python -m orchestrator.predict`": "predict",
                   "### Comparing two runs: `python -m orchestrator.compare`": "compare",
                   "### Ensembles: `python -m orchestrator.ensemble`": "ensemble"}


# ------------------------------------------------------------------------------------------------ in this process


def test_print_config_resolves_defaults_yaml_and_overrides(capsys):
    assert cv.main(["--config", str(CONFIGS / "smoke.yaml"), "--print-config", "train.lr=0.5", "lora.r=4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.5 and cfg["lora"]["r"] == 4  # the overrides
    assert cfg["experiment"] == "smoke" and cfg["model"]["random_config"]["num_hidden_layers"] == 4  # the YAML
    assert cfg["train"]["max_grad_norm"] == Config().train.max_grad_norm  # a default smoke.yaml leaves alone
    assert cv.main(["--print-config", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == "demo_cpu"  # the embedded default


def test_overrides_may_come_before_and_after_flags(capsys):
    assert cv.main(["train.lr=0.5", "--config", str(CONFIGS / "smoke.yaml"), "lora.r=4", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.5 and cfg["lora"]["r"] == 4 and cfg["experiment"] == "smoke"


def test_bad_override_is_one_clear_error(capsys):
    assert cv.main(["--config", str(CONFIGS / "smoke.yaml"), "train.lr=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr: expected a number" in err[0]


def help_config_entries(text: str) -> dict[str, tuple[str, str]]:
    """--help-config's output as {key: (default as printed, doc)}: 'key = default' lines, each with its doc indented
    below it."""
    entries: dict[str, tuple[str, str]] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("    ") and key:
            default, doc = entries[key]
            entries[key] = (default, f"{doc} {line.strip()}".strip())
        elif line.strip():
            key, default = line.split(" = ", 1)
            assert key not in entries, f"{key} listed twice"
            entries[key] = (default, "")
    return entries


def test_help_config_lists_every_key_with_its_default_and_a_doc(capsys):
    """Every key of the config tree (found here from Config().to_dict(), not from the listing's own walk) appears once
    in --help-config, with the default a fresh Config holds and a doc: a key added without a doc fails here."""
    assert cv.main(["--help-config"]) == 0
    entries = help_config_entries(capsys.readouterr().out)
    defaults = Config().to_dict()
    expected = {}
    for name, value in defaults.items():
        if isinstance(value, dict) and name in ("data", "model", "lora", "train", "cluster", "tracking"):
            expected.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            expected[name] = value
    assert set(entries) == set(expected)
    for key, (default, doc) in entries.items():
        assert json.loads(default) == expected[key], key
        assert len(doc.split()) >= 2, f"{key} has no doc in trainer_core/config/schema.py"


class Parsed(Exception):
    """Raised instead of running a command once its parser has read the command line."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace):
        super().__init__("parsed")
        self.parser, self.namespace = parser, args


@pytest.fixture
def parse_only(monkeypatch):
    """``parse(command, argv)`` runs the command's main(argv) only as far as its argparse parser, which then raises
    Parsed; a command line the parser refuses exits 2 (SystemExit), as it would for a user."""
    for name in ("parse_args", "parse_intermixed_args"):
        real = getattr(argparse.ArgumentParser, name)

        def stop(self, *a, _real=real, **kw):
            raise Parsed(self, _real(self, *a, **kw))
        monkeypatch.setattr(argparse.ArgumentParser, name, stop)

    def parse(command: str, argv: list[str]) -> Parsed:
        with pytest.raises(Parsed) as e:
            importlib.import_module(f"orchestrator.{command}").main(argv)
        return e.value
    return parse


def docstring_examples(command: str) -> list[tuple[str, list[str]]]:
    """(command, argv) of every ``python -m orchestrator.X ...`` line in a command module's docstring (continuation
    lines joined, trailing comments dropped)."""
    doc = ast.get_docstring(ast.parse((REPO / "orchestrator" / f"{command}.py").read_text()))
    text = doc.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*python -m orchestrator\.(\w+)(.*)", line)
        if m:
            out.append((m.group(1), m.group(2).split("#")[0].split()))
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_docstring_examples_parse_and_their_configs_validate(command, parse_only, monkeypatch):
    """The examples at the top of each command's --help are what users copy: each must parse with the command it
    names, and an example's --config (one in the repo) with its overrides must load and validate."""
    monkeypatch.chdir(REPO)  # the examples' paths are relative to the repository
    examples = docstring_examples(command)
    assert examples, f"orchestrator/{command}.py's docstring shows no example"
    for name, argv in examples:
        args = parse_only(name, argv).namespace
        config = getattr(args, "config", None)
        if config is not None and not str(config).startswith("runs/"):  # runs/...: written by an earlier example
            validate(load_config(config, getattr(args, "overrides", [])))


def readme_section(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    assert f"\n{heading}\n" in text, f"README has no section {heading!r}"
    level = heading.split()[0]
    body = text.split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


@pytest.mark.parametrize("heading", list(README_SECTIONS))
def test_readme_documents_every_flag_of_the_command(heading, parse_only):
    command = README_SECTIONS[heading]
    argv = {"cv": ["--print-config"], "tune": ["--config", "c.yaml"], "predict": ["--run", "r"], "compare": ["a", "b"],
            "ensemble": ["a", "b", "--out", "e"]}[command]
    usage = parse_only(command, argv).parser.format_usage()
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", usage)) - {"--help"}
    section = readme_section(heading)
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", section))
    assert missing == [], f"README section {heading!r} does not document {missing}"


# ------------------------------------------------------------------------------------------------ the process boundary

# Runs the command as `python -m` does and reports on stderr's last line whether Ray was imported by the time the
# process ended: "before Ray starts" means the error came before `import ray`, not only that Ray printed nothing.
PROBE = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('ray imported:', 'ray' in sys.modules, file=sys.stderr))\n"
         "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str  # without the probe's line
    ray_imported: bool


def run(module: str, *args, timeout=180) -> Result:
    res = subprocess.run([sys.executable, "-c", PROBE, module, *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    *err, probe = res.stderr.rstrip("\n").split("\n")
    assert probe.startswith("ray imported: "), res.stderr[-3000:]
    return Result(res.returncode, res.stdout, "\n".join(err), probe == "ray imported: True")


def test_bad_extra_rows_stop_before_ray_and_write_nothing(tmp_path):
    rows = [arena_row(i) for i in range(1, 6)]
    rows[2]["winner_tie"] = 1  # two winners
    bad = tmp_path / "extra.csv"
    pd.DataFrame(rows).to_csv(bad, index=False)
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, f"data.extra_train_path={bad}")
    assert res.returncode == 2 and not res.ray_imported
    labels = "columns winner_model_a, winner_model_b, winner_tie"
    assert res.stderr.strip() == f"error: {bad}: {labels}: id 3: exactly one must be 1"
    assert not out.exists()


def test_freeze_layers_past_the_models_depth_stops_before_ray_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, "lora.freeze_layers=99")
    assert res.returncode == 2 and not res.ray_imported
    assert res.stderr.strip().startswith("error: lora.freeze_layers=99 leaves no layer to train: the model has ")
    assert not out.exists()


def test_bad_data_stops_before_ray_and_writes_nothing(tmp_path):
    rows = [arena_row(i) for i in range(1, 11)]
    rows[3]["response_a"] = "['python', 'literal']"
    bad = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(bad, index=False)
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, f"data.path={bad}")
    assert res.returncode == 2 and not res.ray_imported
    assert res.stderr.strip() == f"error: {bad}: column 'response_a': id 4: not a JSON list of strings"
    assert not out.exists()


def test_gpu_config_on_a_machine_without_gpus_says_why(tmp_path):
    # random weights, byte tokenizer: the 9B checkpoint is not on this machine (the weights check would stop first)
    res = run("orchestrator.cv", "--config", CONFIGS / "gemma2_9b_qlora.yaml", "--folds", "0", "--out",
              tmp_path / "g", "data.max_rows=50", "model.init=random", "model.tokenizer=bytes", timeout=300)
    assert res.returncode == 3
    assert "cluster.gpus_per_fold=1" in res.stderr and "has 0 GPU(s)" in res.stderr
    # one line, before Ray starts and before anything is written: a rerun is not refused as "a different config"
    assert len(res.stderr.strip().splitlines()) == 1 and "Ray was not started" in res.stderr
    assert not (tmp_path / "g").exists() and "training folds" not in res.stdout


def test_a_joined_cluster_without_enough_gpus_is_refused_from_its_resources():
    from orchestrator.cluster.schedule import ClusterError
    from orchestrator.cv import check_gpus
    from trainer_core.config import load_config

    cfg = load_config(CONFIGS / "smoke.yaml", ["cluster.gpus_per_fold=2"])
    with pytest.raises(ClusterError, match="the Ray cluster has 1 GPU"):
        check_gpus(cfg, {"GPU": 1.0, "CPU": 8.0})
    check_gpus(cfg, {"GPU": 2.0, "CPU": 8.0})
    check_gpus(load_config(CONFIGS / "smoke.yaml"), {"CPU": 1.0})  # CPU folds: nothing to check here

