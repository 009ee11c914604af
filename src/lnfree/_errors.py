"""Exceptions shared by the loading modules (kept apart so they import without cycles)."""


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, unreadable, corrupt, unsafe or unsupported."""
