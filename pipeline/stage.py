"""The entry point of every stage: its start recorded in the progress file (progress.record), a
mistake reported in one line with exit status 2 (under torchrun, written for the launcher to relay
once) and recorded as the stage's "failed" event, which is where a sweep reads why a trial failed;
Ctrl-C with the shell's 130, a stage whose `dvc` is gone stopped as Ctrl-C stops it, and an exit
without the interpreter's teardown."""

from __future__ import annotations

import atexit
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
        status = 0
    except PipelineError as exc:
        if RANK_ERRORS_VARIABLE in os.environ:
            Path(os.environ[RANK_ERRORS_VARIABLE], os.environ["RANK"]).write_text(str(exc))
        else:
            print(f"error: {exc}", file=sys.stderr)
            record("failed", reason=str(exc))
        status = 2
    except KeyboardInterrupt:
        print(
            "interrupted: the stage's previous outputs are left as they were; `dvc repro` runs it again",
            file=sys.stderr,
        )
        status = 130  # the shell's status for a process ended by Ctrl-C
    except BaseException as exc:  # a bug: the traceback as Python prints it, its last line as the reason
        record("failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    exit_without_teardown(status)


def exit_without_teardown(status: int) -> None:
    """Exit once the exit handlers have run (MLflow's, logging's, weakref finalizers), skipping the
    interpreter's teardown of every module and object: with torch and MLflow loaded it takes half a
    second, and a stage needs none of it, its outputs being written and closed (bench/overhead.py)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
