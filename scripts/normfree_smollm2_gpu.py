"""Norm-free SmolLM2-135M on one GPU: the removal fine-tune and its vanilla control, then the numbers (issue 21.6).

The recipe is the CPU run's (scripts/normfree_smollm2_cpu.py, docs/normfree_smollm2.md): every one of the 91
norm sites frozen at a *positional* scale (position 0, the attention sink, keeps its own sigma), one site at a
time, cheapest first by its single-site cost with that scale (``site_costs.json``, computed by the CPU script's
`site_costs`, i.e. `lnfree.removal.site_costs(positional=1)`, unless ``--costs`` names a file), each freeze phased in over ``--freeze-ramp`` steps, LoRA rank 32 on every attention and MLP matrix,
distillation to the original model (KL only), no aux loss, rows ``[<|endoftext|>] + (seq_len - 1)`` tokens (the
CPU script's `first_token`, as `lnfree.zoo.heldout` cuts rows). The one difference from the CPU run: rows of
1024 tokens and 32 rows per step (128x the CPU run's tokens per step).

The vanilla control trains with exactly the same losses and settings (`run_settings`: distillation, temperature,
aux, LoRA, LR, data, steps, batch, seed); only the freezing differs (``vanilla=True``; with an aux loss the
control keeps it through ``recipe={"vanilla_aux": True}``).

Before the runs, a **preflight**: two training steps at the chosen settings on the device, through the
trainer itself. It asserts the peak memory is below ``--memory-fraction`` (80%) of the device's, else stops
with the micro-batch that would fit (estimated from the measured static memory and memory per row), and
projects the whole script's time from the second step's duration; over ``--budget-s`` it stops with the
number of steps that would fit. Results are written incrementally to OUT/results.json (each stage as it ends;
a rerun skips finished runs and resumes an unfinished one from its checkpoint), the runs' log.jsonl and
summary.json under OUT/normfree and OUT/vanilla.

    python scripts/normfree_smollm2_gpu.py --out runs/smollm2-gpu --corpus data/corpus   # H100 / H200, bf16
    python scripts/normfree_smollm2_gpu.py --out /tmp/s --smoke     # CPU ok: 4 steps of 2 x 32 tokens, ~2 min

Defaults and how they were sized (estimates, not measured on a GPU: none was lent): micro-batch 8 x 1024.
The issue measured ~81 GB of activations for a 32 x 1024 micro-batch (~2.5 GB per row, 43 GB of it attention
patterns); distillation adds the teacher's logits and the KL's (~1 GB per row of 1024 x 49,152 in fp32), so
~3.5 GB per row: 8 rows ~28 GB + ~3 GB of weights, teacher, LoRA and optimizer state, ~40% of an H100's 80 GB
(16 rows would be ~60 GB, too close to the 80% limit). Time: 360 steps x 32 x 1024 tokens = 11.8M tokens per
run; per token ~6 x 135M (forward, backward through the frozen backbone, the teacher's forward) + attention
(4 x 30 layers x 1024 x 576 per pass) ~ 1.1 GFLOP, so 1.3e16 FLOP per run: 53 s at 25% of an H100's 989 bf16
TFLOP/s, 130 s at 10%; the two runs, loading (~40 s for the first GGUF conversion), the site costs and the
measurements fit one 10-minute device call at 10% utilisation. The preflight checks this on the device.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULTS = dict(steps=360, batch_size=32, micro_batch_size=8, seq_len=1024, lr=1e-3, min_lr=1e-4, warmup=5,
                lora_rank=32, distill=1.0, distill_temperature=1.0, aux_lambda=0.0, site_aux=10.0, skip_nonfinite=100,
                positional_sigma=1,
                site_start=5, site_gap=3, freeze_ramp=3, checkpoint_every=40, calib_rows=8, rows=1024,
                cfi_rows=512, any_rows=256, small_rows=32)
# --smoke: the whole path on CPU in ~2 minutes (every site frozen at step 1, phased in over 2 steps)
SMOKE = dict(steps=4, warmup=1, batch_size=2, micro_batch_size=1, seq_len=32, site_start=1, site_gap=0, freeze_ramp=2,
             checkpoint_every=2, calib_rows=2, rows=4, cfi_rows=2, any_rows=2, small_rows=2)
GIB = 2**30


class PreflightError(RuntimeError):
    """The chosen settings would not fit the device's memory or the time budget."""


class _Stop(Exception):
    """Raised by the preflight's callback: two steps measured, stop the trainer."""


