"""The lnfree directory: TransformerLens weights + config + LN state + tokenizer, read back bit for bit.

A directory holds ``model.safetensors`` (the TransformerLens state dict, in the model's dtype) and
``config.json``: ``{"format": "lnfree", "version": 1, "model": <HookedTransformerConfig fields>,
"ln_state": <LNFreeTransformer.ln_state()>}``, with the tokenizer in ``tokenizer/``. The same reader
takes the older TransformerLens weights directories this format grew from: a removal run's
``final_tl/`` (``"ln_modes"`` instead of ``"ln_state"``) and zoo pretraining runs (``final/`` or a
checkpoint; config fields under ``"model"`` or at top level).

    >>> from transformer_lens import HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, d_vocab=20, act_fn="gelu")
    >>> cfg_from_json(cfg_to_json(cfg)).d_model
    16
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformer_lens import HookedTransformerConfig

from lnfree._errors import CheckpointError
from lnfree.io.parts import Parts, read_safetensors
from lnfree.io.tokenizers import find_tokenizer
from lnfree.training.checkpoints import CheckpointDir
from lnfree.training.files import atomic_write_text, save_safetensors

FORMAT = "lnfree"
VERSION = 1


def cfg_to_json(cfg: HookedTransformerConfig, *, dtype: bool = True) -> dict:
    """The init fields of a HookedTransformerConfig as JSON values (no device; dtype as a string, or left out)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in ("device", "n_devices") or (f.name == "dtype" and not dtype):
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        try:
            json.dumps(v)
        except TypeError:  # fields that are not plain data (e.g. a callable) are rebuilt from the others
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


def model_cfg_json(model) -> dict:
    """`cfg_to_json` of a model's config as built: removing every site clears ``normalization_type``, but the
    sites' modules (and their weights in the state dict) keep the norm they were built as."""
    d = cfg_to_json(model.cfg)
    if d.get("normalization_type") is None and len(model.blocks):
        d["normalization_type"] = model.blocks[0].ln1.kind
    return d


def tl_config(folder: Path) -> Optional[dict]:
    """The parsed ``config.json`` if `folder` is an lnfree / TransformerLens weights directory, else None."""
    file = folder / "config.json"
    if not ((folder / "model.safetensors").is_file() and file.is_file()):
        return None
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = conf.get("model", conf) if isinstance(conf, dict) else None
    return conf if isinstance(fields, dict) and "d_model" in fields and "n_layers" in fields else None


def dir_name(folder: Path) -> str:
    """A model's name from its directory: the run's name for ``final/``, ``final_tl/`` and checkpoints."""
    folder = Path(os.path.abspath(folder))
    if folder.name in ("final", "final_tl"):
        return folder.parent.name
    if folder.name.startswith("step_") and folder.parent.name in ("checkpoints", "ckpt"):
        return f"{folder.parent.parent.name}/{folder.name}"
    return folder.name


def read_tl_dir(folder: Union[str, os.PathLike]) -> Parts:
    """The `Parts` of an lnfree / TransformerLens weights directory (see the module docstring).

    Example:
        >>> parts = read_tl_dir("runs/removal/final_tl")   # doctest: +SKIP
    """
    folder = Path(folder)
    conf = tl_config(folder)
    if conf is None:
        raise CheckpointError(f"{folder} is not an lnfree directory (model.safetensors + config.json with the "
                              "model's config)")
    ln_state = conf.get("ln_state")
    modes = set(conf.get("ln_modes", {}).values())
    if ln_state is None and ("frozen" in modes or len(modes) > 1):
        raise CheckpointError(f"{folder} holds a partially removed model ({sorted(modes)}) without its scales; "
                              "load the run's last checkpoint instead (lnfree.load of checkpoints/step_*)")
    cfg = cfg_from_json(conf.get("model", conf))
    weights = read_safetensors(folder / "model.safetensors", fix="re-save or re-copy the directory")
    return Parts(cfg, weights, find_tokenizer(folder), ln_state=ln_state, name=dir_name(folder),
                 source=str(folder / "model.safetensors"),
                 dtype=cfg.dtype)


def write_tl_dir(model, out: Path) -> None:
    """Write `model` as an lnfree directory (bit-identical: the state dict as it is, the LN state, the tokenizer).

    Example:
        >>> from lnfree import zoo
        >>> write_tl_dir(zoo.load("tiny-lnfree", device="cpu"), Path("/tmp/lnfree-doc-dir"))
        >>> sorted(p.name for p in Path("/tmp/lnfree-doc-dir").iterdir())
        ['config.json', 'model.safetensors', 'tokenizer']
    """
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
               if not k.endswith((".IGNORE", ".mask"))}
    save_safetensors(weights, out / "model.safetensors")
    conf = {"format": FORMAT, "version": VERSION, "model": model_cfg_json(model), "ln_state": model.ln_state()}
    atomic_write_text(out / "config.json", json.dumps(conf, indent=1))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out / "tokenizer"))


def run_weights_dir(folder: Path) -> Optional[Path]:
    """The weights dir of a zoo pretraining run: ``final/``, else its latest checkpoint (either layout)."""
    if tl_config(folder / "final") is not None:
        return folder / "final"
    try:
        target = latest_run_checkpoint(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return target if target is not None and tl_config(target) is not None else None


def latest_run_checkpoint(out: Union[str, os.PathLike]) -> Optional[Path]:
    """The latest complete checkpoint of a run dir (None if none); reads older ``ckpt/latest.json`` dirs too."""
    found = CheckpointDir(out).latest()
    legacy = Path(out) / "ckpt" / "latest.json"
    if found is None and legacy.exists():
        return Path(out) / "ckpt" / json.loads(legacy.read_text())["dir"]
    return found
