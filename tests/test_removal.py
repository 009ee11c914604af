"""LN removal fine-tune: schedule, sigma EMA, aux loss, data, checkpoints, rollback, resume, DDP, CLI."""

import copy
import json
import math
import multiprocessing as mp
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from _ddp import run_two_ranks
from conftest import REMOVAL_RUN, REMOVAL_SCHED, make_model, removal_data, removal_tl_dir, sigkill_mid_run
from lnfree.removal import (
    PRESETS, Schedule, SigmaEMA, SpikeDetector, TokenData, aux_norm_loss, latest_checkpoint, load_checkpoint,
    load_tokens, lr_at, remove_layernorm,
)
from lnfree.removal.data import chunk, split_holdout
from lnfree.removal.sigma import global_micro_batch_means
from lnfree.removal.trainer import RemovalConfig, load_tl_dir, read_checkpoint
from lnfree.training import OptimConfig

# a 12-step schedule for the 2-layer test model: ln2 at 2,3; ln1.qk at 4,5; ln1.v at 6,8; ln_final at 10
SCHED, RUN, _data = REMOVAL_SCHED, REMOVAL_RUN, removal_data


# ---- schedule ----------------------------------------------------------------------------------
def test_presets_match_the_paper():
    # numbers from the paper: first ln2 / ln1-qk / ln1-v / ln_final steps, gaps, steps, lambda, LRs
    expected = {
        "gpt2-small": (12, 300, (20, 44, 68, 104), (2, 2, 3), 0.1, 6e-4, 3e-4),
        "gpt2-medium": (24, 500, (20, 68, 116, 188), (2, 2, 3), 0.1, 6e-4, 3e-4),
        "gpt2-large": (36, 600, (30, 174, 318, 534), (4, 4, 6), 0.03, 3e-4, 4e-5),
        "gpt2-xl": (48, 800, (50, 242, 434, 722), (4, 4, 6), 0.01, 1e-4, 2e-5),
    }
    for name, (L, steps, starts, gaps, lam, lr, min_lr) in expected.items():
        p = PRESETS[name]
        s = p.schedule
        assert (s.n_layers, s.steps, p.aux_lambda, p.lr, p.min_lr) == (L, steps, lam, lr, min_lr)
        assert p.batch_size * p.seq_len == 524288
        for g, (fmt, start, gap) in enumerate(zip(("blocks.{}.ln2", "blocks.{}.ln1.qk", "blocks.{}.ln1.v"),
                                                  starts, gaps)):
            assert [s.removal_step(fmt.format(i)) for i in range(L)] == [start + i * gap for i in range(L)]
        assert s.removal_step("ln_final") == starts[3]
    small = PRESETS["gpt2-small"].schedule
    assert [small.removal_step(f"blocks.{i}.ln2") for i in range(3)] == [20, 22, 24]
    assert [small.removal_step(f"blocks.{i}.ln1.qk") for i in range(3)] == [44, 46, 48]
    assert [small.removal_step(f"blocks.{i}.ln1.v") for i in range(3)] == [68, 71, 74]
    assert small.removal_step("ln_final") == 104


def test_schedule_queries_and_order():
    s = PRESETS["gpt2-small"].schedule
    assert s.sites_removed_at(44) == ["blocks.0.ln1.qk"] and s.sites_removed_at(43) == []
    for step in (0, 19, 20, 21, 70, 104, 299):
        live, frozen = s.live_sites(step), s.frozen_sites(step)
        assert sorted(live + frozen) == sorted(s.sites) and not set(live) & set(frozen)
    assert s.live_sites(19) == s.sites and s.frozen_sites(104) == s.sites
    # the paper's order: all ln2, then all ln1.qk, then all ln1.v, then ln_final
    order = sorted(s.sites, key=s.removal_step)
    groups = [x.split(".")[-1] if x != "ln_final" else x for x in order]
    assert groups == ["ln2"] * 12 + ["qk"] * 12 + ["v"] * 12 + ["ln_final"]
    assert s.describe(45) == "ln2 12/12, ln1-qk 1/12, ln1-v 0/12, ln_final 0/1"
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert len(s.to_frame()) == 37 and s.plot().data


def test_scaled_schedule_keeps_small_proportions():
    assert Schedule.scaled(12, 300).removal_steps == PRESETS["gpt2-small"].schedule.removal_steps
    for L, steps in ((4, 300), (6, 1000), (2, 12), (24, 500), (1, 2)):
        s = Schedule.scaled(L, steps)
        first, last = s.removal_step("blocks.0.ln2"), s.removal_step("ln_final")
        assert 1 <= first <= last <= steps - 1
        if steps >= 100:
            assert abs(first / steps - 20 / 300) < 0.01 and abs(last / steps - 104 / 300) < 0.01
        steps_in_order = [s.removal_step(x) for x in s.sites]
        assert steps_in_order == sorted(steps_in_order)


