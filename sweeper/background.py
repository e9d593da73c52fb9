"""Writes taken off a trial's critical path: a thread per kind of write, in the order submitted.

A trial's MLflow writes (:class:`sweeper.tracking.Run`), its kept trained part
(:class:`sweeper.states.StateStore`) and the cache entries it fills on a GPU
(:mod:`sweeper.feeds`) are I/O: SQLite commits that mostly wait for the disk, a file of up to
tens of MB, GBs of frozen-prefix outputs copied to the host, checksummed and written. Done
where they are asked for, they add to every trial's wall time; done by a :class:`Writer`, the
trial goes on while the disk works. Whoever needs the result waits for it
(:meth:`Writer.drain`, the future a write returns, or the lock a cache entry's write holds): a
run is ended only once its writes are done, a kept state is read only once it is complete,
an entry only once it is written. Queued writes are finished
before the process exits (:class:`Writer`).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait


class Writer:
    """One background daemon thread running submitted writes in order.

    A daemon thread never holds up the interpreter's exit (a ``ThreadPoolExecutor`` worker
    left idle after a Ctrl-C kept a study's process from exiting, now and then); the writes
    still queued are finished at exit instead (:func:`atexit.register` of :meth:`drain`,
    which runs while daemon threads still run).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue | None = None
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    def _forget(self) -> None:
        """In a forked child: the parent's thread is not there."""
        self._queue, self._pending, self._lock = None, set(), threading.Lock()

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while True:
            future, fn = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            result = None
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - the submitter's to raise
                future.set_exception(e)
            else:
                future.set_result(result)
            # What a write held (a state, a GPU's rows) goes now, not when the next one comes.
            del future, fn, result

    def submit(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` after the writes submitted before it; its future holds its result or
        the exception it raised."""
        future: Future = Future()
        with self._lock:
            if self._queue is None:  # started on first use
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._queue,), name=self.name,
                                 daemon=True).start()
            self._pending.add(future)
            self._queue.put((future, fn))
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


# The process's writers: MLflow's commits do not queue behind a large state file or entry.
MLFLOW = Writer("mlflow-writer")
STATES = Writer("state-writer")
ENTRIES = Writer("cache-writer")
atexit.register(ENTRIES.drain)
atexit.register(STATES.drain)
atexit.register(MLFLOW.drain)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: (MLFLOW._forget(), STATES._forget(),
                                                ENTRIES._forget()))
