"""What the reader of a norm site sees, decided in one place for every analysis.

A site's reader (W_U for ``ln_final``, W_in for ``ln2``, W_Q/W_K/W_V for ``ln1``) sees, for an input x:

- kind ``LN``: C x / s * w + b (C subtracts the mean over d_model); ``LNPre``: C x / s;
  ``RMS``: x / s * w; ``RMSPre``: x / s. LayerNorm kinds centre, RMS kinds do not.
- mode ``live``: s is the per-token std / RMS; ``frozen``: s is the site's stored scale; ``removed``:
  the module is the identity and C, w, b and 1/s are folded into the reader's weights (the site still
  *centres*, through its readers: centering is a property of the kind, never of the weights).
- no module (``ln_final`` of a natively norm-free config): the identity, nothing folded.

`norm_site(model, site)` returns those facts as a `NormSite`; `is_rms(model)` says whether every site
is an RMS kind. `NormSite.apply` is where an analysis applies a site's norm to vectors taken out of the
forward pass (DLA's direct effect): the scale it divides by is the one the forward pass uses there
(read from the site's ``hook_scale``), so that lookup lives here and nowhere else.

    >>> from transformer_lens import HookedTransformerConfig
    >>> from lnfree.model import LNFreeTransformer
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10, act_fn="gelu",
    ...                               normalization_type="RMS")
    >>> final = norm_site(LNFreeTransformer(cfg), "ln_final")
    >>> final.kind, final.mode, final.centers, final.weight is not None, final.bias is None
    ('RMS', 'live', False, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float

from lnfree.layernorm import RemovableLayerNorm

CENTERING_KINDS = ("LN", "LNPre")
RMS_KINDS = ("RMS", "RMSPre")


@dataclass(frozen=True, eq=False)
class NormSite:
    """One norm site as its reader sees it (see the module docstring).

    Attributes:
        site: the site name (``"ln_final"``, ``"blocks.0.ln2"``, ``"blocks.0.ln1.v"``, ...).
        kind: ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"``, or None when the model has no norm module there.
        mode: ``"live"``, ``"frozen"`` or ``"removed"`` (``"removed"`` also when there is no module).
        weight: the w the forward pass multiplies by (None: the kind has none, or it is folded: removed).
        bias: the learned b the forward pass adds (None: LN kinds only have one, and not once removed).
    """

    site: str
    kind: Optional[str]
    mode: str
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    _model: Any = None

    @property
    def centers(self) -> bool:
        """The norm subtracts the mean over d_model (LayerNorm kinds; also once removed, in the readers)."""
        return self.kind in CENTERING_KINDS

    @property
    def rms(self) -> bool:
        """The scale is the RMS of the uncentred input (RMSNorm kinds)."""
        return self.kind in RMS_KINDS

    @property
    def applied(self) -> bool:
        """The forward pass applies a scale, w and b here (live or frozen); False: identity (removed, none)."""
        return self.mode != "removed"

    def input_direction(self, u: Float[torch.Tensor, "..."], dim: int = -1) -> Float[torch.Tensor, "..."]:
        """The direction of the norm's input that the output direction `u` reads, at scale 1: C (w * u).

        ``x . result / s == norm(x) . u - b . u`` at a fixed scale s (centering when the kind centres, w
        when the forward pass applies one); `u` itself when the site is not applied. `dim` is d_model's axis.

        Example:
            >>> site = NormSite("ln_final", "LNPre", "frozen", None, None)
            >>> site.input_direction(torch.tensor([1.0, 3.0]))
            tensor([-1.,  1.])
        """
        if not self.applied:
            return u
        a = u.movedim(dim, -1)
        if self.weight is not None:
            a = a * self.weight.detach().to(u.dtype)
        if self.centers:
            a = a - a.mean(-1, keepdim=True)
        return a.movedim(-1, dim)

    def apply(self, x: Float[torch.Tensor, "... d_model"], want_scale: bool = False,
              positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The site's norm on vectors `x` as the forward pass applies it, and (if asked) its scale [..., 1].

        The scale comes from the site's ``hook_scale`` (live: per vector; frozen: the stored scale, per
        position for a positional scale; removed: ones); None when not asked or when there is no module.
        `positions`: each vector's position in its row, shaped like x's trailing non-d_model dims (e.g. [n]
        for x [k, n, d]); needed by a positional frozen scale on flat inputs, default the index along dim 1.

        Example:
            >>> from transformer_lens import HookedTransformerConfig
            >>> from lnfree.model import LNFreeTransformer
            >>> cfg = HookedTransformerConfig(n_layers=1, d_model=2, n_ctx=4, d_head=2, d_vocab=10, act_fn="gelu",
            ...                               normalization_type="LNPre", eps=0.0)
            >>> out, scale = norm_site(LNFreeTransformer(cfg), "ln_final").apply(torch.tensor([[1.0, 3.0]]), True)
            >>> out, scale
            (tensor([[-1.,  1.]]), tensor([[1.]]))
        """
        if self.kind is None:
            return x, None
        module, path = self._model._site(self.site)
        module.positions = None if positions is None else positions.reshape(
            (1,) * (x.ndim - 1 - positions.ndim) + tuple(positions.shape))
        try:
            if not want_scale:
                return module(x, path).to(x.dtype), None
            seen = {}

            def grab(scale, hook):
                seen["scale"] = scale

            with self._model.hooks(fwd_hooks=[(self._model.site_hook(self.site), grab)]):
                out = module(x, path)
            return out.to(x.dtype), seen["scale"].to(x.dtype)
        finally:
            module.positions = None


def norm_site(model, site: str) -> NormSite:
    """What the reader of `site` sees in `model` (an LNFreeTransformer): kind, mode, weight, bias.

    ``"ln_final"`` of a model without a final norm gives kind None, mode ``"removed"``.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> from lnfree.model import LNFreeTransformer
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10, act_fn="gelu",
        ...                               normalization_type=None)
        >>> norm_site(LNFreeTransformer(cfg), "ln_final").kind is None   # natively norm-free: no final norm
        True
    """
    if site == "ln_final" and not hasattr(model, "ln_final"):
        return NormSite(site, None, "removed", None, None, model)
    module, path = model._site(site)
    mode = module.modes[path]
    applied = mode != "removed"
    weight = module.w if applied and module.has_params else None
    bias = module.b if applied and module.has_bias else None
    return NormSite(site, module.kind, mode, weight, bias, model)


def is_rms(model) -> bool:
    """Whether every norm of `model` is an RMSNorm kind (whatever its mode: removal keeps the kind).

    Works on a plain HookedTransformer too (its config's normalization_type).

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> from lnfree.model import LNFreeTransformer
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10, act_fn="gelu",
        ...                               normalization_type="LN", final_rms=True)
        >>> is_rms(LNFreeTransformer(cfg))   # LayerNorm blocks, an RMS final norm: mixed
        False
    """
    kinds = {m.kind for m in model.modules() if isinstance(m, RemovableLayerNorm)}
    if kinds:
        return kinds <= set(RMS_KINDS)
    return str(model.cfg.normalization_type or "").startswith("RMS")
