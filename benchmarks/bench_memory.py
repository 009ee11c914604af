"""Benchmark: DLA's peak memory does not grow with the dataset (streaming).

`direct_logit_attribution(components="heads", pos=-1, targets)` runs over a small and an 8x larger
dataset (same model, same batch size: one batch vs eight), each in its own fresh subprocess. The
peak RSS increase is the process's peak resident memory during the call minus its RSS just before
it (model and tokens loaded, one warm-up call on a short prompt so lazy imports are not counted).
Streaming keeps one batch's activations alive at a time, so both sizes should peak at the same
working set:

    ratio = peak increase (large dataset) / peak increase (small dataset)     target <= 1.2x

Peaks are the kernel's exact high-water mark (``VmHWM``, reset just before the call) on Linux, else
RSS sampled every 2 ms. Workers run with ``MALLOC_MMAP_THRESHOLD_=1 MiB`` so that RSS follows live
memory: with glibc's adaptive default, how much freed memory the heap keeps varies by tens of MiB
from run to run, whatever the code does (shown as an informational row). Also informational, full
run only: the same ratio for TransformerLens's usual recipe on 4x more data (``run_with_cache`` on
the whole dataset + ``cache.stack_head_results`` + ``cache.logit_attrs``), which holds every
activation at once.

    python benchmarks/bench_memory.py           # 6 layers x 8 heads, d_model 256, vocab 50257; 64 vs 512 sequences of 64 tokens
    python benchmarks/bench_memory.py --quick   # 2 layers, 32 vs 128 sequences; informational, no TL rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

FULL = dict(n_layers=6, d_model=256, n_heads=8, d_vocab=50257, seq=64, sizes=(64, 512), batch_size=64, tl_sizes=(16, 64))
QUICK = dict(n_layers=2, d_model=256, n_heads=8, d_vocab=50257, seq=64, sizes=(32, 128), batch_size=32, tl_sizes=(8, 32))
TARGET = 1.2
# Fixed glibc mmap threshold for the workers: tensors of 1 MiB and more are mapped and unmapped with
# their lifetime, so RSS follows live memory. With glibc's default adaptive threshold, large blocks
# move to the heap after the first frees and the peak depends on its retention (+-30%, run to run).
MMAP_THRESHOLD = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024
    except (OSError, KeyError):
        return False


def _peak_increase(fn) -> tuple[int, float, str]:
    """(peak RSS during fn minus RSS before it, in bytes; seconds; how the peak was measured).

    Linux: the kernel's exact high-water mark (VmHWM, reset just before the call). Elsewhere:
    RSS sampled every 2 ms by a thread (psutil), which can miss short peaks.
    """
    import psutil

    proc = psutil.Process()
    exact = _reset_peak()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = None if exact else threading.Thread(target=sample, daemon=True)
    if thread:
        thread.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    done.set()
    if thread:
        thread.join()
    top = _status_kib("VmHWM") * 1024 if exact else max(peak[0], proc.memory_info().rss)
    return top - base, seconds, "VmHWM" if exact else "sampled"


def _worker(method: str, cfg: dict, n: int) -> dict:
    import torch
    from transformer_lens import HookedTransformerConfig

    from lnfree.analysis.dla import direct_logit_attribution
    from lnfree.model import LNFreeTransformer

    torch.set_num_threads(1)  # per-thread scratch buffers would blur the comparison
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    hcfg = HookedTransformerConfig(
        n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"],
        d_head=cfg["d_model"] // cfg["n_heads"], d_mlp=4 * cfg["d_model"], d_vocab=cfg["d_vocab"],
        n_ctx=cfg["seq"], act_fn="gelu_new", normalization_type="LN", seed=0,
    )
    model = LNFreeTransformer(hcfg).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg["d_vocab"], (n, cfg["seq"]), generator=g)
    targets = torch.randint(0, cfg["d_vocab"], (n,), generator=g)

    if method == "ours":
        def call(t, y):
            return direct_logit_attribution(model, t, targets=y, components="heads", pos=-1, batch_size=cfg["batch_size"])
    else:
        def call(t, y):
            _, cache = model.run_with_cache(t)
            return cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), tokens=y, pos_slice=-1)

    call(tokens[:1, :8], targets[:1])  # warm-up: lazy imports and kernels, next to no tensor memory
    increase, seconds, how = _peak_increase(lambda: call(tokens, targets))
    return {"method": method, "n": n, "peak_increase": increase, "seconds": seconds, "measured_by": how}


def _spawn(method: str, quick: bool, n: int, fixed_mmap: bool = True) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--n", str(n)] + (["--quick"] if quick else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark worker ({method}, n={n}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pair(method: str, quick: bool, sizes, fixed_mmap: bool = True) -> tuple[dict, dict, float]:
    small, large = (_spawn(method, quick, n, fixed_mmap) for n in sizes)
    return small, large, large["peak_increase"] / max(small["peak_increase"], 1)


def _line(label: str, small: dict, large: dict, ratio: float) -> str:
    mib = 2**20
    return (f"  {label}: {small['n']:4d} sequences peak +{small['peak_increase'] / mib:7.1f} MiB "
            f"({small['seconds']:.1f} s); {large['n']:4d} sequences peak +{large['peak_increase'] / mib:7.1f} MiB "
            f"({large['seconds']:.1f} s) -> ratio {ratio:.2f}")


def run(quick: bool = False) -> list[dict]:
    """Run the workers (one subprocess each, one after the other) and return the benchmark rows."""
    cfg = QUICK if quick else FULL
    tag = " [quick]" if quick else ""
    small, large, ratio = _pair("ours", quick, cfg["sizes"])
    print(f"model {cfg['n_layers']} layers x {cfg['n_heads']} heads, d_model {cfg['d_model']}, vocab {cfg['d_vocab']}; "
          f"sequences of {cfg['seq']} tokens; DLA batch_size {cfg['batch_size']}; 1 torch thread; peak by "
          f"{small['measured_by']}; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} unless said otherwise")
    print(_line("ours", small, large, ratio))
    # quick: one batch vs four with a small working set: reported, not judged
    rows = [{"benchmark": f"memory: DLA peak RSS increase, {small['n']} vs {large['n']} seqs{tag}", "measured": ratio,
             "target": TARGET, "unit": "x (<=)", "pass": None if quick else ratio <= TARGET}]
    if not quick:  # four more interpreter starts: skipped in the quick run
        s2, l2, r2 = _pair("ours", quick, cfg["sizes"], fixed_mmap=False)
        print(_line("ours, glibc's default (adaptive) mmap threshold", s2, l2, r2))
        s3, l3, r3 = _pair("tl", quick, cfg["tl_sizes"])
        print(_line("TransformerLens full cache", s3, l3, r3))
        rows += [
            {"benchmark": "memory: same, glibc default malloc settings (info)", "measured": r2, "target": None,
             "unit": "x", "pass": None},
            {"benchmark": f"memory: TL run_with_cache DLA, {s3['n']} vs {l3['n']} seqs (info)", "measured": r3,
             "target": None, "unit": "x", "pass": None},
        ]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, a few seconds")
    parser.add_argument("--worker", choices=["ours", "tl"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, QUICK if args.quick else FULL, args.n)))
        return
    for row in run(args.quick):
        status = {True: "PASS", False: "FAIL", None: "INFO"}[row["pass"]]
        target = "" if row["target"] is None else f" (target <= {row['target']})"
        print(f"[{status}] {row['benchmark']}: {row['measured']:.2f}{row['unit'].split()[0]}{target}")


if __name__ == "__main__":
    main()
