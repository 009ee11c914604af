"""Activation patching, attribution patching (AtP, AtP*), and how to judge the estimates.

The public entry points, implemented in four modules with one job each:

- `lnfree.analysis.patching_core`: sites, input checks (padding), `PatchingResult`;
- `lnfree.analysis.act_patching`: `activation_patching` (the ground truth, batched);
- `lnfree.analysis.atp`: `attribution_patching` (AtP, AtP + QK fix, AtP + GradDrop, AtP*);
- `lnfree.analysis.patching_metrics`: `patching_error` (errors, correlations and the AtP*
  paper's ranking quality), `compare_patching` (two models).

Score shapes (``result.dims``): residual-type sites (resid_pre, resid_mid, resid_post,
attn_out, mlp_out) ``[layer, pos]`` / ``[layer]``; head sites (z, result, q, k, v)
``[layer, head, pos]`` / ``[layer, head]`` (k and v: key/value heads under grouped-query
attention); pattern ``[layer, head, dest_pos]`` / ``[layer, head]``. ``by_pos=False`` patches
all positions of a component at once. ``result.per_prompt`` has a leading prompt dim.

Example:
    >>> import lnfree
    >>> from lnfree.tasks import ioi, make_metric
    >>> model = lnfree.zoo.load("tiny-ln")                                         # doctest: +SKIP
    >>> batch = ioi(model, 8)                                                      # doctest: +SKIP
    >>> metric = make_metric(batch, "logit_diff")                                  # doctest: +SKIP
    >>> act = lnfree.activation_patching(model, batch.clean, batch.corrupt, metric, site="resid_pre")  # doctest: +SKIP
    >>> atp = lnfree.attribution_patching(model, batch.clean, batch.corrupt, metric, site="resid_pre")  # doctest: +SKIP
    >>> lnfree.patching_error(atp, act)                                            # doctest: +SKIP
"""

from lnfree.analysis.act_patching import activation_patching
from lnfree.analysis.atp import LN_OPTIONS, METHODS, attribution_patching
from lnfree.analysis.patching_core import DIRECTIONS, HEAD_SITES, RESID_SITES, SITES, Metric, PatchingResult
from lnfree.analysis.patching_metrics import PatchingComparison, PatchingError, compare_patching, patching_error

__all__ = [
    "activation_patching", "attribution_patching", "patching_error", "compare_patching",
    "PatchingResult", "PatchingError", "PatchingComparison", "Metric",
    "SITES", "RESID_SITES", "HEAD_SITES", "DIRECTIONS", "METHODS", "LN_OPTIONS",
]
