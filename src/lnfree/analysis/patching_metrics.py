"""How good an attribution-patching estimate is: errors, correlations, and the AtP* paper's ranking view.

Two views of the same pair (estimate, activation patching):
- *values* (signed estimates, e.g. AtP): |estimate - truth| per component, the paper's
  per-layer error sum over a layer's components, Pearson / Spearman over components;
- *ranking* (Kramár et al. 2024 judge AtP* this way): the scores are used to decide which
  components to verify with activation patching, largest |score| first. Per prompt pair, the
  true top-k components are those with the largest |activation-patching effect|; ``recall_at``
  is the fraction of them among the first `budget` verified, ``cost`` the number of
  verifications needed to find all k (k at best), and ``cost_curve`` the recall at every
  budget (their cost-of-verification curve). A GradDrop estimate is a magnitude by
  construction; AtP and AtP + QK fix are ranked by |estimate|.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import numpy as np
import torch
from jaxtyping import Float, Int

from lnfree._checks import check_same_model, check_same_vocab, compare_names, positive_int
from lnfree._results import Result, result
from lnfree.analysis.act_patching import activation_patching
from lnfree.analysis.atp import attribution_patching
from lnfree.analysis.patching_core import (
    METHOD_NAMES,
    Metric,
    PatchingResult,
)
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args


def _pearson(x: np.ndarray) -> float:
    a, b = x[:, 0] - x[:, 0].mean(), x[:, 1] - x[:, 1].mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _ranks(v: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.Series(v).rank(method="average").to_numpy()


def _spearman(x: np.ndarray) -> float:
    return _pearson(np.stack([_ranks(x[:, 0]), _ranks(x[:, 1])], 1))


def _check_pair(atp, act) -> None:
    for name, r in (("atp", atp), ("act", act)):
        if not isinstance(r, PatchingResult):
            raise TypeError(f"{name} must be a PatchingResult, got {type(r).__name__}")
    if act.method != "activation":
        raise ValueError(f"act must be an activation_patching result, got method {act.method!r}")
    if atp.method == "activation":
        raise ValueError("atp must be an attribution_patching result, got an activation patching result")
    check_same_model(atp, act, "atp and act")
    for field in ("site", "by_pos", "direction"):
        if getattr(atp, field) != getattr(act, field):
            raise ValueError(f"atp and act differ in {field}: {getattr(atp, field)!r} vs {getattr(act, field)!r}")
    if atp.scores.shape != act.scores.shape:
        raise ValueError(f"atp and act scores differ in shape: {tuple(atp.scores.shape)} vs {tuple(act.scores.shape)}")
    if atp.prompts_id != act.prompts_id:
        raise ValueError("atp and act were computed on different prompts (clean/corrupt tokens or masks differ); "
                         "compute both on the same prompt pairs")
    for which in ("clean_metric", "corrupt_metric"):
        a, b = getattr(atp, which), getattr(act, which)
        if not torch.allclose(a, b, atol=1e-4, rtol=1e-3):
            raise ValueError(f"atp and act were computed with different metrics (their unpatched per-prompt metric "
                             f"values differ: {a[:3].tolist()} vs {b[:3].tolist()}); use the same metric for both")


class _PerPrompt:
    """Per-prompt estimates and truths [prompt, component] (NaN: padded or not patched), and the
    statistics recomputed from any multiset of prompts (a bootstrap resample)."""

    def __init__(self, est_pp: torch.Tensor, truth_pp: torch.Tensor):
        B = est_pp.shape[0]
        self.est = est_pp.reshape(B, -1).double().numpy()
        self.truth = truth_pp.reshape(B, -1).double().numpy()
        self.err = np.abs(self.est - self.truth)

    @staticmethod
    def _mean(x: np.ndarray) -> np.ndarray:
        """Mean over prompts skipping NaN; NaN where every drawn prompt is NaN."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(x, 0)

    def _pairs(self, rows) -> np.ndarray:
        e, t = self._mean(self.est[rows]), self._mean(self.truth[rows])
        ok = np.isfinite(e) & np.isfinite(t)
        return np.stack([e[ok], t[ok]], 1)

    def pearson(self, rows) -> float:
        return _pearson(self._pairs(rows))

    def spearman(self, rows) -> float:
        return _spearman(self._pairs(rows))

    def mean_abs(self, rows) -> float:
        """Mean over components of each component's mean over prompts of |estimate - truth|."""
        m = self._mean(self.err[rows])
        return float(m[np.isfinite(m)].mean())


