"""Errors a user can cause and fix: Hydra prints their message alone and exits non-zero."""

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """A mistake in the config, the data or the environment, with what to do about it.

    Hydra prints a ``CompactHydraException`` as its message alone (no stack trace) and exits
    with status 1; ``HYDRA_FULL_ERROR=1`` still shows the trace for debugging.
    """


def first_line(error: BaseException) -> str:
    """An exception in one line for a message: its type and the first line of what it says,
    without SQLAlchemy's wrapper and link (the driver's own words are what the user needs)."""
    text = str(error).strip()
    if text.startswith("(") and ") " in text:  # "(sqlite3.DatabaseError) file is not a database"
        text = text.split(") ", 1)[1]
    line = text.splitlines()[0].strip() if text else ""
    return line or type(error).__name__
