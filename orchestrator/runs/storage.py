"""Where a run directory lives: a local (or NFS) folder, or a URI on object storage - ``s3://bucket/prefix``,
``gs://bucket/prefix``, or any URI pyarrow or an installed fsspec package serves.

The filesystem of a URI comes from ``pyarrow.fs.FileSystem.from_uri`` (S3, GCS, HDFS), else from fsspec wrapped for
pyarrow (``PyFileSystem(FSSpecHandler(...))``). Credentials are found where those libraries look (environment,
profiles, instance roles); an S3-compatible endpoint (MinIO, Ceph) comes from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``. A URI nothing serves is a :class:`StorageError` (one line), raised before Ray starts, and is never
taken for a local folder named ``s3:``.

Files move whole: an upload goes to a temporary key beside its target (``.<name>.<random>.tmp``) and is then moved
onto it, so a reader sees the old object or the complete new one, never part of one (object stores publish whole
objects); a download goes to a temporary file that is then renamed (``trainer_core.paths.atomic_write``).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from trainer_core.paths import atomic_write

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")  # s3:/bucket: a URI with a slash lost, not a folder
# Where the object store is, not who may use it: passed on to Ray workers (orchestrator.cluster.folds.worker_env).
# Credentials are not passed: each node finds its own (environment, profile, instance role).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
DIRECT_UPLOAD_BYTES = 4 << 30  # S3 moves (server-side copies) stop at 5 GiB: larger files upload straight to the key
CHUNK = 8 << 20


class StorageError(RuntimeError):
    """A run location that cannot be served: unknown scheme, missing bucket, refused credentials."""


def is_uri(location: str | Path | None) -> bool:
    """``scheme://...`` other than ``file://`` (a local path)."""
    m = SCHEME.match(str(location or ""))
    return bool(m) and m.group(1).lower() != "file"


def local_path(location: str | Path) -> Path:
    """A local location as a Path: ``file:///x`` -> ``/x``. StorageError for ``s3:/bucket`` (a lost slash), which
    would otherwise become a local folder named ``s3:``."""
    text = str(location)
    if text.lower().startswith("file://"):
        return Path(text[7:])
    m = ONE_SLASH.match(text)
    if m and not Path(text).exists():
        raise StorageError(f"{text}: looks like a {m.group(1)}:// URI with a slash missing (a local folder named "
                           f"'{m.group(1)}:' is never created); write {m.group(1)}://{text[len(m.group(0)):]}")
    return Path(text)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it without the scheme) for ``uri``; StorageError when nothing serves it."""
    scheme = SCHEME.match(uri).group(1)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as e:  # ArrowInvalid: "Unrecognized filesystem type in URI"
        try:
            import fsspec

            spec_fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as e2:  # unknown protocol, or its package (s3fs, adlfs, ...) not installed
            raise StorageError(f"{uri}: no filesystem serves '{scheme}://' (pyarrow: {_first_line(e)}; fsspec: "
                               f"{_first_line(e2)}); use a local folder, s3://, gs:// or the scheme of an installed "
                               f"fsspec package") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(spec_fs))
    except OSError as e:
        raise StorageError(f"{uri}: {_first_line(e)}") from None
    return fs, path.rstrip("/")


def check_reachable(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """StorageError unless the bucket of ``path`` exists and these credentials can see it (S3 and GCS)."""
    if fs.type_name not in ("s3", "gcs"):
        return
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise StorageError(f"{uri}: {_first_line(e)}") from None
    if info.type == pafs.FileType.NotFound:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default"
        raise StorageError(f"{uri}: bucket '{bucket}' does not exist or these credentials cannot see it (endpoint: "
                           f"{endpoint}); create it first")


def join(location: str, *parts: str) -> str:
    """``location`` / parts, for a URI or a local path (``..`` resolved inside a URI)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    scheme, rest = location.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, *parts))}"


def ray_storage(location: str | Path, sub: str) -> tuple[str, pafs.FileSystem | None]:
    """(``storage_path``, ``storage_filesystem``) for Ray Train/Tune at ``location/sub``: a local absolute path and
    None, or the path on the URI's filesystem and that filesystem."""
    if not is_uri(location):
        return str((local_path(location) / sub).resolve()), None
    fs, path = filesystem(str(location))
    return f"{path}/{sub}", fs


def remove_tree(location: str | Path, sub: str) -> None:
    """Delete ``location/sub`` and everything under it, if it exists."""
    if not is_uri(location):
        shutil.rmtree(local_path(location) / sub, ignore_errors=True)
        return
    fs, path = filesystem(str(location))
    if fs.get_file_info(f"{path}/{sub}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{path}/{sub}")


def read_bytes(location: str | Path, rel: str) -> bytes:
    if not is_uri(location):
        return (local_path(location) / rel).read_bytes()
    fs, path = filesystem(str(location))
    with fs.open_input_stream(f"{path}/{rel}") as f:
        return f.read()


def _hidden(rel: str) -> bool:
    """A temporary file or key (``.<name>...``: our atomic writes and uploads in progress) anywhere in ``rel``."""
    return any(part.startswith(".") for part in rel.split("/"))


def list_files(fs: pafs.FileSystem, root: str) -> dict[str, tuple[int, int]]:
    """{path relative to ``root``: (size, mtime_ns)} of every object under ``root``, temporary keys left out."""
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].lstrip("/")
        if rel and not _hidden(rel):
            out[rel] = (info.size, info.mtime_ns or 0)
    return out


def top_names(fs: pafs.FileSystem, root: str) -> list[str]:
    """Names directly under ``root`` (objects and prefixes), temporary keys left out."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    return sorted(n for n in (i.base_name for i in infos) if n and not n.startswith("."))


def download(fs: pafs.FileSystem, key: str, dest: Path, mtime_ns: int = 0) -> None:
    """Object ``key`` -> local file ``dest`` (atomically), stamped with the object's time when given."""
    def write(tmp: Path) -> None:
        with fs.open_input_stream(key) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    atomic_write(dest, write)
    if mtime_ns:
        os.utime(dest, ns=(mtime_ns, mtime_ns))


TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # the name :func:`temporary_key` gives


def temporary_key(key: str) -> str:
    """Where an upload to ``key`` goes first: ``.<name>.<random>.tmp`` beside it (hidden from listings)."""
    parent, name = posixpath.split(key)
    return f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"


def remove_orphaned_uploads(fs: pafs.FileSystem, root: str, keep_under: tuple[str, ...] = ("ray/",)) -> int:
    """Delete the temporary keys that uploads cut short left under ``root`` (a worker killed mid-upload never moves
    nor deletes its ``.<name>.<random>.tmp``); keys under ``keep_under`` (Ray's own storage) are left alone. Only for
    a moment when nothing uploads into ``root``: a live upload's key would go too. Returns how many."""
    n = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type == pafs.FileType.File and TEMPORARY.match(info.base_name) and not rel.startswith(keep_under):
            fs.delete_file(info.path)
            n += 1
    return n


def upload(fs: pafs.FileSystem, src: Path, key: str) -> None:
    """Local file ``src`` -> object ``key``: to a temporary key beside it, then moved onto it (whole or not at all).
    Files over DIRECT_UPLOAD_BYTES go straight to the key: a multipart upload the object store completes only once
    every part has arrived."""
    if src.stat().st_size > DIRECT_UPLOAD_BYTES:
        pafs.copy_files(str(src), key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    tmp = temporary_key(key)
    try:
        with open(src, "rb") as f, fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(f, out, CHUNK)
        fs.move(tmp, key)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
