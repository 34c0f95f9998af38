"""The one error type for bad input: run.py prints it and exits with status 2, no traceback."""

from collections.abc import Iterable


class InputError(Exception):
    """Bad input from the user's files or config; the message names the file, line or key."""


def check_choice(value: str, valid: Iterable[str], *, what: str) -> str:
    """`value` if it is one of `valid`, else an InputError naming `what`, the value and the valid ones."""
    valid = tuple(valid)
    if value not in valid:
        raise InputError(f"{what} = {value!r} is not one of: {', '.join(valid)}")
    return value
