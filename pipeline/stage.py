"""The entry point of every stage: its start recorded in the progress file (progress.record), a
mistake reported in one line with exit status 2 (under torchrun, written for the launcher to relay
once), Ctrl-C with the shell's 130, and a stage whose `dvc` is gone stopped as Ctrl-C stops it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.dvc_process import (
    DVC_STAGE_VARIABLE,
    lineage_up_to_dvc,
    stop_when_orphaned,
)
from pipeline.errors import PipelineError
from pipeline.progress import record

# Under torchrun, where each rank writes its error instead of printing it: the launcher reports
# the first rank's once, in one line, instead of every rank's line and torchrun's failure dump.
RANK_ERRORS_VARIABLE = "PIPELINE_RANK_ERRORS"


def run_stage(main: Callable[[], None]) -> None:
    if DVC_STAGE_VARIABLE in os.environ:
        stop_when_orphaned([process.pid for process in lineage_up_to_dvc()] or [os.getppid()])
    if os.environ.get("RANK", "0") == "0":  # once, under torchrun too
        record("start")
    try:
        main()
    except PipelineError as exc:
        if RANK_ERRORS_VARIABLE in os.environ:
            Path(os.environ[RANK_ERRORS_VARIABLE], os.environ["RANK"]).write_text(str(exc))
        else:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: the stage's previous outputs are left as they were; `dvc repro` runs it again",
            file=sys.stderr,
        )
        sys.exit(130)  # the shell's status for a process ended by Ctrl-C