def _prompt_bootstrap(n_prompts: int, statistic, **kw) -> Estimate:
    """Bootstrap over prompts of a statistic of the drawn prompts' indices (NaN entries stay inside it)."""
    with warnings.catch_warnings():  # constant scores (e.g. 1 component per layer): nan correlations
        warnings.simplefilter("ignore", RuntimeWarning)
        return bootstrap(np.arange(n_prompts), lambda r: statistic(r.astype(np.int64)), **kw)


def per_prompt_layer_error(est_pp: torch.Tensor, truth_pp: torch.Tensor) -> Float[torch.Tensor, "prompt layer"]:
    """Each prompt's sum over a layer's components of |estimate - truth| (the paper's per-prompt error,
    final_patching_analysis_new_version.py:491-497); NaN where the layer has no real entry for the prompt."""
    err = (est_pp - truth_pp).abs()
    flat = err.reshape(err.shape[0], err.shape[1], -1)
    return torch.where(torch.isnan(flat).all(-1), torch.nan, torch.nansum(flat, -1))


def _ranking(est_pp: np.ndarray, truth_pp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: recall of the true top-k at every budget [prompt, n], and the cost to find all k."""
    n_prompts, n = est_pp.shape
    curves, costs = np.zeros((n_prompts, n)), np.zeros(n_prompts)
    for b in range(n_prompts):
        real = ~(np.isnan(est_pp[b]) | np.isnan(truth_pp[b]))
        e, t = est_pp[b][real], truth_pp[b][real]
        kk = min(k, len(t))
        order = np.argsort(-e, kind="stable")  # verification order: largest |estimate| first
        top = np.zeros(len(t), dtype=bool)
        top[np.argsort(-t, kind="stable")[:kk]] = True
        found = np.cumsum(top[order]) / kk
        curves[b, : len(found)] = found
        curves[b, len(found):] = 1.0
        costs[b] = int(np.argmax(found >= 1.0 - 1e-12)) + 1
    return curves, costs


@result
class PatchingError(Result):
    """How far an attribution-patching estimate is from activation patching of the same sweep.

    Attributes:
        estimate, truth: what was compared, shaped like the scores: means over prompts (``vs_magnitude``:
            of per-prompt |estimate| and |activation patching|).
        per_prompt_error: [prompt, layer] each prompt's sum over the layer's components of
            |estimate - truth|; per_layer: its mean over prompts (the paper's per-layer error; per-prompt
            errors do not cancel); per_layer_of_means: sum over the layer of |mean estimate - mean truth|
            (errors of opposite sign on different prompts cancel in it); total: the sum of per_layer.
        abs_error: per component, the mean over prompts of |estimate - truth|; mean_abs: its mean over
            components. pearson, spearman: correlation over components of the mean estimate and the
            mean truth. Every CI resamples prompts and recomputes the statistic from the drawn
            prompts' values.
        recall: fraction of each prompt's true top-k components (by |activation patching|) among
            the k with the largest |estimate|, mean over prompts with a CI; cost: verifications
            needed to find all k (k at best); cost_curve: Float[budget] mean recall after verifying
            1, 2, ... components; recall_per_prompt: Float[prompt, budget].
        atp, act: the two results; model_name / model_id: the model both came from.
    """

    estimate: torch.Tensor
    truth: torch.Tensor
    abs_error: torch.Tensor
    per_layer: Float[torch.Tensor, "layer"]
    per_layer_of_means: Float[torch.Tensor, "layer"]
    per_prompt_error: Float[torch.Tensor, "prompt layer"]
    total: float
    mean_abs: Estimate
    pearson: Estimate
    spearman: Estimate
    recall: Estimate
    cost: Estimate
    cost_curve: torch.Tensor
    recall_per_prompt: torch.Tensor
    k: int
    labels: tuple[str, ...]
    atp: PatchingResult
    act: PatchingResult
    site: str
    method: str
    model_name: str
    model_id: str
    vs_magnitude: bool = False
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    def recall_at(self, budget: int) -> Estimate:
        """Fraction of the true top-k found within `budget` verified components (CI over prompts)."""
        budget = positive_int(budget, "budget")
        col = self.recall_per_prompt[:, min(budget, self.recall_per_prompt.shape[1]) - 1].double().numpy()
        return bootstrap(col, n_boot=self.n_boot, level=self.level, seed=self.seed)

    def to_frame(self):
        """Long format: one row per component with estimate, truth and |error|."""
        df = self.act._index_frame()
        df["estimate"] = self.estimate.flatten().double().numpy()
        df["truth"] = self.truth.flatten().double().numpy()
        df["abs_error"] = self.abs_error.flatten().double().numpy()
        df["site"], df["method"], df["model"] = self.site, self.method, self.model_name
        return df

    def per_layer_frame(self):
        """One row per layer: the paper's error (mean over prompts of sum |estimate - truth|) and the
        error of the prompt means."""
        import pandas as pd

        return pd.DataFrame({"layer": np.arange(len(self.per_layer)), "error": self.per_layer.double().numpy(),
                             "error_of_means": self.per_layer_of_means.double().numpy(),
                             "method": self.method, "site": self.site, "model": self.model_name})

    def cost_frame(self):
        """The cost-of-verification curve: budget, mean recall of the true top-k."""
        import pandas as pd

        return pd.DataFrame({"budget": np.arange(1, len(self.cost_curve) + 1),
                             "recall": self.cost_curve.double().numpy(), "k": self.k, "method": self.method})

    def top(self, k: int = 10):
        """The k components with the largest |estimate - truth|."""
        k = positive_int(k, "k")
        df = self.to_frame().dropna(subset=["abs_error"])
        return df.sort_values("abs_error", ascending=False).head(k).reset_index(drop=True)

    def plot(self, title: Optional[str] = None):
        """Estimate vs truth scatter, per-layer error bars, and the cost-of-verification curve."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        name = METHOD_NAMES.get(self.method, self.method)
        truth, est = self.truth.flatten().numpy(), self.estimate.flatten().numpy()
        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            f"{name} vs activation patching (r = {self.pearson.value:.3f})", "per-layer error",
            f"true top-{self.k} found (per prompt, mean)"))
        fig.add_trace(go.Scatter(x=truth, y=est, mode="markers", text=list(self.labels), name=name), row=1, col=1)
        ok = np.isfinite(truth) & np.isfinite(est)
        if ok.any():
            lo, hi = float(min(truth[ok].min(), est[ok].min())), float(max(truth[ok].max(), est[ok].max()))
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash"), name="y = x"),
                          row=1, col=1)
        fig.add_trace(go.Bar(x=list(range(len(self.per_layer))), y=self.per_layer.numpy(), name="error"), row=1, col=2)
        budgets = list(range(1, len(self.cost_curve) + 1))
        fig.add_trace(go.Scatter(x=budgets, y=self.cost_curve.numpy(), mode="lines", name=f"{name} ranking"),
                      row=1, col=3)
        fig.add_trace(go.Scatter(x=budgets, y=np.minimum(np.array(budgets) / self.k, 1.0), mode="lines",
                                 line=dict(dash="dot"), name="oracle"), row=1, col=3)
        mag = "|activation patching|" if self.vs_magnitude else "activation patching"
        fig.update_xaxes(title_text=mag, row=1, col=1)
        fig.update_yaxes(title_text=f"{name} {'magnitude' if self.vs_magnitude else 'estimate'}", row=1, col=1)
        fig.update_xaxes(title_text="layer", row=1, col=2)
        fig.update_yaxes(title_text="sum |estimate - truth|", row=1, col=2)
        fig.update_xaxes(title_text="components verified (largest |estimate| first)", row=1, col=3)
        fig.update_yaxes(title_text=f"fraction of true top-{self.k}", row=1, col=3)
        fig.update_layout(title=title or f"{name} on {self.site}, {self.model_name}")
        return fig


