"""The LN vs LN-free report: every analysis of the package on a set of models, one HTML + one JSON.

`run_report` runs the stages below on each model (the same tokens for all) and returns a
`ReportData` (result objects and a JSON-able dict of every number); `write_report` turns that into
a self-contained HTML file (plotly, no network), a JSON file and the result objects themselves
(``{stem}_results/``, saved exactly: `lnfree.report.saved`). ``lnfree demo``, ``lnfree compare``
and ``lnfree reproduce`` are thin wrappers around these two functions.

Stages (each defined once, in `lnfree.report.stages.STAGES`):

- ``ce``: held-out next-token cross-entropy of every model on every data set (bootstrap CI over
  sequences; bits per byte when the tokenizer's byte lengths are known), and each model's paired
  CE gap to the baseline.
- ``dla``: direct logit attribution of every attention head vs its exact direct effect, next-token
  targets at every position: NMAE (%) overall and per layer, with bootstrap CIs over sequences.
- ``atp``: attribution patching (AtP) vs activation patching of every head's output (``z``, all
  positions at once) on IOI prompts (`lnfree.tasks.ioi`): per-layer error sum|AtP - act|, Pearson
  and Spearman correlation, and each model's per-layer error minus the baseline's.
- ``confidence``: entropy-neuron candidates of the baseline's last MLP layer (`find_entropy_neurons`),
  their cumulative mean ablation in every model (total vs direct effect on entropy: the share
  that goes through the final LN scale), and calibration (mean entropy, ECE, top-1 accuracy).
- ``first_token_norm``: residual-stream norm at position 0 / mean norm at the other positions, per layer.
- ``sink_rate``: share of heads with mean attention >= 0.3 on position 0 (attention sinks).

Example:
    >>> from lnfree import zoo
    >>> from lnfree.report.pipeline import run_report, write_report
    >>> models = {n: zoo.load(n) for n in ("tiny-ln", "tiny-lnfree")}                 # doctest: +SKIP
    >>> rd = run_report(models, {"persuasion": zoo.heldout("persuasion")}, quick=True)  # doctest: +SKIP
    >>> print(rd.summary())                                                             # doctest: +SKIP
    >>> html_path, json_path = write_report(rd, "out/report")                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from lnfree import _checks
from lnfree.report.html import Report, jsonable, write_json
from lnfree.report.saved import save_results
from lnfree.report.stages import SINK_THRESHOLD, STAGES, Context, Skip

__all__ = ["Sizes", "FULL", "QUICK", "ReportData", "STAGES", "SINK_THRESHOLD", "run_report", "write_report",
           "build_report", "build_html", "format_summary", "check_same_vocabulary", "token_byte_lengths"]
PathArg = Union[str, Path]


@dataclass(frozen=True)
class Sizes:
    """How much data each stage uses (rows are taken from the start of each data set).

    ce_seqs: sequences per data set for CE (None: all). ce_len: tokens per sequence (None: all).
    dla_seqs x dla_len, conf_seqs x conf_len, geom_seqs x geom_len: tokens of the first data set
    for DLA, the confidence stage and the geometry stages. ioi_prompts: IOI prompt pairs.
    n_boot: bootstrap resamples for every CI. batch_size: sequences per forward pass.
    """

    ce_seqs: Optional[int] = 64
    ce_len: Optional[int] = None
    dla_seqs: int = 32
    dla_len: int = 128
    ioi_prompts: int = 24
    conf_seqs: int = 32
    conf_len: int = 128
    geom_seqs: int = 32
    geom_len: int = 128
    n_boot: int = 1000
    batch_size: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("ce_seqs", "ce_len"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Sizes.{f.name} must be a positive int, got {v!r}")
        if self.dla_len < 2 or self.conf_len < 2 or self.geom_len < 2:
            raise ValueError("dla_len, conf_len and geom_len must be >= 2 (next-token targets, position 0 vs rest)")


#: Defaults: the whole report in about a minute on 2 CPU cores for the zoo's models.
FULL = Sizes()
#: ``quick=True``: a smoke run in a fraction of that.
QUICK = Sizes(ce_seqs=16, ce_len=128, dla_seqs=12, dla_len=64, ioi_prompts=12, conf_seqs=12, conf_len=64,
              geom_seqs=12, geom_len=64, n_boot=200)


@dataclass(frozen=True, eq=False)
class ReportData:
    """What `run_report` computed.

    Attributes:
        title: the report's title.
        models: model names, in the order given; ``baseline`` is the reference model.
        datasets: data set names (the first one feeds DLA, confidence and geometry).
        stages: the stages run (some may be skipped: see ``notes``).
        sizes: the `Sizes` used.
        numbers: JSON-able dict of every number, by stage (what ``report.json`` holds).
        results: stage -> model -> the analysis result objects (DLAResult, PatchingError, ...).
        notes: stage -> why it was skipped or what to keep in mind.
        timings: stage -> seconds.
        info: model -> a short description (LN modes, parameters, config).
    """

    title: str
    models: tuple[str, ...]
    baseline: str
    datasets: tuple[str, ...]
    stages: tuple[str, ...]
    sizes: Sizes
    numbers: dict
    results: dict = field(repr=False)
    notes: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per model: the headline number of every stage that ran."""
        rows = []
        for m in self.models:
            row: dict[str, Any] = {"model": m, "LN": self.info.get(m, {}).get("ln", "")}
            for stage in self.stages:
                if stage in self.numbers:
                    row.update(STAGES[stage].summary(self, m))
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        """Everything numeric, plus settings, timings and notes (JSON-able)."""
        return jsonable({
            "title": self.title, "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lnfree_version": _version(), "models": list(self.models), "baseline": self.baseline,
            "datasets": list(self.datasets), "stages": list(self.stages), "sizes": dataclasses.asdict(self.sizes),
            "model_info": self.info, "notes": self.notes, "timings_s": self.timings,
            "summary": self.summary().to_dict(orient="records"), "results": self.numbers,
        })


