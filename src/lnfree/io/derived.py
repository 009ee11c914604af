"""Derived model directories: a base model spec + what changed, small enough to ship a fine-tune of a real model.

A directory holds:

- ``derived.json``: ``{"format": "lnfree-derived", "version": 1, "base": <model spec>, "model": <config>,
  "keys": [...], "dtype": ..., "lora_scale": {name: scale}, "ln_state": ..., "fold": [...]}``;
- ``delta.safetensors``: per TransformerLens state-dict key ``name``: ``name`` (an additive delta to the
  base's weight), ``name.lora_A`` + ``name.lora_B`` (a LoRA pair in `lnfree.removal.lora`'s layout, merged
  as ``W + scale * delta(A, B)`` exactly as an adapted model computes it), or ``name.value`` (the weight
  itself, where the base lacks it or base + delta would not round back to it); keys the base holds
  unchanged are not stored.

Loading: the base spec is read by the resolver (a path relative to the directory is tried there first),
the weights are rebuilt in ``dtype``, the LN state is loaded, then the ``fold`` sites are removed, so a
model saved with sites frozen (and adapters unmerged) comes back, folded, exactly as
``model.remove_ln(fold)`` leaves it, without storing the dense folded weights. With deltas stored in the
model's dtype the loaded model equals the saved one bit for bit; a lower storage dtype (``float16``,
``bfloat16``) rounds the deltas and factors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from lnfree._errors import CheckpointError
from lnfree.io.parts import Parts, read_safetensors
from lnfree.io.tl_dir import cfg_from_json, dir_name, model_cfg_json
from lnfree.removal.lora import LoRADelta, kind_of, merge_state_dict, merged
from lnfree.training.files import atomic_write_text, save_safetensors

FORMAT = "lnfree-derived"
VERSION = 1
CONFIG = "derived.json"
DELTAS = "delta.safetensors"
_BUFFERS = (".IGNORE", ".mask", ".rotary_sin", ".rotary_cos")  # rebuilt from the config at load


def is_derived(folder: Path) -> bool:
    """Whether `folder` is a derived model directory."""
    return (folder / CONFIG).is_file()


def base_spec(folder: Path) -> str:
    """The base model spec of a derived directory (a relative path that exists there, made absolute)."""
    spec = _config(folder)["base"]
    local = folder / spec
    return str(local) if not os.path.isabs(spec) and local.exists() else spec


def read_derived(folder: Path, base: Parts) -> Parts:
    """The `Parts` of a derived directory, given its base model's parts.

    Example:
        >>> parts = read_derived(Path("twin"), lnfree.io.resolve.read_parts("smollm2-135m"))   # doctest: +SKIP
    """
    conf = _config(folder)
    dtype = getattr(torch, conf["dtype"])
    stored = read_safetensors(folder / DELTAS, fix=f"re-copy the derived directory {folder}")
    weights = {key: _weight(key, base, stored, conf, dtype, folder) for key in conf["keys"]}
    fold = conf.get("fold") or ()
    return Parts(cfg_from_json(conf["model"]), weights, base.tokenizer, ln_state=conf["ln_state"],
                 name=dir_name(folder), source=str(folder / DELTAS), fold=fold if fold == "all" else tuple(fold),
                 dtype=dtype)


def _weight(key: str, base: Parts, stored: dict, conf: dict, dtype, folder: Path) -> torch.Tensor:
    if f"{key}.value" in stored:
        return stored[f"{key}.value"].to(dtype)
    if key not in base.weights:
        raise CheckpointError(f"{folder}: the base model {conf['base']!r} has no weight {key!r}; the directory was "
                              "derived from another base model")
    w = base.weights[key].to(dtype)
    if key in stored:
        w = w + stored[key].to(dtype)
    if f"{key}.lora_A" in stored:
        A, B = stored[f"{key}.lora_A"].to(dtype), stored[f"{key}.lora_B"].to(dtype)
        w = merged(w, kind_of(key.rsplit(".", 1)[-1]), A, B, conf["lora_scale"][key])
    return w


def _config(folder: Path) -> dict:
    try:
        conf = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / CONFIG}: {e}; re-copy the derived directory") from e
    if not isinstance(conf, dict) or conf.get("format") != FORMAT or conf.get("version") != VERSION:
        raise CheckpointError(f"{folder / CONFIG} is not an {FORMAT} v{VERSION} config")
    return conf


def write_derived(model, base: Parts, out: Path, *, spec: str, lora: Optional[bool] = None,
                  dtype: Optional[torch.dtype] = None, fold: Union[tuple[str, ...], str] = ()) -> dict:
    """Write `model` as a derived directory against `base` (the parts of `spec`); returns what was stored.

    `lora`: store the model's LoRA adapters as factor pairs (None: when it has any; False: merged into dense
    deltas). `dtype`: the storage dtype of deltas and factors (None: the model's). `fold`: sites removed
    when the directory is loaded (``"all"``: every site).
    """
    compute = model.W_E.dtype
    storage = compute if dtype is None else dtype
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith(_BUFFERS)}
    adapters = _adapters(model)
    if lora and not adapters:
        raise ValueError("lora=True but the model has no LoRA adapters (lnfree.removal.apply_lora)")
    pairs = lora is not False
    weights, stored, scales = _plain_weights(sd, adapters, pairs), {}, {}
    for key, (A, B, scale) in (adapters if pairs else {}).items():
        stored[f"{key}.lora_A"], stored[f"{key}.lora_B"] = A.to(storage), B.to(storage)
        scales[key] = scale
    for key, w in weights.items():
        stored.update(_delta(key, w, base.weights.get(key), storage))
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in stored.items()}, out / DELTAS)
    conf = {"format": FORMAT, "version": VERSION, "base": spec, "model": model_cfg_json(model),
            "keys": sorted(weights), "dtype": str(compute).removeprefix("torch."), "lora_scale": scales,
            "ln_state": model.ln_state(), "fold": fold if fold == "all" else list(fold)}
    atomic_write_text(out / CONFIG, json.dumps(conf, indent=1))
    return {"stored": sorted(stored), "bytes": (out / DELTAS).stat().st_size}


def _adapters(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """TL key of each adapted weight -> (A, B, scale)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRADelta):  # name: '<module>.parametrizations.<weight>.0'
            head, _, tail = name.partition(".parametrizations.")
            out[f"{head}.{tail.rsplit('.', 1)[0]}"] = (module.A.detach().cpu(), module.B.detach().cpu(), module.scale)
    return out


def _plain_weights(sd: dict, adapters: dict, pairs: bool) -> dict[str, torch.Tensor]:
    """The state dict under plain keys: an adapted weight's key holds its backbone (``...original``), or,
    with `pairs` False, the merged weight."""
    if adapters and not pairs:
        return merge_state_dict(sd, next(iter(adapters.values()))[2])  # apply_lora gives every pair one scale
    out = {}
    for key, value in sd.items():
        head, sep, tail = key.partition(".parametrizations.")
        if not sep:
            out[key] = value
        elif tail.endswith(".original"):
            out[f"{head}.{tail.removesuffix('.original')}"] = value
    return out


def _delta(key: str, w: torch.Tensor, b: Optional[torch.Tensor], storage: torch.dtype) -> dict:
    """What to store for one weight: nothing (unchanged), an additive delta, or the value itself."""
    if b is None or b.shape != w.shape:
        return {f"{key}.value": w.to(storage)}
    b = b.to(w.dtype)
    if torch.equal(w, b):
        return {}
    d = (w - b).to(storage)
    if storage == w.dtype and not torch.equal(b + d, w):  # rounding: keep the weight itself, exactly
        return {f"{key}.value": w}
    return {key: d}
