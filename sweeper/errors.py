"""Errors a user can cause and fix: Hydra prints their message alone and exits non-zero."""

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """A mistake in the config, the data or the environment, with what to do about it.

    Hydra prints a ``CompactHydraException`` as its message alone (no stack trace) and exits
    with status 1; ``HYDRA_FULL_ERROR=1`` still shows the trace for debugging.
    """
