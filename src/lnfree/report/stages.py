"""The report's stages, each defined once: a `Stage` (name, title, text, run, table, figures, summary).

`STAGES` is the registry, in report order. A stage's ``run(ctx)`` computes its numbers (JSON-able)
and result objects from a `Context`; ``table(rd)`` and ``figures(rd)`` render them from a finished
`lnfree.report.pipeline.ReportData`; ``summary(rd, model)`` gives the summary table's columns.
A stage that cannot run raises `Skip` with the reason (it becomes a note on the page).

Dependencies point one way: pipeline -> stages -> figures -> html (no module imports back).

Example:
    >>> from lnfree.report.stages import STAGES
    >>> list(STAGES)
    ['ce', 'dla', 'atp', 'confidence', 'first_token_norm', 'sink_rate']
    >>> STAGES["ce"].title
    'Held-out cross-entropy'
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch

from lnfree import _checks
from lnfree.report import figures
from lnfree.report.figures import ci_text
from lnfree.stats import Estimate, bootstrap

SINK_THRESHOLD = 0.3


class Skip(Exception):
    """Raised by a stage's ``run`` when it cannot run on these models / data (the message says why)."""


@dataclass
class Context:
    """What every stage's ``run`` reads: the checked models and data, the settings, and a notes dict."""

    models: dict
    data: dict  # name -> tokens [n, pos]; the first set feeds DLA, confidence and geometry
    baseline: str
    sizes: Any  # lnfree.report.pipeline.Sizes
    token_bytes: Optional[np.ndarray]
    tokenizer: Any
    ioi: Any
    progress: bool
    notes: dict = field(default_factory=dict)

    def primary(self, n: int, length: int) -> torch.Tensor:
        """The first `n` rows, `length` tokens, of the first data set."""
        toks = next(iter(self.data.values()))
        return _rows(toks, n, length)

    def each_model(self, desc: str):
        return _checks.progress(self.models, enabled=self.progress, desc=desc, total=len(self.models))


@dataclass(frozen=True)
class Stage:
    """One section of the report. See the module docstring for what each callable does."""

    name: str
    title: str
    text: str
    run: Callable[[Context], tuple[dict, dict]]
    table: Callable[[Any], pd.DataFrame]
    figures: Callable[[Any], list]
    summary: Callable[[Any, str], dict]


def _rows(tokens: torch.Tensor, n: Optional[int], length: Optional[int]) -> torch.Tensor:
    return tokens[: n or tokens.shape[0], : length or tokens.shape[1]]


def _est(e: Estimate) -> dict:
    return e.to_dict()


# ---- ce --------------------------------------------------------------------------------------
def run_ce(ctx: Context):
    from lnfree.evaluation import cross_entropy

    sizes, base = ctx.sizes, ctx.baseline
    if ctx.token_bytes is None:
        ctx.notes["ce"] = "bits per byte not reported: the tokenizer is not a byte-level BPE (or there is none)"
    numbers, results = {}, {}
    for dname, toks in ctx.data.items():
        toks = _rows(toks, sizes.ce_seqs, sizes.ce_len)
        n_bytes = int(ctx.token_bytes[toks[:, 1:].numpy()].sum()) if ctx.token_bytes is not None else 0
        numbers[dname], results[dname] = {}, {}
        for m in ctx.each_model(f"CE {dname}"):
            res = cross_entropy(ctx.models[m], toks, batch_size=sizes.batch_size, n_boot=sizes.n_boot)
            results[dname][m] = res
            numbers[dname][m] = {
                "ce": _est(res.mean), "n_tokens": res.n_tokens, "n_sequences": int(toks.shape[0]),
                "seq_len": int(toks.shape[1]),
                "bits_per_byte": _est(res.bits_per_byte(n_bytes)) if n_bytes > 0 else None,
            }
        for m in ctx.models:  # paired gap to the baseline: same sequences, so resample them together
            diff = results[dname][m].per_sequence.double() - results[dname][base].per_sequence.double()
            numbers[dname][m]["gap_to_baseline"] = _est(bootstrap(diff, n_boot=sizes.n_boot))
    return numbers, results


