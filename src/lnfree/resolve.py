"""One model resolver: `load(spec)` turns any model reference lnfree knows into an `LNFreeTransformer`.

Kinds, tried in this order:

1. a zoo name: ``tiny-ln``, ``tiny-vanilla``, ``tiny-lnfree``, ``smollm2-135m`` (`lnfree.zoo`);
2. a ``.gguf`` file (llama / qwen2; `lnfree.gguf_file`);
3. a removal run directory (``checkpoints/latest``; its ``final_tl/`` when the run finished, else the
   latest checkpoint) or one removal checkpoint directory (``state.json``): `lnfree.removal.load_checkpoint`;
4. a zoo pretraining run directory (``final/`` or its latest checkpoint) or a TransformerLens weights
   directory (``model.safetensors`` + ``config.json`` of HookedTransformerConfig fields, at top level or
   under ``"model"``; e.g. a removal run's ``final_tl/``): `lnfree.tl_dir.load_tl_dir`;
5. a Hugging Face directory (``config.json`` with a ``model_type``) of any architecture
   `lnfree.loading.load_model` reads;
6. a hub id (``gpt2``, ``owner/name``): `lnfree.loading.load_model`, offline-first, failing fast.

Anything else raises `lnfree.CheckpointError` (a ValueError) listing these kinds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from lnfree._checks import check_device
from lnfree._errors import CheckpointError

KINDS = (
    "a zoo name ({zoo})",
    "a .gguf file (llama, qwen2)",
    "a removal run or checkpoint directory",
    "a TransformerLens weights directory (model.safetensors + config.json, e.g. final_tl/) or zoo run directory",
    "a Hugging Face model directory (config.json + weights)",
    "a Hugging Face hub id such as 'gpt2' or 'owner/name'",
)


def kinds_text() -> str:
    """The accepted kinds of model reference, as one line for error messages."""
    from lnfree import zoo

    return "; ".join(KINDS).format(zoo=", ".join(zoo.all_names()))


def load(spec: Union[str, os.PathLike], *, device: Optional[Union[str, torch.device]] = None,
         dtype: Optional[torch.dtype] = None, **kwargs):
    """Load any model reference as an `LNFreeTransformer` (see the module docstring for the kinds).

    Args:
        spec: a zoo name, a path (file or directory) or a hub id.
        device: None (TransformerLens's default: CUDA when available), ``"cpu"``, ``"cuda"``...;
            a CUDA device on a machine without one is refused with a clear error.
        dtype: None keeps each format's default (float32).
        kwargs: passed on to `lnfree.loading.load_model` for HF directories, GGUF files and hub ids
            (``fold_ln``, ``tokenizer``, ``n_ctx``, ...); refused for the other kinds.

    Example:
        >>> import lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> model.cfg.n_layers, model.ln_mode("ln_final")
        (4, 'live')
        >>> lnfree.load("smollm2-135m", device="cpu").cfg.n_key_value_heads   # doctest: +SKIP
        3
    """
    from lnfree import zoo
    from lnfree.loading import load_model

    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise TypeError(f"spec must be a non-empty str or path: {kinds_text()}; got {spec!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    check_device(device)
    name = os.fspath(spec)
    dtype_kw = {} if dtype is None else {"dtype": dtype}
    if name in zoo.all_names():
        _no_kwargs(kwargs, "a zoo name")
        return zoo.load(name, device=device, **dtype_kw)
    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_model(path, device=device, **dtype_kw, **kwargs)
    if path.is_dir():
        return _load_dir(path, device, dtype, kwargs)
    if path.exists():
        raise CheckpointError(f"spec {name!r} is a file but not a .gguf; accepted: {kinds_text()}")
    if _looks_like_path(name):
        raise CheckpointError(f"spec {name!r}: no such file or directory (and not a zoo name); accepted: {kinds_text()}")
    from lnfree.loading import _looks_like_hub_id

    if not _looks_like_hub_id(name):
        raise CheckpointError(f"spec {name!r} is not a model reference lnfree knows; accepted: {kinds_text()}")
    return load_model(name, device=device, **dtype_kw, **kwargs)


def _looks_like_path(name: str) -> bool:
    """A path that does not exist (rather than a hub id): absolute, relative, or a file name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(
        ("/", ".gguf", ".safetensors", ".json", ".bin", ".pt"))


def _no_kwargs(kwargs: dict, kind: str) -> None:
    if kwargs:
        raise TypeError(f"{sorted(kwargs)} apply to HF directories, .gguf files and hub ids, not to {kind}")


def _zoo_run_checkpoint(folder: Path) -> Optional[Path]:
    """The weights dir of a zoo pretraining run: ``final/``, else its latest checkpoint (either layout)."""
    from lnfree.tl_dir import tl_config
    from lnfree.zoo.train import latest_checkpoint

    if tl_config(folder / "final") is not None:
        return folder / "final"
    try:
        target = latest_checkpoint(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return target if target is not None and tl_config(target) is not None else None


def _is_removal_checkpoint(folder: Optional[Path]) -> bool:
    from lnfree.removal.checkpoint import CHECKPOINT_FORMAT

    if folder is None or not (folder / "state.json").is_file():
        return False
    try:
        return json.loads((folder / "state.json").read_text()).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _load_dir(folder: Path, device, dtype, kwargs: dict):
    from lnfree.loading import load_model
    from lnfree.removal.checkpoint import latest_checkpoint, load_checkpoint
    from lnfree.tl_dir import load_tl_dir, tl_config

    if _is_removal_checkpoint(folder) or _is_removal_checkpoint(latest_checkpoint(folder)):
        _no_kwargs(kwargs, "a removal run or checkpoint directory")
        if (folder / "summary.json").is_file() and tl_config(folder / "final_tl") is not None:
            return _cast(load_tl_dir(folder / "final_tl", device=_dev(device), tokenizer=_find_tokenizer(folder)),
                         dtype)
        model, _ = load_checkpoint(folder, device=_dev(device))
        return _cast(model, dtype)
    tl_dir = folder if tl_config(folder) is not None else _zoo_run_checkpoint(folder)
    if tl_dir is not None:
        _no_kwargs(kwargs, "a TransformerLens weights directory")
        return _cast(load_tl_dir(tl_dir, device=_dev(device), tokenizer=_find_tokenizer(tl_dir)), dtype)
    if (folder / "config.json").is_file():
        return load_model(folder, device=device, **({} if dtype is None else {"dtype": dtype}), **kwargs)
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"directory {str(folder)!r} holds no model lnfree can read (found: {found or 'nothing'}); "
                          f"accepted: {kinds_text()}")


def _dev(device) -> Optional[str]:
    return None if device is None else str(device)


def _cast(model, dtype):
    return model if dtype is None or model.W_E.dtype == dtype else model.to(dtype)


def _find_tokenizer(folder: Path):
    """The tokenizer saved with a run: ``tokenizer/`` (HF) or ``tokenizer.json``, here or up to two levels up."""
    for d in (folder, folder.parent, folder.parent.parent):
        if (d / "tokenizer" / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            from lnfree.formats import load_saved_tokenizer

            return load_saved_tokenizer(str(d / "tokenizer" if (d / "tokenizer").is_dir() else d / "tokenizer.json"))
    return None
