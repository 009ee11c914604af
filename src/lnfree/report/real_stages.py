"""The real-model report's stages (``lnfree report smollm2-135m``): every headline analysis on one model.

Each stage is a `RealStage` (name, title, the `RealSizes` fields it reads, ``run(ctx) -> numbers``) in
`REAL_STAGES`, in page order; ``run`` reads the same `lnfree.report.stages.Context` as the comparison
report's stages (one model, its held-out books, the sizes). `run_real_report` runs the registry; each
stage's outcome is a `RealStageResult`, saved with `Result.save` under ``saved/<stage>`` and, with
``resume=True``, loaded back with `lnfree.load_result` instead of recomputed when the model and the sizes the
stage reads are unchanged (``--resume``); `lnfree.report.real_page` writes the page from the numbers only.

Example:
    >>> from lnfree.report.real_stages import REAL_STAGES, QUICK
    >>> list(REAL_STAGES)
    ['ce', 'dla', 'entropy_neurons', 'patching', 'geometry']
    >>> REAL_STAGES["ce"].sizes
    ('ce_rows', 'calib_rows', 'seq_len', 'n_boot')
    >>> numbers = run_real_report(model, books, QUICK)          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from jaxtyping import Float, Int

from lnfree._results import Result, load_result, result
from lnfree.report.stages import Context
from lnfree.stats import Estimate

BOOKS = ("persuasion", "cfi")
MASSIVE = 10.0  # first-token |activation| / the largest |activation| elsewhere above which a neuron is "massive"


@dataclass(frozen=True)
class RealSizes:
    """How much data each stage reads. The default: the committed page's sizes (830 s of one CPU core)."""

    ce_rows: int = 8           # rows of each held-out set for CE (and the frozen-norm CE)
    calib_rows: int = 8        # other rows of "persuasion" on which the frozen scales are estimated
    seq_len: int = 64
    dla_rows: int = 4
    dla_len: int = 32
    conf_rows: int = 4
    conf_len: int = 32
    geom_rows: int = 16
    ioi_prompts: int = 6
    layers: tuple = (28, 29)   # entropy-neuron candidates of the last layers
    per_layer: int = 1
    n_boot: int = 200

    def to_dict(self) -> dict:
        """JSON form (``layers`` as a list), as the page's JSON stores it."""
        return dataclasses.asdict(self) | {"layers": list(self.layers)}


DEFAULT = RealSizes()
FULL = RealSizes(ce_rows=32, calib_rows=32, seq_len=128, dla_rows=8, dla_len=64, conf_rows=16, conf_len=64,
                 geom_rows=16, ioi_prompts=8, layers=(27, 28, 29), per_layer=2, n_boot=1000)
QUICK = RealSizes(ce_rows=2, calib_rows=2, seq_len=32, dla_rows=2, dla_len=16, conf_rows=2, conf_len=16, geom_rows=2,
                  ioi_prompts=2, layers=(29,), per_layer=1, n_boot=50)
#: the command-line flag of each preset ("" for the default)
PRESETS = {"": DEFAULT, " --quick": QUICK, " --full": FULL}


@dataclass(frozen=True)
class RealStage:
    """One section of the real-model page: ``run(ctx)`` -> JSON-able numbers, reading only ``sizes``."""

    name: str
    title: str
    sizes: tuple[str, ...]
    run: Callable[[Context], dict]


def est(e) -> dict:
    """An `Estimate` as the page's JSON stores it."""
    return {"value": float(e.value), "low": float(e.low), "high": float(e.high), "n": int(e.n)}


def _model(ctx: Context):
    return ctx.models[ctx.baseline]


