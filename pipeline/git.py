"""git, as the pipeline asks it things: the output, or an error that names the command."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.errors import PipelineError


class GitError(PipelineError):
    """A git command failed, or git is not installed."""


def git(*args: str, cwd: Path | None = None) -> str:
    """`git ARGS`'s output, stripped."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise GitError(f"`git {' '.join(args)}` could not start: {exc}") from exc
    if done.returncode != 0:
        raise GitError(f"`git {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()
