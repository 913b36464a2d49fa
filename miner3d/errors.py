"""User-facing errors.

Everything that a user can cause (a missing file, a bad value, too little memory) raises
:class:`MinerError` with a one-line message. The CLI prints that line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name if it has none: what a
    one-line error quotes of a library's exception."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class MinerError(Exception):
    """An error caused by the input or the environment, explained in one line."""

    exit_code: int = 2


class OutOfMemoryError(MinerError):
    """The requested job would not fit in the memory available (checked before allocating)."""

    exit_code = 3


class FitInterrupted(MinerError):
    """The fit was asked to stop (SIGINT); a checkpoint was written first."""

    exit_code = 130


class DivergedError(MinerError):
    """The loss became NaN or infinite (the learning rate is too high for the signal)."""
