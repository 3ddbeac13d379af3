"""The one exception type a user sees as a one-line message (the CLI prints it, no traceback)."""


class DigaError(Exception):
    """A problem with the user's input: a missing folder, a bad image, a wrong checkpoint, ..."""
