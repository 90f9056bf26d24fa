"""The root exception for what a user asked for wrongly. Imports nothing, so that every layer may raise it."""

__all__ = ['UserError']


class UserError(Exception):
    """A problem with what the user asked for: a flag, a file, a dataset, a model name. Each entry point shows it
    as one line (no traceback) and exits with code 2; any other exception is a bug and keeps its traceback."""