def patching_error(atp: PatchingResult, act: PatchingResult, *, magnitude: Optional[bool] = None, k: int = 10,
                   n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> PatchingError:
    """Error and ranking quality of an AtP / AtP* result against activation patching of the same sweep.

    Both must come from the same model, prompts, metric, site, positions and direction.
    `magnitude`: compare magnitudes (per prompt |estimate| vs |activation patching|, averaged
    over prompts) instead of signed means; default: True for GradDrop (a magnitude estimate),
    False otherwise. The ranking view (``recall``, ``cost``, ``cost_curve``; true top-`k` per
    prompt) always uses magnitudes, as the AtP* paper does.

    Example:
        >>> err = patching_error(atp, act)        # doctest: +SKIP
        >>> err.per_layer, err.pearson, err.recall  # doctest: +SKIP
    """
    _check_pair(atp, act)
    k = positive_int(k, "k")
    check_bootstrap_args(n_boot, level, seed)
    magnitude = (not atp.signed) if magnitude is None else magnitude
    if not isinstance(magnitude, bool):
        raise TypeError(f"magnitude must be None or a bool, got {type(magnitude).__name__}")
    if not magnitude and not atp.signed:
        raise ValueError(f"{atp.method} scores are magnitudes (GradDrop); compare them with magnitude=True")
    est_pp, truth_pp = atp.per_prompt.abs(), act.per_prompt.abs()
    if magnitude:
        from lnfree.analysis.patching_core import masked_mean

        est, truth = masked_mean(est_pp), masked_mean(truth_pp)
        pp = _PerPrompt(est_pp, truth_pp)
        per_prompt = per_prompt_layer_error(est_pp, truth_pp)
    else:
        est, truth = atp.scores, act.scores
        pp = _PerPrompt(atp.per_prompt, act.per_prompt)
        per_prompt = per_prompt_layer_error(atp.per_prompt, act.per_prompt)
    B = est_pp.shape[0]
    of_means = per_prompt_layer_error(est[None], truth[None])[0]  # NaN: layer not patched
    per_layer = torch.from_numpy(_PerPrompt._mean(per_prompt.double().numpy())).to(per_prompt.dtype)
    abs_error = torch.from_numpy(_PerPrompt._mean(pp.err)).to(est.dtype).reshape(est.shape)
    kw = dict(n_boot=n_boot, level=level, seed=seed)
    curves, costs = _ranking(est_pp.reshape(B, -1).double().numpy(), truth_pp.reshape(B, -1).double().numpy(), k)
    kk = min(k, curves.shape[1])
    return PatchingError(
        estimate=est, truth=truth, abs_error=abs_error, per_layer=per_layer, per_layer_of_means=of_means,
        per_prompt_error=per_prompt, total=float(torch.nansum(per_layer)),
        mean_abs=_prompt_bootstrap(B, pp.mean_abs, **kw), pearson=_prompt_bootstrap(B, pp.pearson, **kw),
        spearman=_prompt_bootstrap(B, pp.spearman, **kw),
        recall=bootstrap(curves[:, kk - 1], **kw), cost=bootstrap(costs, **kw),
        cost_curve=torch.from_numpy(curves.mean(0)), recall_per_prompt=torch.from_numpy(curves), k=k,
        labels=atp.labels, atp=atp, act=act, site=atp.site, method=atp.method, model_name=atp.model_name,
        model_id=atp.model_id, vs_magnitude=magnitude, n_boot=n_boot, level=level, seed=seed,
    )


@result
class PatchingComparison(Result):
    """AtP accuracy on two models (e.g. LN vs LN-free): both errors and their per-layer difference.

    Attributes:
        names: the two models' labels (from the models, or ``names=``).
        a, b: each model's `PatchingError` (which holds its ``atp`` and ``act`` results).
        improvement: Float[n_layers] per-layer error of model a minus model b (positive: b's
            attribution patching is more accurate there); improvement_ci: its mean over layers with a
            bootstrap CI over prompts (both models saw the same prompts: each prompt's mean over
            layers of its own error difference is resampled, so layers are never treated as samples);
            improvement_mean / improvement_sd: over layers (sd with ddof=1, a spread, not a CI).
    """

    names: tuple[str, str]
    a: PatchingError
    b: PatchingError
    improvement: Float[torch.Tensor, "layer"]
    improvement_ci: Estimate
    improvement_mean: float
    improvement_sd: float
    labels: tuple[str, ...]
    site: str
    method: str
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    @property
    def errors(self) -> tuple[PatchingError, PatchingError]:
        return (self.a, self.b)

    @property
    def act(self) -> tuple[PatchingResult, PatchingResult]:
        return (self.a.act, self.b.act)

    @property
    def atp(self) -> tuple[PatchingResult, PatchingResult]:
        return (self.a.atp, self.b.atp)

    def difference(self):
        """Per layer: each model's error and a minus b."""
        import pandas as pd

        a, b = self.names
        return pd.DataFrame({"layer": np.arange(len(self.improvement)),
                             f"error {a}": self.a.per_layer.double().numpy(),
                             f"error {b}": self.b.per_layer.double().numpy(),
                             "improvement": self.improvement.double().numpy()})

    table = difference  # the older name

    def to_frame(self):
        """Long format: layer, model, error."""
        import pandas as pd

        return pd.concat([e.per_layer_frame().assign(model=n) for n, e in zip(self.names, self.errors)],
                         ignore_index=True)

    def summary(self) -> dict:
        """Mean/sd of the per-layer improvement and each model's correlation and recall."""
        out = {"improvement_mean": self.improvement_mean, "improvement_sd": self.improvement_sd,
               "improvement_ci": self.improvement_ci.to_dict()}
        for n, e in zip(self.names, self.errors):
            out[f"pearson {n}"] = e.pearson.value
            out[f"recall {n}"] = e.recall.value
            out[f"total_error {n}"] = e.total
        return out

    def plot(self, title: Optional[str] = None):
        """Per-layer error bars for both models and the improvement (a minus b)."""
        import plotly.graph_objects as go

        layers = list(range(len(self.improvement)))
        fig = go.Figure()
        for n, e in zip(self.names, self.errors):
            fig.add_trace(go.Bar(x=layers, y=e.per_layer.numpy(), name=f"error {n}"))
        fig.add_trace(go.Scatter(x=layers, y=self.improvement.numpy(), mode="lines+markers",
                                 name=f"improvement ({self.names[0]} - {self.names[1]})"))
        fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="sum |estimate - activation patching|",
                          title=title or (f"{METHOD_NAMES.get(self.method, self.method)} error per layer on "
                                          f"{self.site}; improvement {self.improvement_ci}"))
        return fig


