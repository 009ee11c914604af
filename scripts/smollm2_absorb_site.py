"""Can fine-tuning absorb ONE expensive SmolLM2 norm site? Freeze only it, ramped in, and fine-tune.

`remove_layernorm` with ``sites=[--site]``: that site is frozen at step 1 (phased in over `--ramp` steps with
`freeze_ramp`), then trained `--frozen-steps` steps fully frozen, and folded at the end; the other 90 sites stay
live throughout (the schedule, `Schedule.from_order`, places them too, but the run freezes only the named site).
Held-out CE (the shipped Persuasion / cfi texts, `lnfree.zoo.heldout`, `[<|endoftext|>] + 63` tokens per row) of:
the original; the original with the site frozen at the sigma the run froze it at (no fine-tune); the
fine-tuned model with the site frozen (the run's last checkpoint), with it folded (the model the run returns,
which must match), and with it live again. Each also with the predictions made at position 0 (and 0-1)
excluded. One run per process.

    PYTHONPATH=src python scripts/smollm2_absorb_site.py --out docs/smollm2_absorb.json --label full \
        --site blocks.14.ln1.v --ramp 16 --frozen-steps 20 --batch-size 4 --seq-len 64 --lr 3e-4 --min-lr 3e-5
    # the same with distillation (loss = KL to the original model): add --distill 1 --label distill
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

CORPUS = os.environ.get("LNFREE_CORPUS", "corpus")


@torch.no_grad()
def position_ce(model, tokens: torch.Tensor) -> dict:
    """Mean next-token CE over all predictions, without position 0's, and without positions 0-1's."""
    was = model.training
    model.eval()
    try:
        lp = F.log_softmax(model(tokens, return_type="logits")[:, :-1].double(), -1)
    finally:
        model.train(was)
    nll = -lp.gather(-1, tokens[:, 1:, None])[..., 0]
    return {"all": float(nll.mean()), "excl_pos0": float(nll[:, 1:].mean()), "excl_pos01": float(nll[:, 2:].mean()),
            "pos0": float(nll[:, 0].mean()), "finite": bool(torch.isfinite(nll).all())}


def evaluate(model, books: dict) -> dict:
    """Per book: `position_ce`, plus the library's CE (with its CI) as the headline and a cross-check."""
    from lnfree.evaluation import cross_entropy

    out = {}
    for name, toks in books.items():
        mine = position_ce(model, toks)
        lib = cross_entropy(model, toks, batch_size=8, n_boot=500).mean
        lib0 = cross_entropy(model, toks, batch_size=8, n_boot=500, exclude_position_0=True).mean
        if mine["finite"]:  # two computations of the same number
            assert abs(float(lib) - mine["all"]) < 1e-4 and abs(float(lib0) - mine["excl_pos0"]) < 1e-4, (lib, mine)
        out[name] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in mine.items()},
                     "ce_ci": [round(lib.low, 4), round(lib.high, 4)]}
    return out


