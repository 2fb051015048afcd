"""What runs on every Ray Train worker of one fold: a thin adapter around ``trainer_core.fold.loop.train_fold``.

The fold reads and writes a local folder (``trainer_core`` knows nothing of object storage): the run directory itself,
or for a run directory at a URI a staging folder whose fold files and TensorBoard events are uploaded by rank 0
(``orchestrator.runs.staging.FoldStage``)."""

from __future__ import annotations

import pickle
import shutil
import tempfile
import traceback
from pathlib import Path

import ray
import ray.train

from orchestrator.runs.compile_cache import use_compile_cache
from orchestrator.runs.staging import FoldStage
from trainer_core.config import config_from_dict


class FoldError(RuntimeError):
    """A fold's exception that could not be pickled, as text: its type, message and traceback in the worker."""


def sendable(e: Exception) -> Exception:
    """``e`` itself when it pickles, else a :class:`FoldError` with its text. Ray pickles the training function's
    exception to send it to the driver; one that holds unpicklable objects (torch inductor's errors keep compiled
    kernels) would otherwise reach the user as Ray's pickling failure instead of the cause."""
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - any pickling failure: send text instead
        return FoldError("".join(traceback.format_exception(e)).rstrip())


def fold_worker(config: dict) -> dict:
    """The training function of a fold's TorchTrainer (``orchestrator.cluster.folds.build_trainer``)."""
    import pandas as pd
    import torch

    from trainer_core.fold.loop import train_fold

    cfg = config_from_dict(config["cfg"])
    fold, placement = config["fold"], config["placement"]
    use_compile_cache(config.get("compile_cache"))
    if not placement.use_gpu:
        torch.set_num_threads(max(1, int(placement.cpus_per_worker)))  # a packed CPU fold uses all it reserved
    with FoldStage(config["run_dir"], fold) as stage:
        run_dir = stage.local
        rows = pd.read_parquet(run_dir / "data.parquet")

        def report(metrics: dict, ckpt_dir: Path | None) -> None:
            if metrics.get("done"):  # the fold's files are written; Tune may end the trial once it sees this report
                stage.publish()
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            ray.train.report(metrics, checkpoint=checkpoint)
            if ckpt_dir is not None:
                stage.sync_events()  # the loss curve so far, beside the checkpoint it belongs to

        resume_dir = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume_dir = Path(tempfile.mkdtemp(prefix=f"fold{fold}-resume-"))
            checkpoint.to_directory(str(resume_dir))
        try:
            result = train_fold(cfg, fold, rows, run_dir / f"fold={fold}", resume_from=resume_dir, report=report,
                                tb_dir=run_dir / "tensorboard" / f"fold={fold}", device=ray.train.torch.get_device(),
                                stop_at=placement.stop_at)
        except Exception as e:
            raise sendable(e) from None
        finally:
            if resume_dir is not None:
                shutil.rmtree(resume_dir, ignore_errors=True)
    return {"paused": True} if result is None else result.metrics.to_dict()
