"""The error type for mistakes a user can fix, and the entry point that reports them cleanly."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

# Under torchrun, where each rank writes its error instead of printing it: the launcher reports
# the first rank's once, in one line, instead of every rank's line and torchrun's failure dump.
RANK_ERRORS_VARIABLE = "PIPELINE_RANK_ERRORS"


class PipelineError(Exception):
    """Bad input or configuration: reported as one line, without a traceback, with exit status 2."""


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as exc:
        if RANK_ERRORS_VARIABLE in os.environ:
            Path(os.environ[RANK_ERRORS_VARIABLE], os.environ["RANK"]).write_text(str(exc))
        else:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the stage's previous outputs are left as they were; `dvc repro` runs it again",
              file=sys.stderr)
        sys.exit(130)  # the shell's status for a process ended by Ctrl-C