# ---- ce: held-out CE, and the cost of freezing every norm at its average scale (no fine-tuning) ------
def run_ce(ctx: Context) -> dict:
    from lnfree.evaluation import cross_entropy
    from lnfree.stats import bootstrap

    model, sizes, books = _model(ctx), ctx.sizes, ctx.data
    res = {}
    for b, toks in books.items():
        rows = toks[: sizes.ce_rows]
        live = cross_entropy(model, rows, n_boot=sizes.n_boot)
        res[b] = {"ce": est(live.mean), "n_tokens": live.n_tokens, "rows": list(rows.shape)}
    calib = books["persuasion"][sizes.ce_rows: sizes.ce_rows + sizes.calib_rows]
    scales = model.estimate_ln_scales(calib, store=False)  # mean RMS of each site's input on other rows
    for b, toks in books.items():
        rows = toks[: sizes.ce_rows]
        live = cross_entropy(model, rows, n_boot=sizes.n_boot)
        with model.ln_frozen(scales=scales), torch.no_grad():
            finite = torch.isfinite(model(rows)).all(-1)  # [row, pos]: every logit finite
        res[b]["frozen_finite_share"] = float(finite.double().mean())
        if not bool(finite.all()):  # the frozen forward overflows: no CE to report, say so
            res[b]["frozen_ce"] = res[b]["frozen_gap"] = None
            continue
        with model.ln_frozen(scales=scales):
            frozen = cross_entropy(model, rows, n_boot=sizes.n_boot)
        gap = bootstrap(frozen.per_sequence.double() - live.per_sequence.double(), n_boot=sizes.n_boot)
        res[b]["frozen_ce"] = est(frozen.mean)
        res[b]["frozen_gap"] = est(gap)
    res["calibration_rows"] = list(calib.shape)
    scales = model.estimate_ln_scales(calib, exclude_position_0=True, store=False)  # position 0 left out
    with model.ln_frozen(scales=scales), torch.no_grad():
        res["frozen_finite_share_excl_pos0"] = float(torch.isfinite(
            model(books["persuasion"][: sizes.ce_rows])).all(-1).double().mean())
    return res


# ---- dla ------------------------------------------------------------------------------------------
def run_dla(ctx: Context) -> dict:
    from lnfree.analysis.dla import direct_logit_attribution

    sizes = ctx.sizes
    toks = ctx.primary(sizes.dla_rows, sizes.dla_len)
    res = direct_logit_attribution(_model(ctx), toks, components="heads", n_boot=sizes.n_boot)
    layers = res.nmae_frame("layer")
    return {"nmae": est(res.nmae()), "rows": list(toks.shape), "ln_final_mode": res.ln_final_mode,
            "per_layer": [{"layer": r.group, "nmae": r.nmae, "low": r.low, "high": r.high}
                          for r in layers.itertuples()],
            "max_abs_error": float((res.dla - res.direct_effect).abs().max())}


# ---- entropy neurons ------------------------------------------------------------------------------
def neuron_activations(model, toks: Int[torch.Tensor, "batch pos"], layer: int) -> Float[torch.Tensor, "batch pos d_mlp"]:
    """mlp.hook_post of one layer."""
    name = f"blocks.{layer}.mlp.hook_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=name)
    return cache[name]


def massive(act: Float[torch.Tensor, "batch pos"]) -> dict:
    """Is this neuron a massive-activation neuron (huge on the first token, small elsewhere)?

    Its mean |activation| on the first token exceeds `MASSIVE` x its largest |activation| anywhere else.
    Mean ablation replaces its first-token value by the mean, rewriting that token's residual stream
    (the attention sink), so its entropy change measures that, not entropy regulation.

    Example:
        >>> massive(torch.tensor([[400.0, 0.5, 0.5]]))["massive"]
        True
    """
    first = float(act[:, 0].abs().mean())
    rest = float(act[:, 1:].abs().max())
    ratio = first / max(rest, 1e-12)
    return {"first_token_abs": first, "rest_max_abs": rest, "first_token_ratio": ratio, "massive": ratio > MASSIVE}