def improvement_over_prompts(a: PatchingError, b: PatchingError, *, n_boot: int = 1000, level: float = 0.95,
                             seed: int = 0) -> Estimate:
    """Mean over layers of a's per-layer error minus b's, with a bootstrap CI over prompts.

    Each prompt's mean over (patched) layers of its own error difference is resampled; its mean
    over prompts is the mean over layers of `a.per_layer - b.per_layer` (no padding-dependent NaNs).

    Example:
        >>> improvement_over_prompts(err_ln, err_free)      # doctest: +SKIP
    """
    if a.per_prompt_error.shape != b.per_prompt_error.shape:
        raise ValueError(f"a and b must come from the same prompts and layers: per-prompt errors "
                         f"{tuple(a.per_prompt_error.shape)} vs {tuple(b.per_prompt_error.shape)}")
    diff = (a.per_prompt_error - b.per_prompt_error).double().numpy()
    patched = ~np.isnan(diff).all(0)
    d = diff[:, patched]
    if np.isnan(d).any():  # a layer real on some prompts only: the per-layer means weight prompts unevenly
        raise ValueError("per-prompt errors are NaN for some prompts of a patched layer; compare on unpadded "
                         "components (by_pos=False) or prompts of one length")
    return bootstrap(d.mean(1), n_boot=n_boot, level=level, seed=seed)


