"""Writes taken off a trial's critical path: a thread per kind of write, in the order submitted.

A trial's MLflow writes (:class:`sweeper.tracking.Run`) and its kept trained part
(:class:`sweeper.states.StateStore`) are I/O: SQLite commits that mostly wait for the disk,
a file of up to tens of MB. Done where they are asked for, they add to every trial's wall
time; done by a :class:`Writer`, the trial goes on while the disk works. Whoever needs the
result waits for it (:meth:`Writer.wait`, :meth:`Writer.drain`): a run is ended only once its
writes are done, a kept state is read only once it is complete. Queued writes are finished
before the process exits (``concurrent.futures`` joins its threads at exit).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait


class Writer:
    """One background thread running submitted writes in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    def _forget(self) -> None:
        """In a forked child: the parent's thread is not there."""
        self._pool, self._pending, self._lock = None, set(), threading.Lock()

    def submit(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` after the writes submitted before it; its future holds its result or
        the exception it raised."""
        with self._lock:
            if self._pool is None:  # made on first use
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            future = self._pool.submit(fn)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def drain(self) -> None:
        """Wait for every write submitted so far (their errors are their submitters' to
        raise)."""
        with self._lock:
            pending = list(self._pending)
        wait(pending)


# The process's writers: MLflow's commits do not queue behind a large state file.
MLFLOW = Writer("mlflow-writer")
STATES = Writer("state-writer")
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: (MLFLOW._forget(), STATES._forget()))
