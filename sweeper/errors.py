"""Errors a user can cause and fix: their message alone and a non-zero exit, wherever they are
raised (:func:`exit_user_error`); and how an entry point stops when it is interrupted (Ctrl-C,
or SIGTERM from ``kill``, ``timeout`` or a scheduler)."""

import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback


class UserError(CompactHydraException):
    """A mistake in the config, the data or the environment, with what to do about it.

    A command prints it alone and exits with status 1 (:func:`exit_user_error`);
    ``HYDRA_FULL_ERROR=1`` adds the stack trace for debugging.
    """


def full_error() -> bool:
    """Whether ``HYDRA_FULL_ERROR=1`` asks for stack traces (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def exit_user_error(error: UserError) -> NoReturn:
    """A command's end after a :class:`UserError`: its message alone on stderr (the trace
    first with ``HYDRA_FULL_ERROR=1``) and exit status 1."""
    if full_error():
        traceback.print_exception(error)
    print(str(error), file=sys.stderr)
    sys.exit(1)


class UserErrorAlone(Callback):
    """A :class:`UserError` raised in a Hydra command's job (``hydra.callbacks`` of
    ``conf/config.yaml``, ``export.yaml``, ``report.yaml``) ends it with its message alone.

    Hydra catches what the job raises, writes "Error executing job with overrides: [...]"
    when it reads the job's return value, and adds a hint about ``HYDRA_FULL_ERROR`` after the
    message; ``on_run_end`` comes before both, with the job's return. Single runs only: a
    study's failing trials are recorded by the study, not fatal. The job has already ended its
    MLflow run (FAILED) by then. With ``HYDRA_FULL_ERROR=1`` Hydra reports it, trace included.
    """

    def on_run_end(self, config: Any, config_name: str | None = None,
                   job_return: JobReturn | None = None, **kwargs: Any) -> None:
        # the exception of a failed job: JobReturn reads it out only by raising it, after
        # writing Hydra's "Error executing job" line
        error = getattr(job_return, "_return_value", None)
        if (job_return is not None and job_return.status == JobStatus.FAILED
                and isinstance(error, UserError) and not full_error()):
            exit_user_error(error)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, :func:`stop_on_sigterm`), carrying the one line that says what was
    kept and how to go on; the entry points print it alone (no trace through whatever was
    running) and exit (:func:`exit_interrupted`)."""


_signalled: list[int] = []  # the signal that stopped this process, if one did


def _terminate(signum: int, frame: object) -> None:
    _signalled.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second one stops at once, without the clean-up
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Let SIGTERM (``kill``, ``timeout``, a batch scheduler's cancel or time limit) stop this
    process the way Ctrl-C does: the runs and trials in flight end KILLED and say so, instead
    of staying RUNNING in MLflow after the process is gone. Called by the entry points; where
    another handler already has SIGTERM (submitit's, in a Slurm job) it is left alone."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _terminate)


def interruption() -> str:
    """What interrupted this process, for the ``error`` tag of the runs it ends KILLED."""
    return "interrupted (SIGTERM)" if signal.SIGTERM in _signalled else "interrupted (Ctrl-C)"


def entry_point(main: Callable[[], object]) -> None:
    """Run a command's ``main`` as ``python -m`` does: SIGTERM stops it as Ctrl-C does
    (:func:`stop_on_sigterm`), and either ends it with :func:`exit_interrupted`; a
    :class:`UserError` that reaches here ends it with :func:`exit_user_error` (in a Hydra job,
    :class:`UserErrorAlone` does, as Hydra catches it first)."""
    stop_on_sigterm()
    try:
        main()
    except KeyboardInterrupt as e:
        exit_interrupted(e)
    except UserError as e:
        exit_user_error(e)


def exit_interrupted(error: KeyboardInterrupt) -> NoReturn:
    """An entry point's end after Ctrl-C or SIGTERM: one line (what was kept, how to go on),
    no trace, and the shell's status for the signal (130 for Ctrl-C, 143 for SIGTERM)."""
    print(str(error) if isinstance(error, Interrupted) and str(error)
          else "Interrupted: run the same command again to go on.", file=sys.stderr)
    sys.exit(128 + (_signalled[-1] if _signalled else signal.SIGINT))


def first_line(error: BaseException) -> str:
    """An exception in one line for a message: its type and the first line of what it says,
    without SQLAlchemy's wrapper and link (the driver's own words are what the user needs)."""
    text = str(error).strip()
    if text.startswith("(") and ") " in text:  # "(sqlite3.DatabaseError) file is not a database"
        text = text.split(") ", 1)[1]
    line = text.splitlines()[0].strip() if text else ""
    return line or type(error).__name__


def _to_log_files(record: logging.LogRecord) -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def log_trace(logger: logging.Logger, error: BaseException, what: str) -> None:
    """``error``'s stack trace, for the log files only (Hydra's job log ``<job>.log``): the
    console gets the one-line reason, the file keeps what a developer needs."""
    _to_log_files(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s, its trace:",
                                    (what,), (type(error), error, error.__traceback__)))


def by_an_interrupt(error: BaseException | None) -> bool:
    """Whether ``error`` is Ctrl-C or SIGTERM, or was raised in its place: clean-up code that
    fails while an interrupt passes through it (a lock's release, a cursor's close) leaves the
    interrupt only as the new error's ``__context__``, and the interrupt must still stop what
    was running."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class InterruptTracesToLogFiles(logging.Filter):
    """On a library's logger: a record whose exception an interrupt caused goes to the log
    files only. Ctrl-C in the middle of a query makes SQLAlchemy log, at ERROR and with a
    trace, that it could not close the cursor of the connection it has just dropped; the user
    who pressed Ctrl-C should see only the line that says what was kept
    (:func:`exit_interrupted`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and by_an_interrupt(record.exc_info[1]):
            _to_log_files(record)
            return False
        return True


def cannot_write(what: str, path: Path | str, error: OSError, setting: str) -> UserError:
    """The error for a file that could not be written (a full disk, a quota, a read-only or
    unwritable folder): what, where, why, and the setting that moves it."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full" if error.errno == errno.ENOSPC else "the disk quota is exceeded"
        todo = f"free some space there, or move it elsewhere with {setting}=/other/disk"
    else:
        why = error.strerror or type(error).__name__
        todo = f"make that folder writable, or move it with {setting}=/writable/folder"
    return UserError(f"Cannot write {what} {path}: {why}. Nothing already recorded was lost; "
                     f"{todo}, and run the same command again.")
