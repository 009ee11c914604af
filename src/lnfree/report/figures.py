"""The report's figures: one function per stage, each taking a finished `ReportData` (duck-typed).

Every figure is plain SVG plotly (no WebGL), so it renders in any browser, headless included, and
every axis has a title. Nothing here imports the rest of `lnfree.report`: the stage registry
(`lnfree.report.stages`) imports this module, never the other way round.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
MAX_POINTS = 1500  # per model and scatter, so the HTML stays small


def _color(rd, m: str) -> str:
    return COLORS[rd.models.index(m) % len(COLORS)]


def _err(ests: list[dict]) -> dict:
    v = np.array([e["value"] for e in ests], dtype=float)
    return dict(type="data", symmetric=False, array=np.array([e["high"] for e in ests], dtype=float) - v,
                arrayminus=v - np.array([e["low"] for e in ests], dtype=float))


def _estimate_panel(fig: go.Figure, points: go.Scatter, x: np.ndarray, y: np.ndarray, col: int, x_title: str,
                    y_title: str) -> None:
    """Subplot (1, col) of an estimate against its exact value: the points, a dashed y = x over both axes'
    data, and the axis titles."""
    fig.add_trace(points, row=1, col=col)
    lo, hi = (float(min(x.min(), y.min())), float(max(x.max(), y.max()))) if x.size else (0.0, 1.0)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="gray", dash="dash"),
                             showlegend=False), row=1, col=col)
    fig.update_xaxes(title_text=x_title, row=1, col=col)
    fig.update_yaxes(title_text=y_title, row=1, col=col)


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, height=height, template="plotly_white", margin=dict(t=70, l=60, r=20, b=50))
    return fig


# ---- per stage -----------------------------------------------------------------------------
def _tight_range(ests: list[dict]) -> list[float]:
    """A y range around every CI (not from 0: the differences between models are what matter)."""
    lo = min(e["low"] if e.get("low") is not None else e["value"] for e in ests)
    hi = max(e["high"] if e.get("high") is not None else e["value"] for e in ests)
    pad = max(0.15 * (hi - lo), 1e-3 * max(abs(hi), 1.0))
    return [lo - pad, hi + pad]


def ce_figures(rd) -> list[go.Figure]:
    n = rd.numbers["ce"]
    others = [m for m in rd.models if m != rd.baseline]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "cross-entropy per model", f"paired gap to {rd.baseline} (same sequences)"))
    all_ests = []
    for m in rd.models:
        ests = [n[d][m]["ce"] for d in rd.datasets]
        all_ests += ests
        fig.add_trace(go.Scatter(x=list(rd.datasets), y=[e["value"] for e in ests], name=m, mode="markers",
                                 marker=dict(color=_color(rd, m), size=10), error_y=_err(ests), legendgroup=m),
                      row=1, col=1)
    for m in others:
        ests = [n[d][m]["gap_to_baseline"] for d in rd.datasets]
        fig.add_trace(go.Scatter(x=list(rd.datasets), y=[e["value"] for e in ests], name=m, mode="markers",
                                 marker=dict(color=_color(rd, m), size=10, symbol="diamond"), error_y=_err(ests),
                                 legendgroup=m, showlegend=False), row=1, col=2)
    fig.add_hline(y=0, line=dict(color="gray", dash="dash"), row=1, col=2)
    fig.update_layout(scattermode="group")
    fig.update_yaxes(title_text="cross-entropy (nats/token)", range=_tight_range(all_ests), row=1, col=1)
    fig.update_yaxes(title_text=f"CE minus {rd.baseline}'s (nats/token)", zeroline=True, row=1, col=2)
    fig.update_xaxes(title_text="held-out set")
    return [_layout(fig, "Held-out cross-entropy (95% bootstrap CI over sequences; axis not from 0)")]


def dla_figures(rd) -> list[go.Figure]:
    n, res = rd.numbers["dla"], rd.results["dla"]
    fig = go.Figure()
    for m in rd.models:
        rows = [r for r in n[m]["per_layer"] if r["group"] not in ("embed", "pos_embed", "bias")]
        fig.add_trace(go.Scatter(
            x=[str(r["group"]) for r in rows], y=[r["nmae"] for r in rows], mode="lines+markers", name=m,
            line=dict(color=_color(rd, m)),
            error_y=_err([{"value": r["nmae"], "low": r["low"], "high": r["high"]} for r in rows])))
    fig.update_layout(xaxis_title="layer", yaxis_title="NMAE (%)")
    figs = [_layout(fig, "DLA error per layer: NMAE = mean|DLA - DE| / mean|DE| (attention heads)")]

    cols = len(rd.models)
    scatter = make_subplots(rows=1, cols=cols, subplot_titles=[
        f"{m}: NMAE {n[m]['nmae']['value']:.3g}%" for m in rd.models])
    rng = np.random.default_rng(0)
    for c, m in enumerate(rd.models, start=1):
        x = res[m].direct_effect.flatten().double().numpy()
        y = res[m].dla.flatten().double().numpy()
        if x.size > MAX_POINTS:
            keep = rng.choice(x.size, MAX_POINTS, replace=False)
            x, y = x[keep], y[keep]
        points = go.Scatter(x=x, y=y, mode="markers", name=m, marker=dict(size=3, opacity=0.5, color=_color(rd, m)),
                            showlegend=False)
        _estimate_panel(scatter, points, x, y, c, "direct effect", "DLA")
    figs.append(_layout(scatter, "DLA against the exact direct effect (one point per head x token; y = x dashed)"))
    return figs


def atp_figures(rd) -> list[go.Figure]:
    n, res = rd.numbers["atp"], rd.results["atp"]
    fig = go.Figure()
    for m in rd.models:
        err = n[m]["per_layer_error"]
        fig.add_trace(go.Bar(x=list(range(len(err))), y=err, name=m, marker_color=_color(rd, m)))
    fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="sum over heads |AtP - activation patching|")
    fig.update_xaxes(dtick=1)
    figs = [_layout(fig, f"AtP error per layer (IOI, metric: {n['metric']}, {n['n_prompts']} prompts)")]

    scatter = make_subplots(rows=1, cols=len(rd.models), subplot_titles=[
        f"{m}: r = {n[m]['pearson']['value']:.3f}" for m in rd.models])
    for c, m in enumerate(rd.models, start=1):
        truth = res[m].act.scores.flatten().double().numpy()
        est = res[m].atp.scores.flatten().double().numpy()
        points = go.Scatter(x=truth, y=est, mode="markers", text=list(res[m].labels), showlegend=False,
                            marker=dict(size=6, color=_color(rd, m)))
        _estimate_panel(scatter, points, truth, est, c, "activation patching", "AtP estimate")
    figs.append(_layout(scatter, "AtP estimate against activation patching, one point per head"))
    return figs


def confidence_figures(rd) -> list[go.Figure]:
    n, res = rd.numbers["confidence"], rd.results["confidence"]
    # neuron labels carry their layer ("L3N652"); bare indices (older report JSON) get it from n["layer"]
    ablated = ", ".join(str(i) if str(i).startswith("L") else f"L{n['layer']}N{i}" for i in n["neurons"])
    # short panel titles: a long one is centred over its panel and runs off the figure's left edge
    fig = make_subplots(rows=1, cols=2, subplot_titles=("entropy change, ablated together (%)",
                                                        "reliability diagram"))
    for m in rd.models:
        a = n[m]["ablation"]
        ests = [a["relative_entropy_change_total_%"], a["relative_entropy_change_direct_%"]]
        fig.add_trace(go.Bar(x=["total", "direct (final LN scale frozen)"], y=[e["value"] for e in ests], name=m,
                             marker_color=_color(rd, m), error_y=_err(ests), legendgroup=m), row=1, col=1)
        cal = res[m]["calibration"]
        centers = ((cal.edges[:-1] + cal.edges[1:]) / 2).numpy()
        keep = cal.count.numpy() > 0
        fig.add_trace(go.Scatter(x=centers[keep], y=cal.accuracy.numpy()[keep], mode="lines+markers",
                                 name=f"{m} (ECE {cal.ece.value:.3f})", line=dict(color=_color(rd, m)),
                                 legendgroup=m), row=1, col=2)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="gray", dash="dash"), name="perfect"),
                  row=1, col=2)
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="top-1 confidence", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="accuracy", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="entropy change (%)", row=1, col=1)
    fig.update_xaxes(title_text="effect", row=1, col=1)
    return [_layout(fig, f"Entropy neurons {ablated}: total vs direct effect of their mean ablation; calibration")]


def first_token_figures(rd) -> list[go.Figure]:
    n = rd.numbers["first_token_norm"]
    fig = go.Figure()
    for m in rd.models:
        fig.add_trace(go.Scatter(x=n[m]["sites"], y=[e["value"] for e in n[m]["ratio"]], mode="lines+markers",
                                 name=m, line=dict(color=_color(rd, m)), error_y=_err(n[m]["ratio"])))
    fig.update_yaxes(type="log", title_text="norm at position 0 / mean norm elsewhere")
    fig.update_xaxes(title_text="residual stream site")
    return [_layout(fig, "First-token residual norm relative to the other positions")]


def sink_figures(rd) -> list[go.Figure]:
    n = rd.numbers["sink_rate"]
    fig = make_subplots(rows=1, cols=len(rd.models), subplot_titles=[
        f"{m}: {n[m]['rate']:.0%} sinks" for m in rd.models], horizontal_spacing=0.06)
    for c, m in enumerate(rd.models, start=1):
        z = np.asarray(n[m]["attention_to_first"], dtype=float)
        fig.add_trace(go.Heatmap(z=z, zmin=0, zmax=1, colorscale="Blues", showscale=c == len(rd.models),
                                 colorbar=dict(title="attn to pos 0")), row=1, col=c)
    # integer ticks: layers and heads are indices, never 0.5
    fig.update_xaxes(title_text="head", dtick=1, tick0=0)
    fig.update_yaxes(title_text="layer", dtick=1, tick0=0, autorange="reversed")
    return [_layout(fig, f"Mean attention to position 0 per head (sink: >= {n['threshold']:.0%})")]


# ---- table cells -----------------------------------------------------------------------------
def ci_text(e: dict, digits: int = 4) -> str:
    """``value [low, high]`` of an `Estimate.to_dict()`; "n/a" when there is no value."""
    if e is None or e.get("value") is None:
        return "n/a"
    f = f"{{:.{digits}g}}"
    lo, hi = e.get("low"), e.get("high")
    if lo is None or hi is None:
        return f.format(e["value"])
    return f"{f.format(e['value'])} [{f.format(lo)}, {f.format(hi)}]"