def absorb(model, seqs, books: dict, a: argparse.Namespace, run_dir: str) -> dict:
    """Fine-tune `model` (in place) with only ``a.site`` removed; the run's record with every held-out CE."""
    from lnfree.removal import RemovalSettings, Schedule, load_checkpoint, remove_layernorm

    original = copy.deepcopy(model)
    run_steps = 1 + a.ramp + a.frozen_steps  # steps 0 .. run_steps-1: the site at step 1, fully frozen from 1 + ramp
    others = [s for s in model.ln_sites if s != a.site]
    sched = Schedule.from_order(model.cfg.n_layers, run_steps, [a.site] + others, start=1, gap=0,
                                name=f"only-{a.site}")
    settings = RemovalSettings(
        schedule=sched, sites=[a.site], batch_size=a.batch_size, micro_batch_size=a.micro_batch_size or a.batch_size,
        seq_len=a.seq_len, lr=a.lr, min_lr=a.min_lr, warmup=a.warmup, aux_lambda=a.aux_lambda, distill=a.distill,
        freeze_ramp=a.ramp, checkpoint_every=run_steps, keep_checkpoints=1,
        **({} if a.guard_factor is None else {"diverge_factor": a.guard_factor, "spike_factor": a.guard_factor}))
    t0 = time.time()
    before = evaluate(model, books)
    events, probes = [], []

    def record(e):  # observes only: the run ends by itself
        events.append(e)
        if e["event"] == "step":
            if e["step"] % a.probe_every == 0 or e["step"] == run_steps:
                probes.append({"after_step": e["step"], **position_ce(model, books["persuasion"])})
            print(json.dumps({k: e.get(k) for k in ("step", "ce", "kl", "loss", "grad_norm", "lr", "wall_time")}),
                  flush=True)

    outcome, folded = "finished", None
    try:
        folded = remove_layernorm(model, seqs, settings=settings, out_dir=run_dir, progress=False, callback=record)
    except Exception as e:  # e.g. DivergedError: what the fail-safe said
        outcome = f"{type(e).__name__}: {e}"
    run_s = time.time() - t0
    print(outcome, flush=True)
    frozen, _ = load_checkpoint(run_dir, device="cpu")  # its latest good checkpoint: the site frozen, not folded
    assert [s for s, m in frozen.ln_modes().items() if m != "live"] == [a.site], "only the site may be frozen"
    if folded is None:  # the run stopped early: fold its last good state as the trainer would have
        folded = copy.deepcopy(frozen).remove_ln([a.site])
    assert [s for s, m in folded.ln_modes().items() if m != "live"] == [a.site], "only the site may be removed"
    freeze = [e for e in events if e["event"] == "freeze"]
    sigma = freeze[0]["sigma"][a.site]
    module, path = frozen._site(a.site)
    res = {"settings": {**vars(a), "schedule": f"{a.site} at step 1 (freeze_ramp {a.ramp}: fully frozen from step "
                        f"{1 + a.ramp}) of a {run_steps}-step run (steps 0..{run_steps - 1}); the other "
                        f"{len(others)} sites live throughout (remove_layernorm(sites=[{a.site!r}]))",
                        "threads": torch.get_num_threads()},
           "outcome": outcome, "sigma": sigma, "blend_at_end": float(module.blend[path]), "run_s": round(run_s, 1),
           "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()
                      if k in ("step", "ce", "kl", "loss", "grad_norm", "lr", "wall_time")}
                     for e in events if e["event"] == "step"],
           "rollbacks": [e for e in events if e["event"] == "rollback"],
           "probes_persuasion": probes, "heldout": {"original": before}}
    with original.ln_frozen([a.site], scales={a.site: sigma}):
        res["heldout"]["original_site_frozen"] = evaluate(original, books)
    res["heldout"]["finetuned_site_frozen"] = evaluate(frozen, books)
    res["heldout"]["finetuned_site_folded"] = evaluate(folded, books)
    with torch.no_grad():
        t = books["persuasion"][:2]
        res["folded_vs_frozen_max_logit_diff"] = float((folded(t) - frozen(t)).abs().max())
    frozen.unfreeze_ln([a.site])
    res["heldout"]["finetuned_site_live"] = evaluate(frozen, books)
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file; this run is added under runs[label]")
    p.add_argument("--label", required=True)
    p.add_argument("--site", default="blocks.14.ln1.v")
    p.add_argument("--ramp", type=int, default=16)
    p.add_argument("--frozen-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--aux-lambda", type=float, default=0.0)
    p.add_argument("--distill", type=float, default=0.0)
    p.add_argument("--eval-rows", type=int, default=16, help="held-out rows per book")
    p.add_argument("--guard-factor", type=float, default=None,
                   help="experiment only: the fail-safe's loss bounds at this factor instead of 3 (the initial-loss "
                        "and spike bounds), so a run that the default guard would stop can be watched; non-finite "
                        "checks stay")
    p.add_argument("--probe-every", type=int, default=4, help="held-out CE (Persuasion rows) every N steps")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    from lnfree import zoo
    from lnfree.removal import load_tokens

    model = zoo.load("smollm2-135m", device="cpu")
    books = {b: zoo.heldout(b, model=model, seq_len=a.seq_len)[: a.eval_rows] for b in ("persuasion", "cfi")}
    steps = 1 + a.ramp + a.frozen_steps
    files = sorted(glob.glob(f"{CORPUS}/train/*.txt"))
    if not files:
        raise SystemExit(f"no {CORPUS}/train/*.txt: set LNFREE_CORPUS to a folder with train/*.txt")
    seqs = load_tokens(files, seq_len=a.seq_len, tokenizer=model.tokenizer,
                       max_tokens=int(steps * a.batch_size * a.seq_len * 1.2) + a.seq_len)
    with tempfile.TemporaryDirectory() as run_dir:  # the run's checkpoints (its last one: the site frozen)
        res = absorb(model, seqs, books, a, run_dir)
    data = json.load(open(a.out)) if os.path.exists(a.out) else {"runs": {}}
    res["machine"] = (f"{os.cpu_count()} CPU cores shared with other jobs, load average "
                      f"{open('/proc/loadavg').read().split()[0]} at the end")
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["runs"][a.label] = res
    with open(a.out, "w") as f:
        json.dump(data, f, indent=1)
    print(json.dumps(res["heldout"]), flush=True)


if __name__ == "__main__":
    main()
