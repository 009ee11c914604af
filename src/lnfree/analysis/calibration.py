"""Properties of the next-token output distribution: entropy, top-1 accuracy and calibration (ECE).

Calibration is a property of the output distribution, not of any component, so it lives here;
`lnfree.analysis.confidence` (entropy neurons) reuses `next_token_stats` for its entropy and CE.

Conventions: position t predicts token t + 1; with an attention mask only predictions whose
position and label are both real tokens count (`lnfree._checks.next_token_mask`). Bins are
equal-width intervals (lo, hi] of the top-1 probability (Guo et al. 2017). The ECE is pooled over
tokens, sum_b |sum correct - sum conf| / N; its CI resamples prompts (tokens of one prompt are not
independent), keeping each prompt's per-bin sums.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from lnfree._checks import (
    batches,
    forward_kwargs,
    model_id,
    model_label,
    next_token_mask,
    positive_int,
    resolve_batch,
)
from lnfree._results import Result, result
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args

__all__ = ["Calibration", "calibration", "next_token_stats"]


def next_token_stats(
    logits: Float[torch.Tensor, "batch pos vocab"],
    tokens: Int[torch.Tensor, "batch pos"],
    valid: Optional[Bool[torch.Tensor, "batch pos_minus_1"]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prediction (positions 0..pos-2): entropy, CE, top-1 probability, top-1 correct.

    From max-shifted logits x (max 0): Z = sum exp(x), H = log Z - sum exp(x) x / Z,
    CE = log Z - x[label], top-1 probability = 1 / Z (no log-probability copies). Non-finite
    values are refused at the `valid` positions only: padded positions are never read.
    """
    logits = logits[:, :-1]
    top, pred = logits.max(-1, keepdim=True)
    x = logits.float() - top.float()
    e = x.exp()
    Z = e.sum(-1)
    logZ = Z.log()
    entropy = logZ - (e * x).sum(-1) / Z
    labels = tokens[:, 1:].to(x.device)
    ce = logZ - x.gather(-1, labels[..., None])[..., 0]
    ok = torch.isfinite(entropy) & torch.isfinite(ce)
    if valid is not None:
        ok = ok | ~valid.to(ok.device)
    if not bool(ok.all()):
        raise ValueError("the model produced non-finite logits at real token positions; entropy / CE are undefined")
    return entropy, ce, 1.0 / Z, pred[..., 0] == labels


