"""Ctrl-C during training: finish the step, write a checkpoint, then stop (a second Ctrl-C stops at once).

A training loop wraps itself in `stop_on_interrupt()` and asks `requested` after each step; when it
is set, the loop checkpoints and raises `TrainingInterrupted`, which names the step and the
checkpoint. It subclasses KeyboardInterrupt, so code that lets a Ctrl-C through still does.

    >>> with stop_on_interrupt() as stop:      # doctest: +SKIP
    ...     while step < steps:
    ...         train_one_step()
    ...         if stop.requested:
    ...             save(); raise TrainingInterrupted(step, path)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after `step`; `checkpoint`: the last good checkpoint's path (None: kept in memory only)."""

    def __init__(self, step: int, checkpoint: Optional[str]):
        self.step, self.checkpoint = step, checkpoint
        where = f"last checkpoint {checkpoint}" if checkpoint else "nothing saved (the run has no out_dir)"
        super().__init__(f"interrupted after step {step}; {where}")


class StopRequest:
    """Set by the first SIGINT; the loop reads `requested` at a step boundary."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def stop_on_interrupt(enabled: bool = True) -> Iterator[StopRequest]:
    """Turn the first SIGINT into `StopRequest.requested`; the second raises KeyboardInterrupt at once.

    Only the main thread can own the handler; elsewhere (or with `enabled=False`, e.g. in a
    multi-process run whose ranks could not agree on the step) SIGINT keeps its usual behaviour.
    """
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
