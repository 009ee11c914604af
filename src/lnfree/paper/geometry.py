"""Attention-sink rate (sink_rate.py + utils.calculate_sink_rate) and first-token residual norms
(mech_interp/residual_stream/residual_norms.py), as the paper computes them."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lnfree._checks import batches, check_choice, check_tokens, model_id, model_label, positive_int
from lnfree._results import Result, result
from lnfree.model import as_lnfree
from lnfree.paper._process import paper_processed
from lnfree.paper.stats import percentile_range
from lnfree.stats import Estimate, bootstrap

#: utils.py:65, strict ``>``.
SINK_THRESHOLD = 0.3


@torch.no_grad()
def sink_rate_per_sample(model, tokens: Int[torch.Tensor, "sample pos"], *, layers: Optional[Sequence[int]] = None,
                         threshold: float = SINK_THRESHOLD, batch_size: int = 8) -> Float[torch.Tensor, "sample"]:
    """Per sample: number of (layer in `layers`, head, query) with attention to key 0 > threshold,
    divided by T * n_layers * n_heads (utils.py:79-101).

    Query 0 counts (it always attends fully to key 0). The divisor is the *config's* layer count
    even when `layers` selects fewer (utils.py:83, 101): the paper's "layer 3" rate
    (sink_rate.py:159) is therefore its fraction / 12. Reproduced as is.
    """
    model = as_lnfree(model)
    tokens = check_tokens(model, tokens)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(L)) if layers is None else [int(l) % L for l in layers]
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    out = []
    for sl in batches(tokens.shape[0], batch_size, enabled=False):
        count = torch.zeros(sl.stop - sl.start, dtype=torch.float64)

        def record(act, hook):  # [batch, head, query, key]
            count.add_((act[..., 0] > threshold).sum(dim=(1, 2)).double().cpu())

        model.run_with_hooks(tokens[sl].to(model.cfg.device), return_type=None,
                             fwd_hooks=[(n, record) for n in names])
        out.append(count / tokens.shape[1] / (L * H))
    return torch.cat(out)


def sink_rate(model, tokens: Int[torch.Tensor, "sample pos"], *, layers: Optional[Sequence[int]] = None,
              threshold: float = SINK_THRESHOLD, batch_size: int = 8, ci: str = "paper", n_boot: int = 1000,
              level: float = 0.95, seed: int = 0) -> Estimate:
    """The paper's sink rate: the fraction of (sample, layer, head, query position) whose attention
    to key position 0 exceeds 0.3 (strict), query 0 included, all layers, unprocessed model.

    ``ci="paper"`` (default) reproduces sink_rate.py:186-211: rates per batch of `batch_size` (8)
    samples (the last batch may be partial); the value is the mean of the batch rates and
    (low, high) the 2.5 / 97.5 percentiles of the batch rates (a spread, not a CI of the mean).
    ``ci="bootstrap"``: mean over samples with a bootstrap CI over samples (lnfree's convention).
    `layers` reproduces the paper's divisor quirk (see `sink_rate_per_sample`).

    Example:
        >>> import lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> est = sink_rate(model, lnfree.zoo.heldout("persuasion")[:16, :64])
        >>> 0 < est.value < 1, est.n                          # two batches of 8
        (True, 2)
    """
    check_choice(ci, ("paper", "bootstrap"), "ci")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    batch_size = positive_int(batch_size, "batch_size")
    per = sink_rate_per_sample(model, tokens, layers=layers, threshold=threshold, batch_size=batch_size)
    if ci == "bootstrap":
        return bootstrap(per, n_boot=n_boot, level=level, seed=seed)
    per_batch = [float(per[i:i + batch_size].mean()) for i in range(0, len(per), batch_size)]
    return percentile_range(per_batch, level=level)


# ---- first-token norms -------------------------------------------------------------------------
def norm_sites(model) -> list[str]:
    """The paper's sites (residual_norms.py:75-95): embed, pos_embed, each resid_mid and resid_post, ln_final."""
    names = ["hook_embed", "hook_pos_embed"]
    for i in range(model.cfg.n_layers):
        names += [f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_resid_post"]
    return names + ["ln_final.hook_normalized"]


@result
class PaperNorms(Result):
    """Mean (and std) L2 norm per site at position 0 ("first") and at positions 1.. pooled ("rest").

    first_mean, first_std, rest_mean, rest_std: [site]; std is torch's unbiased std of the
    per-token norms (residual_norms.py:362-364). first: [sample, site] the norms at position 0;
    rest: [token, site] the norms at positions 1.., sample by sample (each sample's pos - 1 tokens
    in a row: `rest_sequence`, the bootstrap's resampling unit).
    """

    labels: tuple[str, ...]
    first: Float[torch.Tensor, "sample site"]
    rest: Float[torch.Tensor, "token site"]
    n_boot: int
    level: float
    seed: int
    model_name: str = ""
    model_id: str = ""
    _headline = ("final_first", "final_rest")

    @property
    def first_mean(self):
        return self.first.mean(0)

    @property
    def first_std(self):
        return self.first.std(0)

    @property
    def rest_mean(self):
        return self.rest.mean(0)

    @property
    def rest_std(self):
        return self.rest.std(0)

    def final_first(self) -> Estimate:
        """Mean first-token norm at the last site (ln_final), bootstrap CI over samples."""
        return bootstrap(self.first[:, -1], n_boot=self.n_boot, level=self.level, seed=self.seed)

    @property
    def rest_sequence(self) -> torch.Tensor:
        """[token] the sample each row of `rest` comes from."""
        n = self.first.shape[0]
        return torch.arange(n).repeat_interleave(self.rest.shape[0] // n)

    def final_rest(self) -> Estimate:
        """Mean norm of the other tokens at the last site, bootstrap CI over samples (a sample's
        tokens are resampled together: they are correlated)."""
        return bootstrap(self.rest[:, -1], clusters=self.rest_sequence, n_boot=self.n_boot, level=self.level,
                         seed=self.seed)

    def table(self) -> pd.DataFrame:
        """One row per site: first, first_std, rest, rest_std (the paper's plotted means and spreads)."""
        return pd.DataFrame({"site": list(self.labels), "first": self.first_mean.numpy(), "first_std": self.first_std.numpy(),
                             "rest": self.rest_mean.numpy(), "rest_std": self.rest_std.numpy()})

    def to_frame(self) -> pd.DataFrame:
        """Long format: site, position ("first"/"rest"), mean, std."""
        rows = []
        for i, lab in enumerate(self.labels):
            rows.append({"site": lab, "position": "first", "mean": float(self.first_mean[i]), "std": float(self.first_std[i])})
            rows.append({"site": lab, "position": "rest", "mean": float(self.rest_mean[i]), "std": float(self.rest_std[i])})
        return pd.DataFrame(rows)

    def plot(self):
        """Mean +- std L2 norm per site, first token vs the rest (the paper's l2_norms figure)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, m, s in (("first token", self.first_mean, self.first_std), ("other tokens", self.rest_mean, self.rest_std)):
            fig.add_trace(go.Scatter(x=list(self.labels), y=m.numpy(), name=name, mode="lines+markers",
                                     error_y=dict(type="data", array=s.numpy())))
        fig.update_layout(title=f"{self.model_name}: residual L2 norm", xaxis_title="site", yaxis_title="L2 norm",
                          yaxis_type="log")
        return fig


@torch.no_grad()
def first_token_norm(model, tokens: Int[torch.Tensor, "sample pos"], *, batch_size: int = 1, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> PaperNorms:
    """L2 norms of the residual stream at the paper's sites, first token vs the rest.

    On the paper-processed copy (centred writing weights etc., `paper_processed`); sites
    hook_embed, hook_pos_embed, every resid_mid and resid_post, ln_final.hook_normalized (for an
    LN-free model: a copy of the last resid_post, residual_norms.py:272-276). Needs >= 2 positions.

    Example:
        >>> import lnfree
        >>> res = first_token_norm(lnfree.load("tiny-ln", device="cpu"), lnfree.zoo.heldout("persuasion")[:2, :32])
        >>> res.labels[0], res.labels[-1], len(res.to_frame())
        ('hook_embed', 'ln_final.hook_normalized', 22)
    """
    proc = paper_processed(model)
    tokens = check_tokens(proc, tokens, min_pos=2)
    sites = norm_sites(proc)
    ln_free = proc.is_ln_free
    last = f"blocks.{proc.cfg.n_layers - 1}.hook_resid_post"
    hooked = sites[:-1] if ln_free else sites
    first, rest = [], []
    for sl in batches(tokens.shape[0], batch_size, enabled=False):
        found = {}

        def record(act, hook):
            found[hook.name] = act.detach().float().norm(dim=-1).cpu()  # [batch, pos]

        proc.run_with_hooks(tokens[sl].to(proc.cfg.device), return_type=None, fwd_hooks=[(n, record) for n in hooked])
        if ln_free:
            found[sites[-1]] = found[last]
        norms = torch.stack([found[n] for n in sites], -1)  # [batch, pos, site]
        first.append(norms[:, 0])
        rest.append(norms[:, 1:].reshape(-1, len(sites)))
    return PaperNorms(labels=tuple(sites), first=torch.cat(first), rest=torch.cat(rest), n_boot=n_boot, level=level,
                      seed=seed, model_name=model_label(model), model_id=model_id(model))