def table_ce(rd) -> pd.DataFrame:
    rows = []
    for d in rd.datasets:
        for m in rd.models:
            x = rd.numbers["ce"][d][m]
            rows.append({"data": d, "model": m, "CE (nats/token)": ci_text(x["ce"]),
                         "bits/byte": ci_text(x["bits_per_byte"]) if x["bits_per_byte"] else "n/a",
                         f"gap to {rd.baseline}": ci_text(x["gap_to_baseline"], 3), "tokens": x["n_tokens"]})
    return pd.DataFrame(rows)


def summary_ce(rd, m: str) -> dict:
    return {f"CE {d}": rd.numbers["ce"][d][m]["ce"]["value"] for d in rd.datasets}


# ---- dla -------------------------------------------------------------------------------------
def run_dla(ctx: Context):
    from lnfree.analysis.dla import direct_logit_attribution

    sizes = ctx.sizes
    tokens = ctx.primary(sizes.dla_seqs, sizes.dla_len)
    numbers, results = {}, {}
    for m in ctx.each_model("DLA vs DE"):
        res = direct_logit_attribution(ctx.models[m], tokens, components="heads", batch_size=sizes.batch_size,
                                       n_boot=sizes.n_boot)
        overall, per_head = res.nmae(), res.nmae_by_component()
        layers = res.nmae_frame("layer")
        results[m] = res
        numbers[m] = {
            "nmae": _est(overall), "per_layer": layers.to_dict(orient="records"),
            "per_head": {k: (None if not math.isfinite(v) else float(v)) for k, v in per_head.items()},
            "max_abs_error": float((res.dla - res.direct_effect).abs().max()),
            "ln_final_mode": res.ln_final_mode, "targets": res.targets,
            "n_prompts": int(tokens.shape[0]), "n_positions": int(res.dla.shape[-1]),
        }
    return numbers, results


def table_dla(rd) -> pd.DataFrame:
    n = rd.numbers["dla"]
    rows = []
    for m in rd.models:
        row = {"model": m, "ln_final": n[m]["ln_final_mode"], "NMAE % (all heads)": ci_text(n[m]["nmae"], 3),
               "max |DLA - DE|": f"{n[m]['max_abs_error']:.3g}"}
        for r in n[m]["per_layer"]:
            row[f"layer {r['group']}"] = f"{r['nmae']:.3g}"
        rows.append(row)
    return pd.DataFrame(rows)


# ---- atp -------------------------------------------------------------------------------------
def _ioi_metrics(models, batch):
    """Each model's normalised logit difference (0 = corrupted run, 1 = clean run) when every model
    separates clean from corrupted prompts, else the raw logit difference for all (comparable scale)."""
    from lnfree.tasks import make_metric

    try:
        metrics = {m: make_metric(batch, "normalized_logit_diff", model) for m, model in models.items()}
    except ValueError:
        metrics = None
    if metrics and all(abs(x.clean_ld - x.corrupt_ld) > 1e-3 for x in metrics.values()):
        return "normalized_logit_diff", metrics
    return "logit_diff", {m: make_metric(batch, "logit_diff") for m in models}


def ioi_batch(ctx: Context):
    """The IOI prompts: ``ctx.ioi`` when given, else `lnfree.tasks.ioi` with the baseline's tokenizer."""
    from lnfree.tasks import IOIBatch
    from lnfree.tasks import ioi as make_ioi

    model = next(iter(ctx.models.values()))
    if ctx.ioi is not None:
        if not isinstance(ctx.ioi, IOIBatch):
            raise TypeError(f"ioi must be an lnfree.tasks.IOIBatch, got {type(ctx.ioi).__name__}")
        _checks.check_tokens(model, ctx.ioi.clean, name="ioi.clean")
        return ctx.ioi
    if ctx.tokenizer is None:
        raise Skip("the models have no tokenizer, so IOI prompts cannot be written (pass ioi=)")
    try:
        batch = make_ioi(ctx.tokenizer, ctx.sizes.ioi_prompts, seed=0)
        _checks.check_tokens(model, batch.clean, name="IOI prompts")
    except ValueError as e:
        raise Skip(f"IOI prompts cannot be built with this tokenizer: {e}") from None
    return batch


