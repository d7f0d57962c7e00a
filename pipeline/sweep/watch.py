"""A trial's command (`dvc exp run`, a group's process) run and followed: what it does, read from the
progress file its stages write (pipeline.progress), its stdin for a search's answers, why it failed
(the reason its failed stage recorded), and, when its task is cancelled, stopped as Ctrl-C stops it,
its whole process group. Tied to its Ray worker, so it never outlives it."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psutil

from pipeline.progress import PROGRESS_FILE_VARIABLE, Follower, describe
from pipeline.sweep.shared import TrialFailed

STOP_GRACE_SECONDS = 30  # for a cancelled trial's stages to end their MLflow run and exit

# Run in place of a command, to tie it to the process that starts it: the kernel sends it SIGTERM
# when that process dies (PR_SET_PDEATHSIG, kept across exec), then it becomes the command.
_TIED = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # that process died before the line above
    sys.exit(128 + signal.SIGTERM)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def run_watched(
    args: list[str],
    label: str,
    repo: Path,
    env: dict,
    board,
    what: str = "`dvc exp run`",
    on_event: Callable[[dict, IO[str]], None] | None = None,
) -> None:
    """A trial's command (`dvc exp run`, a group's process), followed by the progress file its
    stages write (pipeline.progress): the board shows what it is doing, and `on_event` hears each
    event with the command's stdin to answer on. A cancelled task (Ctrl-C on the driver) interrupts
    it as Ctrl-C would, so its runs end KILLED. A command that fails raises TrialFailed, with the
    reason its failed stage recorded (pipeline.stage), else its exit status and its last line."""
    events = repo.parent / "progress.jsonl"
    events.unlink(missing_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(
        tied_to_this_process(args),
        cwd=repo,
        env=env | {PROGRESS_FILE_VARIABLE: str(events)},
        stdin=subprocess.PIPE if on_event else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, for _interrupt (POSIX; elsewhere ignored)
    )
    reader = threading.Thread(target=tail.extend, args=(proc.stdout,), daemon=True)  # its last lines, for why
    reader.start()
    follower = Follower(events)
    failed = ""  # the reason the last failed stage recorded
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.25)
            for event in follower.new():
                if event["event"] == "failed":
                    failed = event["reason"]
                board.doing.remote(label, describe(event))
                if on_event is not None:
                    on_event(event, proc.stdin)
            if proc.returncode is not None:
                break
        reader.join()
    except BaseException:  # KeyboardInterrupt: Ray cancelled the task
        _interrupt(proc)
        raise
    if proc.returncode != 0:
        said = [line.strip() for line in tail if line.strip()]
        raise TrialFailed(label, failed or f"{what} exited with {proc.returncode}" + (f": {said[-1]}" if said else ""))


def tied_to_this_process(args: list[str]) -> list[str]:
    """`args` as a command that ends when this process does, killed or not. A Ray worker whose
    raylet dies exits at once, and its `dvc exp run` would train on, unseen, into the MLflow run the
    retry has marked FAILED; tied, DVC ends, and its stage with it (pipeline.stage.run_stage).
    On Linux, where Ray clusters run; elsewhere `args` as they are, said once."""
    if sys.platform != "linux":
        _say_untied()
        return args
    return [sys.executable, "-c", _TIED, str(os.getpid()), *args]


@functools.cache
def _say_untied() -> None:
    print(
        f"note: on {sys.platform} a trial is not tied to its Ray worker (Linux's PR_SET_PDEATHSIG): "
        "a trial whose worker is killed trains on until it finishes",
        file=sys.stderr,
    )


def _interrupt(proc: subprocess.Popen) -> None:
    """SIGINT, once each, to every process of the command's group: `dvc exp run` and the stages it
    runs, also a stage DVC starts as the signal comes (it would not be in a list made before);
    SIGKILL to the group after the grace. Where there are no process groups, to its tree."""
    if os.name != "posix":
        with contextlib.suppress(psutil.Error):
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGINT)
            _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_SECONDS)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
        return
    deadline, interrupted = time.monotonic() + STOP_GRACE_SECONDS, set()
    while time.monotonic() < deadline:
        proc.poll()  # reaped once it exits, so the group can empty
        members = _group(proc.pid)
        if not members:
            break
        for process in members:
            if process.pid not in interrupted:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGINT)
                interrupted.add(process.pid)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members
