"""Reading and rebuilding removal checkpoints (the format of `lnfree.training.checkpoints`).

A removal checkpoint's ``state.json`` holds the step, data position, sigma EMAs, site modes and
scales, RNG states, the divergence guard's history and the `RemovalConfig`; ``optimizer.pt`` holds
``{"optimizer": AdamW state, "scheduler": {"step", "lr_scale"}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformer_lens import HookedTransformerConfig

from lnfree.model import LNFreeTransformer
from lnfree.training.checkpoints import CheckpointDir

CHECKPOINT_FORMAT = "lnfree-removal-checkpoint"


# ---- model config (de)serialisation (candidates for lnfree.loading) ------------------------------
def cfg_to_json(cfg: HookedTransformerConfig) -> dict:
    """The init fields of a HookedTransformerConfig as JSON values (dtype as a string, no device)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in ("device", "n_devices"):
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[f.name] = v
    return out


def cfg_from_json(d: dict, device: Optional[str] = None) -> HookedTransformerConfig:
    """Inverse of `cfg_to_json`."""
    d = dict(d)
    if isinstance(d.get("dtype"), str):
        d["dtype"] = getattr(torch, d["dtype"])
    names = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    return HookedTransformerConfig(**{k: v for k, v in d.items() if k in names}, device=device or "cpu")


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


def load_tl_dir(path: Union[str, os.PathLike], device: Optional[str] = None, tokenizer=None) -> LNFreeTransformer:
    """Load a TransformerLens weights dir: ``model.safetensors`` + ``config.json`` holding
    HookedTransformerConfig kwargs (top level or under "model"; the zoo's and ``final_tl/`` format).

    Example:
        >>> model = load_tl_dir("runs/zoo/pretrain/final")    # doctest: +SKIP
    """
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    kwargs = conf.get("model", conf)
    model = LNFreeTransformer(cfg_from_json(kwargs, device), tokenizer=tokenizer)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if ".ln" not in k and not k.startswith("ln_final")]
    if missing:
        raise ValueError(f"{path}/model.safetensors lacks weights {missing[:5]}")
    modes = set(conf.get("ln_modes", {}).values())
    if "frozen" in modes or len(modes) > 1:
        raise ValueError(f"{path} holds a partially removed model ({sorted(modes)}); use load_checkpoint instead")
    return model.eval()
