"""What freezing each norm site alone costs, without fine-tuning: the order in which to freeze them.

For every live site: estimate its average scale on calibration rows (`model.estimate_ln_scales`),
freeze only that site there (`model.ln_frozen`) and measure the held-out cross-entropy change, paired
per sequence against the live model. A site whose frozen forward overflows (non-finite logits) has no
cost (None): `order_by_cost` sorts it last. `SiteCosts.costs()` is what ``lnfree remove-ln
--site-order`` reads (``lnfree site-costs`` writes it).

Scales are opaque here: whatever `estimate_ln_scales` returns for a site is handed back to
`ln_frozen` unchanged (a float, or a per-position list).

Example:
    >>> from lnfree.removal import site_costs
    >>> res = site_costs(model, tokens[:4], calib=tokens[4:], n_boot=100)   # doctest: +SKIP
    >>> res.top(3)                                                          # doctest: +SKIP
    >>> res.order()[:2]      # cheapest first                               # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from lnfree import _checks
from lnfree._results import Result, result
from lnfree.evaluation import CEComparison, CEResult, cross_entropy
from lnfree.removal.schedule import order_by_cost
from lnfree.stats import Estimate

_NO_COST = Estimate(math.nan, math.nan, math.nan, 0)


@result
class SiteCosts(Result):
    """The cross-entropy cost of freezing each norm site alone at its average scale (no fine-tuning).

    Attributes:
        labels: the sites measured, in the model's order.
        cost: one `Estimate` per site: frozen minus live CE (nats/token), paired bootstrap CI over
            sequences; NaN (n=0) where the frozen forward gave non-finite logits.
        finite: ``Bool[Tensor, "site"]``: every logit finite with that site frozen.
        frozen_per_sequence: ``Float[Tensor, "site n_seq"]`` (float64) per-sequence CE with the site frozen.
        live: the live model's `CEResult` on the same tokens.
        scales: site -> the scale it was frozen at (as `estimate_ln_scales` returned it).
        n_calib: calibration rows the scales were estimated on.
        batch_size, n_boot, level, seed: the settings used.
        model_name, model_id: which model produced this.
    """

    labels: tuple[str, ...]
    cost: tuple[Estimate, ...]
    finite: Bool[torch.Tensor, "site"]
    frozen_per_sequence: Float[torch.Tensor, "site n_seq"]
    live: CEResult
    scales: dict
    n_calib: int
    batch_size: int = 16
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    model_name: str = "model"
    model_id: str = ""

    _headline: ClassVar[tuple[str, ...]] = ("max_cost",)

    def max_cost(self) -> Estimate:
        """The largest finite single-site cost (NaN when no site stayed finite)."""
        finite = [e for e in self.cost if math.isfinite(e.value)]
        return max(finite, key=lambda e: e.value) if finite else _NO_COST

    def costs(self) -> dict[str, Optional[float]]:
        """site -> cost (None where the logits went non-finite): the ``--site-order`` file of ``lnfree remove-ln``."""
        return {s: (e.value if math.isfinite(e.value) else None) for s, e in zip(self.labels, self.cost)}

    def order(self) -> list[str]:
        """The sites cheapest first, non-finite last (`lnfree.removal.order_by_cost`)."""
        return order_by_cost(self.costs())

    def to_frame(self) -> pd.DataFrame:
        """One row per site: site, metric ("ce_cost"), value, low, high, n, finite."""
        return pd.DataFrame({"site": list(self.labels), "metric": "ce_cost",
                             "value": [e.value for e in self.cost], "low": [e.low for e in self.cost],
                             "high": [e.high for e in self.cost], "n": [e.n for e in self.cost],
                             "finite": self.finite.tolist()})

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k most costly sites, non-finite ones first."""
        frame = self.to_frame()
        key = frame["value"].where(frame["finite"], math.inf)
        return frame.loc[key.sort_values(ascending=False, kind="stable").index].head(_checks.positive_int(k, "k"))

    def plot(self):
        """The cost of each site (CI bars), in model order; non-finite sites marked on the axis."""
        import plotly.graph_objects as go

        frame = self.to_frame()
        ok = frame[frame["finite"]]
        fig = go.Figure(go.Bar(x=ok["site"], y=ok["value"], name="cost",
                               error_y=dict(type="data", symmetric=False, array=ok["high"] - ok["value"],
                                            arrayminus=ok["value"] - ok["low"])))
        bad = frame[~frame["finite"]]
        if len(bad):
            fig.add_trace(go.Scatter(x=bad["site"], y=[0.0] * len(bad), mode="markers", name="non-finite logits",
                                     marker=dict(symbol="x", size=10, color="red")))
        fig.update_layout(title=f"{self.model_name}: CE cost of freezing each site alone ({self.level:.0%} CIs)",
                          xaxis_title="site", yaxis_title="CE frozen - live (nats/token)")
        return fig

    def __str__(self) -> str:
        bad = int((~self.finite).sum())
        return f"SiteCosts: {len(self.labels)} sites, largest finite cost {self.max_cost()}, {bad} non-finite"


