"""The checkpoint package's error (the bottom of ``checkpoint/``: every module of it may raise it)."""


class CheckpointError(ValueError):
    """A checkpoint or source file that cannot be used; the message names the file and the problem."""