def run_atp(ctx: Context):
    from lnfree.analysis.patching import activation_patching, attribution_patching, patching_error

    batch = ioi_batch(ctx)
    models, base, sizes = ctx.models, ctx.baseline, ctx.sizes
    kind, metrics = _ioi_metrics(models, batch)
    numbers, results = {"metric": kind, "site": "z", "by_pos": False, "n_prompts": len(batch),
                        "example_prompt": batch.prompts[0], "example_corrupt": batch.corrupt_prompts[0]}, {}
    for m in ctx.each_model("AtP vs activation patching"):
        model, metric = models[m], metrics[m]
        act = activation_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False,
                                  n_boot=sizes.n_boot)
        atp = attribution_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False, method="atp",
                                   n_boot=sizes.n_boot)
        err = patching_error(atp, act, n_boot=sizes.n_boot)
        results[m] = err
        numbers[m] = {
            "per_layer_error": err.per_layer.tolist(), "total_error": err.total, "mean_abs_error": _est(err.mean_abs),
            "pearson": _est(err.pearson), "spearman": _est(err.spearman),
            "metric_clean": act.metric_clean, "metric_corrupt": act.metric_corrupt,
            "clean_logit_diff": getattr(metric, "clean_ld", None), "corrupt_logit_diff": getattr(metric, "corrupt_ld", None),
        }
    base_err = results[base].per_layer.double().numpy()
    for m in models:
        err = results[m].per_layer.double().numpy()
        if err.shape != base_err.shape:  # different depths: no per-layer comparison
            numbers[m]["improvement_vs_baseline"] = None
            continue
        diff = base_err - err  # > 0: this model's AtP is more accurate
        numbers[m]["improvement_vs_baseline"] = {
            "per_layer": diff.tolist(), "mean": float(diff.mean()),
            "sd": float(diff.std(ddof=1)) if len(diff) > 1 else None,
        }
    return numbers, results


def table_atp(rd) -> pd.DataFrame:
    n = rd.numbers["atp"]
    rows = []
    for m in rd.models:
        x = n[m]
        imp = x["improvement_vs_baseline"]
        rows.append({"model": m, "total error": f"{x['total_error']:.4g}", "Pearson r": ci_text(x["pearson"], 3),
                     "Spearman": ci_text(x["spearman"], 3), "clean metric": f"{x['metric_clean']:.3g}",
                     "corrupt metric": f"{x['metric_corrupt']:.3g}",
                     f"improvement vs {rd.baseline} (mean over layers)": f"{imp['mean']:.3g}" if imp else "n/a"})
    return pd.DataFrame(rows)


def summary_atp(rd, m: str) -> dict:
    return {"AtP err": rd.numbers["atp"][m]["total_error"], "AtP r": rd.numbers["atp"][m]["pearson"]["value"]}


