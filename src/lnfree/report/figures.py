"""Figures and the HTML layout of the LN vs LN-free report (see `lnfree.report.pipeline`).

Every figure is plain SVG plotly (no WebGL), so it renders in any browser, headless included.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lnfree.report.html import Report

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
MAX_POINTS = 1500  # per model and scatter, so the HTML stays small


def _color(rd, m: str) -> str:
    return COLORS[rd.models.index(m) % len(COLORS)]


def _err(ests: list[dict]) -> dict:
    v = np.array([e["value"] for e in ests], dtype=float)
    return dict(type="data", symmetric=False, array=np.array([e["high"] for e in ests], dtype=float) - v,
                arrayminus=v - np.array([e["low"] for e in ests], dtype=float))


def _add_identity_line(fig: go.Figure, x: np.ndarray, y: np.ndarray, col: int) -> None:
    """Dashed y = x over the range of both axes' data, in subplot (1, col)."""
    lo, hi = (float(min(x.min(), y.min())), float(max(x.max(), y.max()))) if x.size else (0.0, 1.0)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="gray", dash="dash"),
                             showlegend=False), row=1, col=col)


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, height=height, template="plotly_white", margin=dict(t=70, l=60, r=20, b=50))
    return fig


# ---- per stage -----------------------------------------------------------------------------
def ce_figures(rd) -> list[go.Figure]:
    n = rd.numbers["ce"]
    fig = go.Figure()
    for m in rd.models:
        ests = [n[d][m]["ce"] for d in rd.datasets]
        fig.add_trace(go.Bar(x=list(rd.datasets), y=[e["value"] for e in ests], name=m, marker_color=_color(rd, m),
                             error_y=_err(ests)))
    fig.update_layout(barmode="group", yaxis_title="cross-entropy (nats/token)", xaxis_title="held-out set")
    return [_layout(fig, "Held-out cross-entropy (95% bootstrap CI over sequences)")]


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
        scatter.add_trace(go.Scatter(x=x, y=y, mode="markers", name=m, marker=dict(size=3, opacity=0.5,
                                     color=_color(rd, m)), showlegend=False), row=1, col=c)
        _add_identity_line(scatter, x, y, col=c)
        scatter.update_xaxes(title_text="direct effect", row=1, col=c)
    scatter.update_yaxes(title_text="DLA", row=1, col=1)
    figs.append(_layout(scatter, "DLA against the exact direct effect (one point per head x token; y = x dashed)"))
    return figs


def atp_figures(rd) -> list[go.Figure]:
    n, res = rd.numbers["atp"], rd.results["atp"]
    fig = go.Figure()
    for m in rd.models:
        err = n[m]["per_layer_error"]
        fig.add_trace(go.Bar(x=list(range(len(err))), y=err, name=m, marker_color=_color(rd, m)))
    fig.update_layout(barmode="group", xaxis_title="layer", yaxis_title="sum over heads |AtP - activation patching|")
    figs = [_layout(fig, f"AtP error per layer (IOI, metric: {n['metric']}, {n['n_prompts']} prompts)")]

    scatter = make_subplots(rows=1, cols=len(rd.models), subplot_titles=[
        f"{m}: r = {n[m]['pearson']['value']:.3f}" for m in rd.models])
    for c, m in enumerate(rd.models, start=1):
        truth = res[m].act.scores.flatten().double().numpy()
        est = res[m].atp.scores.flatten().double().numpy()
        scatter.add_trace(go.Scatter(x=truth, y=est, mode="markers", text=list(res[m].labels), showlegend=False,
                                     marker=dict(size=6, color=_color(rd, m))), row=1, col=c)
        _add_identity_line(scatter, truth, est, col=c)
        scatter.update_xaxes(title_text="activation patching", row=1, col=c)
    scatter.update_yaxes(title_text="AtP estimate", row=1, col=1)
    figs.append(_layout(scatter, "AtP estimate against activation patching, one point per head"))
    return figs


