"""The `dvc` process that runs this stage: the processes between it and this one, and the stage
stopped as Ctrl-C stops it once one of them is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil

# DVC's own variable, set for every stage command it runs (a stage started by hand has none).
DVC_STAGE_VARIABLE = "DVC_STAGE"
PARENT_POLL_SECONDS = 0.25


def lineage_up_to_dvc() -> list[psutil.Process]:
    """The processes from this one's parent up to DVC's own, the first without DVC's variable (DVC
    sets it for the command only): between them the shell DVC runs the command in where it does not
    exec it (dash, DVC's /bin/sh when SHELL is unset), and torchrun above its ranks. Empty where
    that cannot be told (a parent gone or unreadable)."""
    lineage = []
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process().parents():
            lineage.append(parent)
            if DVC_STAGE_VARIABLE not in parent.environ():
                return lineage
    return []


def stop_when_orphaned(lineage: list[int]) -> None:
    """A stage whose DVC (or torchrun, or the shell between) is killed outright (`kill -9` of
    `dvc`, the OOM killer's of torchrun under its ranks, a lost Ray worker's `dvc exp run`) would
    run on unseen: outputs DVC never records, written outside DVC's lock, beside the next `dvc repro`
    in the same workspace. Once a process of `lineage` is gone (its child is then reparented) the
    stage stops as Ctrl-C stops it: its previous outputs kept, its checkpoint and its MLflow run
    (KILLED) left for the next repro to resume."""

    def intact() -> bool:
        try:
            return [os.getppid(), *(psutil.Process(pid).ppid() for pid in lineage[:-1])] == lineage
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        while intact():
            time.sleep(PARENT_POLL_SECONDS)
        # Where SIGINT is ignored (a background job of a script), Python raises no KeyboardInterrupt.
        interruptible = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGINT if interruptible else signal.SIGTERM)

    threading.Thread(target=watch, name="stop-when-orphaned", daemon=True).start()
