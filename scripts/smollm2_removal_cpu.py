"""A few removal steps on SmolLM2-135M on CPU with each variant (full, LoRA, distillation).

Each variant runs in its own process (so peak resident memory is that variant's), on the shared corpus's
training text (no BOS, documents joined by end-of-text, as in the paper), and records step times, peak
memory, the loss curve and held-out CE before/after in one JSON file.

    python scripts/smollm2_removal_cpu.py --out docs/smollm2_cpu_runs.json --steps 12 --stop-after 5 \
        --batch-size 2 --micro-batch-size 2 --seq-len 64 --eval-rows 2 [--variants full lora distill]
    # the schedule that works on SmolLM2: one site per step, cheapest first (docs/normfree_smollm2.md)
    python scripts/smollm2_removal_cpu.py --out docs/smollm2_cpu_runs.json --order docs/smollm2_site_order.json \
        --steps 100 --site-start 1 --site-gap 1 --freeze-ramp 2 --stop-after 12 --lr 1e-4 --aux-lambda 0.01 --warmup 1 \
        --batch-size 2 --micro-batch-size 2 --seq-len 64 --eval-rows 2 --previous old_runs.json

Without --order the schedule is `Schedule.scaled(30, steps)` (the paper's order; the runs of 2026-12-01).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

CORPUS = os.environ.get("LNFREE_CORPUS", "corpus")
VARIANTS = {"full": {}, "lora": {"lora_rank": 16, "lr": 1e-3}, "distill": {"distill": 1.0}}


class _Stop(Exception):
    pass


def one(variant: str, steps: int, batch: int, micro: int, seq_len: int, eval_rows: int, stop_after: int,
        order=None, site_start=None, site_gap=1, train_kw=None) -> dict:
    """`steps` is the schedule's length (Schedule.scaled(30, steps), or Schedule.from_order from the `order`
    file); the run is stopped after `stop_after` steps."""
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    from lnfree import zoo
    from lnfree.removal import Schedule, load_tokens, remove_layernorm

    t0 = time.time()
    model = zoo.load("smollm2-135m", device="cpu")
    load_s = time.time() - t0
    files = sorted(glob.glob(f"{CORPUS}/train/*.txt"))
    if not files:
        raise SystemExit(f"no {CORPUS}/train/*.txt: set LNFREE_CORPUS to a folder with train/*.txt")
    need = steps * batch * seq_len
    seqs = load_tokens(files, seq_len=seq_len, tokenizer=model.tokenizer, max_tokens=int(need * 1.2) + seq_len)
    held = load_tokens([f"{CORPUS}/heldout/austen_persuasion.txt"], seq_len=seq_len, tokenizer=model.tokenizer,
                       max_tokens=eval_rows * seq_len + seq_len)[:eval_rows]
    rss_before = int(open("/proc/self/statm").read().split()[1]) * 4096
    events = []
    kw = {**(train_kw or {}), **VARIANTS[variant]}
    if order:
        from lnfree.removal.cli import schedule_from_order_file

        sched = schedule_from_order_file(order, model.cfg.n_layers, steps, site_start, site_gap)
        sched_text = f"Schedule.from_order(30, {steps}, order of {order}, start={sched.removal_step(sched.sites[0])}, gap={site_gap})"
    else:
        sched, sched_text = Schedule.scaled(model.cfg.n_layers, steps), f"Schedule.scaled(30, {steps})"

    def record(e):
        events.append(e)
        if e["event"] == "step" and e["step"] >= stop_after:
            raise _Stop

    from lnfree.evaluation import cross_entropy

    held_t = torch.as_tensor(np.asarray(held).astype("int64"))
    ce_before = cross_entropy(model, held_t, batch_size=2, progress=False).mean.to_dict()
    t1 = time.time()
    outcome = "finished"
    try:
        remove_layernorm(model, seqs, schedule=sched, batch_size=batch,
                         micro_batch_size=micro, seq_len=seq_len, progress=False, callback=record, **kw)
    except _Stop:
        outcome = f"stopped after {stop_after} steps (by design)"
    except Exception as e:  # e.g. DivergedError: what the fail-safe said
        outcome = f"{type(e).__name__}: {e}"
    steps_ev = [e for e in events if e["event"] == "step"]
    walls = [e["wall_time"] for e in steps_ev]
    with torch.no_grad():
        logits = model(held_t[:1])
    frozen = [s for s, m in model.ln_modes().items() if m != "live"]
    return {"variant": variant, "settings": {"schedule": sched_text, "stop_after": stop_after,
                                             "batch_size": batch, "micro_batch_size": micro, "seq_len": seq_len, **kw,
                                             "threads": torch.get_num_threads()},
            "outcome": outcome, "load_s": round(load_s, 1), "run_s": round(time.time() - t1, 1),
            "step_s": [round(b - a, 2) for a, b in zip([0.0] + walls[:-1], walls)],
            "loss": [round(e["loss"], 4) for e in steps_ev], "ce": [round(e["ce"], 4) for e in steps_ev],
            "kl": [round(e.get("kl", 0.0), 4) for e in steps_ev], "aux": [round(e["aux"], 4) for e in steps_ev],
            "grad_norm": [round(e["grad_norm"], 3) for e in steps_ev], "lr": [e["lr"] for e in steps_ev],
            "stage": [e["stage"] for e in steps_ev], "frozen_sites_at_end": frozen,
            "events": [e for e in events if e["event"] in ("freeze", "rollback")][:40],
            "ce_before_heldout": ce_before, "ln_modes": sorted(set(model.ln_modes().values())),
            "rss_after_load_mb": round(rss_before / 1e6, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
            "finite_logits_now": bool(torch.isfinite(logits).all())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--stop-after", type=int, default=5)
    p.add_argument("--order", default=None, help="site order file (JSON list, or dict site -> cost): "
                   "Schedule.from_order, one site per --site-gap steps from --site-start")
    p.add_argument("--site-start", type=int, default=None)
    p.add_argument("--site-gap", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--aux-lambda", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--freeze-ramp", type=int, default=None)
    p.add_argument("--previous", default=None, help="a JSON file of earlier runs, kept under 'previous' in --out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    train_kw = {k: v for k, v in (("lr", a.lr), ("aux_lambda", a.aux_lambda), ("warmup", a.warmup),
                                  ("min_lr", a.min_lr), ("freeze_ramp", a.freeze_ramp)) if v is not None}
    if a.child:
        print(json.dumps(one(a.child, a.steps, a.batch_size, a.micro_batch_size, a.seq_len, a.eval_rows,
                             a.stop_after, a.order, a.site_start, a.site_gap, train_kw)))
        return
    results = {"machine": f"{os.cpu_count()} CPU cores (shared with other jobs), load average "
                          f"{open('/proc/loadavg').read().split()[0]} at start",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "script": "scripts/smollm2_removal_cpu.py " + " ".join(sys.argv[1:]), "runs": []}
    if a.previous:
        results["previous"] = json.loads(open(a.previous).read())
    for v in a.variants:
        cmd = [sys.executable, __file__, "--out", a.out, "--child", v, "--steps", str(a.steps), "--batch-size",
               str(a.batch_size), "--micro-batch-size", str(a.micro_batch_size), "--seq-len", str(a.seq_len),
               "--eval-rows", str(a.eval_rows), "--stop-after", str(a.stop_after), "--site-gap", str(a.site_gap)]
        for flag, v in (("--order", a.order), ("--site-start", a.site_start), ("--lr", a.lr),
                        ("--aux-lambda", a.aux_lambda), ("--warmup", a.warmup), ("--freeze-ramp", a.freeze_ramp),
                        ("--min-lr", a.min_lr)):
            if v is not None:
                cmd += [flag, str(v)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            results["runs"].append({"variant": v, "error": r.stderr[-2000:]})
        else:
            results["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]))
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        print(json.dumps(results["runs"][-1])[:400], flush=True)


if __name__ == "__main__":
    main()
