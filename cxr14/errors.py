"""The one error type for bad input: run.py prints it and exits with status 2, no traceback."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from cxr14.text import did_you_mean


@dataclass(frozen=True)
class Fix:
    """The command that fixes an error, as a subcommand and its settings (True: a switch that is on).

    The library says which step to run; the command line spells it with its own flags and completes it
    with the config and folders the user passed, so the suggestion works as printed.
    """

    command: str
    settings: dict = field(default_factory=dict)


class InputError(Exception):
    """Bad input from the user's files or config; the message names the file, line or key and what to do,
    and `fix`, when there is one, is the command that does it: `raise InputError(...).fixed_by(Fix(...))`.

    No __init__ of its own: TensorFlow re-raises an error from traced code (a backbone's refusal, say)
    under its own type only when that type takes Exception's constructor.
    """

    fix: Fix | None = None

    def fixed_by(self, fix: Fix) -> "InputError":
        """This error, with the command that fixes it."""
        self.fix = fix
        return self


def check_choice(value: str, valid: Iterable[str], *, what: str) -> str:
    """`value` if it is one of `valid`, else an InputError naming `what`, the value and the valid ones."""
    valid = tuple(valid)
    if value not in valid:
        raise InputError(f"{what} = {value!r} is not one of: {', '.join(valid)}{did_you_mean(value, valid)}")
    return value


def check_file_name(name: str, *, what: str) -> str:
    """`name` if it can be one file or folder name inside the folder it belongs to, else an InputError
    naming `what`: no path separators, not "." or "..", not hidden (the project's temporaries are)."""
    bad = (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(sep in name for sep in ("/", "\\", "\0"))
    )
    if bad:
        raise InputError(
            f"{what} = {name!r} must be a plain name (letters, digits, - _ + .), not a path: "
            "no '/', '\\', leading '.' or '..'"
        )
    return name
