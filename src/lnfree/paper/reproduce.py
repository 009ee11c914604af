"""``lnfree reproduce FIGURE``: the paper's numbers via `lnfree.paper`, written as FIGURE.json + FIGURE.html.

Defaults are the paper's models for each figure (`PAPER_MODELS`: GPT-2 Small, its vanilla
fine-tune and the released LN-free checkpoint; GPT-2 Medium where the paper's code used Medium) and
data sets (Hugging Face hub, the optional `datasets` package). Offline, pass
``--models`` (zoo names, local checkpoint directories) and ``--data`` (.npy token arrays, text);
zoo models default to the zoo's held-out sets. Without the hub and without them the command fails
within seconds saying so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lnfree._errors import CLIError
from lnfree.training.device import set_threads

SMALL = ("gpt2", "schaeff/gpt2-small_vanilla300", "schaeff/gpt2-small_LNFree300")  # load_models.py:219-223
MEDIUM = ("gpt2-medium", "schaeff/gpt2-medium_vanilla500", "schaeff/gpt2-medium_LNFree500")  # :224-228
#: figure -> the models the paper's code ran it on (the file and line that choose them).
PAPER_MODELS = {
    "table1": SMALL,  # Table 1 lists every size; Small is its first block
    "dla": SMALL,  # attention_head_attribution/run_analysis.py:425, model_str = 'small'
    "atp": SMALL,  # attribution_patching/attr_vs_act_patching_(per_prompt).py:113, model_size="small"
    "entropy": SMALL,  # entropy_neurons/ablate_all_models.py:504-507 (the Small neurons, model_size = 'small')
    "first-token-norm": MEDIUM,  # residual_stream/residual_norms.py:667, model_str = 'medium'
    # sink_rate.py:166-167: Medium, the vanilla fine-tune and the LN-free checkpoint exactly as named there
    "sink-rate": ("schaeff/gpt-2medium_vanilla500", "submarat/gpt2-medium-noln-aux"),
}
#: figure -> what it is, the paper's data set, the paper's sample count (quick: a smoke-run count).
FIGURES = {
    "table1": {"what": "held-out cross-entropy (Table 1)", "data": ("pile-apollo-luca", "openwebtext", "pile-10k"),
               "n": 10000, "quick": 8, "max_context": None},
    "dla": {"what": "DLA vs direct effect of every head: NMAE (%)", "data": ("luca-pile",), "n": 1000, "quick": 6,
            "max_context": 512},
    "atp": {"what": "attribution vs activation patching on IOI resid_pre: per-layer error", "data": (), "n": 480,
            "quick": 4, "max_context": None},
    "entropy": {"what": "entropy-neuron mean ablation: per-token |dCE|, |dH| median [IQR]", "data": ("luca-pile",),
                "n": 250, "quick": 4, "max_context": 512},
    "first-token-norm": {"what": "residual L2 norms, first token vs the rest, per site", "data": ("luca-pile",),
                         "n": 1000, "quick": 4, "max_context": 512},
    "sink-rate": {"what": "attention-sink rate (attention to position 0 > 0.3)", "data": ("pile-apollo-luca",),
                  "n": 1000, "quick": 8, "max_context": 512},
}
#: the key of each figure's numbers in FIGURE.json, as in the report's JSON (lnfree.report.pipeline stages).
STAGE = {"table1": "ce", "dla": "dla", "atp": "atp", "entropy": "confidence", "first-token-norm": "first_token_norm",
         "sink-rate": "sink_rate"}


def _err(msg: str) -> CLIError:
    return CLIError(msg)


# ---- models and data ------------------------------------------------------------------------
def _default_load(spec: str, device=None):
    """`lnfree.load`, its errors as one CLI line (the CLI passes its own resolver instead)."""
    import lnfree

    try:
        return lnfree.load(spec, device=device)
    except (ValueError, TypeError, OSError, ConnectionError) as e:
        raise _err(f"cannot load model {spec!r}: {' '.join(str(e).split())}") from None


def _default_names(specs) -> list[str]:
    out = []
    for s in specs:
        name, i = Path(str(s)).name or str(s), 2
        while name in out:
            name, i = f"{Path(str(s)).name}-{i}", i + 1
        out.append(name)
    return out


def _default_load_data(specs, model, seq_len=None) -> dict:
    """.npy token arrays [n, pos] only (the CLI passes its richer reader: streams, text files)."""
    import numpy as np

    out = {}
    for spec in specs:
        arr = np.load(spec, allow_pickle=False)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise _err(f"data {spec!r} must be integer token ids [n, pos]")
        out[Path(spec).stem] = torch.from_numpy(arr.astype(np.int64))
    return out


def _load_models(specs, device, load, names) -> dict:
    return {name: load(spec, device=device) for name, spec in zip(names(specs), specs)}


def _hub_rows(name: str, tokenizer, n: int, max_context) -> torch.Tensor:
    """The paper's evaluation rows for `name` from the hub (see `lnfree.paper.table1.paper_eval_tokens`)."""
    try:
        import datasets
    except ImportError:
        raise _err("the paper's data sets need the `datasets` package (pip install datasets) and the Hugging Face "
                   "hub; offline, pass --data with .npy token arrays or text files") from None
    from lnfree.paper.table1 import paper_eval_tokens

    try:
        if name == "luca-pile":  # load_dataset.py:358-381: shuffle(seed=42).take(n), first 512 tokens each
            ds = datasets.load_dataset("lucabaroni/apollo-pile-filtered-10k", streaming=True, split="train")
            rows = torch.tensor([ex["input_ids"][:max_context] for ex in ds.shuffle(seed=42).take(n)])
        else:
            rows = paper_eval_tokens(name, tokenizer, num_samples=n)
    except Exception as e:  # network, missing dataset: one clear line
        raise _err(f"cannot read the paper's data set {name!r} from the hub ({' '.join(str(e).split())}); offline, "
                   "pass --data with .npy token arrays or text files") from None
    return rows if max_context is None else rows[:, :max_context]