# ---- inputs --------------------------------------------------------------------------------
def _version() -> str:
    import lnfree

    return lnfree.__version__


def _check_models(models) -> dict:
    from lnfree.model import as_lnfree  # here: importing the model module loads TransformerLens

    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty dict name -> LNFreeTransformer, got {type(models).__name__}")
    out = {}
    for name, m in models.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"model names must be non-empty strings, got {name!r}")
        try:
            out[name] = as_lnfree(m, name=f"models[{name!r}]")
        except TypeError:
            raise TypeError(f"models[{name!r}] must be an LNFreeTransformer (or HookedTransformer), "
                            f"got {type(m).__name__}") from None
    check_same_vocabulary(out)
    return out


def check_same_vocabulary(models: Mapping[str, Any]) -> None:
    """Raise ValueError unless every model reads the same token ids: same d_vocab and, where both
    have a tokenizer, the same encoding (`lnfree._checks.check_same_vocab`, against the first model).

    Example:
        >>> check_same_vocabulary({"a": model_a, "b": model_b})   # doctest: +SKIP
    """
    names = list(models)
    first = names[0]
    for other in names[1:]:
        _checks.check_same_vocab(models[first], models[other], names=(f"models {first!r}", f"{other!r}"))


def _check_data(data, models: dict) -> dict[str, torch.Tensor]:
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"data must be a non-empty dict name -> token tensor [n, pos], got {type(data).__name__}")
    any_model = next(iter(models.values()))
    out = {}
    for name, toks in data.items():
        if not isinstance(toks, (torch.Tensor, np.ndarray)):
            raise TypeError(f"data[{name!r}] must be a token tensor [n, pos], got {type(toks).__name__}")
        toks = _checks.check_tokens(any_model, toks, name=f"data[{name!r}]")
        if toks.shape[1] < 3:
            raise ValueError(f"data[{name!r}] needs sequences of at least 3 tokens, got shape {tuple(toks.shape)}")
        out[str(name)] = toks.cpu()
    return out


def token_byte_lengths(tokenizer) -> Optional[np.ndarray]:
    """Bytes of text per token id for a byte-level BPE tokenizer (GPT-2's, the zoo's), else None.

    Used for bits per byte. Special tokens count 0 bytes.

    Example:
        >>> from lnfree import gpt2_tokenizer
        >>> lengths = token_byte_lengths(gpt2_tokenizer())
        >>> int(lengths[15496])   # "Hello"
        5
    """
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    from lnfree.zoo.family import token_byte_lengths as from_json

    try:
        return from_json(to_str())
    except (ValueError, KeyError, TypeError):
        return None  # not a byte-level BPE: no honest byte count


