"""A normalization layer whose per-token scale can be live, frozen to a constant, or removed.

`RemovableLayerNorm` replaces TransformerLens's `LayerNorm`, `LayerNormPre`, `RMSNorm` and
`RMSNormPre` inside `LNFreeTransformer`. It computes exactly what TransformerLens computes while
every path is `live` (same operations in the same order, so outputs are bit-for-bit identical) and
keeps TransformerLens's hook names (`hook_scale`, `hook_normalized`), so caches and
ActivationCache helpers keep working.

Kinds (`kind`, from the TransformerLens module it replaces):
- ``LN``: x_c / sqrt(mean(x_c^2) + eps) * w + b, with x_c = x - mean(x) (LayerNorm).
- ``LNPre``: the same without w and b (TransformerLens's folded LayerNorm).
- ``RMS``: x / sqrt(mean(x^2) + eps) * w, no centering and no bias (RMSNorm; Gemma's (1 + w)
  offset is already added to w by TransformerLens's weight conversion).
- ``RMSPre``: the same without w.

One module can serve several *paths*: `ln1` feeds the query/key path and the value path of
attention, and the paper removes those two independently. Each path is one LN *site* with its
own mode and scale. Path "qk" (or the single path "main") uses the TransformerLens hook names;
the value path adds `hook_scale_v` / `hook_normalized_v`.

Modes, per path (the paper's procedure, generalised to RMSNorm by replacing the per-token RMS
with its fixed average):
- ``live``: the ordinary normalization above.
- ``frozen``: the per-token scale is replaced by a fixed scalar sigma (the paper's "fake LN"):
  x_c / sigma * w + b for LayerNorm, x / sigma * w for RMSNorm. A *positional* frozen scale is a
  short vector (sigma_0, ..., sigma_{k-1}, sigma_rest): position p < k uses sigma_p, every later
  position sigma_rest. It is still a fixed linear map at each position (nothing depends on the
  activations), so the model stays norm-free and DLA stays the exact direct effect; it assumes the
  first k tokens are the ones it was calibrated on (models with an attention sink at position 0,
  e.g. SmolLM2, whose position-0 residual is a constant of the model after a fixed BOS token).
- ``removed``: identity. The model has folded centering (LayerNorm only), w, b and 1/sigma into
  the weights that read this path (see `LNFreeTransformer.remove_ln`). `hook_scale` still fires,
  with ones, so code that divides by the cached scale stays exact.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from jaxtyping import Float
from transformer_lens.hook_points import HookPoint

MODES = ("live", "frozen", "removed")
KINDS = ("LN", "LNPre", "RMS", "RMSPre")

StdRecorder = Callable[[str, torch.Tensor], None]


class RemovableLayerNorm(nn.Module):
    """LayerNorm or RMSNorm with independently switchable scale sites (one per path).

    `kind` is one of ``KINDS``; `centered` (LayerNorm kinds) says whether the mean is subtracted,
    `has_params` whether there is a weight `w`, `has_bias` whether there is a learned bias `b`.
    RMS kinds with a weight have no bias: `b` is then a zero buffer (not in the state dict), so
    code written for LayerNorm's ``x * w + b`` stays correct.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10, act_fn="gelu")
        >>> ln = RemovableLayerNorm(cfg, paths=("main",), kind="RMS")
        >>> ln.set_mode("main", "frozen", sigma=2.0)
        >>> torch.allclose(ln(torch.ones(1, 2, 8)), torch.full((1, 2, 8), 0.5))
        True
    """

    def __init__(
        self,
        cfg,
        paths: tuple[str, ...] = ("main",),
        w: Optional[nn.Parameter] = None,
        b: Optional[nn.Parameter] = None,
        has_params: Optional[bool] = None,
        kind: Optional[str] = None,
    ):
        super().__init__()
        if kind is None:  # backwards compatible: has_params alone picks LN / LNPre
            kind = "LNPre" if has_params is False else "LN"
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.cfg = cfg
        self.eps = cfg.eps
        self.kind = kind
        self.paths = tuple(paths)
        self.centered = kind in ("LN", "LNPre")
        self.has_params = kind in ("LN", "RMS")
        self.has_bias = kind == "LN"
        if self.has_params:
            self.w = w if w is not None else nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        if self.has_bias:
            self.b = b if b is not None else nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        elif self.has_params:
            self.register_buffer("b", torch.zeros_like(self.w.detach()), persistent=False)
        self.modes: dict[str, str] = {p: "live" for p in self.paths}
        # One scalar scale per path; nan while never set. Not persistent: the TransformerLens
        # state dict stays unchanged, and checkpoints store scales explicitly.
        self.register_buffer("sigma", torch.full((len(self.paths),), float("nan")), persistent=False)
        # Per path, the leading per-position scales of a positional frozen scale (empty: one scalar for
        # every position); buffers, so that .to(device) moves them.
        for i in range(len(self.paths)):
            self.register_buffer(f"sigma_lead_{i}", torch.empty(0), persistent=False)
        # The model sets this ([batch, pos] position of each token, from the attention mask) for the
        # duration of a forward pass (DLA sets it for flat inputs); None: the position is the index along dim 1.
        # Shaped like the leading dims of the input, trailing dims broadcast.
        self.positions: Optional[torch.Tensor] = None
        # per path, the token at position 0 that a positional scale was calibrated with (None: not recorded)
        self.first_token: dict[str, Optional[int]] = {p: None for p in self.paths}
        self.hook_scale = HookPoint()  # [batch, pos, 1] (or [batch, pos, head, 1] for split inputs)
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]
        if len(self.paths) > 1:
            self.hook_scale_v = HookPoint()
            self.hook_normalized_v = HookPoint()
        self.recorder: Optional[StdRecorder] = None
        # per path, how far a frozen scale has been phased in: 1 = fully frozen (the default); a < 1 uses the
        # geometric blend live ** (1 - a) * sigma ** a (the removal trainer's freeze_ramp)
        self.blend: dict[str, float] = {p: 1.0 for p in self.paths}

    # ---- state -------------------------------------------------------------------------
    def _index(self, path: str) -> int:
        if path not in self.paths:
            raise ValueError(f"path {path!r} is not one of this LayerNorm's paths {self.paths}")
        return self.paths.index(path)

    def get_sigma(self, path: str) -> Union[None, float, tuple[float, ...]]:
        """The stored scale: None (never set), a float, or a positional tuple (sigma_0, ..., sigma_rest)."""
        i = self._index(path)
        value = float(self.sigma[i])
        if value != value:
            return None
        lead = getattr(self, f"sigma_lead_{i}")
        return tuple(float(v) for v in lead) + (value,) if lead.numel() else value

    def is_positional(self, path: str) -> bool:
        return getattr(self, f"sigma_lead_{self._index(path)}").numel() > 0

    def store_sigma(self, path: str, sigma: Union[None, float, Sequence[float]]) -> None:
        """Store a scale: None (unset), a float, or a sequence (sigma_0, ..., sigma_rest) of length >= 2."""
        i = self._index(path)
        lead: list[float] = []
        if sigma is None:
            rest = float("nan")
        elif isinstance(sigma, (int, float)):
            rest = float(sigma)
        else:
            values = [float(v) for v in sigma]
            if len(values) < 2:
                raise ValueError(f"a positional scale needs >= 2 values (sigma_0, ..., sigma_rest), got {values}")
            lead, rest = values[:-1], values[-1]
        self.sigma[i] = rest
        setattr(self, f"sigma_lead_{i}", torch.tensor(lead, dtype=self.sigma.dtype, device=self.sigma.device))

    def set_mode(self, path: str, mode: str, sigma: Union[None, float, Sequence[float]] = None) -> None:
        """Set one path's mode; `sigma` is required for "frozen" unless already stored."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._index(path)
        if sigma is not None:
            self.store_sigma(path, sigma)
        if mode == "frozen" and self.get_sigma(path) is None:
            raise ValueError(f"freezing path {path!r} needs a scale: pass sigma=")
        self.modes[path] = mode

    def _frozen_scale(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The frozen scale, broadcastable to x[..., :1]: a scalar, or per position for a positional scale."""
        i = self._index(path)
        rest = self.sigma[i].to(x.dtype)
        lead = getattr(self, f"sigma_lead_{i}").to(x.dtype)
        if lead.numel() == 0:
            return rest.expand(x.shape[:-1] + (1,))
        table = torch.cat([lead, rest[None]])  # position p -> table[min(p, k)]
        pos = self.positions
        if pos is None:
            if x.ndim < 3:
                raise ValueError("a positional frozen scale needs each token's position: set .positions "
                                 "(the model does so in forward) before applying it to a flat [n, d_model] input")
            pos = torch.arange(x.shape[1], device=x.device)[None]
        scale = table[pos.to(x.device).clamp(max=lead.numel())]  # e.g. [batch, pos]
        # trailing singleton dims (split q/k/v inputs: [batch, pos, head, 1]), then the d_model dim
        scale = scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))
        return scale.expand(x.shape[:-1] + (1,))

    def set_blend(self, path: str, a: float) -> None:
        """Phase a frozen path's scale in: ``live ** (1 - a) * sigma ** a`` per token (a = 1: plain frozen).

        Example:
            >>> from transformer_lens import HookedTransformerConfig
            >>> cfg = HookedTransformerConfig(n_layers=1, d_model=2, n_ctx=4, d_head=2, d_vocab=10, act_fn="gelu", eps=0.0)
            >>> ln = RemovableLayerNorm(cfg, kind="RMSPre"); ln.set_mode("main", "frozen", sigma=4.0)
            >>> ln.set_blend("main", 0.5); ln(torch.ones(1, 1, 2))   # scale sqrt(1 * 4) = 2
            tensor([[[0.5000, 0.5000]]])
        """
        self._index(path)
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise ValueError(f"blend must be a number in [0, 1], got {a!r}")
        self.blend[path] = float(a)

    # ---- forward -----------------------------------------------------------------------
    def forward(
        self, x: Float[torch.Tensor, "batch pos d_model"], path: Optional[str] = None
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        path = self.paths[0] if path is None else path
        is_first = path == self.paths[0]
        hook_scale = self.hook_scale if is_first else self.hook_scale_v
        hook_normalized = self.hook_normalized if is_first else self.hook_normalized_v
        mode = self.modes[path]
        if mode == "removed":
            if self.recorder is not None:
                self._record(path, x)
            hook_scale(torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device))
            return hook_normalized(x)

        # Same operations, in the same order, as transformer_lens.components.LayerNorm /
        # LayerNormPre / RMSNorm / RMSNormPre.
        if self.cfg.dtype not in [torch.float32, torch.float64]:
            x = x.to(torch.float32)
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        a = 0.0 if mode == "live" else self.blend[path]  # a < 1: a freeze being phased in
        if a < 1.0:
            live = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if mode == "live":
            scale = live
            if self.recorder is not None:
                self.recorder(path, scale.detach()[..., 0])
        else:
            if self.recorder is not None:
                self._record(path, x, centered=True)
            sigma = self._frozen_scale(path, x)
            # phasing in: the per-token geometric blend of the live scale and sigma
            scale = live ** (1.0 - a) * sigma ** a if a < 1.0 else sigma
        scale = hook_scale(scale)
        x = hook_normalized(x / scale).to(self.cfg.dtype)
        if self.has_bias:
            return x * self.w + self.b
        if self.has_params:
            return x * self.w
        return x

    def _record(self, path: str, x: torch.Tensor, centered: bool = False) -> None:
        """Record what the live scale would be: the std (LayerNorm) or the RMS (RMSNorm) + eps."""
        x = x.detach().float()
        if self.centered and not centered:
            x = x - x.mean(-1, keepdim=True)
        self.recorder(path, (x.pow(2).mean(-1) + self.eps).sqrt())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, " + ", ".join(f"{p}={m}" for p, m in self.modes.items())
