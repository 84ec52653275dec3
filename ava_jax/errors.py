"""Errors that are the user's to fix, not bugs.

`ava_jax.main` prints a user error (`is_user_error`) as one line, `error: <message>`, and exits
with status 2; any other exception is a bug and keeps its traceback. So a `UserError`'s message
must say everything: the config key, or the file, line and field. The subclasses are also
`ValueError`s, so code (and tests) that catch ValueError keep working.
"""
from __future__ import annotations

import os
import traceback

# The one module that turns the ConfigDict into typed dataclasses (house style 2).
_CONFIG_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")


class UserError(Exception):
    """A mistake in the command line, the config or the input data."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the key (`data.path`, ...)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model: the message names the checkpoint and the array."""


class DataError(UserError, ValueError):
    """Bad input data. The message names file, line (1-based) and field where they apply."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.line, self.field, self.reason = path, line, field, reason


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is the user's to fix, so one line (its message) tells them enough.

    True for a `UserError`; a `FileNotFoundError` (its message names the path); and a ValueError or
    TypeError raised inside `ava_jax/config.py`: the ConfigDict -> dataclass conversions there
    validate values the user set, and their messages name the key (e.g. the `HeadConfig` check of
    model.q_param). Everything else is a bug.
    """
    if isinstance(exc, (UserError, FileNotFoundError)):
        return True
    if isinstance(exc, (ValueError, TypeError)):
        return any(os.path.abspath(frame.f_code.co_filename) == _CONFIG_PY
                   for frame, _ in traceback.walk_tb(exc.__traceback__))
    return False