def run_entropy_neurons(ctx: Context) -> dict:
    from lnfree.analysis.calibration import calibration
    from lnfree.analysis.confidence import ablate_neurons, find_entropy_neurons

    model, sizes = _model(ctx), ctx.sizes
    toks = ctx.primary(sizes.conf_rows, sizes.conf_len)
    rows = []
    for layer in sizes.layers:
        found = find_entropy_neurons(model, layer=layer, n_top=sizes.per_layer)
        frame = found.to_frame()
        abl = ablate_neurons(model, toks, found.neurons(), n_boot=sizes.n_boot)
        acts = neuron_activations(model, toks, layer)
        for i, label in enumerate(found.neurons()):
            f = frame.iloc[i]
            rows.append({"neuron": label, "score": float(f.score), "rho": float(f.rho), "norm": float(f.norm),
                         "logit_var": float(f.logit_var),
                         "dH_total_%": est(abl.relative_change(i, "entropy", "total")),
                         "dH_direct_%": est(abl.relative_change(i, "entropy", "direct")),
                         "ln_mediated_fraction": est(abl.ln_mediated_fraction(i, "entropy")),
                         **massive(acts[..., int(label.split("N")[1])])})
    cal = calibration(model, toks, n_boot=sizes.n_boot)
    return {"rows": list(toks.shape), "candidates": rows,
            "calibration": {"mean_entropy": est(cal.mean_entropy), "ece": est(cal.ece),
                            "accuracy_top1": est(cal.accuracy_top1)}}


# ---- patching -------------------------------------------------------------------------------------
def run_patching(ctx: Context) -> dict:
    from lnfree.analysis.patching import activation_patching, attribution_patching, patching_error
    from lnfree.tasks import ioi

    model, sizes = _model(ctx), ctx.sizes
    batch = ioi(model, sizes.ioi_prompts, seed=0)
    metric = batch.metric("logit_diff")
    res = {"n_prompts": len(batch), "example": batch.prompts[0], "example_corrupt": batch.corrupt_prompts[0]}
    for site, by_pos in (("resid_pre", True), ("z", False)):
        act = activation_patching(model, batch.clean, batch.corrupt, metric, site=site, by_pos=by_pos,
                                         n_boot=sizes.n_boot)
        key = f"{site}{'_by_pos' if by_pos else ''}"
        res[key] = {"metric_clean": act.metric_clean, "metric_corrupt": act.metric_corrupt,
                    "n_components": len(act.labels)}
        for method in ("atp", "atp*"):
            atp = attribution_patching(model, batch.clean, batch.corrupt, metric, site=site,
                                              by_pos=by_pos, method=method, n_boot=sizes.n_boot)
            err = patching_error(atp, act, n_boot=sizes.n_boot)
            res[key][method] = {"pearson": est(err.pearson), "spearman": est(err.spearman),
                                "mean_abs_error": est(err.mean_abs), "total_error": float(err.total),
                                "recall": est(err.recall), "k": err.k,
                                "per_layer_error": [float(v) for v in err.per_layer]}
    return res


# ---- geometry -------------------------------------------------------------------------------------
def run_geometry(ctx: Context) -> dict:
    from lnfree.analysis.geometry import attention_sink_rate, first_token_norm

    model, sizes = _model(ctx), ctx.sizes
    toks = ctx.primary(sizes.geom_rows, None)
    norms = first_token_norm(model, toks, n_boot=sizes.n_boot)
    sinks = attention_sink_rate(model, toks, threshold=0.3, n_boot=sizes.n_boot)
    ratio = norms.estimates()["ratio"]
    return {"rows": list(toks.shape), "sites": list(norms.labels), "ratio": [est(e) for e in ratio],
            "first": [est(e) for e in norms.estimates()["first"]],
            "rest": [est(e) for e in norms.estimates()["rest"]],
            "max_ratio": est(norms.max_ratio()), "sink_rate": est(sinks.rate),
            "n_heads": int(sinks.is_sink.numel()), "n_sinks": int(sinks.is_sink.sum()),
            "top_sinks": [{"head": r.label, "attention_to_first": float(r.attention_to_first)}
                          for r in sinks.top(5).itertuples()]}


# ---- the registry ---------------------------------------------------------------------------------
_STAGES = (
    RealStage("ce", "Held-out cross-entropy, and freezing every norm without fine-tuning",
              ("ce_rows", "calib_rows", "seq_len", "n_boot"), run_ce),
    RealStage("dla", "DLA against the exact direct effect", ("seq_len", "dla_rows", "dla_len", "n_boot"), run_dla),
    RealStage("entropy_neurons", "Entropy-neuron candidates of the last layers",
              ("seq_len", "conf_rows", "conf_len", "layers", "per_layer", "n_boot"), run_entropy_neurons),
    RealStage("patching", "IOI: activation patching vs AtP and AtP*", ("ioi_prompts", "n_boot"), run_patching),
    RealStage("geometry", "First-token norm and attention sinks", ("seq_len", "geom_rows", "n_boot"), run_geometry),
)
#: name -> RealStage, in page order.
REAL_STAGES: dict[str, RealStage] = {s.name: s for s in _STAGES}


