"""Progress of the long loops (a training epoch, the evaluation): what runs, how far along it is,
and the time left. A terminal gets tqdm's live bar; a log (CI, `dvc exp run --queue`) gets a plain
line every PIPELINE_PROGRESS_SECONDS (30 by default), where a bar would be carriage returns.

For programs, not people: where PIPELINE_PROGRESS_FILE names a file, every stage appends its
progress there as JSON lines (`record`): a stage's start, a loop's advance and its end (with its
seconds), an epoch's losses. A sweep's driver follows its trials by that file (`Follower`), never
by what they print."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from pipeline.dvc_process import DVC_STAGE_VARIABLE

PROGRESS_FILE_VARIABLE = "PIPELINE_PROGRESS_FILE"
RECORD_EVERY_SECONDS = 1.0  # a loop's advance is recorded at most this often


def seconds_between_lines() -> float:
    """How often progress goes to a log as a line (PIPELINE_PROGRESS_SECONDS)."""
    return float(os.environ.get("PIPELINE_PROGRESS_SECONDS", "30"))


class _Lines:
    """The part of tqdm's interface we use, printed as a line at most every few seconds."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.started = self.printed = time.monotonic()
        self.every = seconds_between_lines()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.printed < self.every or self.done >= self.total:
            return
        self.printed = now
        rate = self.done / max(now - self.started, 1e-9)
        print(
            f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}), "
            f"{rate:,.0f} {self.unit}/s, about {(self.total - self.done) / rate:.0f} s left",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        pass


def stage_name() -> str:
    """The stage this process runs: DVC's name for it, else the module's (`python -m pipeline.x`)."""
    return os.environ.get(DVC_STAGE_VARIABLE) or Path(sys.argv[0]).stem


def record(event: str, **fields) -> None:
    """One JSON line appended to the file PIPELINE_PROGRESS_FILE names (nothing where it is unset):
    {"event", "stage", "time", **fields}. One write of one line, so a follower never reads half."""
    path = os.environ.get(PROGRESS_FILE_VARIABLE)
    if path:
        line = json.dumps({"event": event, "stage": stage_name(), "time": time.time(), **fields}) + "\n"
        with open(path, "a") as file:
            file.write(line)


class Follower:
    """The events a progress file gains, read as it grows (complete lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            read = file.read()
        self.offset += len(read)
        *lines, self.partial = (self.partial + read).split(b"\n")
        return [json.loads(line) for line in lines if line]


def describe(event: dict) -> str:
    """An event in a few words, as a sweep shows what a trial is doing."""
    if event["event"] == "advance":
        doing = event["doing"] if event["doing"].startswith(event["stage"]) else f"{event['stage']} {event['doing']}"
        return f"{doing} ({event['done'] / event['total']:.0%})"
    if event["event"] == "epoch":
        return f"{event['stage']} epoch {event['epoch']}/{event['epochs']} done"
    return f"{event['stage']}"


@contextlib.contextmanager
def progress(
    total: int, desc: str, unit: str, leave: bool = True, shown: bool = True
) -> Iterator[Callable[[int], None] | None]:
    """Yield `advance(n)`, to call as the work goes (None where nothing is `shown`). `leave=False`
    clears a finished bar, for loops that print their own summary line."""
    if not shown:
        yield None
        return
    bar = (
        tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=leave, dynamic_ncols=True)
        if sys.stderr.isatty()
        else _Lines(total, desc, unit)
    )
    done, started = 0, time.monotonic()
    recorded = started

    def advance(n: int = 1) -> None:
        nonlocal done, recorded
        bar.update(n)
        done += n
        if time.monotonic() - recorded >= RECORD_EVERY_SECONDS and done < total:
            recorded = time.monotonic()
            record("advance", doing=desc, done=done, total=total)

    try:
        yield advance
    finally:
        bar.close()
    record("done", doing=desc, seconds=time.monotonic() - started)  # the loop's work, for bench/overhead.py
