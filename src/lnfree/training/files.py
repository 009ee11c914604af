"""File writing every trainer shares: atomic text, fsync, safetensors that respect the umask.

safetensors creates its files with mode 0600 whatever the umask, which leaves weights unreadable by
collaborators on a shared file system; `save_safetensors` gives them the mode ``open()`` would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a new regular file gets from ``open()``: 0o666 minus the umask."""
    return 0o666 & ~_umask()


def fix_mode(path: os.PathLike) -> None:
    """Give `path` the umask's mode (files written by libraries that force 0600)."""
    os.chmod(path, file_mode())


def fsync(path: os.PathLike) -> None:
    """Flush a file or directory to disk (best effort: some file systems refuse it for directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write `text` to a sibling temporary file, fsync it, rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: os.PathLike,
                     metadata: Optional[dict] = None) -> None:
    """`safetensors.torch.save_file` with the umask's file mode (not 0600)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=metadata or {"format": "pt"})
    fix_mode(path)


def fix_tree_modes(root: os.PathLike) -> None:
    """Apply the umask's mode to every file under `root` (after a library wrote some as 0600)."""
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            fix_mode(p)


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict as contiguous CPU tensors, cloning only where storages are shared (safetensors refuses aliases)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out
