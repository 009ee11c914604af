"""Removal checkpoints (the format of `lnfree.training.checkpoints`) -> `Parts`, and their raw contents.

A checkpoint's ``state.json`` holds the step, data position, sigma EMAs, site modes and scales, RNG
states, the divergence guard's history and the `RemovalConfig`; ``optimizer.pt`` holds
``{"optimizer": AdamW state, "scheduler": {"step", "lr_scale"}}``; ``model.safetensors`` the weights
(a LoRA run's adapters unmerged, merged here as `lnfree.removal.lora.merge_lora` merges them). The
writer is the removal trainer (`lnfree.removal.trainer`).

    >>> parts, state = read_checkpoint_parts("runs/removal")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from lnfree.io.parts import Parts
from lnfree.io.tl_dir import cfg_from_json, dir_name
from lnfree.io.tokenizers import find_tokenizer
from lnfree.removal.lora import merge_state_dict
from lnfree.training.checkpoints import CheckpointDir

CHECKPOINT_FORMAT = "lnfree-removal-checkpoint"


def latest_checkpoint(out_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest good checkpoint directory of a run (None if there is none)."""
    return CheckpointDir(out_dir).latest()


def is_checkpoint(folder: Optional[Path]) -> bool:
    """Whether `folder` is one removal checkpoint directory (its ``state.json`` says so)."""
    if folder is None or not (folder / "state.json").is_file():
        return False
    try:
        return json.loads((folder / "state.json").read_text()).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """{'weights': state dict, 'optimizer': optimizer.pt contents, 'state': state.json, 'path'} of one dir.

    A file that cannot be read raises `lnfree.CheckpointError` naming it and what to do.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a removal checkpoint (state.json format {state.get('format')!r})")
    ck = CheckpointDir.read(path)
    return {"weights": ck["weights"], "optimizer": ck["tensors"], "state": ck["state"], "path": ck["path"]}


def read_checkpoint_parts(path: Union[str, os.PathLike]) -> tuple[Parts, dict]:
    """(`Parts`, state.json) of a checkpoint: a ``step_*`` dir, or a run dir (its latest checkpoint).

    The parts carry the weights (LoRA adapters merged) and every site's checkpointed mode and scale.
    """
    path = Path(path)
    if not (path / "state.json").exists():
        found = latest_checkpoint(path) if path.is_dir() else None
        if found is None:
            raise FileNotFoundError(f"{path} is neither a removal checkpoint nor a run dir with checkpoints/latest")
        path = found
    ck = read_checkpoint(path)
    state, config = ck["state"], ck["state"]["config"]
    weights = ck["weights"]
    rank = config.get("lora_rank")
    if rank:
        weights = merge_state_dict(weights, float(config.get("lora_alpha") or rank) / rank)
    ln_state = state.get("ln_state") or {
        site: {"mode": mode, "scale": state["site_scales"][site]} for site, mode in state["site_modes"].items()}
    parts = Parts(cfg_from_json(state["model_config"]), weights, find_tokenizer(path), ln_state=ln_state,
                  name=dir_name(path), source=str(path / "model.safetensors"))
    return parts, state
