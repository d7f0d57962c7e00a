"""Writes that either complete or leave the previous file in place, even across a power cut: temp
name in the same folder, fsync, rename, fsync the folder (without the first fsync a rename can
reach the disk before the data, leaving an empty file; without the second, the rename itself can
be lost). A write that finds the disk full (or over a file size limit) stops the stage with one
line naming the file; the previous file is left as it was. Temp files that a killed process could
not clean up are removed by the next write of the same target; a folder whose swap was cut off
between its two renames is put back."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no space, over quota, over the file size limit


class DiskFullError(PipelineError):
    """An output did not fit on its disk."""


@contextlib.contextmanager
def _reported_as(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise DiskFullError(
            f"cannot write {target}: {exc.strerror}; any previous {target} is left as it was. "
            "Free space on its disk (or raise the file size limit) and rerun"
        ) from None


def _retired(target: Path) -> Path:
    """Where a folder swap keeps the previous `target` until the new one is in place: not a temp
    name, so stale-temp cleanup never takes it for litter."""
    return target.parent / f".{target.name}.previous"


def _remove_stale_temps(target: Path) -> None:
    """The temp files and folders of `target` that a killed writer could not remove. A swap killed
    between its renames left no `target`: the previous one is put back from where it was retired."""
    retired = _retired(target)
    if retired.exists() and not target.exists():
        os.replace(retired, target)
        _fsync(target.parent)
    elif retired.exists():
        shutil.rmtree(retired)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _fsync(path: Path) -> None:
    """Flush `path`'s data (a file) or entries (a folder) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file and folder below `folder`, then `folder` itself."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(parent) / name)
        _fsync(Path(parent))


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    with _reported_as(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, target)
            _fsync(target.parent)
        finally:
            tmp.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode())


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it becomes `target` (the old one
    moved aside to `_retired`, then deleted), on error it is removed."""
    target = Path(target)
    with _reported_as(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _reported_as(target):
            yield staging
            _fsync_tree(staging)
        if target.exists():
            retired = _retired(target)
            os.replace(target, retired)
            os.replace(staging, target)
            _fsync(target.parent)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
            _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
