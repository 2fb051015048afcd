"""Sweep search spaces: a YAML mapping of dotted config keys to one distribution each, checked against the base
config before Ray starts.

A space file looks like::

    train.lr: {loguniform: [5.0e-5, 5.0e-4]}   # log-uniform float in [lo, hi]
    lora.dropout: {uniform: [0.0, 0.1]}        # uniform float in [lo, hi]
    train.warmup_steps: {randint: [0, 50]}     # integer in [lo, hi)  (hi excluded, as in Ray Tune)
    lora.r: {choice: [8, 16, 32]}              # one of the values, drawn per trial
    lora.freeze_layers: {grid: [0, 8, 16]}     # every value: each sample runs the whole grid (random search only)

Every key must exist in the config tree, every value (each choice, each range end) must have the key's type and keep
the config valid - including against the model's real depth (``lora.freeze_layers`` below its decoder layer count, read
from ``random_config`` or the checkpoint's config.json) - so no trial can fail inside Ray for a value the sweep drew;
every problem is reported at once, one line each. This module does not import Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer_core.config import Config, ConfigError, apply_overrides, get_value, validate
from trainer_core.model.weights import model_fit_problem

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
# The sweep's rows, folds and placement are fixed for all trials (one data.parquet, one concurrency plan).
FIXED_PREFIXES = ("experiment", "data.path", "data.max_rows", "data.n_folds", "data.fold_by", "cluster.", "tracking.")


class SpaceError(ValueError):
    """A search space that cannot be used; the message lists every problem, one per line."""


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key, e.g. "train.lr"
    kind: str  # one of KINDS
    values: tuple  # (lo, hi) for ranges, the candidates for choice/grid


def _number(x: Any) -> float | None:
    """A YAML number, including '5e-5' (YAML 1.1 reads exponents without a dot as strings)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _parse_entry(key: str, spec: Any, errs: list[str]) -> Param | None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        errs.append(f"{key}: expected one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r}")
        return None
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            errs.append(f"{key}: {kind} needs a non-empty list of values, got {args!r}")
            return None
        return Param(key, kind, tuple(args))
    nums = [_number(a) for a in args] if isinstance(args, list) and len(args) == 2 else [None]
    if None in nums:
        errs.append(f"{key}: {kind} needs [lo, hi] (two numbers), got {args!r}")
        return None
    lo, hi = nums
    if kind == "randint" and not all(float(v).is_integer() for v in (lo, hi)):
        errs.append(f"{key}: randint needs integer bounds, got {args!r}")
        return None
    if kind == "randint":
        lo, hi = int(lo), int(hi)
    if not lo < hi:
        errs.append(f"{key}: {kind} needs lo < hi, got {args!r}")
        return None
    if kind == "loguniform" and lo <= 0:
        errs.append(f"{key}: loguniform needs lo > 0, got {args!r}")
        return None
    return Param(key, kind, (lo, hi))


def _candidates(p: Param) -> list:
    """Values that stand for the whole distribution when checking it against the config."""
    if p.kind == "randint":
        return [p.values[0], p.values[1] - 1]  # hi is excluded
    return list(p.values)


def _check_against_config(p: Param, base: Config, search: str, errs: list[str]) -> Param:
    """Append the problems of ``p`` to ``errs``; returns ``p`` with choice/grid values in the key's type ('1e-4' ->
    1e-4), so trial configs, the leaderboard and best.yaml all show the value that was used."""
    if p.key.startswith(FIXED_PREFIXES) or p.key in ("data", "cluster", "tracking"):
        errs.append(f"{p.key}: cannot be searched (a sweep's data, folds, cluster placement and tracking are the same "
                    f"for every trial)")
        return p
    typed = []
    for v in _candidates(p):
        try:
            cfg = apply_overrides(base, {p.key: v})
        except ConfigError as e:
            errs.append(f"{p.key}: {e}" if not str(e).startswith(p.key) else str(e))
            return p  # an unknown key or a wrong type fails the same way for every value
        typed.append(get_value(cfg, p.key))
        if p.kind in ("uniform", "loguniform") and isinstance(get_value(cfg, p.key), int):
            errs.append(f"{p.key}: is an integer setting; {p.kind} draws fractions - use randint or choice")
            return
        try:
            validate(cfg)
        except ConfigError as e:
            problems = "; ".join(line.strip() for line in str(e).splitlines()[1:])
            errs.append(f"{p.key}: value {v!r} makes the config invalid ({problems})")
            continue
        misfit = model_fit_problem(cfg)
        if misfit:
            errs.append(f"{p.key}: value {v!r} does not fit the model ({misfit})")
    if search == "optuna":
        if p.kind == "grid":
            errs.append(f"{p.key}: grid is not supported by --search optuna (use choice, or --search random)")
        elif p.kind == "choice" and not all(v is None or isinstance(v, (bool, int, float, str)) for v in p.values):
            errs.append(f"{p.key}: --search optuna needs plain choice values (numbers, strings, true/false, null)")
    return Param(p.key, p.kind, tuple(typed)) if p.kind in ("choice", "grid") and len(typed) == len(p.values) else p


def parse_space(raw: Any, base: Config, search: str = "random", source: str = "space") -> dict[str, Param]:
    """Validate a loaded space mapping against ``base`` (a valid config); SpaceError lists every problem."""
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{source}: a search space is a non-empty mapping of dotted keys, e.g. "
                         f"'train.lr: {{loguniform: [5.0e-5, 5.0e-4]}}'")
    errs: list[str] = []
    misfit = model_fit_problem(base)
    if misfit and "lora.freeze_layers" not in raw:
        errs.append(f"the base config: {misfit}")
    space: dict[str, Param] = {}
    for key, spec in raw.items():
        p = _parse_entry(str(key), spec, errs)
        if p is not None:
            space[p.key] = _check_against_config(p, base, search, errs)
    if errs:
        raise SpaceError(f"{source}: invalid search space:\n  " + "\n  ".join(errs))
    return space


def load_space(path: str | Path, base: Config, search: str = "random") -> dict[str, Param]:
    """Read and validate a space file (see the module docstring)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpaceError(f"{path}: cannot read search space ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(raw, base, search, source=str(path))


def n_trials(space: dict[str, Param], num_samples: int) -> int:
    """Trials a random/grid sweep runs: each sample covers every grid combination."""
    return num_samples * math.prod(len(p.values) for p in space.values() if p.kind == "grid")


def space_fingerprint(space: dict[str, Param]) -> str:
    canon = {k: [p.kind, list(p.values)] for k, p in sorted(space.items())}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_param_space(space: dict[str, Param]) -> dict:
    """Ray Tune domains keyed by the dotted config keys (a trial's config is then exactly its overrides)."""
    from ray import tune

    make = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {k: make[p.kind](p.values) for k, p in space.items()}
