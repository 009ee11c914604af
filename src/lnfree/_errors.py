"""Exceptions shared across layers (kept apart, at the bottom layer, so any module imports them without cycles)."""


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, unreadable, corrupt, unsafe or unsupported."""


class CLIError(Exception):
    """A user error of an ``lnfree`` command: printed as one line, exit status 2 (`lnfree.cli.main`)."""