def _model_info(model) -> dict:
    modes = set(model.ln_modes().values()) if model.ln_sites else {"removed"}
    cfg = model.cfg
    return {"ln": _checks.ln_state_label(model), "ln_modes": sorted(modes),
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_mlp": cfg.d_mlp,
            "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "source": getattr(model, "zoo_name", None)}


def _tokenizer(models: dict, base: str):
    tok = getattr(models[base], "tokenizer", None)
    if tok is not None:
        return tok
    return next((m.tokenizer for m in models.values() if getattr(m, "tokenizer", None) is not None), None)


def _check_stages(stages) -> tuple[str, ...]:
    stages = tuple(STAGES if stages is None else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages or len(set(stages)) != len(stages):
        raise ValueError(f"stages must be a non-empty subset of {list(STAGES)} without repeats, got {list(stages)}")
    return stages


def _byte_table(token_bytes, tokenizer, d_vocab: int) -> Optional[np.ndarray]:
    if token_bytes is None:
        token_bytes = token_byte_lengths(tokenizer)
    if token_bytes is not None and len(token_bytes) < d_vocab:  # padded vocab rows: never in text
        token_bytes = np.concatenate([token_bytes, np.zeros(d_vocab - len(token_bytes), dtype=np.int64)])
    return token_bytes


# ---- running ---------------------------------------------------------------------------------
def run_report(
    models: Mapping[str, Any],
    data: Mapping[str, Int[torch.Tensor, "n pos"]],
    *,
    baseline: Optional[str] = None,
    quick: bool = False,
    progress: bool = True,
    stages: Optional[Sequence[str]] = None,
    ioi=None,
    token_bytes: Optional[np.ndarray] = None,
    sizes: Optional[Sizes] = None,
    title: Optional[str] = None,
) -> ReportData:
    """Run the report's stages on `models` (same tokens for all) and collect every number.

    Args:
        models: name -> LNFreeTransformer (or HookedTransformer), sharing one vocabulary.
        data: name -> token ids [n, pos]; the first set feeds DLA, confidence and geometry, every
            set gets a CE row.
        baseline: the reference model (default: the first): CE gaps, AtP improvements and the
            entropy neurons are taken relative to it.
        quick: use `QUICK` sizes (a smoke run) instead of `FULL`; ignored when `sizes` is given.
        progress: a progress bar per stage.
        stages: subset of `STAGES` (default: all).
        ioi: an `lnfree.tasks.IOIBatch` for the ``atp`` stage; default: `lnfree.tasks.ioi` with the
            baseline's tokenizer (the stage is skipped, with a note, when there is none or it cannot
            form IOI prompts).
        token_bytes: bytes per token id for bits per byte (default: from the tokenizer when it is
            byte-level BPE).
        sizes: a `Sizes` (data per stage, bootstrap resamples).
        title: the report's title.

    Example:
        >>> rd = run_report({"LN": ln_model, "LN-free": ln_free}, {"heldout": tokens}, quick=True)  # doctest: +SKIP
        >>> rd.numbers["dla"]["LN-free"]["nmae"]["value"]                                          # doctest: +SKIP
        0.0
    """
    models = _check_models(models)
    stages = _check_stages(stages)
    if stages == ("atp",) and isinstance(data, Mapping) and not data:
        data = {}  # IOI prompts only: no token data needed
    else:
        data = _check_data(data, models)
    if baseline is None:
        baseline = next(iter(models))
    if baseline not in models:
        raise ValueError(f"baseline must be one of the models {list(models)}, got {baseline!r}")
    sizes = sizes if sizes is not None else (QUICK if quick else FULL)
    if not isinstance(sizes, Sizes):
        raise TypeError(f"sizes must be a lnfree.report.pipeline.Sizes, got {type(sizes).__name__}")
    tokenizer = _tokenizer(models, baseline)
    ctx = Context(models=models, data=data, baseline=baseline, sizes=sizes, tokenizer=tokenizer, ioi=ioi,
                  token_bytes=_byte_table(token_bytes, tokenizer, next(iter(models.values())).cfg.d_vocab),
                  progress=progress)
    numbers: dict = {}
    results: dict = {}
    timings: dict = {}
    for stage in stages:
        t0 = time.perf_counter()
        try:
            numbers[stage], results[stage] = STAGES[stage].run(ctx)
        except Skip as why:
            ctx.notes[stage] = f"skipped: {why}"
            continue
        timings[stage] = round(time.perf_counter() - t0, 3)
    return ReportData(
        title=title or f"{' vs '.join(models)}: LayerNorm report", models=tuple(models), baseline=baseline,
        datasets=tuple(data), stages=stages, sizes=sizes, numbers=numbers, results=results, notes=ctx.notes,
        timings=timings, info={m: _model_info(models[m]) for m in models},
    )


# ---- output --------------------------------------------------------------------------------
def build_html(rd: ReportData) -> Report:
    """The whole report as a `Report` (summary, per-stage text, tables and figures, settings)."""
    r = Report(rd.title)
    described = ", ".join(f"{m} ({rd.info[m]['ln']})" for m in rd.models)
    r.text(f"Models: {described}; baseline {rd.baseline}. "
           f"Data: {', '.join(rd.datasets)} (the first feeds DLA, confidence and geometry). "
           "Every number is also in the JSON file next to this page.")
    r.section("Summary")
    r.table(rd.summary())
    for name in rd.stages:
        stage = STAGES[name]
        r.section(stage.title, stage.text)
        if name in rd.notes:
            r.text(rd.notes[name], note=True)
        if name not in rd.numbers:
            continue
        r.table(stage.table(rd))
        for fig in stage.figures(rd):
            r.figure(fig)
    r.section("Settings")
    r.table(pd.DataFrame([{"setting": k, "value": str(v)} for k, v in vars(rd.sizes).items()]))
    r.table(pd.DataFrame([{"model": m, **{k: str(v) for k, v in rd.info[m].items()}} for m in rd.models]))
    r.text("Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rd.timings.items()), note=True)
    return r


def write_report(report_data: ReportData, out_dir: PathArg, *, stem: str = "report",
                 results: bool = True) -> tuple[Path, Path]:
    """Write ``{stem}.html`` (self-contained: plotly inlined, no network), ``{stem}.json`` and, with
    `results`, ``{stem}_results/``: every result object, saved exactly (`lnfree.report.saved`; read them
    back with ``load_results(out_dir / f"{stem}_results")``). Returns the page's and the JSON's paths.

    Example:
        >>> html_path, json_path = write_report(rd, "out/demo")   # doctest: +SKIP
    """
    if not isinstance(report_data, ReportData):
        raise TypeError(f"report_data must be a ReportData (from run_report), got {type(report_data).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path = build_html(report_data).write(out / f"{stem}.html")
    data = report_data.to_json()
    if results:
        save_results(report_data.results, out / f"{stem}_results")
        data["saved_results"] = f"{stem}_results"
    json_path = write_json(data, out / f"{stem}.json")
    return html_path, json_path


def build_report(models: Mapping[str, Any], data: Mapping[str, Int[torch.Tensor, "n pos"]],
                 out_dir: Optional[PathArg] = None, *, stem: str = "report", **kwargs) -> ReportData:
    """`run_report` then, when `out_dir` is given, `write_report`: the report in one call.

    Keyword arguments are `run_report`'s (baseline, quick, stages, sizes, ...).

    Example:
        >>> from lnfree import report, zoo
        >>> models = {n: zoo.load(n) for n in ("tiny-ln", "tiny-lnfree")}                       # doctest: +SKIP
        >>> rd = report.build_report(models, {"persuasion": zoo.heldout("persuasion")},
        ...                          "out/mine", quick=True)                                   # doctest: +SKIP
        >>> rd.summary()                                                                      # doctest: +SKIP
    """
    rd = run_report(models, data, **kwargs)
    if out_dir is not None:
        write_report(rd, out_dir, stem=stem)
    return rd


def format_summary(report_data: ReportData) -> str:
    """The summary table as fixed-width text (what the commands print).

    Example:
        >>> print(format_summary(rd))       # doctest: +SKIP
    """
    df = report_data.summary()
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")