def stage_sizes(sizes: dict) -> dict:
    """stage -> the sizes it reads (what ``--resume`` compares), from a JSON sizes dict."""
    return {k: {f: sizes.get(f) for f in s.sizes} for k, s in REAL_STAGES.items()}


def _is_estimate(x) -> bool:
    return isinstance(x, dict) and set(x) == {"value", "low", "high", "n"}


def _leaves(x, path: str = ""):
    """(key path, value) of every estimate dict and scalar in a stage's numbers."""
    if _is_estimate(x) or not isinstance(x, (dict, list)):
        yield path, x
        return
    items = x.items() if isinstance(x, dict) else enumerate(x)
    for k, v in items:
        yield from _leaves(v, f"{path}.{k}" if path else str(k))


@result
class RealStageResult(Result):
    """One stage of the real-model report: the numbers its page section shows, and what produced them.

    ``numbers`` is the stage's JSON (estimates as ``{"value", "low", "high", "n"}`` dicts); ``sizes`` the whole
    `RealSizes` of the run (``stage_sizes(sizes)[stage]`` is what the stage read), ``data`` the held-out books'
    shapes, ``seconds`` the stage's own run time, ``model_id`` the name the report was run for. Saved with
    ``save(path)``, read with `lnfree.load_result`.

    Example:
        >>> res = RealStageResult(stage="dla", title="DLA", numbers={"nmae": {"value": 1.0, "low": 0.5,
        ...     "high": 2.0, "n": 8}}, sizes=QUICK.to_dict(), data={}, seconds=1.5, model_id="tiny",
        ...     model_name="tiny (LN)", labels=("nmae",))
        >>> res.estimates()["nmae"]
        Estimate(value=1.0, low=0.5, high=2.0, n=8, level=0.95, n_nan=0)
        >>> res.to_frame()[["key", "value"]].values.tolist()
        [['nmae', 1.0]]
    """

    stage: str
    title: str
    numbers: dict
    sizes: dict
    data: dict
    seconds: float
    model_id: str
    model_name: str
    labels: tuple

    def estimates(self) -> dict[str, Estimate]:
        """Every estimate among the numbers, by key path (e.g. ``"persuasion.ce"``)."""
        return {k: Estimate(float(v["value"]), float(v["low"]), float(v["high"]), int(v["n"]))
                for k, v in _leaves(self.numbers) if _is_estimate(v)}

    def to_frame(self):
        """One row per number (key path, value; low, high and n for estimates), in the page's order."""
        import pandas as pd

        rows = [{"key": k, **v} if _is_estimate(v) else {"key": k, "value": v} for k, v in _leaves(self.numbers)]
        return pd.DataFrame(rows, columns=["key", "value", "low", "high", "n"])

    def plot(self):
        """The stage's estimates with their CIs, one bar per key path."""
        import plotly.graph_objects as go

        est = list(self.estimates().items())
        fig = go.Figure(go.Bar(x=[k for k, _ in est], y=[e.value for _, e in est],
                               error_y=dict(type="data", symmetric=False, array=[e.high - e.value for _, e in est],
                                            arrayminus=[e.value - e.low for _, e in est])))
        fig.update_layout(title=f"{self.model_name}: {self.title}", xaxis_title="number", yaxis_title="value")
        return fig


def _saved(saved: Optional[Path], stage: RealStage, sizes: dict, label: str) -> Optional[RealStageResult]:
    """The stage's saved result if it was computed on this model with the sizes it reads now, else None."""
    if saved is None or not (saved / stage.name / "result.json").is_file():
        return None
    res = load_result(saved / stage.name, RealStageResult)
    same = stage_sizes(res.sizes)[stage.name] == stage_sizes(sizes)[stage.name]
    return res if same and res.model_name == label else None


