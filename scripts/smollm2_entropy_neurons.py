"""Entropy-neuron candidates of SmolLM2-135M's last layers: detection, mean ablation (total vs direct), calibration.

Text: the zoo's held-out books (decoded from the family's tokens, re-tokenized with SmolLM2's own
tokenizer, no BOS as the model's config says), cut into rows of --seq-len tokens.

    PYTHONPATH=src python scripts/smollm2_entropy_neurons.py --out out/smollm2_entropy.json

Prints one row per candidate (score, rho, ||w_out||, relative entropy change total / direct with CIs,
LN-mediated fraction with CI, per-token median |dH|), then calibration, and writes every number as JSON.

Read the ablations with care: "direct" freezes only the final RMSNorm scale, so for layers before the last
it still includes every later layer's response; and a neuron with massive activations (SmolLM2's L28N678
fires at ~2350 on the first token, ~9 elsewhere) is changed everywhere by mean ablation, so its large
effect says nothing about entropy regulation. 16 x 64 tokens take ~40 min on 2 busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def heldout_rows(model, n_rows: int, seq_len: int, books=("persuasion", "cfi")) -> torch.Tensor:
    from lnfree import zoo

    family = zoo.tokenizer()
    ids: list[int] = []
    for book in books:
        text = family.decode(zoo.heldout(book)[:, 1:].reshape(-1).tolist())
        ids += model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(n_rows, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def est(e) -> dict:
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[27, 28, 29])
    p.add_argument("--top", type=int, default=5, help="candidates per layer")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import lnfree
    from lnfree.analysis.calibration import calibration
    from lnfree.analysis.confidence import ablate_neurons, find_entropy_neurons

    t0 = time.time()
    model = lnfree.zoo.load("smollm2-135m", device="cpu")
    tokens = heldout_rows(model, args.n_prompts, args.seq_len)
    out = {"model": "smollm2-135m", "tokens": list(tokens.shape), "layers": {}}
    print(f"SmolLM2-135M, {tokens.shape[0]} x {tokens.shape[1]} tokens of held-out text (loaded in {time.time() - t0:.0f}s)")
    header = (f"{'neuron':>9} {'score':>8} {'rho':>6} {'|w_out|':>7} {'dH total %':>24} {'dH direct %':>24} "
              f"{'norm-mediated':>24} {'med|dH|':>8}")
    for layer in args.layers:
        found = find_entropy_neurons(model, layer=layer, n_top=args.top)
        abl = ablate_neurons(model, tokens, found, batch_size=args.batch_size)  # one set per neuron
        cum = ablate_neurons(model, tokens, found.neurons(3), cumulative=True, batch_size=args.batch_size,
                             means=abl.mean_activation[:3])  # the same means: skips a pass
        print(f"\nlayer {layer} (null_dim {found.null_dim}; median score {float(found.score.median()):.3g}, "
              f"median rho {float(found.rho.median()):.3f})\n{header}")
        rows = []
        for i, label in enumerate(abl.labels):
            r = {"label": label, "score": float(found.score[i]), "rho": float(found.rho[i]),
                 "norm": float(found.norm[i]), "logit_var": float(found.logit_var[i]),
                 "entropy_total_%": est(abl.relative_change(i, "entropy", "total")),
                 "entropy_direct_%": est(abl.relative_change(i, "entropy", "direct")),
                 "ce_total_%": est(abl.relative_change(i, "ce", "total")),
                 "norm_mediated_fraction": est(abl.ln_mediated_fraction(i, "entropy")),
                 "median_abs_dH_total": float(abl.per_token(i, "entropy", "total").abs().median()),
                 "median_abs_dH_direct": float(abl.per_token(i, "entropy", "direct").abs().median())}
            rows.append(r)
            f = lambda e: f"{e['value']:8.3f} [{e['low']:6.3f}, {e['high']:6.3f}]"  # noqa: E731
            print(f"{label:>9} {r['score']:8.3g} {r['rho']:6.3f} {r['norm']:7.3f} {f(r['entropy_total_%'])} "
                  f"{f(r['entropy_direct_%'])} {f(r['norm_mediated_fraction'])} {r['median_abs_dH_total']:8.4f}")
        c = {"set": cum.labels[-1], "entropy_total_%": est(cum.relative_change()),
             "entropy_direct_%": est(cum.relative_change(-1, "entropy", "direct")),
             "norm_mediated_fraction": est(cum.ln_mediated_fraction())}
        print(f"  top 3 together {c['set']}: dH total {cum.relative_change()}, direct "
              f"{cum.relative_change(-1, 'entropy', 'direct')}, norm-mediated {cum.ln_mediated_fraction()}")
        out["layers"][layer] = {"null_dim": found.null_dim, "candidates": rows, "top3_together": c,
                                "median_score": float(found.score.median()), "median_rho": float(found.rho.median())}
    cal = calibration(model, tokens, batch_size=args.batch_size)
    out["calibration"] = {"mean_entropy": est(cal.mean_entropy), "ece": est(cal.ece), "accuracy_top1": est(cal.accuracy_top1)}
    print(f"\ncalibration: mean entropy {cal.mean_entropy} nats, ECE {cal.ece}, top-1 accuracy {cal.accuracy_top1}")
    print(f"total {time.time() - t0:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
