"""Norm-free SmolLM2-135M on one GPU: the removal fine-tune (bf16) and its vanilla control, then the numbers.

Prepared for a lent GPU (docs/normfree_smollm2.md); no GPU was lent in the session that wrote it, so it
has run on CPU only in its --smoke form. One call does everything and writes OUT/results.json (held-out
CE for original / vanilla / norm-free, DLA NMAE and the entropy-neuron ablation before/after, loss
curves, wall times) and the two runs' log.jsonl/summary.json; weights stay on the machine unless
--keep-weights.

    python scripts/normfree_smollm2_gpu.py --out runs/smollm2 [--variant distill|full|lora]
    python scripts/normfree_smollm2_gpu.py --out /tmp/s --smoke          # 3 steps, tiny batch, CPU ok

The schedule (docs/normfree_smollm2.md, "The schedule that works"): the paper's order froze 18 ln2 sites at
once and every CPU run hit NaN at the next step, so sites are frozen one at a time, cheapest first by their
measured single-site cost (docs/smollm2_site_order.json, written by scripts/smollm2_site_costs.py):
`Schedule.from_order(30, steps, order_by_cost(costs), start=20, gap=2)`, each freeze phased in over
`--freeze-ramp 10` steps (per-token scale live^(1-a) sigma^a), aux lambda 0.01, lr 3e-4 -> 3e-5. Defaults: 300 steps
of 128 x 1024 tokens (39M tokens per run; estimated 3-4 minutes on one H200 in bf16, the vanilla control the
same), which fits a 15-minute device budget with loading and evaluation.

The corpus (--corpus, default $LNFREE_CORPUS or /work/shared/corpus) needs train/*.txt and
heldout/{austen_persuasion,cfi_en}.txt; copy it into the working tree (e.g. data/corpus/) when the
device machine cannot see /work/shared.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil
import time
import traceback
from pathlib import Path


def _heldout(model, corpus: Path, seq_len: int, rows: int) -> dict:
    import numpy as np
    import torch

    from lnfree.removal import load_tokens

    out = {}
    for name, f in (("persuasion", "austen_persuasion.txt"), ("cfi", "cfi_en.txt")):
        arr = load_tokens([corpus / "heldout" / f], seq_len=seq_len, tokenizer=model.tokenizer,
                          max_tokens=rows * seq_len + seq_len)[:rows]
        out[name] = torch.as_tensor(np.asarray(arr).astype("int64"))
    return out


def _measure(model, held: dict, batch: int) -> dict:
    """CE per held-out set; DLA NMAE and the entropy-neuron ablation (best effort: recorded errors)."""
    from lnfree.evaluation import cross_entropy

    res = {"ce": {k: cross_entropy(model, v, batch_size=batch, progress=False).mean.to_dict() for k, v in held.items()}}
    toks = held["persuasion"][:16, :128].to(next(model.parameters()).device)
    try:
        from lnfree import direct_logit_attribution

        est = direct_logit_attribution(model, toks).nmae()
        est = est[0] if isinstance(est, tuple) else est
        res["dla_nmae_percent"] = est.to_dict() if hasattr(est, "to_dict") else float(est)
    except Exception as e:  # the analysis API belongs to other modules; never lose the CE numbers
        res["dla_error"] = f"{type(e).__name__}: {e}"
    try:
        from lnfree import ablate_neurons, find_entropy_neurons

        found = find_entropy_neurons(model, layer=model.cfg.n_layers - 1)
        abl = ablate_neurons(model, toks, found.top(1) if hasattr(found, "top") else found)
        res["entropy_neuron_ablation"] = str(abl)[:2000]
    except Exception as e:
        res["entropy_error"] = f"{type(e).__name__}: {e}"
    return res


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=os.environ.get("LNFREE_CORPUS", "/work/shared/corpus"))
    p.add_argument("--variant", choices=["full", "lora", "distill"], default="distill")
    p.add_argument("--steps", type=int, default=300, help="last site at start + 90 x gap, then ramp, then recovery")
    p.add_argument("--batch-size", type=int, default=128, help="128 x 1024 tokens per step: fits the 15-minute budget "
                   "(the paper: 512; its data scaling predicts ~168M tokens for 135M parameters)")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=3e-5)
    p.add_argument("--order", default=str(Path(__file__).resolve().parents[1] / "docs" / "smollm2_site_order.json"),
                   help="site -> single-site cost (JSON); frozen cheapest first. 'paper': Schedule.scaled(30, steps)")
    p.add_argument("--site-start", type=int, default=20)
    p.add_argument("--site-gap", type=int, default=2)
    p.add_argument("--freeze-ramp", type=int, default=10)
    p.add_argument("--aux-lambda", type=float, default=0.01, help="0.01: SmolLM2's aux loss is ~10x its CE at the "
                   "paper's Small value 0.1 (docs/normfree_smollm2.md, CPU runs)")
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--no-vanilla", action="store_true", help="skip the vanilla control")
    p.add_argument("--keep-weights", action="store_true")
    p.add_argument("--smoke", action="store_true", help="3 steps, 4 x 64 tokens: checks the script end to end")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch_size, a.micro_batch_size, a.seq_len, a.eval_rows = 5, 4, 2, 64, 2
        a.site_start, a.site_gap, a.freeze_ramp = 1, 0, 1  # every site frozen at step 1, ramped over 1 step
    from lnfree import zoo
    from lnfree.removal import Schedule, load_tokens, remove_layernorm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out, corpus = Path(a.out), Path(a.corpus)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(a), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1))

    t0 = time.time()
    original = zoo.load("smollm2-135m", device=device)
    results["load_s"] = round(time.time() - t0, 1)
    held = _heldout(original, corpus, a.seq_len, a.eval_rows)
    files = sorted(glob.glob(str(corpus / "train" / "*.txt")))
    need = a.steps * a.batch_size * a.seq_len
    rows = load_tokens(files, seq_len=a.seq_len, tokenizer=original.tokenizer, max_tokens=int(need * 1.05) + a.seq_len)
    results["train_rows"], results["train_tokens_needed"] = int(rows.shape[0]), need
    results["original"] = _measure(original, held, 4)
    save()
    if a.order == "paper":
        sched, ramp = Schedule.scaled(original.cfg.n_layers, a.steps), 0
    else:
        from lnfree.removal.cli import schedule_from_order_file

        sched = schedule_from_order_file(a.order, original.cfg.n_layers, a.steps, a.site_start, a.site_gap)
        ramp = a.freeze_ramp
    results["schedule"] = {**sched.to_dict(), "freeze_ramp": ramp}
    variant = {"full": {}, "lora": {"lora_rank": 64, "lr": 1e-3}, "distill": {"distill": 0.5}}[a.variant]
    runs = [("normfree", False)] + ([] if a.no_vanilla else [("vanilla", True)])
    for name, vanilla in runs:
        run_dir = out / name
        t1 = time.time()
        try:
            kw = ({"lr": a.lr, "min_lr": a.min_lr, "aux_lambda": a.aux_lambda, "freeze_ramp": ramp, **variant}
                  if not vanilla else {"lr": a.lr, "min_lr": a.min_lr})
            model = remove_layernorm(copy.deepcopy(original), rows, schedule=sched, batch_size=a.batch_size,
                                     micro_batch_size=a.micro_batch_size, seq_len=a.seq_len, vanilla=vanilla,
                                     bf16=device == "cuda", out_dir=run_dir, resume="auto", progress=False,
                                     checkpoint_every=max(1, a.steps // 4), **kw)
            results[name] = {"wall_s": round(time.time() - t1, 1), "summary": model.removal_summary,
                             **_measure(model, held, 4)}
            del model
        except Exception as e:  # e.g. DivergedError: the fail-safe's one line, and the curve up to it
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if (run_dir / "log.jsonl").is_file():
            log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
            results[name]["loss_curve"] = [(r["step"], round(r["loss"], 4), round(r["ce"], 4), round(r["aux"], 4),
                                            round(r.get("kl", 0.0), 4)) for r in log if r.get("event") == "step"]
            results[name]["rollbacks"] = [r for r in log if r.get("event") == "rollback"]
        if not a.keep_weights:
            for sub in ("checkpoints", "final", "final_tl"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        if device == "cuda":
            results[name]["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        save()
    results["total_s"] = round(time.time() - t0, 1)
    save()
    print(json.dumps({k: results[k] for k in ("device", "total_s")}))


if __name__ == "__main__":
    main()