def test_schedule_validation():
    with pytest.raises(ValueError, match="outside the run"):
        Schedule.from_gaps(2, 10, 2, 1, 1, 2)  # ln_final at 10 in a 10-step run
    with pytest.raises(ValueError, match="must be >= 1"):
        Schedule.from_gaps(2, 20, 0, 1, 1, 1)  # a site at step 0 would have no sigma estimate
    with pytest.raises(ValueError, match="every site"):
        Schedule(2, 20, (("blocks.0.ln2", 3),))
    with pytest.raises(ValueError, match="non-decreasing"):
        Schedule.from_gaps(2, 30, 5, 1, 1, 1, start_ln1qk=2)
    with pytest.raises(ValueError, match="not in this"):
        SCHED.removal_step("blocks.7.ln2")
    with pytest.raises(ValueError, match="unknown preset"):
        remove_layernorm(make_model(), _data(), schedule="gpt2-tiny", progress=False)
    with pytest.raises(ValueError, match="12-layer"):
        remove_layernorm(make_model(), _data(), schedule="gpt2-small", progress=False)


# ---- pieces ------------------------------------------------------------------------------------
def test_lr_schedule_closed_form():
    cfg = OptimConfig(steps=22, lr=1.0, min_lr=0.2, warmup=5)
    assert [lr_at(i, cfg) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_at(5, cfg) == pytest.approx(1.0)
    assert lr_at(13, cfg) == pytest.approx(0.6)  # cosine midpoint = (lr + min_lr) / 2
    assert lr_at(21, cfg) == pytest.approx(0.2)  # the last step ends at min_lr


def test_sigma_ema_brute_force():
    rng = np.random.default_rng(0)
    xs = rng.uniform(1, 3, size=(7, 2))
    ema = SigmaEMA(["a", "b"], momentum=0.9)
    for row in xs:
        ema.update({"a": row[0], "b": row[1], "untracked": 1.0})
    expect = xs[0].copy()
    for row in xs[1:]:
        expect = 0.9 * expect + 0.1 * row
    assert ema.value("a") == pytest.approx(expect[0], rel=1e-12) and ema.value("b") == pytest.approx(expect[1])
    state = json.loads(json.dumps(ema.state_dict()))
    other = SigmaEMA([])
    other.load_state_dict(state)
    assert other.value("a") == ema.value("a")
    with pytest.raises(ValueError, match="no data"):
        SigmaEMA(["c"]).value("c")
    local = torch.tensor([[[6.0, 3.0], [0.0, 0.0]], [[2.0, 4.0], [9.0, 3.0]]], dtype=torch.float64)
    assert global_micro_batch_means(local, ["a", "b"]) == [{"a": 2.0}, {"a": 0.5, "b": 3.0}]


def test_aux_loss_and_gradient_match_manual():
    g = torch.Generator().manual_seed(0)
    resid = (torch.randn(3, 5, 8, generator=g) * torch.linspace(0.5, 3, 5)[None, :, None]).double()
    tokens = torch.randint(1, 9, (3, 5), generator=g)
    tokens[1, 2] = 0  # end-of-text
    x = resid.numpy()
    xc = x - x.mean(-1, keepdims=True)
    sigma = np.sqrt((xc**2).mean(-1) + 1e-5)
    keep = np.ones((3, 5), bool)
    keep[:, 0] = False
    keep[1, 2] = False
    sigma_hat = sigma[keep].mean()
    expected = ((sigma - sigma_hat) ** 2).mean()
    r = resid.clone().requires_grad_(True)
    loss = aux_norm_loss(r, tokens, eot_token_id=0, eps=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    # d/dx of mean (sigma - const)^2: 2 (sigma - sigma_hat) / N * xc / (d * sigma); sigma_hat gets no gradient
    grad = 2 * (sigma - sigma_hat)[..., None] / sigma.size * xc / (8 * sigma[..., None])
    np.testing.assert_allclose(r.grad.numpy(), grad, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="resid must be"):
        aux_norm_loss(r[0], tokens)


def test_spike_detector():
    d = SpikeDetector(factor=3.0, margin=2.0, window=5, min_history=3)
    assert d.check(100.0) is None  # too little history to judge
    for x in (0.5, 0.6, 0.55):
        d.record(x)
    assert d.check(1.9) is None  # > 3x median but within median + 2
    assert "spike" in d.check(2.6)
    assert "non-finite" in d.check(float("nan"))


# ---- data --------------------------------------------------------------------------------------
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("a b c d e f".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]")


def test_text_data_joined_with_eot_no_bos(tmp_path):
    tok = _word_tokenizer()
    (tmp_path / "1.txt").write_text("a b c")
    (tmp_path / "2.txt").write_text("d e")
    (tmp_path / "3.jsonl").write_text('{"text": "f f"}\n{"text": "a"}\n')
    seqs = load_tokens(tmp_path, seq_len=3, tokenizer=tok)
    # a b c EOT d e EOT f f EOT a EOT -> 12 tokens, 4 chunks of 3, no BOS at the start
    assert seqs.tolist() == [[2, 3, 4], [0, 5, 6], [0, 7, 7], [0, 2, 0]]
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokens(tmp_path / "1.txt", seq_len=3)
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.npy", seq_len=3)


def test_token_arrays_and_order(tmp_path):
    stream = np.arange(100, dtype=np.uint16)
    np.save(tmp_path / "s.npy", stream)
    assert load_tokens(tmp_path / "s.npy", seq_len=16).shape == (6, 16)
    with_bos = load_tokens(tmp_path / "s.npy", seq_len=16, bos_token_id=7)  # [7] + 15 stream tokens per row
    assert with_bos.shape == (6, 16) and with_bos[:, 0].tolist() == [7] * 6
    assert with_bos[1, 1:].tolist() == list(range(15, 30))
    assert chunk(np.arange(40).reshape(2, 20), 8).tolist()[1] == list(range(8, 16))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        chunk(np.zeros((3, 4), np.int64), 8)
    data = TokenData(np.arange(50).reshape(10, 5), seed=3)
    first_two_epochs = data.indices(0, 20)
    assert sorted(first_two_epochs[:10]) == list(range(10)) and sorted(first_two_epochs[10:]) == list(range(10))
    assert not np.array_equal(first_two_epochs[:10], first_two_epochs[10:])
    assert np.array_equal(TokenData(data.sequences, seed=3).indices(7, 6), first_two_epochs[7:13])
    assert not np.array_equal(TokenData(data.sequences, seed=4).indices(0, 10), first_two_epochs[:10])
    train, held = split_holdout(np.arange(20).reshape(10, 2), 3)
    assert train.shape == (7, 2) and held[0].tolist() == [14, 15]


# ---- training ----------------------------------------------------------------------------------
def test_freeze_steps_and_sigma_match_brute_force():
    """With a negligible LR the weights stay put, so the EMA can be recomputed from hook_scale caches."""
    model, ref = make_model(), make_model()
    data = _data()
    events = []
    kw = dict(RUN, lr=1e-30, min_lr=1e-30, checkpoint_every=100)
    out = remove_layernorm(model, data, **kw, callback=events.append)
    freezes = {e["step"]: e["sigma"] for e in events if e["event"] == "freeze"}
    assert {s: sorted(v) for s, v in freezes.items()} == {
        st: sorted(SCHED.sites_removed_at(st)) for st in sorted(set(SCHED.to_dict()["removal_steps"].values()))}
    assert out.is_ln_free and set(out.ln_modes().values()) == {"removed"}
    order = TokenData(data.numpy(), seed=0)
    ema, position = {}, 0
    for step in range(SCHED.steps):
        for site in SCHED.sites_removed_at(step):
            assert freezes[step][site] == pytest.approx(ema[site], rel=1e-6)
            ref.freeze_ln(site, scales=ema[site])
        for j in range(2):  # two micro-batches of 2 per step
            toks = order.batch(position + 2 * j, 2)
            _, cache = ref.run_with_cache(toks, names_filter=lambda n: "hook_scale" in n)
            for site in SCHED.live_sites(step):
                v = float(cache[ref.site_hook(site)].double().mean())
                ema[site] = v if site not in ema else 0.9 * ema[site] + 0.1 * v
        position += 4


def test_run_removes_every_site_and_folding_matches_frozen(tmp_path, tokens):
    events = []
    out = remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path, eval_data=_data(8, seed=9),
                           callback=events.append)
    assert out.is_ln_free and out.cfg.normalization_type is None
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert all(math.isfinite(e["loss"]) and e["aux"] > 0 for e in steps)
    assert steps[0]["stage"] == "ln2 0/2, ln1-qk 0/2, ln1-v 0/2, ln_final 0/1"
    assert steps[-1]["stage"] == "ln2 2/2, ln1-qk 2/2, ln1-v 2/2, ln_final 1/1"
    frozen, state = load_checkpoint(tmp_path)  # the final checkpoint: all sites frozen, not folded
    assert state["step"] == 12 and set(frozen.ln_modes().values()) == {"frozen"}
    with torch.no_grad():
        torch.testing.assert_close(out(tokens), frozen(tokens), atol=2e-4, rtol=1e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 4 * 16 and summary["ln_free"]
    assert summary["ce_before"]["low"] <= summary["ce_before"]["value"] <= summary["ce_before"]["high"]
    assert summary["ce_after"]["n"] == 8 and summary["schedule"] == SCHED.to_dict()
    assert summary["sigma"] == pytest.approx(state["site_scales"])
    ht = load_tl_dir(tmp_path / "final_tl")
    with torch.no_grad():
        torch.testing.assert_close(ht(tokens), out(tokens))


def test_vanilla_keeps_ln_and_first_loss_is_plain_ce():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    data = _data()
    events = []
    out = remove_layernorm(model, data, **RUN, vanilla=True, callback=events.append)
    assert set(out.ln_modes().values()) == {"live"} and not any(e["event"] == "freeze" for e in events)
    first = next(e for e in events if e["event"] == "step")
    batch = TokenData(data.numpy(), seed=0).batch(0, 4)
    ref = make_model()
    with torch.no_grad():
        ce = float(ref(batch, return_type="loss"))
    assert first["loss"] == pytest.approx(ce, rel=1e-5) and first["aux"] == 0
    assert first["stage"] == "vanilla (LN kept)"
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items() if k in before)


def test_checkpoint_files_and_resume_guards(tmp_path):
    remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path)
    ck = latest_checkpoint(tmp_path)
    assert ck.name == "step_000012" and (tmp_path / "checkpoints" / "latest").read_text().strip() == ck.name
    assert len([p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]) == 2  # keep_checkpoints
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert opt["scheduler"]["step"] == 12 and opt["optimizer"]["state"]
    state = json.loads((ck / "state.json").read_text())
    for key in ("step", "position", "sigma_ema", "site_modes", "site_scales", "rng", "config", "data"):
        assert key in state
    assert state["position"] == 12 * 4
    with pytest.raises(ValueError, match="resume=True"):
        remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path)
    with pytest.raises(ValueError, match="lr="):
        remove_layernorm(make_model(), _data(), **dict(RUN, lr=1e-2), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="training data differ"):
        remove_layernorm(make_model(), _data(seed=6), **RUN, out_dir=tmp_path, resume=True)
    # a half-written checkpoint directory is ignored (and cleaned up by the next write)
    (tmp_path / "checkpoints" / ".step_000016.tmp99").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000012"


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        remove_layernorm(model, _data(), **dict(RUN, micro_batch_size=3))
    with pytest.raises(ValueError, match="n_ctx"):
        remove_layernorm(model, torch.randint(0, 61, (8, 32)), **dict(RUN, seq_len=32))
    with pytest.raises(ValueError, match="vocabulary"):
        remove_layernorm(model, torch.randint(0, 200, (8, 16)), **RUN)
    with pytest.raises(TypeError, match="HookedTransformer"):
        remove_layernorm("gpt2", _data(), **RUN)
    with pytest.raises(ValueError, match="no LayerNorm left"):
        remove_layernorm(make_model().remove_ln(scales=2.0), _data(), **RUN)