def _sites(model, sites: Optional[Sequence[str]]) -> list[str]:
    live = [s for s in model.ln_sites if model.ln_mode(s) == "live"]
    if sites is None:
        if not live:
            raise ValueError("the model has no live norm site to freeze (every site is frozen or removed)")
        return live
    if isinstance(sites, str) or not all(isinstance(s, str) for s in sites) or not sites:
        raise TypeError(f"sites must be a non-empty list of site names, got {sites!r}")
    unknown = [s for s in sites if s not in model.ln_sites]
    if unknown:
        raise ValueError(f"unknown sites {unknown}; the model's sites are {model.ln_sites}")
    not_live = [s for s in sites if s not in live]
    if not_live:
        raise ValueError(f"sites {not_live} are not live (modes {[model.ln_mode(s) for s in not_live]}): "
                         "freezing them measures nothing; unfreeze them or leave them out")
    return list(dict.fromkeys(sites))


def _frozen_ce(model, tokens, kwargs) -> Optional[CEResult]:
    """`cross_entropy` of the model as it is, or None when its logits overflow (no CE to report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the forward's overflow warning: reported as None
        try:
            return cross_entropy(model, tokens, **kwargs)
        except ValueError as e:
            if "non-finite" in str(e):  # bootstrap refuses NaN / inf per-sequence CEs
                return None
            raise


@torch.no_grad()
def site_costs(
    model,
    tokens: Union[Int[torch.Tensor, "batch pos"], _checks.TokenBatch],
    *,
    calib: Optional[Int[torch.Tensor, "calib pos"]] = None,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    sites: Optional[Sequence[str]] = None,
    positional: int = 0,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> SiteCosts:
    """The CE cost on `tokens` of freezing each live site alone at its mean scale on `calib`.

    Args:
        model: an `LNFreeTransformer` (or HookedTransformer); left as it was on return.
        tokens: held-out rows [batch, pos] (or a `TokenBatch`; padding through ``attention_mask``).
        calib: unpadded rows [n, pos] the scales are estimated on (`model.estimate_ln_scales`); default
            `tokens` themselves (then `tokens` must not be padded).
        sites: which live sites (default: every live site).
        positional: k > 0 freezes each site at a positional scale (positions 0..k-1 their own;
            `model.estimate_ln_scales(positional=k)`; every calibration row must start with one token).
        batch_size, n_boot, level, seed: as in `lnfree.cross_entropy`.

    Example:
        >>> res = site_costs(model, tokens[:4], calib=tokens[4:], n_boot=100)   # doctest: +SKIP
        >>> json.dump(res.costs(), open("costs.json", "w"))   # for lnfree remove-ln --site-order  # doctest: +SKIP
    """
    from lnfree.model import as_lnfree

    model = as_lnfree(model)
    tokens, mask = _checks.resolve_batch(model, tokens, attention_mask, min_pos=2)
    if calib is None:
        if mask is not None:
            raise ValueError("tokens are padded, so they cannot calibrate the scales (padded positions would "
                             "count); pass calib= (unpadded rows)")
        calib = tokens
    calib = _checks.check_tokens(model, calib, name="calib")
    chosen = _sites(model, sites)
    boot = {"n_boot": n_boot, "level": level, "seed": seed}
    ce = {"attention_mask": mask, "batch_size": batch_size, **boot}
    live = cross_entropy(model, tokens, **ce)
    scales = model.estimate_ln_scales(calib, batch_size=batch_size, store=False, positional=positional)
    costs, per_seq = [], []
    for site in _checks.progress(chosen, enabled=progress, desc="site costs"):
        with model.ln_frozen(site, scales=scales[site]):
            frozen = _frozen_ce(model, tokens, ce)
        costs.append(_NO_COST if frozen is None else
                     CEComparison(names=("frozen", "live"), a=frozen, b=live, **boot).difference())
        per_seq.append(torch.full_like(live.per_sequence, math.nan) if frozen is None else frozen.per_sequence)
    finite = torch.tensor([cost is not _NO_COST for cost in costs])
    return SiteCosts(labels=tuple(chosen), cost=tuple(costs), finite=finite,
                     frozen_per_sequence=torch.stack(per_seq), live=live, scales={s: scales[s] for s in chosen},
                     n_calib=int(calib.shape[0]), batch_size=batch_size, **boot,
                     model_name=_checks.model_label(model), model_id=_checks.model_id(model))
