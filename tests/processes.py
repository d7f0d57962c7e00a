"""Processes the tests start, watch and stop: each in a group of its own, so a stop reaches its
children; and every process of this session, so none outlives it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import uuid

import psutil

# Every process the tests start inherits this variable, also those that leave their parent's
# process group or are re-parented (a daemonised PostgreSQL, DVC's queue workers), so the session
# can find any that outlive it.
SESSION_MARKER = "VAE_PIPELINE_TEST_SESSION"
# And where a test checks what its own processes left running, this one, with a value of the test's
# own (`owner_marker`): tests run side by side, and one test's check must not see another's Ray.
OWNER_MARKER = "VAE_PIPELINE_TEST_OWNER"


def owner_marker() -> dict[str, str]:
    """An environment entry to start a test's processes with; their descendants inherit it."""
    return {OWNER_MARKER: uuid.uuid4().hex}


def processes_marked(name: str, value: str | None) -> list[psutil.Process]:
    """Every live process but this one whose environment holds `name`=`value`."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(name) == value:
                found.append(proc)
    return found


def processes_started_with(marker: dict[str, str]) -> list[psutil.Process]:
    """The live processes a test started with `marker` (owner_marker's), and their descendants."""
    [(name, value)] = marker.items()
    return processes_marked(name, value)


def processes_started_by_this_session() -> list[psutil.Process]:
    """Every live process with this session's marker, but for pytest's own multiprocessing resource
    tracker (started by the tests that spawn gloo ranks), which ends when pytest does."""
    return [
        proc
        for proc in processes_marked(SESSION_MARKER, os.environ.get(SESSION_MARKER))
        if not (proc.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(proc.cmdline()))
    ]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the process group `proc` leads, then SIGKILL to whatever of it is left after
    `grace_s`: children that ignore SIGTERM or outlive their parent go too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def epoch_ended(n: int) -> str:
    """The pattern of the line training prints once epoch `n` is over and its checkpoint written
    (a log's progress line, `epoch n/N: ... images`, comes before it and does not match)."""
    return rf"^epoch {n}/\d+  train_"


def stage_process(dvc: subprocess.Popen, stage: str, timeout: float = 120) -> psutil.Process:
    """The `python -m pipeline.<stage>` process that `dvc` started, once it runs: DVC's child where
    its shell execs the command (bash), its grandchild where it does not (dash, DVC's /bin/sh when
    SHELL is unset); torchrun's, not the ranks below it, under torchrun."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            runs_stage = {}
            for process in psutil.Process(dvc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if f"pipeline.{stage}" in process.cmdline():
                        runs_stage[process.pid] = process
            for process in runs_stage.values():
                if process.ppid() not in runs_stage:
                    return process
        time.sleep(0.05)
    raise AssertionError(f"DVC did not start the {stage} stage within {timeout} s")


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"process ended before printing {pattern!r}:\n{seen}")