def _nan_after(model, n_calls, every=False):
    """Make block 0 output NaN on the n-th training forward (or on every one from then on)."""
    calls = [0]

    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == n_calls or (every and calls[0] >= n_calls):
                return output * float("nan")

    model.blocks[0].register_forward_hook(hook)


def test_nan_rolls_back_to_last_good_checkpoint(tmp_path):
    model = make_model()
    _nan_after(model, 2 * 5 + 1)  # first micro-batch of step 5; checkpoints at 0, 4, 8, 12
    events = []
    with pytest.warns(UserWarning, match="rolled back to step 4"):
        out = remove_layernorm(model, _data(), **RUN, out_dir=tmp_path, callback=events.append)
    rb = [e for e in events if e["event"] == "rollback"]
    assert len(rb) == 1 and rb[0]["failed_step"] == 5 and rb[0]["to_step"] == 4 and rb[0]["lr_scale"] == 0.5
    assert "non-finite" in rb[0]["reason"]
    steps = [e for e in events if e["event"] == "step"]
    # step index 5 failed: steps 4 (done, not yet checkpointed) and 5.. are run again from the step-4 checkpoint
    assert [e["step"] for e in steps] == list(range(1, 6)) + list(range(5, 13))
    cfg = OptimConfig(steps=12, lr=3e-3, min_lr=1e-3, warmup=2)
    after = steps[5:]
    assert [e["lr"] for e in after] == pytest.approx([0.5 * lr_at(e["step"] - 1, cfg) for e in after])
    assert out.is_ln_free and all(bool(torch.isfinite(p).all()) for p in out.parameters())
    assert json.loads((tmp_path / "summary.json").read_text())["rollbacks"] == 1


