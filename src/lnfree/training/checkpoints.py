"""One checkpoint-directory format for every trainer.

::

    ROOT/checkpoints/step_000050/model.safetensors   weights
                                /state.json          JSON state (the trainer decides what)
                                /optimizer.pt        tensors: optimiser state, RNG states
                                                     (read with torch.load(weights_only=True))
                                /<name>.json         any further JSON files the trainer adds
    ROOT/checkpoints/latest                          name of the newest GOOD checkpoint

A checkpoint is written under a temporary name, every file fsynced, then renamed into place; only
then may `mark_good` point ``latest`` at it (atomically). A trainer that verifies its weights
first (the removal fine-tune checks the next batch's loss) writes, verifies, then marks, so
``latest`` never names a state that was not checked. A kill at any moment leaves the previous good
checkpoint intact. `prune` keeps the newest ``keep`` complete checkpoints and never the one named by
``latest``'s predecessor chain's head.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from lnfree._errors import CheckpointError
from lnfree.training.files import atomic_write_text, fix_mode, fsync, save_safetensors

SUBDIR = "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


class CheckpointDir:
    """Write, mark, prune and read the checkpoints under ``root/checkpoints``.

    Example:
        >>> ck = CheckpointDir("runs/x", keep=2)                                        # doctest: +SKIP
        >>> path = ck.write(10, weights=model.state_dict(), state={"step": 10}, tensors={"optimizer": {}})  # doctest: +SKIP
        >>> ck.mark_good(path); ck.latest() == path                                     # doctest: +SKIP
        True
    """

    def __init__(self, root: os.PathLike, keep: int = 2):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.root = Path(root)
        self.dir = self.root / SUBDIR
        self.keep = keep

    # -- reading --------------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The newest good checkpoint (None if ``latest`` does not exist)."""
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
        return path

    @staticmethod
    def read(path: os.PathLike) -> dict:
        """{'weights', 'state', 'tensors', 'path'} of one checkpoint directory (safe loaders only)."""
        from safetensors.torch import load_file

        path = Path(path)
        file = path / "state.json"
        try:
            state = json.loads(file.read_text())
            file = path / "optimizer.pt"
            tensors = torch.load(file, map_location="cpu", weights_only=True)
            file = path / "model.safetensors"
            weights = load_file(str(file))
        except pickle.UnpicklingError as e:  # not corrupt but unsafe: refused, never run
            raise pickle.UnpicklingError(f"refused to load {file}: it needs more than tensors. {e}") from e
        except Exception as e:  # any failure to read names the file: the library's own error does not
            raise CheckpointError(
                f"cannot read checkpoint file {file}: {type(e).__name__}: {e}. The checkpoint is corrupt or "
                f"truncated; use an earlier one ({path.parent}/step_*), or delete {path.name} and write the name "
                f"of an earlier good step into {path.parent / 'latest'}") from e
        return {"weights": weights, "state": state, "tensors": tensors, "path": str(path)}

    # -- writing --------------------------------------------------------------------------------
    def write(self, step: int, *, weights: Mapping[str, torch.Tensor], state: dict, tensors: dict,
              json_files: Optional[Mapping[str, object]] = None) -> Path:
        """Write a complete checkpoint directory for `step` (not yet marked good); returns its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = step_name(step)
        tmp = self.dir / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_safetensors(weights, tmp / "model.safetensors")
        torch.save(tensors, tmp / "optimizer.pt")
        fix_mode(tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for fname, obj in (json_files or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=1))
        for f in tmp.iterdir():
            fsync(f)
        final = self.dir / name
        current = self.latest()
        if final.exists():  # left by a run killed before it marked it; never the good one
            if current is not None and current.resolve() == final.resolve():
                raise RuntimeError(f"refusing to overwrite the latest good checkpoint {final}")
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(self.dir)
        return final

    def mark_good(self, path: os.PathLike) -> None:
        """Point ``latest`` at `path` (atomically), then prune old checkpoints."""
        path = Path(path)
        if path.parent.resolve() != self.dir.resolve() or not (path / "state.json").exists():
            raise ValueError(f"{path} is not a complete checkpoint of {self.dir}")
        atomic_write_text(self.dir / "latest", path.name + "\n")
        fsync(self.dir)
        self.prune()

    def discard(self, path: os.PathLike) -> None:
        """Delete an unmarked checkpoint (one whose weights failed verification)."""
        path = Path(path)
        current = self.latest()
        if current is not None and current.resolve() == path.resolve():
            raise RuntimeError(f"refusing to delete the latest good checkpoint {path}")
        shutil.rmtree(path, ignore_errors=True)

    def prune(self) -> None:
        """Keep the newest `keep` checkpoints up to the good one; delete later unmarked ones and debris."""
        current = self.latest()
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        if current is not None:
            later = [p for p in done if p.name > current.name]  # unverified leftovers of a killed run
            for p in later:
                shutil.rmtree(p, ignore_errors=True)
            done = [p for p in done if p.name <= current.name]
        for p in done[: max(0, len(done) - self.keep)]:
            if current is None or p.name != current.name:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".step_*.tmp*"):  # debris of killed writers
            shutil.rmtree(p, ignore_errors=True)
