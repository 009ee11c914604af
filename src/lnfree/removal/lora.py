"""LoRA adapters for the parameter-efficient removal fine-tune: a frozen backbone, trainable low rank.

Each targeted weight ``W`` is reparametrised (``torch.nn.utils.parametrize``) as
``W + (alpha / r) * delta(A, B)`` with ``delta`` the rank-r product mapping the weight's input to its
output space. TransformerLens's shapes:

- ``W_Q, W_K, W_V`` ``[heads, d_model, d_head]`` (GQA: ``_W_K, _W_V`` ``[kv_heads, ...]``):
  ``A [d_model, r]``, ``B [heads, r, d_head]``, ``delta[h, i, j] = sum_k A[i, k] B[h, k, j]``;
- ``W_O`` ``[heads, d_head, d_model]``: ``A [heads, d_head, r]``, ``B [r, d_model]``;
- ``W_in, W_gate`` ``[d_model, d_mlp]``, ``W_out`` ``[d_mlp, d_model]``: ``A [in, r]``, ``B [r, out]``.

``B`` starts at zero, so the adapted model starts as exactly the original function; only ``A`` and
``B`` require gradients (the optimiser holds state for them alone). `merge_lora` writes ``W + delta``
as new plain Parameters and unfreezes the backbone: the result is an ordinary model.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")
_ATTN_IN = ("W_Q", "W_K", "W_V", "_W_K", "_W_V")


def kind_of(name: str) -> str:
    """The factor layout of weight `name` (``W_Q``, ``_W_K``, ``W_O``, ``W_in``...): 'in3', 'out3' or 'mat'."""
    return "in3" if name in _ATTN_IN else ("out3" if name.lstrip("_") == "W_O" else "mat")


def delta_of(kind: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The rank-r product of a factor pair in its weight's layout (see the module docstring)."""
    if kind == "in3":
        return torch.einsum("ik,hkj->hij", A, B)
    if kind == "out3":
        return torch.einsum("hek,kd->hed", A, B)
    return A @ B


def merged(W: torch.Tensor, kind: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * delta(A, B)``: how an adapted model computes its weight, so that a saved pair merges
    into the very weights `merge_lora` writes."""
    return W + float(scale) * delta_of(kind, A, B).to(W.dtype)


def merge_state_dict(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict saved from an adapted model, with every adapter merged (the keys of `merge_lora`'s model).

    Example:
        >>> sd = merge_state_dict(adapted_model.state_dict(), scale=1.0)   # doctest: +SKIP
    """
    out, pairs = {}, {}
    for key, value in weights.items():
        head, sep, tail = key.partition(".parametrizations.")
        if not sep:
            out[key] = value
            continue
        name, _, part = tail.partition(".")
        pairs.setdefault((head, name), {})[part] = value
    for (head, name), p in pairs.items():
        out[f"{head}.{name}"] = merged(p["original"], kind_of(name), p["0.A"], p["0.B"], scale)
    return out


class LoRADelta(nn.Module):
    """The parametrization ``W -> W + scale * delta(A, B)`` of one weight (see the module docstring)."""

    def __init__(self, name: str, shape: torch.Size, rank: int, alpha: float, generator: torch.Generator,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.kind = kind_of(name)
        if self.kind == "in3":
            h, d_in, e = shape
            a_shape, b_shape = (d_in, rank), (h, rank, e)
        elif self.kind == "out3":
            h, e, d_out = shape
            d_in = h * e
            a_shape, b_shape = (h, e, rank), (rank, d_out)
        else:
            d_in, d_out = shape
            a_shape, b_shape = (d_in, rank), (rank, d_out)
        self.scale = float(alpha) / rank
        a = torch.randn(a_shape, generator=generator, dtype=torch.float32) / math.sqrt(d_in)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))

    def delta(self) -> torch.Tensor:
        return delta_of(self.kind, self.A, self.B)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return merged(W, self.kind, self.A, self.B, self.scale)


def _targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[nn.Module, str]]:
    found = []
    for block in model.blocks:
        for module in (block.attn, block.mlp):
            for name in targets:
                attr = f"_{name}" if name in ("W_K", "W_V") and f"_{name}" in module._parameters else name
                p = module._parameters.get(attr)
                if isinstance(p, nn.Parameter) and p.ndim in (2, 3):
                    found.append((module, attr))
    return found


def apply_lora(model: nn.Module, rank: int, *, alpha: Optional[float] = None,
               targets: Optional[Sequence[str]] = None, seed: int = 0) -> list[tuple[nn.Module, str]]:
    """Freeze every parameter of `model` and add rank-`rank` adapters to the targeted weights (in place).

    Returns the (module, parameter name) pairs adapted. `alpha` defaults to `rank` (scale 1).

    Example:
        >>> adapted = apply_lora(model, 8)                                # doctest: +SKIP
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # doctest: +SKIP
        36864
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if is_lora(model):
        raise ValueError("the model already has LoRA adapters (merge them with merge_lora first)")
    alpha = float(rank if alpha is None else alpha)
    pairs = _targets(model, DEFAULT_TARGETS if targets is None else targets)
    if not pairs:
        raise ValueError(f"no LoRA target weights {tuple(targets or DEFAULT_TARGETS)} found in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    for module, name in pairs:
        w = module._parameters[name]
        delta = LoRADelta(name.lstrip("_"), w.shape, rank, alpha, gen, w.dtype, w.device)
        parametrize.register_parametrization(module, name, delta, unsafe=True)
    return pairs


def is_lora(model: nn.Module) -> bool:
    """Whether `model` carries LoRA adapters."""
    return any(isinstance(m, LoRADelta) for m in model.modules())


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what a LoRA run trains)."""
    return [p for m in model.modules() if isinstance(m, LoRADelta) for p in (m.A, m.B)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Write ``W + delta`` of every adapter as a new plain Parameter, drop the adapters, unfreeze all.

    Example:
        >>> merge_lora(model).training is not None and not is_lora(model)   # doctest: +SKIP
        True
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if not any(isinstance(p, LoRADelta) for p in module.parametrizations[name]):
                continue
            merged = getattr(module, name).detach().clone()
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            setattr(module, name, nn.Parameter(merged))
    for p in model.parameters():
        p.requires_grad_(True)
    return model
