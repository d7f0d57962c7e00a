"""Writes that either complete or leave the previous file in place: temp name in the same folder,
then rename. A write that finds the disk full (or over a file size limit) stops the stage with one
line naming the file; the previous file is left as it was. Temp files that a killed process could
not clean up are removed by the next write of the same target."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

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


def _remove_stale_temps(target: Path) -> None:
    """The temp files and folders of `target` that a killed writer could not remove."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


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
            os.replace(tmp, target)
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
    moved aside, then deleted), on error it is removed."""
    target = Path(target)
    with _reported_as(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _reported_as(target):
            yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