# ---- confidence ------------------------------------------------------------------------------
def run_confidence(ctx: Context):
    from lnfree.analysis.calibration import calibration
    from lnfree.analysis.confidence import ablate_neurons, find_entropy_neurons

    if any(m.cfg.attn_only for m in ctx.models.values()):
        raise Skip("attention-only models have no MLP neurons")
    models, base, sizes = ctx.models, ctx.baseline, ctx.sizes
    tokens = ctx.primary(sizes.conf_seqs, sizes.conf_len)
    found = find_entropy_neurons(models[base], layer=-1, n_top=3)
    neurons = found.neurons()  # labels "L{layer}N{neuron}": the layer travels with each neuron
    frame = found.top(len(neurons))
    numbers = {"layer": found.layer, "neurons": neurons, "neurons_from": base,
               "candidates": frame[["label", "norm", "logit_var", "rho", "score"]].to_dict(orient="records")}
    results = {"neurons": found}
    for m in ctx.each_model("entropy neurons, calibration"):
        model = models[m]
        own = find_entropy_neurons(model, layer=-1, n_top=3)
        # the baseline's neurons where they exist (same layer and width, e.g. a fine-tuned twin), else the model's own
        same = own.layer == found.layer and model.cfg.d_mlp == models[base].cfg.d_mlp
        chosen = neurons if same else own.neurons()
        abl = ablate_neurons(model, tokens, chosen, cumulative=True, batch_size=sizes.batch_size, n_boot=sizes.n_boot)
        cal = calibration(model, tokens, batch_size=sizes.batch_size, n_boot=sizes.n_boot)
        results[m] = {"neurons": own, "ablation": abl, "calibration": cal}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            last = len(abl.sets) - 1  # all the neurons together
            numbers[m] = {
                "own_top_neurons": own.neurons(),
                "ablated_neurons": list(chosen), "neurons_from": base if same else m,
                "ablated_set": abl.labels[last],
                "ablation": {
                    "relative_entropy_change_total_%": _est(abl.relative_change(last, "entropy", "total")),
                    "relative_entropy_change_direct_%": _est(abl.relative_change(last, "entropy", "direct")),
                    "entropy_change_total": _est(abl.change(last, "entropy", "total")),
                    "entropy_change_direct": _est(abl.change(last, "entropy", "direct")),
                    "ce_change_total": _est(abl.change(last, "ce", "total")),
                    "ln_mediated_fraction_entropy": _est(abl.ln_mediated_fraction(last, "entropy")),
                    "per_set_relative_entropy_change_total_%": [
                        abl.relative_change(i, "entropy", "total").value for i in range(len(abl.sets))],
                },
                "calibration": {"mean_entropy": _est(cal.mean_entropy), "ece": _est(cal.ece),
                                "accuracy_top1": _est(cal.accuracy_top1), "n_bins": cal.n_bins},
            }
    return numbers, results


def table_confidence(rd) -> pd.DataFrame:
    n = rd.numbers["confidence"]
    rows = []
    for m in rd.models:
        a, c = n[m]["ablation"], n[m]["calibration"]
        rows.append({"model": m, "entropy change total %": ci_text(a["relative_entropy_change_total_%"], 3),
                     "direct %": ci_text(a["relative_entropy_change_direct_%"], 3),
                     "LN-mediated fraction": ci_text(a["ln_mediated_fraction_entropy"], 3),
                     "mean entropy (nats)": ci_text(c["mean_entropy"]), "ECE": ci_text(c["ece"], 3),
                     "top-1 acc": ci_text(c["accuracy_top1"], 3), "ablated": str(n[m]["ablated_neurons"]),
                     "own top neurons": str(n[m]["own_top_neurons"])})
    return pd.DataFrame(rows)


def summary_confidence(rd, m: str) -> dict:
    c = rd.numbers["confidence"][m]
    return {"entropy": c["calibration"]["mean_entropy"]["value"], "ECE": c["calibration"]["ece"]["value"],
            "abl dH %": c["ablation"]["relative_entropy_change_total_%"]["value"]}


# ---- geometry --------------------------------------------------------------------------------
def run_first_token_norm(ctx: Context):
    from lnfree.analysis.geometry import first_token_norm

    sizes = ctx.sizes
    tokens = ctx.primary(sizes.geom_seqs, sizes.geom_len)
    numbers, results = {}, {}
    for m in ctx.each_model("first-token norm"):
        res = first_token_norm(ctx.models[m], tokens, batch_size=sizes.batch_size, n_boot=sizes.n_boot)
        ests = {k: [_est(e) for e in v] for k, v in res.estimates().items()}
        results[m] = res
        numbers[m] = {"sites": res.labels, **ests, "max_ratio": float(res.ratio.max()),
                      "final_ratio": float(res.ratio[-1])}
    return numbers, results


def table_first_token_norm(rd) -> pd.DataFrame:
    n = rd.numbers["first_token_norm"]
    rows = []
    for m in rd.models:
        row = {"model": m}
        for site, e in zip(n[m]["sites"], n[m]["ratio"]):
            row[site] = f"{e['value']:.3g}"
        rows.append(row)
    return pd.DataFrame(rows)