def _sibling(name: str):
    """scripts/<name>.py imported by path (scripts/ is not a package): reused, not copied."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- the two runs' settings ----------------------------------------------------------------------------
def run_settings(a: argparse.Namespace, schedule, bos: int, *, vanilla: bool, bf16: bool):
    """The `RemovalSettings` of one run. The control differs from the norm-free run in the freezing only:
    the same losses (distillation weight and temperature, aux loss, the norm-input loss ``site_aux``, which the
    trainer keeps in both), LoRA, optimiser, data, steps and batch."""
    from lnfree.removal import RemovalSettings

    return RemovalSettings(
        schedule=schedule, steps=a.steps, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size,
        seq_len=a.seq_len, lr=a.lr, min_lr=a.min_lr, warmup=a.warmup, aux_lambda=a.aux_lambda, lora_rank=a.lora_rank,
        distill=a.distill, distill_temperature=a.distill_temperature, freeze_ramp=a.freeze_ramp,
        positional_sigma=a.positional_sigma, bos_token_id=bos, bf16=bf16, seed=a.seed,
        checkpoint_every=a.checkpoint_every, keep_checkpoints=2, vanilla=vanilla, site_aux=a.site_aux,
        skip_nonfinite=a.skip_nonfinite,
        # the trainer drops the aux loss from vanilla runs unless told to keep it
        recipe={"vanilla_aux": True} if vanilla and a.aux_lambda > 0 else None)


def site_order(model, calib, a: argparse.Namespace, out: Path) -> list[str]:
    """Sites cheapest first by their single-site cost at a positional scale (``--costs``, else computed once
    into OUT/site_costs.json by scripts/normfree_smollm2_cpu.py's `site_costs`)."""
    from lnfree.removal import order_by_cost

    path = Path(a.costs) if a.costs else out / "site_costs.json"
    if not path.exists():
        half = len(calib) // 2
        result = _sibling("normfree_smollm2_cpu").site_costs(model, calib[:half], calib[half:])
        path.write_text(json.dumps(result, indent=1))
        model.unfreeze_ln()
    costs = json.loads(path.read_text())
    costs = costs.get("costs", costs)
    missing = sorted(set(model.ln_sites) - set(costs))
    if missing:
        raise ValueError(f"{path} has no cost for {missing[:3]} ({len(missing)} sites); it was computed for another "
                         "model: delete it or pass --costs with this model's file")
    return order_by_cost({s: costs[s] for s in model.ln_sites})


# ---- the preflight -------------------------------------------------------------------------------------
class MemoryProbe:
    """Peak and current memory of the device (CUDA: the caching allocator's counters; CPU: the process's RSS
    and its kernel high-water mark, VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def total(self) -> int:
        if self.cuda:
            return self.torch.cuda.get_device_properties(0).total_memory
        import psutil

        return psutil.virtual_memory().total

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def current(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        import psutil

        return psutil.Process().memory_info().rss

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        import psutil

        try:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
            return int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            return psutil.Process().memory_info().rss


def preflight(original, rows, settings, probe: MemoryProbe) -> dict:
    """Two steps of the norm-free run's settings through the trainer (on a copy): peak memory, the memory that
    stays between steps (weights, teacher, adapters, optimizer state), and the second step's seconds."""
    import torch

    from lnfree.removal import remove_layernorm

    marks = []

    def on_event(record: dict) -> None:
        if record.get("event") in ("step", "rollback"):  # a rolled-back step ran forward + backward too
            marks.append((time.perf_counter(), probe.current()))
            if len(marks) == 2:
                raise _Stop

    model = copy.deepcopy(original)
    probe.reset()
    try:
        remove_layernorm(model, rows[: 3 * settings.batch_size], settings=settings.replace(checkpoint_every=10**6),
                         progress=False, callback=on_event)
    except _Stop:
        pass
    finally:
        del model
        if probe.cuda:
            torch.cuda.empty_cache()
    if len(marks) < 2:
        raise PreflightError("the preflight's training run ended before two steps (steps < 2?)")
    return {"micro_batch_size": settings.micro_batch_size, "seq_len": settings.seq_len,
            "batch_size": settings.batch_size,
            "peak_bytes": probe.peak(), "static_bytes": marks[1][1], "total_bytes": probe.total(),
            "step_s": round(marks[1][0] - marks[0][0], 3)}


def check_memory(m: dict, fraction: float) -> None:
    """Refuse a peak above `fraction` of the device, naming the largest micro-batch (a divisor of the batch)
    that the measured static memory + memory per row predicts below it."""
    limit = fraction * m["total_bytes"]
    if m["peak_bytes"] <= limit:
        return
    mb = m["micro_batch_size"]
    per_row = max(m["peak_bytes"] - m["static_bytes"], 0) / mb
    fits = [d for d in range(1, m["batch_size"] + 1)
            if m["batch_size"] % d == 0 and m["static_bytes"] + per_row * d <= limit]
    what = (f"one step at micro-batch {mb} x {m['seq_len']} tokens peaked at {m['peak_bytes'] / GIB:.1f} GiB, "
            f"{m['peak_bytes'] / m['total_bytes']:.0%} of the device's {m['total_bytes'] / GIB:.1f} GiB "
            f"(limit {fraction:.0%})")
    if fits:
        d = max(fits)
        fix = (f"rerun with --micro-batch-size {d} (estimated peak {(m['static_bytes'] + per_row * d) / GIB:.1f} GiB: "
               f"{m['static_bytes'] / GIB:.1f} GiB of weights, teacher and optimizer state + "
               f"{per_row / GIB:.2f} GiB per row)")
    else:
        fix = "even one row per micro-batch would not fit: lower --seq-len"
    raise PreflightError(f"memory preflight: {what}; {fix}")


def check_time(m: dict, steps: int, runs: int, elapsed_s: float, measure_s: float, budget_s: float) -> dict:
    """Project the script's time (elapsed + runs x steps x the measured step + the measurements) and refuse a
    projection over `budget_s`, naming the steps that would fit."""
    projected = elapsed_s + runs * steps * m["step_s"] + measure_s
    out = {"projected_s": round(projected, 1), "budget_s": budget_s}
    if projected > budget_s:
        fit = int((budget_s - elapsed_s - measure_s) / max(runs * m["step_s"], 1e-9))
        raise PreflightError(
            f"time preflight: {runs} run(s) of {steps} steps at {m['step_s']:.2f} s per step, after {elapsed_s:.0f} s "
            f"of set-up and with {measure_s:.0f} s of measurements, project {projected:.0f} s > the budget "
            f"{budget_s:.0f} s; rerun with --steps {max(fit, 0)} (and --site-gap / --site-start so that every site "
            "is frozen by then), or a larger --budget-s")
    return out


# ---- the pipeline --------------------------------------------------------------------------------------
def _measure_smollm2(a: argparse.Namespace, skip):
    """scripts/normfree_smollm2_measure.py's `measure` on {"original", "twin"[, "vanilla"]}: held-out CE of each
    model on both row cuts with the paired per-sequence differences (twin - original, vanilla - original, twin -
    vanilla), DLA NMAE, L29N371 total vs direct, first-token norm and sinks of the twin and the original."""
    measure = _sibling("normfree_smollm2_measure").measure
    text_dir = Path(a.corpus) / "heldout"

    def run(models: dict) -> dict:
        return measure(models, a.rows, a.cfi_rows, a.small_rows, text_dir if text_dir.is_dir() else None,
                       a.any_rows, skip)

    return run


class Results(dict):
    """OUT/results.json, rewritten (atomically) after every stage; a rerun starts from what it holds."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.exists() else {})
        self.path = path

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        os.replace(tmp, self.path)


def train_one(original, rows, settings, run_dir: Path, res: Results, name: str):
    """One run (resumed from its checkpoint if one exists); its model, or None if it failed (error recorded)."""
    import lnfree
    from lnfree.removal import remove_layernorm

    if res.get(name, {}).get("done"):
        return lnfree.load(str(run_dir), device=str(next(original.parameters()).device))
    t0 = time.time()
    try:
        model = remove_layernorm(copy.deepcopy(original), rows, settings=settings, out_dir=run_dir, resume="auto",
                                 progress=False)
        res[name] = {"done": True, "wall_s": round(time.time() - t0, 1),
                     "summary": {k: v for k, v in model.removal_summary.items() if k != "sigma"}}
    except Exception as e:  # DivergedError and the like: the fail-safe's message and the curve up to it
        model = None
        res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:],
                     "wall_s": round(time.time() - t0, 1)}
    if (run_dir / "log.jsonl").is_file():
        res[name]["loss_curve"] = _sibling("normfree_smollm2_measure").loss_curve(run_dir)
        log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        res[name]["rollbacks"] = [r for r in log if r.get("event") == "rollback"]
    res.save()
    return model


def pipeline(original, rows, calib, a: argparse.Namespace, out: Path, *, device: str, bos: int,
             measure_fn, probe: MemoryProbe, t0: float) -> Results:
    """Site order, preflight, the norm-free run and the control, each measured as it ends (results.json)."""
    from lnfree.removal import Schedule

    res = Results(out / "results.json")
    res["args"] = vars(a)
    order = site_order(original, calib, a, out)
    schedule = Schedule.from_order(original.cfg.n_layers, a.steps, order, start=a.site_start, gap=a.site_gap)
    res["schedule"] = {"order": order, "freeze_ramp": a.freeze_ramp, **schedule.to_dict()}
    bf16 = device.startswith("cuda")
    runs = [("normfree", False)] + ([] if a.no_vanilla else [("vanilla", True)])
    kws = {name: run_settings(a, schedule, bos, vanilla=vanilla, bf16=bf16) for name, vanilla in runs}
    todo = [name for name, _ in runs if not res.get(name, {}).get("done")]
    if todo:
        m = preflight(original, rows, kws["normfree"], probe)
        res["preflight"] = m
        res.save()
        check_memory(m, a.memory_fraction)
        if a.budget_s and bf16:  # the time check is for a device call's limit (bf16: on CUDA)
            res["preflight"].update(check_time(m, a.steps, len(todo), time.time() - t0, a.measure_s, a.budget_s))
            res.save()
    models = {}
    for name, _ in runs:
        models[name] = train_one(original, rows, kws[name], out / name, res, name)
        # measured as each run ends: the twin against the original, then all three (CE once per model)
        have = {"twin": models.get("normfree"), "vanilla": models.get("vanilla")}
        have = {k: m for k, m in have.items() if m is not None}
        key = "measure_" + "_".join(sorted(have))
        if "twin" in have and key not in res:
            t1 = time.time()
            res[key] = {**measure_fn({"original": original, **have}), "seconds": round(time.time() - t1, 1)}
            res.save()
    res["total_s"] = round(time.time() - t0, 1)
    res.save()
    return res


def _sink_tokens(cpu, model, out: Path):
    """[vocab] bool: the tokens that make position 1 a second sink after the first token (the CPU script's
    `sink_tokens`, once into OUT/sink_tokens.json); rows never start with them (the CPU run's rule)."""
    import numpy as np

    path = out / "sink_tokens.json"
    start = cpu.first_token(model.tokenizer)
    if not path.exists():
        sinks = cpu.sink_tokens(model, start)
        path.write_text(json.dumps({"start": start, "layers": [8, 16, 24], "factor": 8.0,
                                    "tokens": [int(i) for i in sinks.nonzero()[0]]}))
    skip = np.zeros(model.cfg.d_vocab, dtype=bool)
    skip[json.loads(path.read_text())["tokens"]] = True
    return skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=os.environ.get("LNFREE_CORPUS", "corpus"),
                   help="a directory with train/*.txt (copy it into the working tree for the device machine)")
    p.add_argument("--costs", default=None, help="site -> single-site cost JSON (the CPU run's site_costs.json); "
                   "default: computed once into OUT/site_costs.json")
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-fraction", type=float, default=0.8, help="the preflight's peak-memory limit")
    p.add_argument("--budget-s", type=float, default=540.0, help="the preflight's time limit for the whole script "
                   "(a device call runs at most 600 s); 0: no time check. Applied on CUDA only")
    p.add_argument("--measure-s", type=float, default=90.0, help="time allowed for the measurements (projection)")
    p.add_argument("--no-vanilla", action="store_true", help="skip the vanilla control")
    p.add_argument("--smoke", action="store_true", help="4 steps of 2 x 32 tokens on any device (~2 min on CPU)")
    a = p.parse_args(argv)
    if a.smoke:
        for key, value in SMOKE.items():
            setattr(a, key, value)
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch

    import lnfree

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    original = lnfree.load("smollm2-135m", device=device)
    files = sorted(str(f) for f in (Path(a.corpus) / "train").glob("*.txt"))
    if not files:
        raise SystemExit(f"--corpus {a.corpus}: no train/*.txt there")
    need = a.steps * a.batch_size * a.seq_len
    cpu = _sibling("normfree_smollm2_cpu")
    skip = _sink_tokens(cpu, original, out)
    rows = cpu._rows(original, files, a.seq_len, int(need * 1.05) + (2 * a.calib_rows + 1) * a.seq_len, skip)
    calib, rows = rows[-2 * a.calib_rows:], rows[: -2 * a.calib_rows]  # calibration rows never trained on
    res = Results(out / "results.json")
    res.update({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                "load_s": round(time.time() - t0, 1), "train_rows": int(rows.shape[0]), "train_tokens_needed": need})
    res.save()
    res = pipeline(original, rows, calib, a, out, device=device, bos=cpu.first_token(original.tokenizer),
                   measure_fn=_measure_smollm2(a, skip), probe=MemoryProbe(device), t0=t0)
    print(json.dumps({k: res.get(k) for k in ("device", "total_s", "preflight")}, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
