"""What every reader returns (`Parts`) and the one way a model is built from it (`assemble`).

A reader turns a file or directory into a TransformerLens config, TransformerLens-keyed weights, a
tokenizer and an LN state (`LNFreeTransformer.ln_state()`'s JSON, treated as opaque: it goes back
through `load_ln_state` as it came). `assemble` builds the `LNFreeTransformer` through the model's
public API with one rule for weights that do not match the model:

- missing: the buffers the model builds from its config (attention masks, rotary tables), biases (an
  absent bias is zero: converters omit some), and the norm weights of sites the LN state marks
  removed (never read); anything else names the weights and the source;
- unexpected: norm weights of sites the model builds without parameters (an LN-free config), and
  all-zero biases the model has no slot for (TransformerLens's Phi-3 converter writes them for its
  RMSNorms); anything else names the weights and the source.

Device and dtype are decided by the resolver (`lnfree.io.resolve`), never here.

    >>> from lnfree.io.parts import Parts
    >>> Parts.__dataclass_fields__.keys() >= {"cfg", "weights", "tokenizer", "ln_state"}
    True
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Union

import torch

from lnfree._errors import CheckpointError

#: TransformerLens's weight-processing flags (`load_and_process_state_dict`), applied by `assemble`.
FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


@dataclasses.dataclass
class Parts:
    """A model as read from disk, before it is built.

    Attributes:
        cfg: a ``HookedTransformerConfig`` (its device and dtype are replaced by the resolver's).
        weights: TransformerLens state-dict keys -> tensors (any float dtype).
        tokenizer: a transformers tokenizer, or None.
        ln_state: `LNFreeTransformer.ln_state()` JSON (None: every site as the config builds it).
        name: the model's name (``cfg.model_name``): a zoo name, a directory's or file's name, a hub id.
        source: where the parts came from, for error messages.
        fold: sites removed after the LN state is loaded (their scales folded into the weights then),
            or ``"all"``; `fold_scale` is the scale of those still live (None: their stored one).
        dtype: the dtype the source stores (the resolver's default when none is asked for).
        attrs: attributes set on the built model (e.g. ``zoo_name``).
    """

    cfg: Any
    weights: dict[str, torch.Tensor]
    tokenizer: Any = None
    ln_state: Optional[dict] = None
    name: Optional[str] = None
    source: str = ""
    fold: Union[tuple[str, ...], str] = ()
    fold_scale: Optional[float] = None
    dtype: torch.dtype = torch.float32
    attrs: dict = dataclasses.field(default_factory=dict)

    def has_fixed_scales(self) -> bool:
        """Whether any site is frozen or removed (or will be): float16 is then unsafe."""
        modes = {e.get("mode") for e in (self.ln_state or {}).values()}
        return bool(self.fold) or bool(modes - {"live"}) or self.cfg.normalization_type is None


def assemble(parts: Parts, *, device, dtype: torch.dtype, flags: Optional[dict] = None):
    """The `LNFreeTransformer` of `parts` on `device` in `dtype` (both already decided by the resolver).

    Without processing flags the weights go in with one `load_state_dict` call (TransformerLens's
    `load_and_process_state_dict` loads key by key: 20x slower on a 30-layer model); with flags its
    processing runs as it is.
    """
    from lnfree.model import LNFreeTransformer

    cfg = copy.deepcopy(parts.cfg)
    cfg.device, cfg.dtype, cfg.init_weights = device, dtype, False
    if parts.name is not None:
        cfg.model_name = parts.name
    model = LNFreeTransformer(cfg, tokenizer=parts.tokenizer)
    flags = flags or {}
    if any(flags.get(f) for f in FLAGS):
        model.load_and_process_state_dict(dict(parts.weights), refactor_factored_attn_matrices=False,
                                          **{f: bool(flags.get(f)) for f in FLAGS})
    else:
        model.load_state_dict(matched_weights(model, parts), strict=True)
    if parts.ln_state is not None:
        model.load_ln_state(parts.ln_state)
    if parts.fold:
        model.remove_ln(None if parts.fold == "all" else list(parts.fold), scales=parts.fold_scale)
    for key, value in parts.attrs.items():
        setattr(model, key, value)
    return model.eval()


def matched_weights(model, parts: Parts) -> dict[str, torch.Tensor]:
    """`parts.weights` fitted to `model`'s state dict by the module's one missing/unexpected-key rule."""
    expected = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    removed = _removed_modules(parts.ln_state)
    out, unexpected = {}, []
    for key, value in parts.weights.items():
        if key in expected:
            out[key] = value
        elif _is_norm_param(key) and (model.cfg.normalization_type is None or _module(key) in removed):
            continue  # a site built without parameters: its norm weights are never read
        elif not (_is_bias(key) and not bool(value.any())):
            unexpected.append(key)
    missing = []
    for key, value in expected.items():
        if key in out:
            continue
        if key in buffers:  # masks, rotary tables: the model builds them from its config
            out[key] = value
        elif (_is_bias(key) and not _is_norm_param(key)) or (_is_norm_param(key) and _module(key) in removed):
            out[key] = torch.zeros_like(value) if not key.endswith(".w") else torch.ones_like(value)
        else:
            missing.append(key)
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {parts.source or 'the source'} do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. The file is incomplete or belongs to another configuration."
        )
    return out


def _is_norm_param(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] in ("w", "b") and (parts[0] == "ln_final" or (len(parts) == 4 and parts[2] in ("ln1", "ln2")))


def _is_bias(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].lstrip("_")
    return leaf == "b" or leaf.startswith("b_")


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0]


def _removed_modules(ln_state: Optional[dict]) -> set[str]:
    """Norm modules all of whose sites are removed ('blocks.0.ln1' once both its qk and v paths are)."""
    modes: dict[str, set] = {}
    for site, entry in (ln_state or {}).items():
        module = site.rsplit(".", 1)[0] if site.endswith((".qk", ".v")) else site
        modes.setdefault(module, set()).add(entry.get("mode"))
    return {m for m, s in modes.items() if s == {"removed"}}


def read_safetensors(file, *, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, corrupt or truncated file raises `CheckpointError`
    naming it and `fix` (what to do about it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}. The file is missing, corrupt or truncated; {fix}.") from e