def test_gives_up_after_max_rollbacks_keeping_good_checkpoint(tmp_path):
    model = make_model()
    _nan_after(model, 2 * 5 + 1, every=True)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="gave up at step 4.*2 rollbacks"):
        remove_layernorm(model, _data(), **RUN, out_dir=tmp_path, max_rollbacks=2)
    ck = read_checkpoint(latest_checkpoint(tmp_path))
    assert ck["state"]["step"] == 4
    params = {n for n, _ in make_model().named_parameters()}
    assert all(bool(torch.isfinite(v).all()) for k, v in ck["weights"].items() if k in params)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    data = _data().numpy()
    killed = tmp_path / "killed"
    # a forked child: a separate process (killed for real) without re-importing torch and TransformerLens
    proc = mp.get_context("fork").Process(target=sigkill_mid_run, args=(killed, data, make_model))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL
    assert latest_checkpoint(killed).name == "step_000004"
    resumed = remove_layernorm(make_model(), data, **RUN, out_dir=killed, resume=True)
    straight = remove_layernorm(make_model(), data, **RUN, out_dir=tmp_path / "straight")
    a, b = resumed.state_dict(), straight.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-for-bit: weights, optimizer, EMA, data cursor all restored exactly
    log = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["step"] == 4 for e in log)
    # the log reads as one run: what the killed process logged after the step-4 checkpoint is dropped
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(1, 13))


