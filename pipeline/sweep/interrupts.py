"""Ctrl-C as a flag read between steps, never an exception raised mid-step. Raised mid-step, it can
land between Ray accepting a task and the driver recording it (the task then runs on, in no list),
or between a trial's push and its landing on the board (an experiment reported as cancelled). Ray's
cancel of a running task raises KeyboardInterrupt as Ctrl-C does (`_thread.interrupt_main`), so the
same flag holds it off on a worker."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def ctrl_c_as_flag() -> Iterator[threading.Event]:
    """Within the block, Ctrl-C sets the event it yields; the caller looks at it when it can stop.
    Main thread only, as Python's signal handlers are."""
    pressed = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """The block runs to its end; a Ctrl-C (or Ray's cancel) that came meanwhile is raised after it."""
    with ctrl_c_as_flag() as pressed:
        yield
    if pressed.is_set():
        raise KeyboardInterrupt
