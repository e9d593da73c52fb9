"""Optuna storages: where a study lives, opened the same way by the study, its jobs and reports.

A storage is a journal file path (many processes on one machine: :class:`Journal`) or an RDB
URL such as ``postgresql://user:pw@host/db`` (many machines); never SQLite for parallel
writers (Optuna's FAQ). :class:`StudyLock` serialises counting and asking for trials across
the processes and machines that share a study.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from sweeper.errors import UserError, first_line

log = logging.getLogger(__name__)


def is_url(storage: str) -> bool:
    return "://" in storage


def journal_path(storage: str) -> Path:
    return Path(storage).expanduser().resolve()


def storage_label(storage: str) -> str:
    """``storage`` fit to show and log: an absolute journal path, or a URL without password."""
    if not is_url(storage):
        return str(journal_path(storage))
    from sqlalchemy.engine import make_url

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: show the scheme only
        return storage.split("://", 1)[0] + "://..."


def rdb_url(storage: str) -> str:
    """``storage`` with a driver SQLAlchemy can load: SQLAlchemy 2.1 reads a bare
    ``postgresql://`` as psycopg 3; use psycopg2 when only that one is installed."""
    import importlib.util

    if (storage.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        return "postgresql+psycopg2://" + storage[len("postgresql://"):]
    return storage


# Operation codes of Optuna's journal file (its on-disk format) that only a running trial
# writes: a report (SET_TRIAL_INTERMEDIATE_VALUE), a user or system attribute (progress, the
# results set just before the trial is told).
_RUNNING_TRIAL_OPS = frozenset({7, 8, 9})


class _Lock(JournalFileSymlinkLock):
    """Optuna's symlink lock, whose release lets Ctrl-C and SIGTERM through as themselves.

    Optuna 5's release, interrupted before it renames the link away, removes the renamed
    file that does not exist yet: the FileNotFoundError takes the interrupt's place (a study
    took a Ctrl-C for a failed trial and went on), and the lock stays held (every later write
    waits out its grace period, 30 s). Here the release is finished first, then the interrupt
    raised."""

    def release(self) -> None:
        try:
            super().release()
            return
        except FileNotFoundError as e:
            if not isinstance(e.__context__, KeyboardInterrupt):
                raise
            interrupt = e.__context__
        with contextlib.suppress(RuntimeError):  # (released meanwhile: forced by a waiter)
            super().release()  # not renamed yet: the link is still this process's
        raise interrupt


class Journal(JournalFileBackend):
    """Optuna's journal file, synced to the disk (fsync) where a study could otherwise lose
    what it resumes from after the machine itself crashes: a study's creation and attributes,
    a trial's creation, parameters and end. What only a running trial writes (its ten reports,
    its progress, its attributes) is appended without a sync of its own: the next synced
    append makes it durable with it (a file's sync writes all of it), and a trial that never
    got that far is failed as lost and runs again anyway. A process that is killed loses
    nothing either way (its writes are in the kernel's hands). About three quarters of a default
    study's thousand journal writes, each of which waited for the disk.

    The same file, lines and lock (:class:`~optuna.storages.journal.JournalFileSymlinkLock`,
    its release mended: :class:`_Lock`) as ``JournalFileBackend``: Optuna and other processes
    read it as theirs."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock_obj = _Lock(path)
        super().__init__(path, self._lock_obj)

    def append_logs(self, logs: list[dict]) -> None:
        if any(entry.get("op_code") not in _RUNNING_TRIAL_OPS for entry in logs):
            super().append_logs(logs)
            return
        text = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in logs)
        self._lock_obj.acquire()
        try:
            with open(self._path, "ab") as f:
                f.write(text.encode("utf-8"))
        finally:
            self._lock_obj.release()


def open_storage(storage: str) -> BaseStorage:
    """The Optuna storage for ``storage``: an RDB URL, or else a journal file path."""
    if is_url(storage):
        storage = rdb_url(storage)
        if storage.startswith("sqlite:"):
            log.warning("SQLite is not safe for parallel writers (Optuna FAQ): use the default "
                        "journal file on one machine, PostgreSQL for several.")
        try:
            return RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:  # noqa: BLE001 - driver or connection errors, told plainly
            raise UserError(unreachable(storage, e)) from None
    path = journal_path(storage)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(Journal(str(path)))
    except OSError as e:
        raise UserError(f"hydra.sweeper.storage={path}: the Optuna journal cannot be written "
                        f"there ({first_line(e)}); point it (or paths.outputs) at a folder you "
                        "can write.") from None


def unreachable(storage: str, error: BaseException) -> str:
    """The message for an RDB storage that cannot be opened (no server there, a wrong
    password, a missing database or driver), without the driver's trace."""
    return (f"hydra.sweeper.storage={storage_label(storage)}: cannot open the Optuna storage "
            f"({first_line(error)}). Check the server's address and that it runs, the user "
            "and password, and that the database exists (createdb); or leave the default, a "
            "journal file, for sweeps on one machine.")


class StudyLock:
    """Mutual exclusion over one study across threads, processes and machines.

    Counting the study's trials and asking for a new one happen under it, so that n_trials
    is the study's total even with several sweeps; so does creating the MLflow parent run.
    A journal file (or SQLite) uses a lock file beside it; PostgreSQL an advisory lock.
    """

    def __init__(self, storage: str, study_name: str) -> None:
        self._thread_lock = threading.RLock()
        self._file_lock = None
        self._engine = None
        self._key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        if not is_url(storage):
            from filelock import FileLock

            # Not "<journal>.lock": that is Optuna's own lock for writing the journal.
            self._file_lock = FileLock(str(journal_path(storage)) + ".sweeper.lock")
        elif storage.startswith("sqlite:///"):
            from filelock import FileLock

            self._file_lock = FileLock(storage[len("sqlite:///"):] + ".sweeper.lock")
        elif storage.startswith("postgresql"):
            import sqlalchemy

            self._url = storage
            try:
                self._engine = sqlalchemy.create_engine(rdb_url(storage),
                                                        poolclass=sqlalchemy.pool.NullPool)
            except Exception as e:  # noqa: BLE001 - a malformed URL or a missing driver
                raise UserError(unreachable(storage, e)) from None
        else:
            log.warning("No cross-process lock for %s: several sweeps on this study may run a "
                        "few trials past n_trials.", storage_label(storage))

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._file_lock is not None:
                with self._file_lock:
                    yield
            elif self._engine is not None:
                import sqlalchemy

                try:
                    conn = self._engine.connect()
                except sqlalchemy.exc.SQLAlchemyError as e:
                    raise UserError(unreachable(self._url, e)) from None
                with conn:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"),
                                     {"k": self._key})
            else:
                yield
