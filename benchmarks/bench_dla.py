"""Benchmark: DLA and exact direct effect of every attention head.

(a) `direct_logit_attribution(components="heads", pos=-1, targets)` (DLA *and* exact DE of all
    heads) against one plain forward pass (logits) over the same batch. Target: <= 1.5x.
(b) the same call against TransformerLens's own pipeline: ``run_with_cache`` (full cache) +
    ``cache.stack_head_results(pos_slice=-1)`` + ``cache.logit_attrs(..., pos_slice=-1)`` (which
    applies ln_final's cached scale). Targets: >= 3x faster, <= half the peak memory.

Each method runs in its own subprocess (same seed, same random GPT-2-small-shaped weights), so
peak memory is that process's alone: we report the peak RSS above the loaded model (sampled every
2 ms) and the process high-water mark (``ru_maxrss``). Both run under ``torch.no_grad()``.

    python benchmarks/bench_dla.py              # GPT-2 small shape: 12 x 12 heads, d_model 768, vocab 50257, 4 x 128 tokens
    python benchmarks/bench_dla.py --batch 8    # 8 x 128 tokens (TransformerLens then peaks at ~6 GiB)
    python benchmarks/bench_dla.py --quick      # a small model, a few seconds
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _workers  # noqa: E402  (the worker subprocess and command line every benchmark of this kind shares)

FULL = dict(n_layers=12, d_model=768, n_heads=12, d_vocab=50257, batch=4, seq=128, reps=3)
QUICK = dict(n_layers=4, d_model=256, n_heads=8, d_vocab=8000, batch=4, seq=64, reps=5)


# ---- measurement helpers -----------------------------------------------------------------------
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _measure(fn):
    """(result, seconds, peak RSS above the RSS at the start, in bytes)."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return out, seconds, max(peak[0], _rss()) - base


def _setup(cfg: dict):
    import torch
    from transformer_lens import HookedTransformerConfig

    from lnfree.model import LNFreeTransformer

    torch.manual_seed(0)
    hcfg = HookedTransformerConfig(
        n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"], d_head=cfg["d_model"] // cfg["n_heads"],
        d_mlp=4 * cfg["d_model"], d_vocab=cfg["d_vocab"], n_ctx=max(cfg["seq"], 16), act_fn="gelu_new",
        normalization_type="LN", seed=0,
    )
    model = LNFreeTransformer(hcfg).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg["d_vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    targets = torch.randint(0, cfg["d_vocab"], (cfg["batch"],), generator=g)
    return model, tokens, targets


def _ours(model, tokens, targets):
    from lnfree.analysis.dla import direct_logit_attribution

    return direct_logit_attribution(model, tokens, targets=targets, components="heads", pos=-1, batch_size=tokens.shape[0])


def _transformer_lens(model, tokens, targets):
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    return cache.logit_attrs(stack, tokens=targets, pos_slice=-1)  # applies ln_final's cached scale


# ---- subprocess worker -------------------------------------------------------------------------
def _worker(method: str, cfg: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model, tokens, targets = _setup(cfg)
    run = {"ours": _ours, "tl": _transformer_lens}[method]
    run(model, tokens[:1, :8], targets[:1])  # warm-up: kernels, lazy imports
    out, seconds, peak = _measure(lambda: run(model, tokens, targets))
    result = {"method": method, "seconds": [seconds], "peak_above_model": peak,
              "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if method == "ours":
        # (a): interleave plain forward passes and further runs, in this same process
        forward = []
        for _ in range(cfg["reps"]):
            t0 = time.perf_counter()
            model(tokens)
            forward.append(time.perf_counter() - t0)
            result["seconds"].append(_measure(lambda: run(model, tokens, targets))[1])
        result["forward_seconds"] = forward
    else:
        # the two pipelines compute the same DLA here (ln_final.w = 1 at initialisation)
        ours = _ours(model, tokens[:2], targets[:2]).dla
        result["max_abs_diff_vs_ours"] = float((out[:, :2] - ours).abs().max())
    return result


def _spawn(method: str, quick: bool, threads: int, batch: Optional[int]) -> dict:
    return _workers.spawn(__file__, method, quick, threads, batch)


# ---- driver ------------------------------------------------------------------------------------
def _config(quick: bool, batch: Optional[int]) -> dict:
    return _workers.settings(QUICK, FULL, quick, batch)


def run(quick: bool = False, threads: int = 1, batch: Optional[int] = None) -> list[dict]:
    """Run both subprocesses (one after the other) and return the benchmark rows.

    ``threads``: torch threads per worker (1 by default: on a shared machine, oversubscribed
    OpenMP threads make timings erratic; both methods get the same setting).
    """
    cfg = _config(quick, batch)
    ours, tl = _spawn("ours", quick, threads, batch), _spawn("tl", quick, threads, batch)
    t_ours, t_fwd, t_tl = min(ours["seconds"]), min(ours["forward_seconds"]), min(tl["seconds"])
    mib = 2**20
    print(
        f"model {cfg['n_layers']}x{cfg['n_heads']} heads, d_model {cfg['d_model']}, vocab {cfg['d_vocab']}, "
        f"batch {cfg['batch']}x{cfg['seq']}, pos=-1, {threads} torch thread(s)\n"
        f"  forward (logits):       {t_fwd:8.3f} s  (min of {len(ours['forward_seconds'])})\n"
        f"  ours, DLA + exact DE:   {t_ours:8.3f} s  (min of {len(ours['seconds'])}), peak {ours['peak_above_model'] / mib:8.1f} MiB "
        f"above model, process maxrss {ours['maxrss'] / mib:8.1f} MiB\n"
        f"  TransformerLens DLA:    {t_tl:8.3f} s  (1 run), peak {tl['peak_above_model'] / mib:8.1f} MiB above model, "
        f"process maxrss {tl['maxrss'] / mib:8.1f} MiB\n"
        f"  max |DLA ours - TL| = {tl['max_abs_diff_vs_ours']:.2e}"
    )
    ratio_fwd = t_ours / t_fwd
    speedup = t_tl / t_ours
    mem_ratio = ours["peak_above_model"] / max(tl["peak_above_model"], 1)
    rss_ratio = ours["maxrss"] / tl["maxrss"]
    rows = [
        {"benchmark": "dla: exact DE of all heads vs one forward pass", "measured": ratio_fwd, "target": 1.5,
         "unit": "x forward time (<=)", "pass": ratio_fwd <= 1.5},
        {"benchmark": "dla: all-head DLA speed vs TransformerLens", "measured": speedup, "target": 3.0,
         "unit": "x faster (>=)", "pass": speedup >= 3.0},
        {"benchmark": "dla: peak memory above model vs TransformerLens", "measured": mem_ratio, "target": 0.5,
         "unit": "fraction of TL (<=)", "pass": mem_ratio <= 0.5},
    ]
    if not quick:  # a tiny model's process peak is torch itself: only meaningful at full size
        rows.append({"benchmark": "dla: process peak RSS vs TransformerLens", "measured": rss_ratio, "target": 0.5,
                     "unit": "fraction of TL (<=)", "pass": rss_ratio <= 0.5})
    return rows


def main(argv=None) -> None:
    _workers.main(argv, doc=__doc__, worker=_worker, run=run, config=_config, quick_help="small model, a few seconds",
                  batch_help="prompts per batch (default 4; 4 with --quick)")


if __name__ == "__main__":
    main()