def run_real_report(model, books: Mapping[str, Int[torch.Tensor, "n pos"]], sizes: RealSizes = DEFAULT, *,
                    name: str = "smollm2-135m", progress: bool = True, saved: Optional[Path] = None,
                    resume: bool = False) -> dict:
    """Run `REAL_STAGES` on `model` and return the page's numbers (JSON-able).

    Args:
        model: an LNFreeTransformer with its norms live (left as it was).
        books: ``{"persuasion": rows, "cfi": rows}`` held-out token rows [n, seq_len] (persuasion also
            calibrates the frozen scales and feeds DLA, entropy neurons and geometry).
        sizes: a `RealSizes` (`DEFAULT`, `QUICK`, `FULL` or your own).
        saved: a directory: each stage's `RealStageResult` is saved to ``saved/<stage>`` as it finishes.
        resume: load the stages saved there on the same model with the sizes they read now
            (`lnfree.load_result`) instead of recomputing them (``--resume``).

    Example:
        >>> books = {b: zoo.heldout(b, model=model, seq_len=64) for b in BOOKS}   # doctest: +SKIP
        >>> numbers = run_real_report(model, books, QUICK)                        # doctest: +SKIP
    """
    from lnfree._checks import model_label

    if not isinstance(sizes, RealSizes):
        raise TypeError(f"sizes must be a RealSizes, got {type(sizes).__name__}")
    if set(books) != set(BOOKS):
        raise ValueError(f"books must hold exactly {list(BOOKS)} token rows, got {list(books)}")
    t0 = time.perf_counter()
    saved = None if saved is None else Path(saved)
    out: dict = {"model": name, "model_label": model_label(model), "sizes": sizes.to_dict(), "timings_s": {}}
    out["stage_sizes"] = stage_sizes(out["sizes"])
    books = {b: books[b] for b in BOOKS}
    out["data"] = {b: list(t.shape) for b, t in books.items()}
    ctx = Context(models={name: model}, data=books, baseline=name, sizes=sizes, token_bytes=None,
                  tokenizer=getattr(model, "tokenizer", None), ioi=None, progress=progress)
    for stage in REAL_STAGES.values():
        res = _saved(saved, stage, out["sizes"], out["model_label"]) if resume else None
        if res is None:
            t = time.perf_counter()
            numbers = json.loads(json.dumps(stage.run(ctx)))  # plain JSON types: as a saved result loads back
            res = RealStageResult(stage=stage.name, title=stage.title, numbers=numbers, sizes=out["sizes"],
                                  data=out["data"], seconds=round(time.perf_counter() - t, 1), model_id=name,
                                  model_name=out["model_label"], labels=tuple(numbers))
            if saved is not None:
                res.save(saved / stage.name)
            if progress:
                print(f"[{time.perf_counter() - t0:6.0f}s] {stage.name} done", file=sys.stderr, flush=True)
        out[stage.name], out["timings_s"][stage.name] = res.numbers, res.seconds
    return finish_numbers(out)


def finish_numbers(out: dict) -> dict:
    """The run's totals: the stages' own times (resumed ones included) and the machine."""
    out["total_s"] = round(sum(out["timings_s"].values()), 1)
    out["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    return out


def saved_numbers(saved: Path, sizes: RealSizes) -> dict:
    """The page's numbers from the stages saved under `saved` with `sizes` (those a ``--resume`` would reuse);
    the stages not saved there are missing (the page says so)."""
    found = {}
    for stage in REAL_STAGES.values():
        if (Path(saved) / stage.name / "result.json").is_file():
            res = load_result(Path(saved) / stage.name, RealStageResult)
            if stage_sizes(res.sizes)[stage.name] == stage_sizes(sizes.to_dict())[stage.name]:
                found[stage.name] = res
    if not found:
        raise FileNotFoundError(f"no stage results saved under {saved} with these sizes")
    first = next(iter(found.values()))
    out = {"model": first.model_id, "model_label": first.model_name, "sizes": sizes.to_dict(), "timings_s": {},
           "stage_sizes": stage_sizes(sizes.to_dict()), "data": first.data}
    for name, res in found.items():
        out[name], out["timings_s"][name] = res.numbers, res.seconds
    return out