def test_ddp_two_processes_match_one(tmp_path, tokens):
    data = _data().numpy()
    kw = dict(RUN, batch_size=8, micro_batch_size=2)  # 2 processes x 2 micro-batches x 2 = 1 x 4 x 2
    out = tmp_path / "ddp"
    r0, r1 = run_two_ranks(out, data, kw)
    single = remove_layernorm(make_model(), data, **kw)
    ref = single.state_dict()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k  # ranks froze the same sigmas and took the same steps
        if k.endswith("b_K"):
            continue  # its exact gradient is 0 (softmax shift invariance): Adam turns rounding noise into steps
        torch.testing.assert_close(r0[k], ref[k], atol=2e-5, rtol=1e-4)
    ddp_model = make_model().remove_ln(scales=1.0)
    ddp_model.load_state_dict(r0)
    with torch.no_grad():
        torch.testing.assert_close(ddp_model(tokens), single(tokens), atol=1e-4, rtol=1e-4)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "step" for e in log) == 12  # only rank 0 writes
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_bf16_autocast_runs():
    out = remove_layernorm(make_model(), _data(), **dict(RUN, checkpoint_every=100), bf16=True)
    assert out.is_ln_free and all(bool(torch.isfinite(p).all()) for p in out.parameters())


def test_cli_remove_ln_from_tl_dir(tmp_path, tokens):
    from lnfree.cli import main

    src = removal_tl_dir(tmp_path)
    out = tmp_path / "run"
    args = ["remove-ln", str(src), "--data", str(tmp_path / "train.npy"), "--out", str(out), "--steps", "12",
            "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "16", "--eval-seqs", "8",
            "--checkpoint-every", "6", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_pretrained may be unavailable: final_tl/ is always written
        assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["ln_free"] and summary["ce_after"]["n"] == 8
    assert summary["schedule"]["name"] == "scaled-2L-12" and summary["wall_time_s"] > 0
    frozen, state = load_checkpoint(out)
    final = load_tl_dir(out / "final_tl")
    with torch.no_grad():
        torch.testing.assert_close(final(tokens), frozen(tokens), atol=2e-4, rtol=1e-4)
    assert "final" in summary["final"] or "final_error" in summary["final"]
    assert main(args) == 2  # the run exists: needs --resume
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + ["--resume"]) == 0  # a finished run: nothing left to train, outputs rewritten
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert main(["remove-ln", str(src), "--data", str(tmp_path / "train.npy"), "--out", str(tmp_path / "x"),
                 "--preset", "gpt2-small", "--no-progress"]) == 2  # a 12-layer preset on a 2-layer model