def confidence_figures(rd) -> list[go.Figure]:
    n, res = rd.numbers["confidence"], rd.results["confidence"]
    ablated = ", ".join(f"L{n['layer']}N{i}" for i in n["neurons"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"entropy change when ablating {ablated} together (%)",
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
    return [_layout(fig, "Entropy neurons: total vs direct effect of their mean ablation; calibration")]


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
        fig.update_xaxes(title_text="head", row=1, col=c)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    return [_layout(fig, f"Mean attention to position 0 per head (sink: >= {n['threshold']:.0%})")]


FIGURES = {"ce": ce_figures, "dla": dla_figures, "atp": atp_figures, "confidence": confidence_figures,
           "first_token_norm": first_token_figures, "sink_rate": sink_figures}


# ---- tables --------------------------------------------------------------------------------
def _ci(e: dict, digits: int = 4) -> str:
    if e is None or e.get("value") is None:
        return "n/a"
    f = f"{{:.{digits}g}}"
    lo, hi = e.get("low"), e.get("high")
    if lo is None or hi is None:
        return f.format(e["value"])
    return f"{f.format(e['value'])} [{f.format(lo)}, {f.format(hi)}]"


def ce_table(rd) -> pd.DataFrame:
    rows = []
    for d in rd.datasets:
        for m in rd.models:
            x = rd.numbers["ce"][d][m]
            rows.append({"data": d, "model": m, "CE (nats/token)": _ci(x["ce"]),
                         "bits/byte": _ci(x["bits_per_byte"]) if x["bits_per_byte"] else "n/a",
                         f"gap to {rd.baseline}": _ci(x["gap_to_baseline"], 3), "tokens": x["n_tokens"]})
    return pd.DataFrame(rows)


def dla_table(rd) -> pd.DataFrame:
    n = rd.numbers["dla"]
    rows = []
    for m in rd.models:
        row = {"model": m, "ln_final": n[m]["ln_final_mode"], "NMAE % (all heads)": _ci(n[m]["nmae"], 3),
               "max |DLA - DE|": f"{n[m]['max_abs_error']:.3g}"}
        for r in n[m]["per_layer"]:
            row[f"layer {r['group']}"] = f"{r['nmae']:.3g}"
        rows.append(row)
    return pd.DataFrame(rows)


def atp_table(rd) -> pd.DataFrame:
    n = rd.numbers["atp"]
    rows = []
    for m in rd.models:
        x = n[m]
        imp = x["improvement_vs_baseline"]
        rows.append({"model": m, "total error": f"{x['total_error']:.4g}", "Pearson r": _ci(x["pearson"], 3),
                     "Spearman": _ci(x["spearman"], 3), "clean metric": f"{x['metric_clean']:.3g}",
                     "corrupt metric": f"{x['metric_corrupt']:.3g}",
                     f"improvement vs {rd.baseline} (mean over layers)": f"{imp['mean']:.3g}" if imp else "n/a"})
    return pd.DataFrame(rows)


def confidence_table(rd) -> pd.DataFrame:
    n = rd.numbers["confidence"]
    rows = []
    for m in rd.models:
        a, c = n[m]["ablation"], n[m]["calibration"]
        rows.append({"model": m, "entropy change total %": _ci(a["relative_entropy_change_total_%"], 3),
                     "direct %": _ci(a["relative_entropy_change_direct_%"], 3),
                     "LN-mediated fraction": _ci(a["ln_mediated_fraction_entropy"], 3),
                     "mean entropy (nats)": _ci(c["mean_entropy"]), "ECE": _ci(c["ece"], 3),
                     "top-1 acc": _ci(c["accuracy_top1"], 3), "ablated": str(n[m]["ablated_neurons"]),
                     "own top neurons": str(n[m]["own_top_neurons"])})
    return pd.DataFrame(rows)


def geometry_table(rd, stage: str) -> pd.DataFrame:
    n = rd.numbers[stage]
    if stage == "sink_rate":
        return pd.DataFrame([{"model": m, "sink rate": f"{n[m]['rate']:.1%}",
                              "sink heads": f"{n[m]['n_sinks']}/{n[m]['n_heads']}",
                              "top heads": ", ".join(n[m]["top_heads"])} for m in rd.models])
    rows = []
    for m in rd.models:
        row = {"model": m}
        for site, e in zip(n[m]["sites"], n[m]["ratio"]):
            row[site] = f"{e['value']:.3g}"
        rows.append(row)
    return pd.DataFrame(rows)


TABLES = {"ce": ce_table, "dla": dla_table, "atp": atp_table, "confidence": confidence_table,
          "first_token_norm": lambda rd: geometry_table(rd, "first_token_norm"),
          "sink_rate": lambda rd: geometry_table(rd, "sink_rate")}

TEXT = {
    "ce": "Mean next-token cross-entropy on held-out text; the gap column is the paired difference to the "
          "baseline on the same sequences (negative: better than the baseline).",
    "dla": "Direct logit attribution (DLA) linearises the final LayerNorm at the model's own scale; the direct "
           "effect (DE) recomputes it after removing the head's output. With LayerNorm removed, DLA is exact "
           "(NMAE 0). Next-token targets at every position; CIs resample sequences.",
    "atp": "Attribution patching (AtP) estimates each head's activation-patching effect from one backward pass; "
           "the error is sum |AtP - activation patching| over a layer's heads (output z, all positions at once). "
           "Improvement = baseline's per-layer error minus this model's (positive: AtP is more accurate here).",
    "confidence": "Entropy (confidence) neurons of the baseline's last MLP layer (large ||w_out||, low LogitVar) "
                  "are mean-ablated together in every model. Total effect: the ordinary forward pass; direct: the "
                  "final LayerNorm scale frozen at its clean value. Without LayerNorm both coincide. Calibration: "
                  "mean next-token entropy and expected calibration error (15 equal-width bins).",
    "first_token_norm": "L2 norm of the residual stream at position 0 divided by the mean norm at the other "
                        "positions, before each layer and after the last (95% CI over sequences).",
    "sink_rate": "Mean attention from query positions >= 1 to position 0, per head; a head is a sink when that "
                 "mean is at least the threshold.",
}


def build_html(rd) -> Report:
    """The whole report as a `Report` (summary, per-stage text, tables and figures, settings)."""
    from lnfree.report.pipeline import STAGE_TITLES

    r = Report(rd.title)
    described = ", ".join(f"{m} ({rd.info[m]['ln']})" for m in rd.models)
    r.text(f"Models: {described}; baseline {rd.baseline}. "
           f"Data: {', '.join(rd.datasets)} (the first feeds DLA, confidence and geometry). "
           "Every number is also in the JSON file next to this page.")
    r.section("Summary")
    r.table(rd.summary())
    for stage in rd.stages:
        r.section(STAGE_TITLES[stage], TEXT[stage])
        if stage not in rd.numbers:
            r.text(rd.notes.get(stage, "skipped"), note=True)
            continue
        if stage in rd.notes:
            r.text(rd.notes[stage], note=True)
        r.table(TABLES[stage](rd))
        for fig in FIGURES[stage](rd):
            r.figure(fig)
    r.section("Settings")
    sizes = rd.sizes
    r.table(pd.DataFrame([{"setting": k, "value": str(v)} for k, v in vars(sizes).items()]))
    r.table(pd.DataFrame([{"model": m, **{k: str(v) for k, v in rd.info[m].items()}} for m in rd.models]))
    r.text("Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rd.timings.items()), note=True)
    return r
