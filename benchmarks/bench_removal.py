"""Benchmark: a removal training step with every LN site frozen vs the same model's live step.

A training step is forward + backward + AdamW step, through the trainer's own step code
(`lnfree.removal.trainer._Run`): micro-batches, loss, clipping, LR, EMA bookkeeping.

(a) removal step with all sites frozen and the aux loss on (what the fine-tune runs once every
    site is frozen) vs the vanilla step (LN live, no aux loss) of the same model.   Target <= 1.05x.
(b) the same with the aux loss off (the cost of frozen LN alone).                 Target <= 1.05x.
The two variants alternate, a few steps each, for several rounds; the median per-round ratio is
reported. With 1 torch thread (the default) steps are timed in process CPU time, which a busy
shared machine does not inflate; with more threads, in wall time.
(c) unless --quick: seconds per step of batch 16 x 256 tokens for the zoo base model shape
    (4 layers, d_model 256, vocab 4096), while sites are live (std recording on) and once all are
    frozen. Informational.

    python benchmarks/bench_removal.py            # ~1-2 min on 2 cores, 1 torch thread
    python benchmarks/bench_removal.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

FULL = dict(n_layers=4, d_model=256, n_heads=8, d_vocab=4096, n_ctx=256, batch=8, seq=128, rounds=7, steps=2)
QUICK = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=512, n_ctx=64, batch=4, seq=32, rounds=5, steps=2)


def _model(c: dict):
    import torch
    from transformer_lens import HookedTransformerConfig

    from lnfree.model import LNFreeTransformer

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=c["n_layers"], d_model=c["d_model"], n_heads=c["n_heads"],
                                  d_head=c["d_model"] // c["n_heads"], d_mlp=4 * c["d_model"], d_vocab=c["d_vocab"],
                                  n_ctx=c["n_ctx"], act_fn="gelu_new", normalization_type="LN", seed=0)
    return LNFreeTransformer(cfg)


def _run(model, c: dict, *, vanilla: bool, aux_lambda: float, batch: int, seq: int, micro: int = None,
         teacher=None, **variant):
    """A trainer `_Run` over random tokens (no files, no progress bar); `variant`: lora_rank, distill."""
    import torch

    from lnfree.removal.data import TokenData
    from lnfree.removal.schedule import Schedule
    from lnfree.removal.trainer import RemovalConfig, _Dist, _Run
    from lnfree.training import OptimConfig

    g = torch.Generator().manual_seed(1)
    data = TokenData(torch.randint(0, c["d_vocab"], (max(64, 4 * batch), seq), generator=g).numpy())
    sched = Schedule.scaled(c["n_layers"], 10_000)
    cfg = RemovalConfig(optim=OptimConfig(steps=10_000, lr=6e-4, min_lr=3e-4, warmup=10, weight_decay=0.01),
                        batch_size=batch, micro_batch_size=micro or batch, seq_len=seq, aux_lambda=aux_lambda,
                        vanilla=vanilla, seed=0, bf16=False, schedule=sched.to_dict(), **variant)
    return _Run(model, data, cfg, sched, out_dir=None, dist=_Dist(), device=torch.device("cpu"), progress=False,
                teacher=teacher)


def _steps(run, n: int) -> float:
    """Seconds per training step (forward + backward + optimizer), averaged over n steps.

    With one torch thread this is the process's CPU time, which other jobs on a shared machine do
    not inflate (wall time would count the time spent waiting for a core); with more, wall time.
    """
    import torch

    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    for _ in range(n):
        run.optimizer_step(run.forward_backward())
    return (clock() - t0) / n


def _ratio(c: dict, aux_lambda: float) -> float:
    live_model = _model(c)
    frozen_model = copy.deepcopy(live_model)
    import torch

    sample = torch.randint(0, c["d_vocab"], (8, c["seq"]), generator=torch.Generator().manual_seed(2))
    frozen_model.freeze_ln(scales=frozen_model.estimate_ln_scales(sample))
    frozen = _run(frozen_model, c, vanilla=False, aux_lambda=aux_lambda, batch=c["batch"], seq=c["seq"])
    live = _run(live_model, c, vanilla=True, aux_lambda=0.0, batch=c["batch"], seq=c["seq"])
    return _alternate(frozen, live, c)


def _alternate(a, b, c: dict) -> float:
    """Median over ``c["rounds"]`` rounds of a's step time / b's (``c["steps"]`` steps each), after one
    warm-up step each; the runs alternate, swapping which goes first, to spread load drifts evenly."""
    _steps(a, 1), _steps(b, 1)  # warm-up
    ratios = []
    for r in range(c["rounds"]):
        if r % 2:
            tb, ta = _steps(b, c["steps"]), _steps(a, c["steps"])
        else:
            ta, tb = _steps(a, c["steps"]), _steps(b, c["steps"])
        ratios.append(ta / tb)
    return statistics.median(ratios)


def _step_time_base_model(steps: int = 3) -> dict:
    """Seconds per 16 x 256-token step of the zoo base-model shape, live (recording) and all-frozen."""
    import torch

    c = dict(n_layers=4, d_model=256, n_heads=8, d_vocab=4096, n_ctx=256)
    model = _model(c)
    live = _run(model, c, vanilla=False, aux_lambda=0.1, batch=16, seq=256)  # every site live: EMA recording on
    _steps(live, 1)
    t_live = _steps(live, steps)
    model2 = copy.deepcopy(model)
    sample = torch.randint(0, c["d_vocab"], (4, 256), generator=torch.Generator().manual_seed(2))
    model2.freeze_ln(scales=model2.estimate_ln_scales(sample))
    frozen = _run(model2, c, vanilla=False, aux_lambda=0.1, batch=16, seq=256)
    _steps(frozen, 1)
    return {"live": t_live, "frozen": _steps(frozen, steps)}


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """Measure and return the benchmark rows."""
    import torch

    torch.set_num_threads(threads)
    c = QUICK if quick else FULL
    rows = []
    for name, lam in (("frozen_step_vs_live_step", 0.1), ("frozen_step_vs_live_step_no_aux", 0.0)):
        ratio = _ratio(c, lam)
        rows.append({"benchmark": name, "measured": round(ratio, 3), "target": 1.05, "unit": "x", "pass": ratio <= 1.05})
    if not quick:
        t = _step_time_base_model()
        for phase, secs in t.items():
            rows.append({"benchmark": f"step_time_4L_d256_16x256_{phase}_{threads}thread", "measured": round(secs, 3),
                         "target": None, "unit": "s/step", "pass": True})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, a few seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    for row in run(args.quick, args.threads):
        flag = "PASS" if row["pass"] else "FAIL"
        target = "" if row["target"] is None else f" (target <= {row['target']}{row['unit']})"
        print(f"{flag}  {row['benchmark']}: {row['measured']}{row['unit']}{target}")


if __name__ == "__main__":
    main()
