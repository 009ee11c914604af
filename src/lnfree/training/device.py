"""Resolve a user's ``device=`` argument, with a clear error where the device does not exist."""

from __future__ import annotations

from typing import Optional, Union

import torch


def resolve_device(device: Union[None, str, torch.device], *, argument: str = "device") -> Optional[torch.device]:
    """`device` as a torch.device (None stays None), refusing devices this machine lacks.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{argument}={device!r} is not a device ({e}); pass 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}={device!r}: no CUDA device is available on this machine (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); pass {argument}='cpu' "
                             "or leave it unset")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{argument}={device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{argument}={device!r}: no MPS device is available; pass {argument}='cpu'")
    return dev
