"""Progress of the long loops (a training epoch, the evaluation): what runs, how far along it is,
and the time left. A terminal gets tqdm's live bar; a log (CI, `dvc exp run --queue`) gets a plain
line every PIPELINE_PROGRESS_SECONDS (30 by default), where a bar would be carriage returns."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm


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
    try:
        yield bar.update
    finally:
        bar.close()