def run_sink_rate(ctx: Context):
    from lnfree.analysis.geometry import attention_sink_rate

    sizes = ctx.sizes
    tokens = ctx.primary(sizes.geom_seqs, sizes.geom_len)
    numbers, results = {"threshold": SINK_THRESHOLD}, {}
    for m in ctx.each_model("attention sinks"):
        res = attention_sink_rate(ctx.models[m], tokens, threshold=SINK_THRESHOLD, batch_size=sizes.batch_size,
                                  n_boot=sizes.n_boot)
        results[m] = res
        numbers[m] = {"rate": float(res.rate), "rate_ci": _est(res.rate), "n_sinks": int(res.is_sink.sum()), "n_heads": int(res.is_sink.numel()),
                      "attention_to_first": res.attention_to_first.tolist(), "top_heads": list(res.top(5)["label"]),
                      "n_prompts": res.n_prompts}
    return numbers, results


def table_sink_rate(rd) -> pd.DataFrame:
    n = rd.numbers["sink_rate"]
    return pd.DataFrame([{"model": m, "sink rate": f"{n[m]['rate']:.1%}",
                          "sink heads": f"{n[m]['n_sinks']}/{n[m]['n_heads']}",
                          "top heads": ", ".join(n[m]["top_heads"])} for m in rd.models])


# ---- the registry ----------------------------------------------------------------------------
_STAGES = (
    Stage("ce", "Held-out cross-entropy",
          "Mean next-token cross-entropy on held-out text; the gap column is the paired difference to the "
          "baseline on the same sequences (negative: better than the baseline).",
          run_ce, table_ce, figures.ce_figures, summary_ce),
    Stage("dla", "Direct logit attribution vs direct effect",
          "Direct logit attribution (DLA) linearises the final LayerNorm at the model's own scale; the direct "
          "effect (DE) recomputes it after removing the head's output. With LayerNorm removed, DLA is exact "
          "(NMAE 0). Next-token targets at every position; CIs resample sequences.",
          run_dla, table_dla, figures.dla_figures,
          lambda rd, m: {"DLA NMAE %": rd.numbers["dla"][m]["nmae"]["value"]}),
    Stage("atp", "Attribution patching vs activation patching (IOI)",
          "Attribution patching (AtP) estimates each head's activation-patching effect from one backward pass; "
          "the error is sum |AtP - activation patching| over a layer's heads (output z, all positions at once). "
          "Improvement = baseline's per-layer error minus this model's (positive: AtP is more accurate here).",
          run_atp, table_atp, figures.atp_figures, summary_atp),
    Stage("confidence", "Confidence (entropy) neurons and calibration",
          "Entropy (confidence) neurons of the baseline's last MLP layer (large ||w_out||, low LogitVar) "
          "are mean-ablated together in every model. Total effect: the ordinary forward pass; direct: the "
          "final LayerNorm scale frozen at its clean value. Without LayerNorm both coincide. Calibration: "
          "mean next-token entropy and expected calibration error (15 equal-width bins).",
          run_confidence, table_confidence, figures.confidence_figures, summary_confidence),
    Stage("first_token_norm", "First-token residual norm",
          "L2 norm of the residual stream at position 0 divided by the mean norm at the other "
          "positions, before each layer and after the last (95% CI over sequences).",
          run_first_token_norm, table_first_token_norm, figures.first_token_figures,
          lambda rd, m: {"pos0 norm ratio": rd.numbers["first_token_norm"][m]["max_ratio"]}),
    Stage("sink_rate", "Attention sinks",
          "Mean attention from query positions >= 1 to position 0, per head; a head is a sink when that "
          f"mean is at least the threshold ({SINK_THRESHOLD:.0%}).",
          run_sink_rate, table_sink_rate, figures.sink_figures,
          lambda rd, m: {"sink rate": rd.numbers["sink_rate"][m]["rate"]}),
)

#: name -> Stage, in report order.
STAGES: dict[str, Stage] = {s.name: s for s in _STAGES}
