"""User-facing errors.

A `BigaspError` is a problem with the user's input (a path, a config key, a file) that
the user can fix; the CLI prints its message without a traceback. Its message must say
what was wrong, where (file / field) and what to do.
"""

from __future__ import annotations


class BigaspError(Exception):
    """An error the user can fix; the message names the file or field and the fix."""

    exit_code = 2  # the CLI's exit status for it
    label = "error"  # how the CLI heads the message


class Interrupted(BigaspError):
    """The user stopped a command (Ctrl-C); the message says what was committed."""

    exit_code = 130
    label = "interrupted"


class ConfigError(BigaspError):
    """A config file or override is invalid."""


class ModelLoadError(BigaspError):
    """Model weights could not be found or read."""


class DataError(BigaspError):
    """A dataset artifact is missing, malformed or corrupt."""