def compare_patching(
    model_a,
    model_b,
    clean: Int[torch.Tensor, "batch pos"],
    corrupt: Int[torch.Tensor, "batch pos"],
    metric: Union[Metric, tuple[Metric, Metric]],
    *,
    names: Optional[tuple[str, str]] = None,
    site: str = "z",
    by_pos: bool = False,
    method: str = "atp",
    ln: str = "live",
    direction: str = "denoise",
    attention_mask=None,
    batch_size: Optional[int] = None,
    k: int = 10,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> PatchingComparison:
    """Attribution vs activation patching on two models, and the per-layer error improvement.

    `metric` is one callable for both models or a pair (metric_a, metric_b), e.g. each model's
    own normalised logit difference. The improvement is model a's per-layer error minus model
    b's (the paper: vanilla minus LN-free, mean -0.026, sd 0.082 on IOI). Names come from the
    models (name and norm state) unless `names` is given.

    Example:
        >>> cmp = compare_patching(vanilla, ln_free, batch.clean, batch.corrupt,        # doctest: +SKIP
        ...                        (make_metric(batch, "normalized_logit_diff", vanilla),
        ...                         make_metric(batch, "normalized_logit_diff", ln_free)))
        >>> cmp.improvement_ci, cmp.difference()                                         # doctest: +SKIP
    """
    names = compare_names(model_a, model_b, names)
    check_same_vocab(model_a, model_b, ("model_a", "model_b"))
    if model_a.cfg.n_layers != model_b.cfg.n_layers:
        raise ValueError(f"a per-layer comparison needs the same number of layers: {model_a.cfg.n_layers} vs "
                         f"{model_b.cfg.n_layers}")
    if isinstance(metric, (tuple, list)):
        if len(metric) != 2:
            raise ValueError(f"metric must be a callable or a pair of callables, got {len(metric)} items")
        metrics = tuple(metric)
    else:
        metrics = (metric, metric)
    kw = dict(site=site, by_pos=by_pos, direction=direction, attention_mask=attention_mask, n_boot=n_boot,
              level=level, seed=seed)
    errs = []
    for model, m in zip((model_a, model_b), metrics):
        act = activation_patching(model, clean, corrupt, m, batch_size=batch_size, progress=progress, **kw)
        atp = attribution_patching(model, clean, corrupt, m, method=method, ln=ln, **kw)
        errs.append(patching_error(atp, act, k=k, n_boot=n_boot, level=level, seed=seed))
    improvement = errs[0].per_layer - errs[1].per_layer
    imp = improvement.double().numpy()
    return PatchingComparison(
        names=names, a=errs[0], b=errs[1], improvement=improvement,
        improvement_ci=improvement_over_prompts(errs[0], errs[1], n_boot=n_boot, level=level, seed=seed),
        improvement_mean=float(imp.mean()),
        improvement_sd=float(imp.std(ddof=1)) if len(imp) > 1 else float("nan"),
        labels=tuple(f"layer {l}" for l in range(len(imp))), site=site, method=errs[0].method,
        n_boot=n_boot, level=level, seed=seed,
    )
