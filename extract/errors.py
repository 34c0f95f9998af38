"""The one error type for bad input: run.py prints it and exits with status 2, no traceback."""


class InputError(Exception):
    """Bad input from the user's files or config; the message names the file, line or key."""
