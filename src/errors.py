"""One error path for input the user can fix.

Checks of config values, data folders, checkpoints and output paths raise `UserError` (a `ValueError`) or
one of its subclasses below, whose message says what was expected and what was given. The entry points
(`main.py`, the scripts in `benchmarks/` and `ablations/`) run through `reports_user_errors`, which prints
such an error as one line, `error: <message>`, and exits with status 2.

Every other exception keeps its traceback: running out of memory, a kernel bug or a failed assertion is
not bad input and must not read like one. `SPATIAL_MAMBA_TRACEBACK=1` shows the traceback of user
errors too.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")
EXIT_CODE = 2  # as argparse's usage errors
TRACEBACK_VARIABLE = "SPATIAL_MAMBA_TRACEBACK"


class UserError(ValueError):
    """Input the user can fix: a config value, a data folder, a checkpoint file, an output path."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output file exists and would be overwritten."""


class NotWritableError(UserError, PermissionError):
    """An output cannot be written where the user asked for it."""


class DataError(UserError, RuntimeError):
    """A data file that cannot be used: unreadable, truncated, or of the wrong kind."""


def user_error_of(error: BaseException) -> UserError | None:
    """`error` if it is a `UserError`, else the first `UserError` it was raised from (`raise ... from e`:
    jsonargparse wraps the errors of the classes it builds that way). An exception raised while handling
    another one without `from` is a new problem and is not looked through."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def one_line(error: BaseException) -> str:
    """The message of `error` as one line, whatever its argument is."""
    # KeyError's str() quotes its argument, which need not be a string (KeyError(5))
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: the traceback's last line
        message = message.strip().splitlines()[-1]
        name, sep, rest = message.partition(": ")
        if sep and re.fullmatch(r"[\w.]+", name):  # "src.errors.UserError: message" -> "message"
            message = rest
    return " ".join(message.split()) or type(error).__name__


def reports_user_errors(entry: Callable[P, int | None]) -> Callable[P, int]:
    """Decorate a command's entry point: a `UserError` (or an error raised from one) is printed as
    `error: <message>` on stderr and the call returns exit code 2; any other exception propagates with its
    traceback. A normal return of None is exit code 0."""

    @functools.wraps(entry)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return entry(*args, **kwargs) or 0
        except Exception as e:
            user_error = user_error_of(e)
            if user_error is None or os.environ.get(TRACEBACK_VARIABLE) == "1":
                raise
            print(f"error: {one_line(user_error)}", file=sys.stderr)
            return EXIT_CODE

    return run
