"""Removal checkpoints from the trainer's side: putting a model's sites back as a checkpoint recorded them.

Reading and rebuilding checkpoints is `lnfree.io.checkpoint` (parts) and `lnfree.io.resolve` (the model);
the names the trainer and older code import from here are re-exported. The writer is the trainer.
"""

from __future__ import annotations

from lnfree.io.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, read_checkpoint
from lnfree.io.resolve import load_checkpoint, load_tl_dir
from lnfree.io.tl_dir import cfg_from_json, cfg_to_json
from lnfree.model import LNFreeTransformer

__all__ = ["CHECKPOINT_FORMAT", "cfg_from_json", "cfg_to_json", "latest_checkpoint", "load_checkpoint",
           "load_tl_dir", "read_checkpoint", "restore_sites"]


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
