"""Reading and rebuilding removal checkpoints (the format of `lnfree.training.checkpoints`).

A finished run's ``final_tl/`` is a TransformerLens weights directory: `lnfree.tl_dir`.

A removal checkpoint's ``state.json`` holds the step, data position, sigma EMAs, site modes and
scales, RNG states, the divergence guard's history and the `RemovalConfig`; ``optimizer.pt`` holds
``{"optimizer": AdamW state, "scheduler": {"step", "lr_scale"}}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from lnfree.model import LNFreeTransformer
from lnfree.tl_dir import cfg_from_json, cfg_to_json, load_tl_dir  # noqa: F401  (the trainer and tests import them here)
from lnfree.training.checkpoints import CheckpointDir

CHECKPOINT_FORMAT = "lnfree-removal-checkpoint"


# ---- checkpoints --------------------------------------------------------------------------------
def latest_checkpoint(out_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest good checkpoint directory of a run (None if there is none)."""
    return CheckpointDir(out_dir).latest()


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """{'weights': state dict, 'optimizer': optimizer.pt contents, 'state': state.json, 'path'} of one dir."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a removal checkpoint (state.json format {state.get('format')!r})")
    ck = CheckpointDir.read(path)
    return {"weights": ck["weights"], "optimizer": ck["tensors"], "state": ck["state"], "path": ck["path"]}


def restore_sites(model: LNFreeTransformer, state: dict) -> None:
    """Put every site in the mode (and scale) a checkpoint recorded."""
    for site, mode in state["site_modes"].items():
        current = model.ln_mode(site)
        if mode == "frozen":
            model.freeze_ln(site, scales=state["site_scales"][site])
        elif mode == "live" and current == "frozen":
            model.unfreeze_ln(site)
        elif mode != current and "removed" in (mode, current):
            raise ValueError(f"checkpoint has {site} {mode}, the model has it {current}; removal is permanent")


def load_checkpoint(path: Union[str, os.PathLike], device: Optional[str] = None) -> tuple[LNFreeTransformer, dict]:
    """Rebuild the model of a checkpoint (a ``step_*`` dir, or a run dir: its latest checkpoint).

    Returns ``(model, state)``: weights loaded (LoRA adapters of a LoRA run merged), sites in their
    checkpointed modes and scales.

    Example:
        >>> model, state = load_checkpoint("runs/removal")     # doctest: +SKIP
        >>> state["step"], model.ln_modes()["ln_final"]         # doctest: +SKIP
        (300, 'frozen')
    """
    from lnfree.removal.lora import apply_lora, merge_lora

    path = Path(path)
    if not (path / "state.json").exists():
        found = latest_checkpoint(path) if path.is_dir() else None
        if found is None:
            raise FileNotFoundError(f"{path} is neither a removal checkpoint nor a run dir with checkpoints/latest")
        path = found
    ck = read_checkpoint(path)
    state = ck["state"]
    model = LNFreeTransformer(cfg_from_json(state["model_config"], device), tokenizer=_load_tokenizer(path))
    lora = state["config"].get("lora_rank")
    if lora:
        apply_lora(model, lora, alpha=state["config"].get("lora_alpha"),
                   targets=state["config"].get("lora_targets"), seed=state["config"]["seed"])
    model.load_state_dict(ck["weights"])
    restore_sites(model, state)
    if lora:
        merge_lora(model)
    return model.eval(), state


def _load_tokenizer(ckpt_path: Path):
    tok_dir = ckpt_path.parent.parent / "tokenizer"
    if not tok_dir.exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))