def _data(args, fig: str, model, load_data, zoo_data) -> dict:
    """--data when given; else the zoo's held-out sets for zoo-tokenizer models; else the paper's (hub)."""
    spec = FIGURES[fig]
    if args.data:
        data = load_data(args.data, model, args.seq_len)
    else:
        data = zoo_data(model) if args.models and zoo_data is not None else None
        if data is None:
            n = spec["quick"] if args.quick else spec["n"]
            data = {name: _hub_rows(name, model.tokenizer, n, spec["max_context"]) for name in spec["data"]}
    if args.quick:
        data = {k: v[: spec["quick"]] for k, v in data.items()}
    return data


# ---- figures ----------------------------------------------------------------------------------
def _first(data: dict):
    name = next(iter(data))
    return name, data[name]


def _table1(models, data, args, out):
    import lnfree.paper as P

    numbers, figs = {}, []
    import plotly.graph_objects as go

    fig = go.Figure()
    for dname, tokens in data.items():
        batch = P.table1.PAPER_BATCH if tokens.shape[0] >= P.table1.PAPER_BATCH else tokens.shape[0]
        res = {m: P.table1_ce(model, tokens, batch_size=batch) for m, model in models.items()}
        numbers[dname] = {m: {"ce": r.ce, "n_sequences": r.n_sequences, "n_dropped": r.n_dropped,
                              "batch_size": r.batch_size} for m, r in res.items()}
        fig.add_trace(go.Bar(name=dname, x=list(res), y=[r.ce.value for r in res.values()],
                             error_y=dict(type="data", symmetric=False,
                                          array=[r.ce.high - r.ce.value for r in res.values()],
                                          arrayminus=[r.ce.value - r.ce.low for r in res.values()])))
        out.append(f"{dname}: " + ", ".join(f"{m} {r.ce:.4f}" for m, r in res.items()))
    fig.update_layout(barmode="group", title="Cross-entropy (nats/token), the paper's evaluation",
                      xaxis_title="model", yaxis_title="CE (nats/token)")
    return numbers, [fig]


def _dla(models, data, args, out):
    import lnfree.paper as P

    dname, tokens = _first(data)
    numbers, res = {"data": dname}, {}
    for m, model in models.items():
        r = res[m] = P.paper_dla(model, tokens, progress=False)
        numbers[m] = {"nmae_percent": r.nmae, "per_head_nmae_percent": dict(zip(r.labels, r.per_head.tolist()))}
        out.append(f"{m}: NMAE {r.nmae:.3g} %")
    return numbers, [_dla_figure(res)]


def _dla_figure(res: dict):
    """One heatmap [layer, head] per model on one colour scale from 0 (white) to the largest NMAE of any
    model, so the panels compare: an LN-free model's zero error is white, not its own mid-scale."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from lnfree.paper.dla import NMAE_COLORSCALE

    maps = {m: r.per_head.reshape(1 + max(int(lab[1:].split("H")[0]) for lab in r.labels), -1).numpy()
            for m, r in res.items()}
    top = max(max(float(z.max()) for z in maps.values()), 1e-9)
    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=[f"{m}: NMAE {res[m].nmae:.3g} %" for m in maps])
    for c, z in enumerate(maps.values(), start=1):
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis"), row=1, col=c)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=c)
        fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed", row=1, col=c)
    fig.update_layout(title="Per-head NMAE (%), DLA vs direct effect; one colour scale, 0 = white",
                      coloraxis=dict(colorscale=NMAE_COLORSCALE, cmin=0, cmax=top, colorbar=dict(title="NMAE (%)")))
    return fig


def _sink(models, data, args, out):
    import plotly.graph_objects as go

    import lnfree.paper as P

    dname, tokens = _first(data)
    numbers = {"data": dname}
    for m, model in models.items():
        paper, boot = P.sink_rate(model, tokens), P.sink_rate(model, tokens, ci="bootstrap")
        numbers[m] = {"sink_rate": paper, "sink_rate_bootstrap_ci": boot}
        out.append(f"{m}: sink rate {paper:.4f} (batch 2.5-97.5% range), bootstrap CI {boot:.4f}")
    fig = go.Figure(go.Bar(x=list(models), y=[numbers[m]["sink_rate"].value for m in models]))
    fig.update_layout(title="Attention-sink rate (attention to position 0 > 0.3)", xaxis_title="model",
                      yaxis_title="sink rate")
    return numbers, [fig]


def _norms(models, data, args, out):
    import lnfree.paper as P

    dname, tokens = _first(data)
    numbers, figs = {"data": dname}, []
    for m, model in models.items():
        r = P.first_token_norm(model, tokens)
        numbers[m] = {"frame": r.to_frame(), "final_first": r.final_first(), "final_rest": r.final_rest()}
        figs.append(r.plot())
        out.append(f"{m}: final first-token norm {r.final_first():.4g}, other tokens {r.final_rest():.4g}")
    return numbers, figs


def _entropy(models, data, args, out):
    import lnfree.paper as P
    from lnfree.paper.entropy import _top_neurons, paper_neurons

    dname, tokens = _first(data)
    base = next(iter(models.values()))
    neurons = paper_neurons(base) or _top_neurons(base, base.cfg.n_layers - 1)
    numbers, figs = {"data": dname, "neurons": list(neurons)}, []
    for m, model in models.items():
        r = P.entropy_neuron_ablation(model, tokens, neurons=neurons)
        numbers[m] = {"table": r.to_frame(),
                      "lnfree_ln_mediated_fraction_entropy": dict(zip(r.labels, r.lnfree_fraction))}
        figs.append(r.plot("loss"))
        out.append(f"{m}: " + ", ".join(f"{lab} |dCE| {r.summary(n, 'loss'):.4f}" for n, lab in zip(r.neurons, r.labels)))
    return numbers, figs


def _atp(models, data, args, out):
    import lnfree.paper as P

    base = next(iter(models.values()))
    if getattr(base, "tokenizer", None) is None:
        raise _err("the atp figure writes IOI prompts: the first model needs a tokenizer (GPT-2's)")
    n = FIGURES["atp"]["quick"] if args.quick else FIGURES["atp"]["n"]
    try:
        prompts = P.ioi_prompts(base.tokenizer, n=n, seed=0)
    except ValueError as e:
        raise _err(f"atp: {e}") from None
    if data:
        print("note: the atp figure uses IOI prompts; --data is not used", file=sys.stderr)
    cmp = P.compare_ioi_atp(models, prompts)
    numbers = {"n_prompts": n, "prompt_seed": 0, "table": cmp.table(),
               "per_layer_error": {nm: r.error for nm, r in zip(cmp.names, cmp.results)}}
    for nm, r in zip(cmp.names, cmp.results):
        out.append(f"{nm}: error {r.mean_over_layers:.4f} +- {r.sd_over_layers:.4f} (mean +- sd over layers)")
    return numbers, [cmp.plot()]


COMPUTE: dict[str, Callable] = {"table1": _table1, "dla": _dla, "sink-rate": _sink, "first-token-norm": _norms,
                                "entropy": _entropy, "atp": _atp}


def run_reproduce(args, *, load=None, names=None, load_data=None, zoo_data=None) -> int:
    """Run one figure (argparse namespace from ``lnfree reproduce``); returns the exit code.

    The CLI passes its model resolver (`load`), display names (`names`), data reader
    (`load_data`) and zoo held-out lookup (`zoo_data`); the defaults are `lnfree.load`, base
    names, ``.npy`` rows and none.

    Example:
        >>> from lnfree.cli import main
        >>> main(["reproduce", "dla", "--models", "tiny-ln", "tiny-lnfree", "--quick"])   # doctest: +SKIP
    """
    from lnfree.report.html import Report, write_json

    t0 = time.perf_counter()
    set_threads(getattr(args, "threads", None))
    fig = args.figure
    if fig not in FIGURES:
        raise _err(f"FIGURE must be one of {', '.join(FIGURES)}, got {fig!r}")
    specs = list(args.models or PAPER_MODELS[fig])
    models = _load_models(specs, args.device, load or _default_load, names or _default_names)
    base = next(iter(models.values()))
    data = {} if fig == "atp" else _data(args, fig, base, load_data or _default_load_data, zoo_data)
    lines: list[str] = []
    numbers, figures = COMPUTE[fig](models, data, args, lines)
    out = Path(args.out or f"out/reproduce/{fig}")
    payload = {"figure": fig, "what": FIGURES[fig]["what"], "models": dict(zip(models, specs)),
               "data": {k: list(v.shape) for k, v in data.items()}, "quick": bool(args.quick),
               "definitions": "docs/paper.md", "results": {STAGE[fig]: numbers}}
    json_path = write_json(payload, out / f"{fig}.json")
    report = Report(f"lnfree reproduce {fig}: {FIGURES[fig]['what']}")
    report.text("Computed as the paper's code does (lnfree.paper); definitions and differences: docs/paper.md.")
    for line in lines:
        report.text(line)
    for f in figures:
        report.figure(f)
    html_path = report.write(out / f"{fig}.html")
    print("\n".join(lines))
    print(f"report: {html_path}\nnumbers: {json_path}\ntotal {time.perf_counter() - t0:.1f} s")
    return 0