@result
class Calibration(Result):
    """Mean entropy, top-1 accuracy and expected calibration error of next-token predictions.

    edges: [n_bins + 1] bin edges; count: [n_bins] predictions per bin; accuracy, confidence:
    [n_bins] mean top-1 correctness / probability per bin (nan for empty bins).
    per_prompt_entropy: [prompt] mean entropy per prompt over its real predictions (nats).
    per_prompt_bins: [prompt, 3, n_bins] per prompt and bin: count, sum of confidence, sum of
        correctness (what the ECE bootstrap resamples).
    mean_entropy (mean of per-prompt means), ece, accuracy_top1 (pooled over predictions):
        `Estimate`s with bootstrap CIs over prompts. labels: the bins, "(lo, hi]".
    """

    model_name: str
    model_id: str
    n_bins: int
    n_boot: int
    level: float
    seed: int
    n_prompts: int
    n_predictions: int
    padded: bool
    edges: Float[torch.Tensor, "n_bins_plus_1"]
    count: Int[torch.Tensor, "n_bins"]
    accuracy: Float[torch.Tensor, "n_bins"]
    confidence: Float[torch.Tensor, "n_bins"]
    per_prompt_entropy: Float[torch.Tensor, "prompt"]
    per_prompt_bins: Float[torch.Tensor, "prompt 3 n_bins"]
    mean_entropy: Estimate
    ece: Estimate
    accuracy_top1: Estimate
    labels: tuple[str, ...]

    def summary(self) -> pd.DataFrame:
        """mean_entropy, ece, accuracy_top1 with CIs: one row each (metric, value, low, high, n, level)."""
        ests = {"mean_entropy": self.mean_entropy, "ece": self.ece, "accuracy_top1": self.accuracy_top1}
        return pd.DataFrame([{"metric": k, **v.to_dict()} for k, v in ests.items()])

    def to_frame(self) -> pd.DataFrame:
        """Long format: bin, lo, hi, quantity, value, low, high, n.

        Per bin the quantities count, accuracy, confidence, gap (accuracy - confidence) and
        ece_contribution (|gap| * count / N), without CIs; then bin "all" with the headline
        mean_entropy, ece, accuracy_top1 and their CIs.
        """
        gap = (self.accuracy - self.confidence).double()
        contrib = torch.nan_to_num(gap.abs() * self.count.double() / max(self.n_predictions, 1))
        rows = []
        for i, label in enumerate(self.labels):
            lo, hi = float(self.edges[i]), float(self.edges[i + 1])
            for q, v in (("count", float(self.count[i])), ("accuracy", float(self.accuracy[i])),
                         ("confidence", float(self.confidence[i])), ("gap", float(gap[i])),
                         ("ece_contribution", float(contrib[i]))):
                rows.append({"bin": label, "lo": lo, "hi": hi, "quantity": q, "value": v,
                             "low": float("nan"), "high": float("nan"), "n": int(self.count[i])})
        for metric, est in (("mean_entropy", self.mean_entropy), ("ece", self.ece),
                            ("accuracy_top1", self.accuracy_top1)):
            rows.append({"bin": "all", "lo": 0.0, "hi": 1.0, "quantity": metric, "value": est.value,
                         "low": est.low, "high": est.high, "n": est.n})
        return pd.DataFrame(rows)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` bins contributing most to the ECE: bin, count, accuracy, confidence, gap, ece_contribution."""
        k = positive_int(k, "k")
        df = self.to_frame()
        wide = df[df.bin != "all"].pivot(index="bin", columns="quantity", values="value")
        wide = wide.reindex(list(self.labels))[["count", "accuracy", "confidence", "gap", "ece_contribution"]]
        wide["count"] = wide["count"].round().astype(int)
        return (wide.sort_values("ece_contribution", ascending=False, kind="stable").head(k)
                .reset_index().rename_axis(columns=None))

    def _trace(self, name: str, color: Optional[str] = None):
        import plotly.graph_objects as go

        centers = ((self.edges[:-1] + self.edges[1:]) / 2).numpy()
        return go.Bar(
            x=centers, y=self.accuracy.numpy(), width=1.0 / self.n_bins, name=name, opacity=0.6,
            marker_color=color, customdata=self.count.numpy(),
            hovertemplate="conf %{x:.2f}: acc %{y:.3f} (n=%{customdata})",
        )

    def plot(self):
        """Reliability diagram: accuracy per confidence bin against the diagonal."""
        import plotly.graph_objects as go

        fig = go.Figure([self._trace(f"ECE {self.ece:.4f}")])
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash")))
        fig.update_layout(
            title=f"Reliability diagram, {self.model_name} (mean entropy {self.mean_entropy:.3f} nats)",
            xaxis_title="top-1 confidence", yaxis_title="top-1 accuracy", xaxis_range=[0, 1], yaxis_range=[0, 1],
        )
        return fig


def _ece(bins: np.ndarray) -> float:
    """ECE from [prompt, 3, n_bins] per-prompt bin sums: sum_b |sum correct - sum conf| / N."""
    totals = bins.sum(axis=0)
    return float(np.abs(totals[2] - totals[1]).sum() / totals[0].sum())


def _accuracy(bins: np.ndarray) -> float:
    return float(bins[:, 2].sum() / bins[:, 0].sum())


@torch.no_grad()
def calibration(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    n_bins: int = 15,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> Calibration:
    """Mean next-token entropy, top-1 accuracy and expected calibration error (equal-width bins).

    Labels are the tokens shifted by one. `tokens` may be a `TokenBatch` (from `lnfree.tokenize`)
    or come with `attention_mask=` (1 = real token): the forward pass uses the mask and padded
    positions are left out of every statistic, so a padded batch gives each row's numbers alone.

    Example:
        >>> cal = calibration(model, tokens)
        >>> cal.ece                                     # doctest: +SKIP
        0.0213 [0.0157, 0.0301]
        >>> cal.plot()                                  # doctest: +SKIP
    """
    from lnfree.model import as_lnfree  # here: importing the model module loads TransformerLens

    model = as_lnfree(model)
    tokens, mask = resolve_batch(model, tokens, attention_mask, min_pos=2)
    n_bins = positive_int(n_bins, "n_bins")
    batch_size = positive_int(batch_size, "batch_size")
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    valid_all = next_token_mask(mask)
    ent, bins = [], []
    for sl in batches(tokens.shape[0], batch_size, enabled=progress, desc="calibration"):
        batch = tokens[sl].to(model.cfg.device)
        sub = None if mask is None else mask[sl].to(batch.device)
        valid = torch.ones(batch.shape[0], batch.shape[1] - 1, dtype=torch.bool, device=batch.device) \
            if valid_all is None else valid_all[sl].to(batch.device)
        logits = model(batch, **forward_kwargs(model, batch, sub))
        h, _, conf, correct = next_token_stats(logits, batch, valid)
        del logits
        w = valid.double()
        idx = ((conf * n_bins).ceil().long() - 1).clamp(0, n_bins - 1)  # bins (lo, hi]
        b = torch.zeros(conf.shape[0], 3, n_bins, dtype=torch.float64, device=conf.device)
        for row, values in enumerate((w, conf.double() * w, correct.double() * w)):
            b[:, row].scatter_add_(1, idx, values)
        ent.append(((h.double() * w).sum(1) / w.sum(1)).cpu())
        bins.append(b.cpu())
    ent, bins = torch.cat(ent), torch.cat(bins)
    totals = bins.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (totals[2] / totals[0]).float()
        confidence = (totals[1] / totals[0]).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins_np = bins.numpy()
    boot = dict(n_boot=n_boot, level=level, seed=seed)
    return Calibration(
        model_name=model_label(model), model_id=model_id(model),
        n_bins=n_bins, n_boot=n_boot, level=level, seed=seed,
        n_prompts=int(tokens.shape[0]), n_predictions=int(totals[0].sum().round()), padded=mask is not None,
        edges=edges.float(), count=totals[0].round().long(), accuracy=accuracy, confidence=confidence,
        per_prompt_entropy=ent.float(), per_prompt_bins=bins.float(),
        mean_entropy=bootstrap(ent, **boot), ece=bootstrap(bins_np, _ece, **boot),
        accuracy_top1=bootstrap(bins_np, _accuracy, **boot),
        labels=tuple(f"({lo:.3f}, {hi:.3f}]" for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist())),
    )
