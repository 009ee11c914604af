"""Saving: `save_pretrained` (every model, every mode) and `save_derived` (a base spec + what changed).

    >>> from lnfree import zoo
    >>> save_pretrained(zoo.load("tiny-lnfree", device="cpu"), "/tmp/lnfree-doc-save")
    'lnfree'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from lnfree.io import derived, hf_write, tl_dir
from lnfree.io.resolve import read_parts

PathLike = Union[str, os.PathLike]
FORMATS = ("auto", "lnfree", "hf")


def save_pretrained(model, path: PathLike, *, format: str = "auto") -> str:
    """Save `model` in a directory `lnfree.load` reads back; returns the format written.

    Formats:

    - ``"lnfree"``: the TransformerLens state dict as it is, the config, every site's mode and scale
      (`LNFreeTransformer.ln_state`) and the tokenizer (`lnfree.io.tl_dir`): read back bit for bit (every
      weight, mode, scale and logit equal), for every architecture and every mix of live, frozen and
      removed sites;
    - ``"hf"``: a Hugging Face format (`lnfree.io.hf_write`) that transformers runs with the same logits to
      float rounding: GPT-2 for GPT-2-shaped models with every site live, or every site removed and
      centered readers (the released LN-free format); Llama for Llama-shaped models (RMSNorm, rotary,
      SwiGLU, no biases) with every site live; anything else is refused, saying why;
    - ``"auto"`` (default): ``"hf"`` where the model can be written so, else ``"lnfree"``.

    Example:
        >>> from lnfree import zoo
        >>> import lnfree, torch
        >>> model = zoo.load("tiny-ln", device="cpu").freeze_ln("blocks.0.ln2", scales=2.0)
        >>> save_pretrained(model, "/tmp/lnfree-doc-frozen")
        'lnfree'
        >>> lnfree.load("/tmp/lnfree-doc-frozen", device="cpu").ln_mode("blocks.0.ln2")
        'frozen'
    """
    from lnfree.model import as_lnfree

    model = as_lnfree(model)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = _out_dir(path)
    problem = hf_write.hf_problem(model) if format != "lnfree" else None
    if format == "hf" and problem is not None:
        raise ValueError(f"this model cannot be written in a Hugging Face format: {problem}. Save it with "
                         "format='lnfree' (or the default format='auto'), which lnfree.load reads back exactly")
    if format == "lnfree" or problem is not None:
        tl_dir.write_tl_dir(model, out)
        return "lnfree"
    hf_write.write_hf(model, out)
    return "hf"


def save_derived(model, base_spec: str, path: PathLike, *, lora: Optional[bool] = None,
                 dtype: Optional[torch.dtype] = None, fold: Union[Sequence[str], str] = ()) -> dict:
    """Save `model` as a derived directory: the base model's spec + deltas (+ LoRA pairs) + the LN state.

    `base_spec` is read with the resolver now (to compute the deltas) and again at load time (a zoo
    name such as ``"smollm2-135m"``, or a path: a relative one is looked up beside the directory first).
    `lora`: store the model's LoRA adapters as factor pairs (None: when it has any; False: merged, as
    dense deltas). `dtype`: storage dtype of deltas and factors (None: the model's, which reads back
    bit for bit; float16 / bfloat16 round them). `fold`: sites (or ``"all"``) removed at load, so that a
    model saved with those sites frozen comes back exactly as ``model.remove_ln(fold)`` leaves it, without
    storing the dense folded weights. Returns ``{"stored": [keys], "bytes": size of delta.safetensors}``.

    Example:
        >>> info = save_derived(twin_before_folding, "smollm2-135m", "twin", lora=True, fold="all")  # doctest: +SKIP
        >>> lnfree.load("twin").is_ln_free                                                          # doctest: +SKIP
        True
    """
    from lnfree.model import as_lnfree

    model = as_lnfree(model)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    if fold != "all":
        fold = tuple(fold)
        for site in fold:
            model.ln_mode(site)  # an unknown site raises, naming the valid ones
    return derived.write_derived(model, read_parts(base_spec), _out_dir(path), spec=str(base_spec), lora=lora,
                                 dtype=dtype, fold=fold)


def _out_dir(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"path must be a non-empty str or path, got {path!r}")
    out = Path(os.path.expanduser(os.fspath(path)))
    if out.exists() and not out.is_dir():
        raise ValueError(f"path must be a directory (it is created if needed); {str(path)!r} is a file")
    return out
