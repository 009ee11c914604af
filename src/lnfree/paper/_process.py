"""The paper's weight processing, applied to a copy of the caller's model.

The paper loads every model through TransformerLens's ``HookedTransformer.from_pretrained``
(mech_interp/load_models.py:99-106, 156-166), whose defaults fold the LayerNorm weights into the
reading weights (centering them), center the writing weights and the unembedding and fold the
value biases into b_O. LN-free checkpoints get the same processing on their LN weights divided by
1e6 and then lose every LN module (load_models.py:139-166); lnfree's released-format loader already
divides by sqrt(eps) = 1e6 and folds the centering into the readers, so only the remaining steps
(center_writing_weights, center_unembed, fold_value_biases) are left to do for them.

Beyond GPT-2: centering the writing weights removes the residual stream's mean over d_model, which
only a reader that centres ignores (LayerNorm, or a removed LayerNorm whose centering was folded
into its readers). It is done only where every reader centres; RMSNorm readers (live or removed)
see the mean, so their models keep it. TransformerLens's own ``process_weights`` decides this from
``normalization_type`` alone and runs in float32 whatever the model's dtype; here the same
TransformerLens steps run on the model's own dtype.
"""

from __future__ import annotations

import copy

import torch

from lnfree.layernorm import RemovableLayerNorm
from lnfree.model import as_lnfree

PAPER_FLAGS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def every_reader_centres(model) -> bool:
    """Whether every reader of the residual stream subtracts its mean (LayerNorm kinds, live or removed)."""
    sites = [m for m in model.modules() if isinstance(m, RemovableLayerNorm)]
    return bool(sites) and all(m.centered for m in sites)


def _fold_kind(model) -> str | None:
    """How to fold live norms: "LN" (every site centres), "RMS" (none does), None (mixed: not folded)."""
    kinds = {m.centered for m in model.modules() if isinstance(m, RemovableLayerNorm)}
    return {frozenset({True}): "LN", frozenset({False}): "RMS"}.get(frozenset(kinds))


def _process(sd: dict, cfg, *, fold: str | None, centre: bool) -> dict:
    """TransformerLens's processing steps (ProcessWeights.process_weights' order) in the weights' dtype."""
    from transformer_lens.weight_processing import ProcessWeights as P

    if fold is not None:  # LN: fold w, b and centre the readers; RMS: fold w only
        sd = P.fold_layer_norm(sd, cfg, fold_biases=fold == "LN", center_weights=fold == "LN")
    if centre:
        sd = P.center_writing_weights(sd, cfg)
    sd = P.center_unembed(sd, cfg)
    sd = P.fold_value_biases(sd, cfg)
    if centre:  # the value biases just folded into b_O write to the residual stream too
        for layer in range(cfg.n_layers):
            key = f"blocks.{layer}.attn.b_O"
            sd[key] = sd[key] - sd[key].mean()
    return sd


def paper_processed(model, name: str = "model"):
    """A processed deep copy of `model` (LN live on every site, or LN-free); `model` is untouched.

    Log-probabilities are unchanged (tested to 1e-5 for LN, RMSNorm, LN with a final RMSNorm and
    RMSNorm + GQA + rotary models, live and removed). Frozen or mixed sites have no counterpart in the
    paper's code and are refused.

    Example:
        >>> import lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> float(paper_processed(model).W_E.detach().mean(-1).abs().max()) < 1e-5   # LayerNorm readers: centred
        True
    """
    model = as_lnfree(model, name)
    modes = set(model.ln_modes().values())
    if modes not in ({"live"}, {"removed"}):
        raise ValueError(
            f"{name}: the paper's analyses run on an LN model (every site live) or an LN-free model (every site "
            f"removed); this one has sites {sorted(modes)}. Call {name}.remove_ln() or {name}.unfreeze_ln() first."
        )
    if model.W_E.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: the paper processes float32 weights; got {model.W_E.dtype}. Use {name}.float().")
    out = copy.deepcopy(model)
    # Removed sites have nothing left to fold (their centering is already in the readers).
    fold = _fold_kind(out) if modes == {"live"} else None
    with torch.no_grad():
        sd = _process(dict(out.state_dict()), out.cfg, fold=fold, centre=every_reader_centres(out))
        out.load_state_dict(sd)
    return out.eval()
