"""Benchmark: one removal training step on SmolLM2-135M vs transformers' own LlamaForCausalLM training step.

Ours: the removal trainer's step (`lnfree.removal.trainer._Run`: LNFreeTransformer forward + backward +
clipping + AdamW) with every norm site live and its scale recorded for the sigma EMA (a removal run's step
before its first freeze), full fine-tune, no distillation, no aux loss; an info row gives the vanilla step
(no recording). transformers': ``LlamaForCausalLM(input_ids, labels=input_ids).loss`` + backward + clipping
+ AdamW, its default attention implementation, built from the same weights (the GGUF file that
``lnfree.load("smollm2-135m")`` reads, dequantised by `lnfree.gguf_file` into HF names). Both on the same
batches (the same seeded random token rows, the same order), the same torch threads, fp32, CPU.
Each in its own subprocess: a few warm-up steps, then the median of N steps (process CPU time with one
thread, which a busy shared machine does not inflate; wall time with more), and the peak RSS of the whole
training phase (VmHWM, reset after loading; ``MALLOC_MMAP_THRESHOLD_`` = 1 MiB as in bench_memory.py).
The first step's loss of both is printed: the same weights give the same loss.

Target (issue 21): tokens per second >= 0.8x transformers'. The peak-memory ratio is informational.

    python benchmarks/bench_removal_smollm2.py                 # 4 x 64 tokens, 2 warm-up + 5 timed steps
    python benchmarks/bench_removal_smollm2.py --batch 2       # 2 x 64
    python benchmarks/bench_removal_smollm2.py --quick         # 2 x 32, 1 + 2 steps (informational rows)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _workers  # noqa: E402
from bench_memory import MMAP_THRESHOLD, _peak_increase  # noqa: E402
from bench_removal import _run, _steps  # noqa: E402  (the trainer's step, timed as there)

FULL = dict(batch=4, seq=64, warmup=2, steps=5)
QUICK = dict(batch=2, seq=32, warmup=1, steps=2)
LR, WEIGHT_DECAY, CLIP = 6e-4, 0.01, 1.0  # the trainer's defaults (bench_removal's _run)


def _clock():
    import torch

    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def _ours(cfg: dict, vanilla: bool) -> dict:
    from lnfree import load

    model = load("smollm2-135m", device="cpu")  # fp32, every site live
    c = {"d_vocab": model.cfg.d_vocab, "n_layers": model.cfg.n_layers}
    run = _run(model, c, vanilla=vanilla, aux_lambda=0.0, batch=cfg["batch"], seq=cfg["seq"])
    first = []

    def train():
        stats = run.forward_backward()
        first.append(stats.ce)
        run.optimizer_step(stats)
        for _ in range(cfg["warmup"] - 1):
            _steps(run, 1)
        return [_steps(run, 1) for _ in range(cfg["steps"])]

    return _train_phase(train, first)


def _hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lnfree import gguf_file
    from lnfree.io.zoo import real_model_path

    path = real_model_path("smollm2-135m")
    reader = gguf_file.open_reader(path)
    config = gguf_file.hf_config(reader, path)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    missing, unexpected = model.load_state_dict(gguf_file.hf_state_dict(reader, path, config), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"the GGUF's weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def _hf(cfg: dict) -> dict:
    import torch

    from lnfree.removal.data import TokenData

    model = _hf_model().train()
    # bench_removal._run's data and order: the same token rows, batch after batch
    g = torch.Generator().manual_seed(1)
    data = TokenData(torch.randint(0, model.config.vocab_size, (max(64, 4 * cfg["batch"]), cfg["seq"]),
                                   generator=g).numpy())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999))
    position, clock, first = [0], _clock(), []

    def step() -> float:
        t0 = clock()
        tokens = data.batch(position[0], cfg["batch"])
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        position[0] += cfg["batch"]
        if not first:
            first.append(float(loss.detach()))
        return clock() - t0

    def train():
        for _ in range(cfg["warmup"]):
            step()
        return [step() for _ in range(cfg["steps"])]

    out = _train_phase(train, first)
    out["attn_implementation"] = model.config._attn_implementation
    return out


def _train_phase(train, first: list) -> dict:
    """Warm-up + timed steps under one peak-RSS measurement (VmHWM reset just before them)."""
    from bench_memory import _status_kib

    times: list = []
    peak, _, how = _peak_increase(lambda: times.extend(train()))
    return {"seconds": times, "median_s": statistics.median(times), "peak_increase": peak, "measured_by": how,
            "peak_rss": _status_kib("VmHWM") * 1024 if how == "VmHWM" else None, "first_loss": first[0]}


def _worker(method: str, cfg: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {"ours": lambda: _ours(cfg, vanilla=False), "vanilla": lambda: _ours(cfg, vanilla=True),
           "hf": lambda: _hf(cfg)}[method]()
    return {"method": method, "threads": threads, "tokens": [cfg["batch"], cfg["seq"]], **out}


def _config(quick: bool, batch: Optional[int]) -> dict:
    return _workers.settings(QUICK, FULL, quick, batch)


def run(quick: bool = False, threads: int = 1, batch: Optional[int] = None) -> list[dict]:
    """The three workers, one after the other; rows for run_all.py (quick rows are informational)."""
    cfg = _config(quick, batch)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    t0 = time.perf_counter()
    res = {m: _workers.spawn(__file__, m, quick, threads, batch, env=env) for m in ("ours", "hf", "vanilla")}
    tokens = cfg["batch"] * cfg["seq"]
    tps = {m: tokens / r["median_s"] for m, r in res.items()}
    mib = 2**20
    lines = [f"SmolLM2-135M training step, {cfg['batch']} x {cfg['seq']} tokens, fp32, {threads} torch thread(s), "
             f"{cfg['warmup']} warm-up + median of {cfg['steps']} steps, wall {time.perf_counter() - t0:.0f} s"]
    for m, name in (("ours", "lnfree removal step (sites live, recording)"), ("vanilla", "lnfree vanilla step"),
                    ("hf", f"transformers LlamaForCausalLM ({res['hf']['attn_implementation']})")):
        r = res[m]
        peak = f"{r['peak_rss'] / mib:.0f} MiB" if r["peak_rss"] else "n/a"
        lines.append(f"  {name:48s} {r['median_s']:6.2f} s/step ({', '.join(f'{s:.2f}' for s in r['seconds'])}), "
                     f"{tps[m]:6.0f} tokens/s, peak RSS {peak} (+{r['peak_increase'] / mib:.0f} MiB in training), "
                     f"first loss {r['first_loss']:.5f}")
    print("\n".join(lines))
    speed = tps["ours"] / tps["hf"]
    mem = res["ours"]["peak_increase"] / max(res["hf"]["peak_increase"], 1)
    rss = (res["ours"]["peak_rss"] or 0) / max(res["hf"]["peak_rss"] or 1, 1)
    tag = " [quick]" if quick else ""
    return [
        {"benchmark": f"removal smollm2: removal step tokens/s vs transformers{tag}", "measured": speed,
         "target": 0.8, "unit": "x transformers (>=)", "pass": None if quick else speed >= 0.8},
        {"benchmark": f"removal smollm2: vanilla step tokens/s vs transformers (info){tag}",
         "measured": tps["vanilla"] / tps["hf"], "target": None, "unit": "x", "pass": None},
        {"benchmark": f"removal smollm2: peak RSS in training vs transformers (info){tag}", "measured": rss,
         "target": None, "unit": "x", "pass": None},
        {"benchmark": f"removal smollm2: training memory (peak above loaded) vs transformers (info){tag}",
         "measured": mem, "target": None, "unit": "x", "pass": None},
        {"benchmark": f"removal smollm2: |first loss ours - transformers| (info){tag}",
         "measured": abs(res["ours"]["first_loss"] - res["hf"]["first_loss"]), "target": None, "unit": "nats",
         "pass": None},
    ]


def main(argv=None) -> None:
    _workers.main(argv, doc=__doc__, worker=_worker, run=run, config=_config, methods=("ours", "vanilla", "hf"),
                  quick_help="2 x 32 tokens, 1 + 2 steps, informational", batch_help="rows per step (default 4)")


if __name__ == "__main__":
    main()
