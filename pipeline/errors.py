"""The error type for mistakes a user can fix, and the entry point that reports them cleanly."""

from __future__ import annotations

import sys
from typing import Callable


class PipelineError(Exception):
    """Bad input or configuration: reported as one line, without a traceback, with exit status 2."""


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the stage's previous outputs are left as they were; `dvc repro` runs it again",
              file=sys.stderr)
        sys.exit(130)  # the shell's status for a process ended by Ctrl-C
