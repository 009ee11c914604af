"""scripts/normfree_smollm2_gpu.py (issue 21.6): the vanilla control trains with the norm-free run's losses
(only the freezing differs), the memory and time preflight, and the script's pipeline end to end on a tiny
random Llama-like model with a sink-like first token (not SmolLM2), on CPU."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lnfree.evaluation import cross_entropy
from lnfree.removal import Schedule
from test_positional_scale import BOS, VOCAB, _llama

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "normfree_smollm2_gpu.py"
GIB = 2**30


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("normfree_smollm2_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY = ["--steps", "10", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "16", "--lr", "3e-3",
        "--min-lr", "1e-3", "--warmup", "1", "--lora-rank", "4", "--site-start", "1", "--site-gap", "1",
        "--freeze-ramp", "1", "--checkpoint-every", "4", "--calib-rows", "2"]


def _rows(n=48, seed=5):
    t = torch.randint(1, VOCAB, (n, 16), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t.numpy()


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["config"]


def _steps(run_dir: Path) -> list[dict]:
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in log if r.get("event") == "step"]


def _pipeline(gpu, tmp_path, extra=()):
    a = gpu.parse_args(["--out", str(tmp_path)] + TINY + list(extra))
    calls = []

    def measure(models: dict):  # the SmolLM2 measurements need its tokenizer; CE on held-out rows here
        calls.append(dict(models))
        held = torch.as_tensor(_rows(8, seed=9))
        return {k: float(cross_entropy(m, held, n_boot=1).mean) for k, m in models.items()}

    original = _llama()
    rows = _rows()
    res = gpu.pipeline(original, rows[:-4], rows[-4:], a, tmp_path, device="cpu", bos=BOS, measure_fn=measure,
                       probe=gpu.MemoryProbe("cpu"), t0=0.0)
    return a, res, calls, original


@pytest.mark.parametrize("aux", [0.0, 0.01])
def test_control_kwargs_differ_from_the_normfree_run_only_in_freezing(gpu, aux):
    a = gpu.parse_args(["--out", "x", "--aux-lambda", str(aux)])
    sched = Schedule.scaled(2, a.steps)
    nf = dataclasses.asdict(gpu.run_settings(a, sched, 1, vanilla=False, bf16=True))
    van = dataclasses.asdict(gpu.run_settings(a, sched, 1, vanilla=True, bf16=True))
    differ = {k for k in set(nf) | set(van) if nf.get(k) is not van.get(k) and nf.get(k) != van.get(k)}
    assert differ == ({"vanilla", "recipe"} if aux else {"vanilla"})
    assert van["distill"] == nf["distill"] == 1.0 and van["lora_rank"] == 32 and van["aux_lambda"] == aux
    assert van["site_aux"] == nf["site_aux"] == 10.0  # the norm-input loss, in both (the CPU runs' finding)
    if aux:
        assert van["recipe"] == {"vanilla_aux": True}  # else the trainer would drop the control's aux loss


@pytest.mark.parametrize("aux", [0.0, 0.05])
def test_pipeline_on_a_tiny_llama_control_trains_with_the_same_losses(gpu, tmp_path, aux):
    a, res, calls, original = _pipeline(gpu, tmp_path, ["--aux-lambda", str(aux)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["normfree"]["done"] and saved["vanilla"]["done"], saved.get("normfree", {}).get("error")
    # the trainer's own record of both runs' settings: only the freezing differs (and, with an aux loss, the
    # switch that keeps it in the control)
    nf, van = _config(tmp_path / "normfree"), _config(tmp_path / "vanilla")
    assert {k for k in nf if nf[k] != van[k]} == ({"vanilla", "vanilla_aux"} if aux else {"vanilla"})
    # and the losses actually computed: the control distils (KL logged) and keeps the aux loss when it is on
    for run in ("normfree", "vanilla"):
        steps = _steps(tmp_path / run)
        assert len(steps) == a.steps and all("kl" in r for r in steps)
        assert all((r["aux"] > 0) == bool(aux) for r in steps)
    assert any(r["kl"] > 0 for r in _steps(tmp_path / "vanilla"))
    # the norm-free model: every site frozen at a positional scale (position 0 apart), none live
    assert [sorted(c) for c in calls] == [["original", "twin"], ["original", "twin", "vanilla"]]
    twin, vanilla = calls[1]["twin"], calls[1]["vanilla"]
    assert calls[0]["original"] is original and calls[1]["original"] is original and calls[0]["twin"] is twin
    assert twin.is_norm_free and all(twin.is_positional(s) for s in twin.ln_sites)
    assert set(vanilla.ln_modes().values()) == {"live"}
    assert set(res) >= {"measure_twin", "measure_twin_vanilla", "preflight"}
    assert res["measure_twin_vanilla"]["twin"] == res["measure_twin"]["twin"]
    assert res["schedule"]["order"] and sorted(res["schedule"]["order"]) == sorted(original.ln_sites)
    assert json.loads((tmp_path / "site_costs.json").read_text())["costs"].keys() == set(original.ln_sites)


def test_pipeline_preflight_and_rerun_skips_finished_runs(gpu, tmp_path):
    a, res, calls, _ = _pipeline(gpu, tmp_path)
    m = res["preflight"]
    assert m["micro_batch_size"] == 2 and m["step_s"] > 0
    assert m["total_bytes"] > m["peak_bytes"] >= m["static_bytes"] > 0
    lines = (tmp_path / "normfree" / "log.jsonl").read_text()
    _, res2, calls2, _ = _pipeline(gpu, tmp_path)  # the same command again: nothing retrained or re-measured
    assert (tmp_path / "normfree" / "log.jsonl").read_text() == lines
    assert calls2 == [] and res2["normfree"] == res["normfree"] and "preflight" in res2


def test_check_memory_names_a_micro_batch_that_fits(gpu):
    m = {"micro_batch_size": 32, "seq_len": 1024, "batch_size": 128, "peak_bytes": 70 * GIB, "static_bytes": 6 * GIB,
         "total_bytes": 80 * GIB}
    with pytest.raises(gpu.PreflightError, match=r"88% of the device's 80\.0 GiB.*--micro-batch-size 16 "
                                                  r"\(estimated peak 38\.0 GiB: 6\.0 GiB .* \+ 2\.00 GiB per row\)"):
        gpu.check_memory(m, 0.8)
    gpu.check_memory({**m, "peak_bytes": 60 * GIB}, 0.8)  # 75%: passes
    with pytest.raises(gpu.PreflightError, match="even one row .* lower --seq-len"):
        gpu.check_memory({**m, "static_bytes": 63.9 * GIB, "peak_bytes": 79 * GIB}, 0.8)


def test_check_time_projects_and_names_the_steps_that_fit(gpu):
    m = {"step_s": 0.5}
    out = gpu.check_time(m, 360, 2, elapsed_s=60, measure_s=90, budget_s=540)
    assert out["projected_s"] == pytest.approx(60 + 360 + 90)
    with pytest.raises(gpu.PreflightError, match=r"project 870 s > the budget 540 s; rerun with --steps 195 "):
        gpu.check_time({"step_s": 1.0}, 360, 2, elapsed_s=60, measure_s=90, budget_s=540)


def test_site_order_refuses_a_costs_file_of_another_model(gpu, tmp_path):
    costs = tmp_path / "c.json"
    costs.write_text(json.dumps({"costs": {"blocks.0.ln2": 0.1}}))
    a = gpu.parse_args(["--out", str(tmp_path), "--costs", str(costs)])
    with pytest.raises(ValueError, match=r"no cost for .*delete it or pass --costs"):
        gpu.site_order(_llama(), np.zeros((2, 16), dtype=np.int64), a, tmp_path)
