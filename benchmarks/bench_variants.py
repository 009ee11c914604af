"""Benchmark: the removal variants against the full fine-tune, ratios measured in one run.

(a) LoRA step vs full step (same model, same batch, all LN sites live: the EMA recording on):
    time ratio, and the training-state memory ratio, measured two ways:
    - optimiser state + gradients, counted exactly (elements x 4 bytes);
    - peak resident memory of a fresh process running a few steps, above the same process's
      resident memory once the model is built (ru_maxrss - RSS before training), one subprocess per variant.
(b) distillation step vs plain step (one extra no-grad forward of the frozen teacher): time ratio.

Steps are timed in process CPU time with 1 torch thread (a busy shared machine does not inflate
it), alternating the two variants for several rounds; the median per-round ratio is reported.

    python benchmarks/bench_variants.py            # ~2-3 min on 2 cores
    python benchmarks/bench_variants.py --quick    # ~20 s
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_removal import _alternate, _model, _run  # noqa: E402

FULL = dict(n_layers=4, d_model=256, n_heads=8, d_vocab=4096, n_ctx=256, batch=8, seq=128, rounds=5, steps=2,
            rank=16)
QUICK = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=512, n_ctx=64, batch=4, seq=32, rounds=3, steps=2, rank=8)


def _state_bytes(run) -> int:
    """Bytes of gradients + AdamW state after one step (exact count)."""
    grads = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    opt = sum(t.numel() for s in run.optimizer.state.values() for t in s.values() if hasattr(t, "numel") and t.ndim)
    return 4 * (grads + opt)


def _peak_child(c: dict, lora: bool) -> int:
    """Peak RSS above the post-build RSS (bytes) of a fresh process running 3 steps of one variant."""
    code = f"""
import json, resource, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
torch.set_num_threads(1)
from bench_removal import _model, _run, _steps
c = {c!r}
model = _model(c)
run = _run(model, c, vanilla=False, aux_lambda=0.1, batch=c["batch"], seq=c["seq"], **({{"lora_rank": c["rank"]}} if {lora} else {{}}))
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
_steps(run, 3)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"rss": rss, "peak": peak, "before": before}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak"] - max(r["rss"], 0)


def run(quick: bool = False) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    c = QUICK if quick else FULL
    rows = []
    base = _model(c)
    full = _run(copy.deepcopy(base), c, vanilla=False, aux_lambda=0.1, batch=c["batch"], seq=c["seq"])
    lora = _run(copy.deepcopy(base), c, vanilla=False, aux_lambda=0.1, batch=c["batch"], seq=c["seq"],
                lora_rank=c["rank"])
    rows.append({"benchmark": f"lora_r{c['rank']}_step_vs_full_step_time", "measured": round(_alternate(lora, full, c), 3),
                 "unit": "x"})
    rows.append({"benchmark": f"lora_r{c['rank']}_vs_full_grad_and_optimizer_bytes",
                 "measured": round(_state_bytes(lora) / _state_bytes(full), 4), "unit": "x",
                 "detail": f"{_state_bytes(lora) / 1e6:.2f} MB vs {_state_bytes(full) / 1e6:.2f} MB"})
    p_lora, p_full = _peak_child(c, True), _peak_child(c, False)
    rows.append({"benchmark": f"lora_r{c['rank']}_vs_full_peak_rss_above_model", "measured": round(p_lora / p_full, 3),
                 "unit": "x", "detail": f"{p_lora / 1e6:.1f} MB vs {p_full / 1e6:.1f} MB"})
    teacher = copy.deepcopy(base).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    plain = _run(copy.deepcopy(base), c, vanilla=False, aux_lambda=0.1, batch=c["batch"], seq=c["seq"])
    distill = _run(copy.deepcopy(base), c, vanilla=False, aux_lambda=0.1, batch=c["batch"], seq=c["seq"],
                   distill=0.5, teacher=teacher)
    rows.append({"benchmark": "distill_step_vs_plain_step_time", "measured": round(_alternate(distill, plain, c), 3),
                 "unit": "x"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for row in run(args.quick):
        print(f"{row['benchmark']}: {row['measured']}{row['unit']}" + (f"  ({row['detail']})" if "detail" in row else ""))


if __name__ == "__main__":
    main()
