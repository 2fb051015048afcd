"""A run directory as the commands use it: a local folder, or a URI on object storage worked on through a local
staging folder (:mod:`orchestrator.runs.storage` says which URIs and how files move).

The project's code reads and writes ``RunDir.local`` only. For a URI, ``local`` is a temporary folder named after the
URI's last part, and:

- :meth:`RemoteRunDir.pull` downloads what the command reads (by default everything but Ray's checkpoints under
  ``ray/``, the folds' weights under ``adapter/`` and compile caches), skipping files it already has;
- :meth:`RemoteRunDir.push` uploads every local file written or changed since the last pull or push, **in the order
  they were written** (their mtimes), so the order protocols of the local code hold on the store too: ``run.json``
  before the rest, a fold's ``metrics.json`` after its other files, ``report.json`` after the report files.

Ray Train and Tune write their checkpoints and state straight to ``<location>/ray`` (``storage.ray_storage``), and
each fold's worker uploads its own files when the fold ends (:class:`FoldStage`), so nothing depends on a disk that
every node sees. Deletion is never mirrored, except by :meth:`RemoteRunDir.clear` (``--restart``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.runs import storage

SKIPPED_DIRS = ("ray", "adapter", "compile_cache")  # checkpoints, fold weights, compile caches: read where needed
MARKERS = ("run.json", "metrics.json", "report.json")  # on equal mtimes these go last
STAGE_PREFIX = "orchestrator-stage-"  # + <pid>-<random>, under the system's temporary folder


def remove_stale_staging() -> None:
    """Remove the staging folders of processes that are gone (a fold worker killed mid-fold cannot remove its own):
    each folder's name carries the pid of the process that made it."""
    import psutil

    for path in Path(tempfile.gettempdir()).glob(f"{STAGE_PREFIX}*-*"):
        pid = path.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def run_files(rel: str) -> bool:
    """What a run's bookkeeping reads (resume checks, the reducer, leaderboards): all but SKIPPED_DIRS."""
    return not any(part in SKIPPED_DIRS for part in rel.split("/")[:-1])


def with_adapters(rel: str) -> bool:
    """What predicting and exporting read: :func:`run_files` plus every fold's ``adapter/``."""
    return not any(part in ("ray", "compile_cache") for part in rel.split("/")[:-1])


class RunDir:
    """A run directory on a disk this machine sees: ``local`` is the place itself; pulls and pushes do nothing."""

    remote = False

    def __init__(self, path: str | Path):
        self.local = storage.local_path(path).expanduser().resolve()
        self.location = str(self.local)

    def show(self, name: str = "") -> str:
        """How the console names ``name`` in this run directory (the URI for a remote one)."""
        return storage.join(self.location, name) if name else self.location

    def top_names(self) -> list[str]:
        return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []

    def pull(self, keep: Callable[[str], bool] = run_files) -> int:
        return 0

    def push(self, under: str = "") -> int:
        return 0

    def clear(self) -> None:
        """Nothing: the local code empties a local run directory itself (``--restart``)."""

    def tidy(self) -> int:
        """Nothing in a folder (its writes are renames, :func:`trainer_core.paths.atomic_write`)."""
        return 0

    @contextlib.contextmanager
    def pushed_however_it_ends(self):
        """What the driver wrote inside the block (sessions.json, error logs, the report, tracking ids) is pushed
        however the block ends; when it raises, a failing push is suppressed: the error in flight is the one to
        report."""
        try:
            yield self
        except BaseException:
            with contextlib.suppress(Exception):
                self.push()
            raise
        self.push()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteRunDir(RunDir):
    """A run directory at a URI, mirrored through a local staging folder."""

    remote = True

    def __init__(self, uri: str, *, check: bool = True):
        self.location = uri.rstrip("/")
        self.fs, self.root = storage.filesystem(self.location)
        if check:
            storage.check_reachable(self.fs, self.root, self.location)
        remove_stale_staging()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-"))
        self.local = self._tmp / (self.root.rsplit("/", 1)[-1] or "run")
        self.local.mkdir()
        self._remote: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) of the object when last synced
        self._local: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) of the local file when last synced

    def top_names(self) -> list[str]:
        return storage.top_names(self.fs, self.root)

    def _sig(self, rel: str) -> tuple[int, int]:
        st = (self.local / rel).stat()
        return st.st_size, st.st_mtime_ns

    def pull(self, keep: Callable[[str], bool] = run_files) -> int:
        """Download every object ``keep`` accepts that changed since this folder last saw it; returns how many."""
        n = 0
        for rel, sig in sorted(storage.list_files(self.fs, self.root).items()):
            if not keep(rel) or (self._remote.get(rel) == sig and (self.local / rel).exists()):
                continue
            storage.download(self.fs, f"{self.root}/{rel}", self.local / rel, sig[1])
            self._remote[rel], self._local[rel] = sig, self._sig(rel)
            n += 1
        return n

    def push(self, under: str = "") -> int:
        """Upload every local file under ``under`` (default: all) written or changed since the last pull or push, in
        the order they were written; symbolic links and temporary files stay local. Returns how many."""
        changed = []
        top = self.local / under
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames
                           if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                path = Path(dirpath, name)
                rel = path.relative_to(self.local).as_posix()
                if name.startswith(".") or path.is_symlink():
                    continue
                sig = self._sig(rel)
                if self._local.get(rel) != sig:
                    changed.append((sig[1], name in MARKERS, rel, sig))
        for _, _, rel, sig in sorted(changed):
            storage.upload(self.fs, self.local / rel, f"{self.root}/{rel}")
            self._local[rel] = sig
        if changed:  # what the store now holds for them, so a later pull does not fetch them back
            listing = storage.list_files(self.fs, self.root)
            self._remote.update({rel: listing[rel] for _, _, rel, _ in changed if rel in listing})
        return len(changed)

    def tidy(self) -> int:
        """Delete the temporary keys of uploads a killed process cut short (a fold's worker SIGKILLed mid-upload):
        only when the run's folds are over, so that no live upload loses its key. Returns how many."""
        return storage.remove_orphaned_uploads(self.fs, self.root)

    def clear(self) -> None:
        """Delete every object under the URI (``--restart``, once the checks have passed)."""
        self.fs.delete_dir_contents(self.root, missing_dir_ok=True)
        self._remote.clear()

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def open_run(location: str | Path | RunDir, *, check: bool = True) -> RunDir:
    """The run directory at ``location``: a RemoteRunDir for a URI (StorageError when nothing serves it), else a
    RunDir."""
    if isinstance(location, RunDir):
        return location
    return RemoteRunDir(str(location), check=check) if storage.is_uri(location) else RunDir(location)


