"""Resolve a user's ``device=`` argument (`lnfree._checks.check_device`), naming the flag the user typed;
the commands' ``--threads``."""

from __future__ import annotations

from typing import Optional, Union

import torch

from lnfree._checks import check_device
from lnfree._errors import CLIError


def resolve_device(device: Union[None, str, torch.device], *, argument: str = "device") -> Optional[torch.device]:
    """`device` as a torch.device (None stays None), refusing devices this machine lacks.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    try:
        dev = check_device(device)
    except ValueError as e:
        msg = str(e)
        raise ValueError(f"{argument}={msg[len('device '):]}" if msg.startswith("device ") else msg) from None
    if dev is not None and dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{argument}={device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


def set_threads(threads: Optional[int]) -> None:
    """A command's ``--threads``: torch's CPU thread count (None leaves torch's default), refusing < 1.

    Example:
        >>> set_threads(None)  # the default: torch chooses
    """
    if threads is None:
        return
    if threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
