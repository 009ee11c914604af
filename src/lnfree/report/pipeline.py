"""The LN vs LN-free report: every analysis of the package on a set of models, one HTML + one JSON.

`run_report` runs the stages below on each model (the same tokens for all) and returns a
`ReportData` (result objects and a JSON-able dict of every number); `write_report` turns that into
a self-contained HTML file (plotly, no network) and a JSON file. ``lnfree demo``, ``lnfree compare``
and ``lnfree reproduce`` are thin wrappers around these two functions.

Stages (`STAGES`):

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
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from lnfree.stats import Estimate, bootstrap

STAGES = ("ce", "dla", "atp", "confidence", "first_token_norm", "sink_rate")
STAGE_TITLES = {
    "ce": "Held-out cross-entropy",
    "dla": "Direct logit attribution vs direct effect",
    "atp": "Attribution patching vs activation patching (IOI)",
    "confidence": "Confidence (entropy) neurons and calibration",
    "first_token_norm": "First-token residual norm",
    "sink_rate": "Attention sinks",
}
SINK_THRESHOLD = 0.3
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
        n = self.numbers
        for m in self.models:
            row: dict[str, Any] = {"model": m, "LN": self.info.get(m, {}).get("ln", "")}
            for d in self.datasets:
                ce = n.get("ce", {}).get(d, {}).get(m)
                if ce:
                    row[f"CE {d}"] = ce["ce"]["value"]
            if "dla" in n:
                row["DLA NMAE %"] = n["dla"][m]["nmae"]["value"]
            if "atp" in n:
                row["AtP err"] = n["atp"][m]["total_error"]
                row["AtP r"] = n["atp"][m]["pearson"]["value"]
            if "confidence" in n:
                c = n["confidence"][m]
                row["entropy"] = c["calibration"]["mean_entropy"]["value"]
                row["ECE"] = c["calibration"]["ece"]["value"]
                row["abl dH %"] = c["ablation"]["relative_entropy_change_total_%"]["value"]
            if "first_token_norm" in n:
                row["pos0 norm ratio"] = n["first_token_norm"][m]["max_ratio"]
            if "sink_rate" in n:
                row["sink rate"] = n["sink_rate"][m]["rate"]
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        """Everything numeric, plus settings, timings and notes (JSON-able)."""
        from lnfree.report.html import jsonable

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
    from transformer_lens import HookedTransformer

    from lnfree.model import LNFreeTransformer

    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty dict name -> LNFreeTransformer, got {type(models).__name__}")
    out = {}
    for name, m in models.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"model names must be non-empty strings, got {name!r}")
        if not isinstance(m, HookedTransformer):
            raise TypeError(f"models[{name!r}] must be an LNFreeTransformer (or HookedTransformer), got {type(m).__name__}")
        out[name] = m if isinstance(m, LNFreeTransformer) else LNFreeTransformer.from_hooked(m)
    check_same_vocabulary(out)
    return out


def check_same_vocabulary(models: Mapping[str, Any]) -> None:
    """Raise ValueError unless every model reads the same token ids: same d_vocab and, where both
    have a tokenizer, the same vocabulary.

    Example:
        >>> check_same_vocabulary({"a": model_a, "b": model_b})   # doctest: +SKIP
    """
    names = list(models)
    first = names[0]
    va = models[first].cfg.d_vocab
    ta = getattr(models[first], "tokenizer", None)
    for other in names[1:]:
        vb = models[other].cfg.d_vocab
        if va != vb:
            raise ValueError(f"models {first!r} and {other!r} have different vocabularies (d_vocab {va} vs {vb}); "
                             "they must share one tokenizer to be compared on the same tokens")
        tb = getattr(models[other], "tokenizer", None)
        if ta is not None and tb is not None and ta is not tb and _vocab(ta) != _vocab(tb):
            raise ValueError(f"models {first!r} and {other!r} have different tokenizers (their vocabularies differ); "
                             "the same token ids would mean different text")


def _vocab(tokenizer) -> Optional[dict]:
    return tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None


def _check_data(data, models: dict) -> dict[str, torch.Tensor]:
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"data must be a non-empty dict name -> token tensor [n, pos], got {type(data).__name__}")
    any_model = next(iter(models.values()))
    out = {}
    for name, toks in data.items():
        if isinstance(toks, np.ndarray):
            if not np.issubdtype(toks.dtype, np.integer):
                raise TypeError(f"data[{name!r}] must hold integer token ids, got dtype {toks.dtype}")
            toks = torch.from_numpy(toks.astype(np.int64))
        if not isinstance(toks, torch.Tensor):
            raise TypeError(f"data[{name!r}] must be a token tensor [n, pos], got {type(toks).__name__}")
        try:
            toks = any_model._check_tokens(toks.long() if not toks.dtype.is_floating_point else toks)
        except (TypeError, ValueError) as e:
            raise type(e)(f"data[{name!r}]: {e}") from None
        if toks.shape[1] < 3:
            raise ValueError(f"data[{name!r}] needs sequences of at least 3 tokens, got shape {tuple(toks.shape)}")
        out[str(name)] = toks.cpu()
    return out


def _rows(tokens: torch.Tensor, n: Optional[int], length: Optional[int]) -> torch.Tensor:
    return tokens[: n or tokens.shape[0], : length or tokens.shape[1]]


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


# ---- the stages ----------------------------------------------------------------------------
def _est(e: Estimate) -> dict:
    return e.to_dict()


def _stage_ce(models, data, base, sizes, token_bytes, progress, tqdm):
    from lnfree.evaluation import cross_entropy

    numbers, results = {}, {}
    for dname, toks in data.items():
        toks = _rows(toks, sizes.ce_seqs, sizes.ce_len)
        n_bytes = int(token_bytes[toks[:, 1:].numpy()].sum()) if token_bytes is not None else 0
        numbers[dname], results[dname] = {}, {}
        for m in tqdm(models, disable=not progress, desc=f"CE {dname}"):
            res = cross_entropy(models[m], toks, batch_size=sizes.batch_size, n_boot=sizes.n_boot)
            results[dname][m] = res
            numbers[dname][m] = {
                "ce": _est(res.mean), "n_tokens": res.n_tokens, "n_sequences": int(toks.shape[0]),
                "seq_len": int(toks.shape[1]),
                "bits_per_byte": _est(res.bits_per_byte(n_bytes)) if n_bytes > 0 else None,
            }
        for m in models:  # paired gap to the baseline: same sequences, so resample them together
            diff = results[dname][m].per_sequence.double() - results[dname][base].per_sequence.double()
            numbers[dname][m]["gap_to_baseline"] = _est(bootstrap(diff, n_boot=sizes.n_boot))
    return numbers, results


def _stage_dla(models, tokens, sizes, progress, tqdm):
    from lnfree.analysis.dla import direct_logit_attribution

    numbers, results = {}, {}
    for m in tqdm(models, disable=not progress, desc="DLA vs DE"):
        res = direct_logit_attribution(models[m], tokens, components="heads", batch_size=sizes.batch_size)
        overall, per_head = res.nmae(n_boot=sizes.n_boot)
        layers = res.nmae_frame("layer", n_boot=sizes.n_boot)
        results[m] = res
        numbers[m] = {
            "nmae": _est(overall), "per_layer": layers.to_dict(orient="records"),
            "per_head": {k: (None if not math.isfinite(v) else float(v)) for k, v in per_head.items()},
            "max_abs_error": float((res.dla - res.direct_effect).abs().max()),
            "ln_final_mode": res.ln_final_mode, "targets": res.targets,
            "n_prompts": int(tokens.shape[0]), "n_positions": int(res.dla.shape[-1]),
        }
    return numbers, results


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


def _stage_atp(models, batch, base, sizes, progress, tqdm):
    from lnfree.analysis.patching import activation_patching, attribution_patching, patching_error

    kind, metrics = _ioi_metrics(models, batch)
    numbers, results = {"metric": kind, "site": "z", "by_pos": False, "n_prompts": len(batch),
                        "example_prompt": batch.prompts[0], "example_corrupt": batch.corrupt_prompts[0]}, {}
    for m in tqdm(models, disable=not progress, desc="AtP vs activation patching"):
        model, metric = models[m], metrics[m]
        act = activation_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False)
        atp = attribution_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False, method="atp")
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


def _stage_confidence(models, tokens, base, sizes, progress, tqdm):
    from lnfree.analysis.confidence import ablate_neurons, calibration, find_entropy_neurons

    found = find_entropy_neurons(models[base], layer=-1, top=3)
    neurons = found.top()
    frame = found.to_frame().head(len(neurons))
    numbers = {"layer": found.layer, "neurons": neurons, "neurons_from": base,
               "candidates": frame[["label", "norm", "logit_var", "rho", "score"]].to_dict(orient="records")}
    results = {"neurons": found}
    for m in tqdm(models, disable=not progress, desc="entropy neurons, calibration"):
        model = models[m]
        own = find_entropy_neurons(model, layer=-1, top=3)
        # the baseline's neurons where they exist (same layer and width, e.g. a fine-tuned twin), else the model's own
        same = own.layer == found.layer and model.cfg.d_mlp == models[base].cfg.d_mlp
        chosen = neurons if same else own.top()
        abl = ablate_neurons(model, tokens, chosen, layer=own.layer, cumulative=True, batch_size=sizes.batch_size)
        cal = calibration(model, tokens, batch_size=sizes.batch_size)
        results[m] = {"neurons": own, "ablation": abl, "calibration": cal}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            last = len(abl.sets) - 1  # all the neurons together
            numbers[m] = {
                "own_top_neurons": own.top(),
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


def _stage_first_token(models, tokens, sizes, progress, tqdm):
    from lnfree.analysis.geometry import first_token_norm

    numbers, results = {}, {}
    for m in tqdm(models, disable=not progress, desc="first-token norm"):
        res = first_token_norm(models[m], tokens, batch_size=sizes.batch_size)
        ests = {k: [_est(e) for e in v] for k, v in _bootstrapped(res, sizes.n_boot).items()}
        results[m] = res
        numbers[m] = {"sites": res.labels, **ests, "max_ratio": float(res.ratio.max()),
                      "final_ratio": float(res.ratio[-1])}
    return numbers, results


def _bootstrapped(res, n_boot: int) -> dict[str, list[Estimate]]:
    """ResidNorms.estimates with our n_boot (its own uses the default)."""
    ratio = lambda a, b: float(a.mean() / b.mean())  # noqa: E731
    idx = range(len(res.labels))
    return {
        "first": [bootstrap(res.first[:, i], n_boot=n_boot) for i in idx],
        "rest": [bootstrap(res.rest[:, i], n_boot=n_boot) for i in idx],
        "ratio": [bootstrap(res.first[:, i], ratio, paired=res.rest[:, i], n_boot=n_boot) for i in idx],
    }


def _stage_sinks(models, tokens, sizes, progress, tqdm):
    from lnfree.analysis.geometry import attention_sink_rate

    numbers, results = {"threshold": SINK_THRESHOLD}, {}
    for m in tqdm(models, disable=not progress, desc="attention sinks"):
        res = attention_sink_rate(models[m], tokens, threshold=SINK_THRESHOLD, batch_size=sizes.batch_size)
        results[m] = res
        numbers[m] = {"rate": res.rate, "n_sinks": int(res.is_sink.sum()), "n_heads": int(res.is_sink.numel()),
                      "attention_to_first": res.attention_to_first.tolist(), "top_heads": res.top(5),
                      "n_prompts": res.n_prompts}
    return numbers, results


def _model_info(model) -> dict:
    modes = set(model.ln_modes().values()) if model.ln_sites else {"removed"}
    ln = "LN-free" if model.is_ln_free else ("LN" if modes == {"live"} else "/".join(sorted(modes)))
    cfg = model.cfg
    return {"ln": ln, "ln_modes": sorted(modes), "n_params": int(sum(p.numel() for p in model.parameters())),
            "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_mlp": cfg.d_mlp,
            "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "source": getattr(model, "zoo_name", None)}


def _tokenizer(models: dict, base: str):
    tok = getattr(models[base], "tokenizer", None)
    if tok is not None:
        return tok
    return next((m.tokenizer for m in models.values() if getattr(m, "tokenizer", None) is not None), None)


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
        progress: tqdm bars, one per stage.
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
    from tqdm.auto import tqdm

    models = _check_models(models)
    stages = tuple(STAGES if stages is None else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages or len(set(stages)) != len(stages):
        raise ValueError(f"stages must be a non-empty subset of {STAGES} without repeats, got {list(stages)}")
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
    if token_bytes is None:
        token_bytes = token_byte_lengths(tokenizer)
    if token_bytes is not None and len(token_bytes) < next(iter(models.values())).cfg.d_vocab:
        token_bytes = np.concatenate([token_bytes, np.zeros(next(iter(models.values())).cfg.d_vocab - len(token_bytes),
                                                            dtype=np.int64)])  # padded vocab rows: never in text
    primary = next(iter(data.values()), None)
    numbers: dict = {}
    results: dict = {}
    notes: dict = {}
    timings: dict = {}
    for stage in stages:
        t0 = time.perf_counter()
        if stage == "ce":
            out = _stage_ce(models, data, baseline, sizes, token_bytes, progress, tqdm)
            if token_bytes is None:
                notes["ce"] = "bits per byte not reported: the tokenizer is not a byte-level BPE (or there is none)"
        elif stage == "dla":
            out = _stage_dla(models, _rows(primary, sizes.dla_seqs, sizes.dla_len), sizes, progress, tqdm)
        elif stage == "atp":
            batch, why = _ioi_batch(ioi, tokenizer, sizes.ioi_prompts, models)
            if batch is None:
                notes["atp"] = f"skipped: {why}"
                continue
            out = _stage_atp(models, batch, baseline, sizes, progress, tqdm)
        elif stage == "confidence":
            if any(m.cfg.attn_only for m in models.values()):
                notes["confidence"] = "skipped: attention-only models have no MLP neurons"
                continue
            out = _stage_confidence(models, _rows(primary, sizes.conf_seqs, sizes.conf_len), baseline, sizes,
                                    progress, tqdm)
        elif stage == "first_token_norm":
            out = _stage_first_token(models, _rows(primary, sizes.geom_seqs, sizes.geom_len), sizes, progress, tqdm)
        else:
            out = _stage_sinks(models, _rows(primary, sizes.geom_seqs, sizes.geom_len), sizes, progress, tqdm)
        numbers[stage], results[stage] = out
        timings[stage] = round(time.perf_counter() - t0, 3)
    return ReportData(
        title=title or f"{' vs '.join(models)}: LayerNorm report", models=tuple(models), baseline=baseline,
        datasets=tuple(data), stages=stages, sizes=sizes, numbers=numbers, results=results, notes=notes,
        timings=timings, info={m: _model_info(models[m]) for m in models},
    )


def _ioi_batch(ioi, tokenizer, n: int, models: dict):
    from lnfree.tasks import IOIBatch
    from lnfree.tasks import ioi as make_ioi

    if ioi is not None:
        if not isinstance(ioi, IOIBatch):
            raise TypeError(f"ioi must be an lnfree.tasks.IOIBatch, got {type(ioi).__name__}")
        next(iter(models.values()))._check_tokens(ioi.clean)
        return ioi, None
    if tokenizer is None:
        return None, "the models have no tokenizer, so IOI prompts cannot be written (pass ioi=)"
    try:
        batch = make_ioi(tokenizer, n, seed=0)
        next(iter(models.values()))._check_tokens(batch.clean)
    except ValueError as e:
        return None, f"IOI prompts cannot be built with this tokenizer: {e}"
    return batch, None


# ---- output --------------------------------------------------------------------------------
def write_report(report_data: ReportData, out_dir: PathArg, *, stem: str = "report") -> tuple[Path, Path]:
    """Write ``{stem}.html`` (self-contained: plotly inlined, no network) and ``{stem}.json``.

    Example:
        >>> html_path, json_path = write_report(rd, "out/demo")   # doctest: +SKIP
    """
    from lnfree.report.figures import build_html
    from lnfree.report.html import write_json

    if not isinstance(report_data, ReportData):
        raise TypeError(f"report_data must be a ReportData (from run_report), got {type(report_data).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path = build_html(report_data).write(out / f"{stem}.html")
    json_path = write_json(report_data.to_json(), out / f"{stem}.json")
    return html_path, json_path


def format_summary(report_data: ReportData) -> str:
    """The summary table as fixed-width text (what the commands print).

    Example:
        >>> print(format_summary(rd))       # doctest: +SKIP
    """
    df = report_data.summary()
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")
