"""TransformerLens's per-pass weight copies made no-ops: weights stored in the layout TL copies them into.

TransformerLens copies weights into a permuted layout in every forward pass: the gated MLP and the
unembedding call ``F.linear(x, W.T.contiguous())``, attention reshapes W_Q/W_K/W_V to
[(head d_head), d_model] and W_O to [d_model, (head d_head)]. SmolLM2-135M: W_U alone is 113 MB,
~0.3 s per pass on one core, as much as the arithmetic of a 60-token pass. Stored in that layout (same
shape and values, other strides), the copy is a no-op and the same values in the same layout reach
``F.linear``: every output is bit-identical. Used for a call by patching (`tl_weight_layout`) and for a
whole run by the removal trainer (`to_tl_layout`, then `contiguous_parameters`); gradients and AdamW's
state follow a parameter's strides, so training is bit-identical too, only faster.

Example:
    >>> import torch
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> net = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10,
    ...                                                 act_fn="silu", gated_mlp=True))
    >>> x = torch.tensor([[1, 2, 3]])
    >>> ref = net(x)
    >>> with tl_weight_layout(net):
    ...     bool((net(x) == ref).all()), net.unembed.W_U.T.is_contiguous()
    (True, True)
    >>> net.unembed.W_U.is_contiguous()                 # restored on exit
    True
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

# the permutation each forward pass makes contiguous, per module class and parameter
_T = (1, 0)
_QKV = (0, 2, 1)  # [head, d_model, d_head] -> [head, d_head, d_model]
_PERMS = {"GatedMLP": {"W_gate": _T, "W_in": _T, "W_out": _T}, "Unembed": {"W_U": _T}}
_ATTN_QKV = {"W_Q": _QKV, "W_K": _QKV, "W_V": _QKV, "_W_K": _QKV, "_W_V": _QKV}
_ATTN_O = {"W_O": (2, 0, 1)}  # [head, d_head, d_model] -> [d_model, head, d_head]


def _layout_perms(module, cfg) -> dict:
    name = type(module).__name__
    if name in ("Attention", "GroupedQueryAttention"):  # only the F.linear paths (not einsum, not 4-bit)
        simple = not (cfg.use_split_qkv_input or cfg.use_attn_in or getattr(cfg, "load_in_4bit", False))
        return ({**(_ATTN_QKV if simple else {}), **(_ATTN_O if simple and not cfg.use_attn_result else {})})
    return _PERMS.get(name, {})


def _permuted_layout(p: torch.Tensor, perm: tuple) -> torch.Tensor:
    """p's values stored so that ``p.permute(perm)`` is contiguous (same shape and values as p)."""
    inverse = tuple(int(i) for i in np.argsort(perm))
    return p.detach().permute(perm).contiguous().permute(inverse)


def to_tl_layout(model, swapped: Optional[list] = None) -> list:
    """Store, in place, every weight TL copies per pass in that layout; returns (parameter, old data) pairs
    (appended to `swapped` as they are made, so a caller can undo a partial swap)."""
    swapped = [] if swapped is None else swapped
    for module in model.modules():
        for name, perm in _layout_perms(module, model.cfg).items():
            p = module._parameters.get(name)  # a Parameter, not a property (GQA's expanded W_K)
            if isinstance(p, torch.nn.Parameter) and p.dim() == len(perm) and not p.permute(perm).is_contiguous():
                layout = _permuted_layout(p, perm)
                swapped.append((p, p.data))
                p.data = layout
    return swapped


def contiguous_parameters(model: torch.nn.Module) -> None:
    """Every parameter back in the ordinary (contiguous) layout, keeping its current values."""
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()


@contextlib.contextmanager
def tl_weight_layout(model):
    """For the call, store those weights in the layout TransformerLens copies them into, so its copy is a no-op.

    The same values in the same layout reach ``F.linear``, so every number is bit-identical; the copy
    is made once per weight per call instead of once per forward pass. The copies exist only during the
    call (~85% of SmolLM2's weight memory, freed on exit: nothing stays cached on the model), and the
    original parameters are restored on exit.
    """
    swapped: list = []
    try:
        to_tl_layout(model, swapped)
        yield
    finally:
        for p, data in reversed(swapped):
            p.data = data
