"""A guard on a group of trials training together. A GPU that never finishes a step never hands
control back, so nothing in the training loop can notice it: a thread watches the loop's heartbeat
instead, and stops the process with one line and every thread's stack rather than let a sweep wait
forever. Every wait on CUDA releases the GIL, so the thread runs while the loop is stuck."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

STALL_FACTOR = 10  # no heartbeat for this many times the first epoch's seconds is a stall...
STALL_FLOOR_SECONDS = 300.0  # ...and never less: a first epoch compiles the forward and captures graphs
STALLED_EXIT = 3  # the group's exit status after a stall (the sweep reads each trial's reason)


class StallGuard:
    """While entered, a process whose loop calls `beat` (each batch) and `epoch_ended` goes on; one
    that stops beating for longer than the limit hears `on_stall(reason)` from the guard's thread,
    which then writes the reason and every thread's stack to `log` and ends the process."""

    def __init__(
        self,
        on_stall: Callable[[str, str], None],
        floor: float = STALL_FLOOR_SECONDS,
        factor: float = STALL_FACTOR,
        log=sys.stderr,
    ):
        self.on_stall, self.floor, self.factor, self.log = on_stall, floor, factor, log
        self.first_epoch: float | None = None
        self.last_beat = time.monotonic()
        self.pauses = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="stall-guard", daemon=True)

    def __enter__(self) -> StallGuard:
        self.last_beat = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    @property
    def limit(self) -> float:
        """The seconds without a beat that make a stall: `factor` times the first epoch's, at least
        the floor (the floor alone until the first epoch has ended)."""
        return self.floor if self.first_epoch is None else max(self.floor, self.factor * self.first_epoch)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def epoch_ended(self, seconds: float) -> None:
        """The epoch's seconds: the first sets the limit."""
        if self.first_epoch is None:
            self.first_epoch = seconds
        self.beat()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A wait that is not the device's (the sweep's answer at a rung): no stall while in it."""
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            self.beat()

    def _watch(self) -> None:
        while not self.done.wait(min(1.0, self.limit / 10)):
            idle = time.monotonic() - self.last_beat
            if self.pauses or idle <= self.limit:
                continue
            first = f"{self.factor:g}x its first epoch's {self.first_epoch:.1f} s, " if self.first_epoch else ""
            reason = (
                f"its group made no progress for {idle:.0f} s, over its limit of {self.limit:.0f} s "
                f"({first}at least {self.floor:.0f} s): stopped, with every thread's stack in its log"
            )
            stacks = all_stacks()
            self.on_stall(reason, stacks)
            print(f"error: {reason}\n{stacks}", file=self.log, flush=True)
            os._exit(STALLED_EXIT)


def all_stacks() -> str:
    """Every thread's stack as faulthandler writes it (to a real file: it needs a descriptor)."""
    with tempfile.TemporaryFile("w+") as file:
        faulthandler.dump_traceback(file, all_threads=True)
        file.seek(0)
        return file.read()
