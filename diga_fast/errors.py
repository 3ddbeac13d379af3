"""The one exception type a user sees as a one-line message (the CLI prints it, no traceback)."""


class DigaError(Exception):
    """A problem with the user's input: a missing folder, a bad image, a wrong checkpoint, ..."""


class Stopped(Exception):
    """A run stopped on a signal (SIGTERM, SIGUSR1, SIGINT) after writing a checkpoint: the message says
    which step and how to resume; the process exits with the conventional status, 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum
