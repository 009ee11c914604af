"""Measure SmolLM2-135M beside its norm-free twin (issue 21.5): writes the JSON behind docs/normfree_smollm2.md.

    python scripts/normfree_smollm2_measure.py --twin smollm2-135m-normfree --run runs/smollm2-normfree/run \
        --out docs/normfree_smollm2.json [--rows 1024 --cfi-rows 512 --threads 2]

Every number is on text no run trained on (the package's held-out Persuasion and cfi rows, ``[BOS] + 63``
tokens each). CIs resample sequences (prompts for the entropy-neuron ablation): the unit that varies
independently. Sections: held-out CE (paired per-sequence difference twin - original), DLA vs the exact
direct effect (NMAE over every head), the entropy neuron L29N371 (total vs direct entropy change), the
first-token norm ratio and the attention-sink rate, and the run's loss curve (from its log.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _est(e) -> dict:
    return {"value": float(e.value), "low": float(e.low), "high": float(e.high), "n": int(e.n)}


def measure(models: dict, rows: int, cfi_rows: int, small: int) -> dict:
    import lnfree
    from lnfree import zoo

    first = next(iter(models.values()))
    out: dict = {"settings": {"rows": rows, "cfi_rows": cfi_rows, "seq_len": 64, "small_rows": small}}
    for name, n in (("persuasion", rows), ("cfi", cfi_rows)):
        tokens = zoo.heldout(name, model=first, seq_len=64)[:n]
        cmp = lnfree.compare_cross_entropy(models["twin"], models["original"], tokens, names=("twin", "original"))
        out[f"ce_{name}"] = {"twin": _est(cmp.a.mean), "original": _est(cmp.b.mean),
                             "difference": _est(cmp.difference()), "tokens": int(tokens.numel())}
        print(name, out[f"ce_{name}"], flush=True)
    tokens = zoo.heldout("persuasion", model=first, seq_len=64)[:small]
    for key, model in models.items():
        t0 = time.time()
        dla = lnfree.direct_logit_attribution(model, tokens, components="heads")
        abl = lnfree.ablate_neurons(model, tokens, ["L29N371"])
        norms = lnfree.first_token_norm(model, tokens)
        sinks = lnfree.attention_sink_rate(model, tokens)
        out[key] = {
            "dla_nmae_heads_%": _est(dla.nmae()),
            "L29N371_entropy_change_total_%": _est(abl.relative_change(0, "entropy", "total")),
            "L29N371_entropy_change_direct_%": _est(abl.relative_change(0, "entropy", "direct")),
            "first_token_norm_max_ratio": _est(norms.max_ratio()),
            "sink_rate": _est(sinks.rate),
            "ln_modes": sorted(set(model.ln_modes().values())), "norm_free": model.is_norm_free,
            "seconds": round(time.time() - t0, 1),
        }
        print(key, out[key], flush=True)
    return out


def loss_curve(run: Path) -> dict:
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    steps = [s for s in steps if s.get("event") == "step"]
    freezes = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"freeze"' in line]
    return {"step": [s["step"] for s in steps], "kl": [s.get("kl") for s in steps], "ce": [s["ce"] for s in steps],
            "freeze_steps": [f["step"] for f in freezes]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--twin", default="smollm2-135m-normfree", help="the norm-free model (zoo name or directory)")
    ap.add_argument("--run", default=None, help="the removal run directory (its log.jsonl gives the loss curve)")
    ap.add_argument("--out", default="docs/normfree_smollm2.json")
    ap.add_argument("--rows", type=int, default=1024, help="held-out Persuasion rows of 64 tokens for CE")
    ap.add_argument("--cfi-rows", type=int, default=512, help="held-out cfi rows of 64 tokens for CE")
    ap.add_argument("--small-rows", type=int, default=32, help="rows for DLA, ablation, norms and sinks")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import lnfree

    models = {"original": lnfree.load("smollm2-135m"), "twin": lnfree.load(args.twin)}
    result = {"twin": args.twin, "date": time.strftime("%Y-%m-%d"), **measure(models, args.rows, args.cfi_rows,
                                                                             args.small_rows)}
    if args.run:
        result["loss_curve"] = loss_curve(Path(args.run))
        summary = Path(args.run) / "summary.json"
        if summary.exists():
            result["run_summary"] = {k: v for k, v in json.loads(summary.read_text()).items()
                                     if k in ("steps", "tokens", "wall_time_s", "rollbacks", "variant", "norm_free")}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
