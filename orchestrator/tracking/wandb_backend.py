"""Weights & Biases: one W&B run per fold (or sweep trial) and one for the CV itself, all in one group named after
the run directory (W&B has no nested runs; a group is how its UI shows runs that belong together). Offline mode writes
them under ``<run_dir>/wandb`` for ``wandb sync`` later."""

from __future__ import annotations

import re
from pathlib import Path


class WandbBackend:
    name = "wandb"

    def __init__(self, mode: str, project: str, entity: str | None, run_dir: Path, group: str):
        import wandb

        self.wandb, self.mode, self.project, self.entity = wandb, mode, project, entity
        self.dir, self.group = Path(run_dir), group
        self.target = f"{mode}:{entity or ''}/{project}"
        self.runs: dict[str | None, str] = {}  # run ids; None = the CV's own run
        self.handles: dict[str | None, object] = {}  # the open wandb Run objects
        self.saved_children: dict[str, str] = {}

    def open_run(self, key: str | None, name: str, params: dict[str, str], job_type: str, *,
                 resume_id: str | None = None, config: dict | None = None) -> None:
        wandb = self.wandb
        self.dir.mkdir(parents=True, exist_ok=True)
        # reinit="create_new": several runs open at once in this process (folds train concurrently); console="off":
        # the driver's console is the project's progress lines, not W&B's; no system stats of the driver machine
        # (the folds run elsewhere).
        run = wandb.init(mode=self.mode, project=self.project, entity=self.entity, dir=str(self.dir), group=self.group,
                         name=name if key is None else f"{self.group}/{name}", job_type=job_type,
                         config=config if config is not None else params, id=resume_id,
                         resume="allow" if resume_id else None, reinit="create_new",
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                                 save_code=False, init_timeout=60))
        self.runs[key], self.handles[key] = run.id, run

    def log(self, key: str | None, values: dict[str, float], step: int) -> None:
        self.handles[key].log(values, step=step)

    def summary(self, key: str | None, values: dict[str, float]) -> None:
        self.handles[key].summary.update(values)

    def artifacts(self, key: str | None, paths: list[Path]) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.group}-{key or 'cv'}")  # W&B's artifact-name alphabet
        artifact = self.wandb.Artifact(name, type="report")
        for p in paths:
            artifact.add_file(str(p))
        self.handles[key].log_artifact(artifact)

    def close(self, key: str | None, ok: bool) -> None:
        run = self.handles.pop(key, None)
        if run is not None:
            run.finish(exit_code=0 if ok else 1)