@contextlib.contextmanager
def staged(location: str | Path, *, keep: Callable[[str], bool] = run_files,
           write_back: bool = False) -> Iterator[Path]:
    """A run (or ensemble) directory named on the command line, as a local folder: a local one as it is; a URI pulled
    into a staging folder (``keep``: which files), removed afterwards. ``write_back``: files the command wrote there
    are uploaded when it ends without an error (``orchestrator.report``)."""
    with open_run(location) as run:
        if run.remote:
            if not run.top_names():
                raise storage.StorageError(f"{run.location}: nothing there (no run.json)")
            run.pull(keep)
        yield run.local
        if write_back:
            run.push()


class FoldStage:
    """Where a fold's Ray Train worker writes: the run directory itself when it is local (the same path on every
    node: a local or shared disk), else a staging folder holding the run's ``data.parquet``, from which rank 0's
    ``fold=<k>/`` and ``tensorboard/fold=<k>/`` are uploaded just before the fold's final report (:meth:`publish`;
    the events also at every checkpoint, :meth:`sync_events`). A fold that stops on an error uploads only its
    events: its files are written again by the run that finishes it."""

    def __init__(self, location: str, fold: int):
        self.fold = fold
        self.run = open_run(location, check=False)
        if self.run.remote:
            self.run.pull(lambda rel: rel == "data.parquet")
        self.local = self.run.local

    def sync_events(self) -> None:
        self.run.push(f"tensorboard/fold={self.fold}")

    def publish(self) -> None:
        """Upload the fold's events, then its files (``metrics.json`` last: the fold is complete on the store only
        now). Called before the fold's final report: once Tune sees that report it may end the trial, workers and
        all, at any moment."""
        self.sync_events()
        self.run.push(f"fold={self.fold}")
        self.run.close()  # nothing is read from it any more, and the worker may not get to remove it

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.publish()  # anything not yet uploaded (a paused piece's last events)
            else:
                with contextlib.suppress(Exception):  # the fold's own error is the one to report
                    self.sync_events()
        finally:
            self.run.close()


@contextlib.contextmanager
def staged_for_predict(location: str | Path) -> Iterator[Path]:
    """:func:`staged` with every fold's weights, for ``orchestrator.predict``; for an ensemble whose members are (or,
    stored relative to it, lie) at a URI, those members too, with the staged ``ensemble.json`` pointing at their
    staging folders (the original is never rewritten)."""
    with contextlib.ExitStack() as stack:
        yield _stage_tree(str(location), stack)


def _stage_tree(location: str, stack: contextlib.ExitStack) -> Path:
    from orchestrator.runs.provenance import ENSEMBLE_FILE

    local = stack.enter_context(staged(location, keep=with_adapters))
    if not (local / ENSEMBLE_FILE).exists():
        return local
    spec = json.loads((local / ENSEMBLE_FILE).read_text())
    remote = storage.is_uri(location)
    members = [m if storage.is_uri(m) or Path(m).is_absolute() else storage.join(location, m) if remote
               else str((local / m).resolve()) for m in spec["members"]]
    if not any(storage.is_uri(m) for m in members):
        return local
    if not remote:  # a local ensemble with members on object storage: its copy points at their staging folders
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{STAGE_PREFIX}{os.getpid()}-"))
        copy = Path(tmp) / local.name
        shutil.copytree(local, copy)
        local = copy
    spec["members"] = [str(_stage_tree(m, stack)) if storage.is_uri(m) else m for m in members]
    (local / ENSEMBLE_FILE).write_text(json.dumps(spec, indent=2))
    return local


def on_staged_run(stage, work: Callable[[Path], int]) -> int:
    """A command's body on a staged run directory: ``work(local folder)``'s exit code, or 2 with one line when the
    run's storage cannot serve it."""
    try:
        with stage as run_dir:
            return work(run_dir)
    except storage.StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
