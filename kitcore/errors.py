"""Errors meant for users: the CLIs print the message on one line and exit with status 2."""

__all__ = ["FsdpkitError", "ModelNotFoundError", "ModelSpecError"]


class FsdpkitError(Exception):
    """Bad input from a user (a name, a file, a size): the message says what and what to do."""


class ModelNotFoundError(FsdpkitError, LookupError):
    """A model name that no entry point registers and that is not ``package.module:factory``."""


class ModelSpecError(FsdpkitError, TypeError):
    """A model spec, factory or unit list that does not satisfy the :class:`ModelSpec` contract."""
