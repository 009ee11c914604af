"""The paper's weight processing, applied to a copy of the caller's model.

The paper loads every model through TransformerLens's ``HookedTransformer.from_pretrained``
(mech_interp/load_models.py:99-106, 156-166), whose defaults fold the LayerNorm weights into the
reading weights (centering them), center the writing weights and the unembedding and fold the
value biases into b_O. LN-free checkpoints get the same processing on their LN weights divided by
1e6 and then lose every LN module (load_models.py:139-166); lnfree's released-format loader already
divides by sqrt(eps) = 1e6 and folds the centering into the readers, so only the remaining steps
(center_writing_weights, center_unembed, fold_value_biases) are left to do for them.
"""

from __future__ import annotations

import copy

import torch

from lnfree.model import as_lnfree

PAPER_FLAGS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def paper_processed(model, name: str = "model"):
    """A processed deep copy of `model` (LN live on every site, or LN-free); `model` is untouched.

    Frozen or mixed sites have no counterpart in the paper's code and are refused.
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
    flags = dict(PAPER_FLAGS)
    if modes == {"removed"}:
        # Nothing left to fold (the readers are already centered). TransformerLens skips
        # center_writing_weights when normalization_type is None, but the paper centered them
        # while its LN modules still existed: mark the copy as LNPre for the processing only.
        flags["fold_ln"] = False
        out.cfg.normalization_type = "LNPre"
    try:
        out.load_and_process_state_dict(out.state_dict(), refactor_factored_attn_matrices=False, **flags)
    finally:
        if modes == {"removed"}:
            out.cfg.normalization_type = None
    return out.eval()
