"""TransformerLens weights directories: ``model.safetensors`` + ``config.json`` of HookedTransformerConfig fields.

The format of a removal run's ``final_tl/``, of zoo pretraining checkpoints and of the zoo's manifest
config. The config JSON holds the config's init fields (top level, or under ``"model"``);
`cfg_to_json` / `cfg_from_json` convert both ways, `tl_config` reads one if a directory is in this
format, `load_tl_dir` builds the `LNFreeTransformer`.

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

from lnfree.model import LNFreeTransformer


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


def tl_config(folder: Path) -> Optional[dict]:
    """The parsed ``config.json`` if `folder` is a TransformerLens weights directory, else None."""
    file = folder / "config.json"
    if not ((folder / "model.safetensors").is_file() and file.is_file()):
        return None
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = conf.get("model", conf) if isinstance(conf, dict) else None
    return conf if isinstance(fields, dict) and "d_model" in fields and "n_layers" in fields else None


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
