"""Measure each departure of the paper's recipe from lnfree's on the embedded family's tiny-ln (CE of the result).

Each run fine-tunes a fresh copy of ``tiny-ln`` with the removal procedure on the shared corpus's training
text ([BOS] + 127-token rows, as the zoo was pretrained), the same data, seed and steps, changing one
switch of `lnfree.removal.schedule.RECIPE_KEYS` (or all of them), and scores the LN-free result on the
shipped Persuasion held-out rows. Paired differences against lnfree's recipe use the same rows. Every arm
runs once per training seed (`--seeds`: data order) and per micro-batch size (`--micro-batch-sizes`: the
EMA's granularity); an arm's difference is the mean over seeds of its paired difference, with a t
interval over seeds. The LR horizon (the paper's setting only for Large and XL) is measured alone and in
"all (Large/XL)", not in "all (Small/Medium)". tie_embeddings is not measured: tiny-ln was trained untied.

    python scripts/measure_paper_departures.py --out docs/paper_departures.json [--steps 100] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time

CORPUS = os.environ.get("LNFREE_CORPUS", "corpus")


def main(argv=None) -> None:
    import numpy as np
    import torch

    from lnfree import zoo
    from lnfree.evaluation import cross_entropy
    from lnfree.removal import remove_layernorm
    from lnfree.removal.data import chunk_with_bos
    from lnfree.stats import bootstrap
    from lnfree.zoo.train import tokenize_files

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=48)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base = zoo.load("tiny-ln", device="cpu")
    tok = zoo.tokenizer()
    files = sorted(glob.glob(f"{CORPUS}/train/*.txt"))
    if not files:
        raise SystemExit(f"no {CORPUS}/train/*.txt: set LNFREE_CORPUS to a folder with train/*.txt")
    stream = tokenize_files(files, tok)
    rows = chunk_with_bos(stream, a.seq_len, 0)
    need = a.steps * a.batch_size
    rows = rows[np.random.default_rng(0).permutation(len(rows))[: need + 64]]
    held = zoo.heldout("persuasion")[: a.eval_rows]
    small_medium = {"share_ln1_sigma": True, "ln1_momentum_power": 3, "mask_eot_labels": True,
                    "no_decay": "bias", "warmup_from_zero": True, "dropout": 0.1}
    variants = {
        "lnfree": None,
        "share_ln1_sigma": {"share_ln1_sigma": True},
        "ln1_momentum_power=3": {"ln1_momentum_power": 3},
        "mask_eot_labels": {"mask_eot_labels": True},
        "no_decay=bias": {"no_decay": "bias"},
        "horizon=2x steps": {"horizon": 2 * a.steps},
        "warmup_from_zero": {"warmup_from_zero": True},
        "dropout=0.1": {"dropout": 0.1},
        "all (Small/Medium)": small_medium,
        "all (Large/XL)": {**small_medium, "horizon": 2 * a.steps},
    }
    results = {"settings": vars(a), "base_ce": None, "runs": {}, "summary": {}}
    r0 = cross_entropy(base, held, batch_size=8, progress=False)
    results["base_ce"] = r0.mean.to_dict()
    for mbs in a.micro_batch_sizes:
        for seed in a.seeds:
            per_seq = {}
            for name, recipe in variants.items():
                t0 = time.time()
                model = remove_layernorm(copy.deepcopy(base), rows, steps=a.steps, batch_size=a.batch_size,
                                         micro_batch_size=mbs, seq_len=a.seq_len, recipe=recipe, seed=seed,
                                         eot_token_id=0, progress=False)
                r = cross_entropy(model, held, batch_size=8, progress=False)
                per_seq[name] = r.per_sequence.double().numpy()
                entry = {"recipe": recipe, "micro_batch_size": mbs, "seed": seed, "ce": r.mean.to_dict(),
                         "wall_s": round(time.time() - t0, 1), "ln_free": model.is_ln_free,
                         "rollbacks": model.removal_summary["rollbacks"]}
                if name != "lnfree":
                    entry["minus_lnfree"] = bootstrap(per_seq[name] - per_seq["lnfree"], seed=0).to_dict()
                results["runs"][f"{name} | micro {mbs} | seed {seed}"] = entry
                print(name, json.dumps(entry), flush=True)
            _summarise(results, variants, mbs, a.seeds)
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)


#: two-sided 95% t quantiles by degrees of freedom (a CI over 3 seeds is a t interval, not a bootstrap)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _summarise(results: dict, variants: dict, mbs: int, seeds) -> None:
    """Per arm: mean over the seeds run so far of the paired CE difference, with a t interval over seeds."""
    import numpy as np

    for name in variants:
        if name == "lnfree":
            continue
        d = np.array([results["runs"][k]["minus_lnfree"]["value"] for k in results["runs"]
                      if k.startswith(f"{name} | micro {mbs} |")])
        mean = float(d.mean())
        half = _T95.get(len(d) - 1, 1.96) * float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else None
        results["summary"][f"{name} | micro {mbs}"] = {  # one seed: no interval (None)
            "mean_minus_lnfree": mean, "low": None if half is None else mean - half,
            "high": None if half is None else mean + half, "n_seeds": int(len(d)), "per_seed": d.tolist()}

if __name__ == "__main__":
    main()
