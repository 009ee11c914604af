"""Removal variants (issue 16): LoRA adapters on a frozen backbone, distillation to the original model;
both on tiny random GPT-2 and Llama-like (RMSNorm, GQA, rotary, SwiGLU) models, composing with resume,
rollback, DDP and bf16."""

import copy
import json
import math
import multiprocessing as mp
import signal

import pytest
import torch

from _ddp import run_two_ranks
import conftest
from conftest import make_model
from lnfree.model import LNFreeTransformer
from lnfree.removal import apply_lora, distill_kl, latest_checkpoint, load_checkpoint, merge_lora, remove_layernorm
from lnfree.removal.lora import adapter_parameters, is_lora
from lnfree.removal.loss import aux_norm_loss

SCHED, RUN = conftest.REMOVAL_SCHED, conftest.REMOVAL_RUN


def make_llama(seed=0) -> LNFreeTransformer:
    return conftest.make_llama(seed, d_mlp=64)


MAKERS = {"gpt2": make_model, "llama": make_llama}


_data = conftest.removal_data


def _tokens():
    return torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(1))


# ---- LoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_starts_at_the_original_and_merges_exactly(arch):
    model, ref = MAKERS[arch](), MAKERS[arch]()
    toks = _tokens()
    pairs = apply_lora(model, 4, seed=0)
    names = sorted({n for _, n in pairs})
    expected = ["W_O", "W_Q", "W_gate", "W_in", "W_out", "_W_K", "_W_V"] if arch == "llama" else \
        ["W_K", "W_O", "W_Q", "W_V", "W_in", "W_out"]
    assert names == expected and len(pairs) == len(expected) * 2
    assert all(not p.requires_grad for n, p in model.named_parameters() if "parametrizations" not in n
               or n.endswith("original"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(model)}
    with torch.no_grad():
        assert torch.equal(model(toks), ref(toks))  # B = 0: exactly the original function
        for p in adapter_parameters(model):
            p.add_(0.05 * torch.randn_like(p))  # give the adapters something to merge
        adapted = model(toks)
    assert not torch.allclose(adapted, ref(toks).detach(), atol=1e-3)
    # an independent computation of one adapted weight: W + (alpha / r) * (A reshaped) @ (B reshaped)
    attn = model.blocks[0].attn
    d = attn.parametrizations["W_Q"][0]
    W = attn.parametrizations["W_Q"].original
    brute = W + d.scale * torch.einsum("ik,hkj->hij", d.A, d.B)
    torch.testing.assert_close(attn.W_Q, brute, rtol=0, atol=1e-6)
    merge_lora(model)
    assert not is_lora(model) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(toks), adapted, atol=1e-5, rtol=1e-5)


def test_lora_optimizer_state_is_only_for_adapters():
    from lnfree.training import OptimConfig, make_optimizer

    model = make_model()
    n_all = sum(p.numel() for p in model.parameters())
    apply_lora(model, 2)
    opt = make_optimizer(model, OptimConfig(steps=2, lr=1e-3))
    in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert in_opt == sum(p.numel() for p in adapter_parameters(model)) < n_all / 4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_run_removes_every_site_and_saves_a_plain_model(arch, tmp_path):
    from lnfree.removal import load_tl_dir

    events = []
    out = remove_layernorm(MAKERS[arch](), _data(), **RUN, lora_rank=4, out_dir=tmp_path, callback=events.append)
    assert out.is_ln_free and not is_lora(out) and set(out.ln_modes().values()) == {"removed"}
    toks = _tokens()
    with torch.no_grad():
        logits = out(toks)
    assert torch.isfinite(logits).all()
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 12 and all(math.isfinite(e["loss"]) for e in steps)
    frozen, state = load_checkpoint(tmp_path)  # the LoRA checkpoint: adapters merged on load
    assert not is_lora(frozen) and state["config"]["lora_rank"] == 4
    with torch.no_grad():
        torch.testing.assert_close(frozen(toks), logits, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(load_tl_dir(tmp_path / "final_tl")(toks), logits)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["variant"] == "lora"
    # GPT-2 is also exported in HF format; other architectures keep final_tl and say why, without a warning
    assert ("final" in summary["final"]) == (arch == "gpt2")
    if arch != "gpt2":
        assert "no HF GPT-2 export for this architecture" in summary["final"]["final_error"]


def test_lora_keeps_the_backbone_frozen():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = remove_layernorm(model, _data(), **dict(RUN, checkpoint_every=100), lora_rank=2, vanilla=True)
    after = out.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # only the adapted matrices moved (by their merged low-rank update); embeddings, biases, norms did not
    assert changed and all(k.split(".")[-1] in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out") for k in changed)
    delta = (after["blocks.0.mlp.W_in"] - before["blocks.0.mlp.W_in"]).double()
    assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 2


# ---- distillation ----------------------------------------------------------------------------------
def test_distill_kl_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    ps, pt = s.softmax(-1).double(), t.softmax(-1).double()
    brute = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert float(distill_kl(s, t)) == pytest.approx(float(brute), rel=1e-5)
    T = 2.0
    ps, pt = (s / T).softmax(-1).double(), (t / T).softmax(-1).double()
    assert float(distill_kl(s, t, temperature=T)) == pytest.approx(float((pt * (pt.log() - ps.log())).sum(-1).mean() * T * T), rel=1e-5)
    assert float(distill_kl(s, s)) == 0.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_distillation_starts_at_zero_and_removes_every_site(arch):
    model = MAKERS[arch]()
    events = []
    out = remove_layernorm(model, _data(), **dict(RUN, checkpoint_every=100), distill=1.0, callback=events.append)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["kl"] == 0.0  # nothing frozen yet: the student is the teacher
    assert steps[0]["loss"] == pytest.approx(0.1 * steps[0]["aux"], abs=1e-12)  # distill=1: KL + lambda aux only
    assert any(e["kl"] > 0 for e in steps[2:])  # once sites freeze, the student departs and is pulled back
    assert out.is_ln_free and torch.isfinite(out(_tokens())).all()


def test_mixed_distillation_loss_is_the_weighted_sum():
    events = []
    remove_layernorm(make_model(), _data(), **dict(RUN, checkpoint_every=100), distill=0.25, callback=events.append)
    for e in (e for e in events if e["event"] == "step"):
        assert e["loss"] == pytest.approx(0.75 * e["ce"] + 0.25 * e["kl"] + 0.1 * e["aux"], rel=1e-9)


# ---- RMS -------------------------------------------------------------------------------------------
def test_rms_model_aux_loss_and_sigma_use_the_rms():
    """On an RMSNorm model the aux loss's sigma and the sigma EMA are RMS values (no centering), as RMSNorm computes."""
    from lnfree.removal.data import TokenData

    events = []
    remove_layernorm(make_llama(), _data(), **dict(RUN, lr=1e-30, min_lr=1e-30, checkpoint_every=100),
                     callback=events.append)
    ref, order = make_llama(), TokenData(_data().numpy(), seed=0)

    def rms_of_final_input(position):  # independent: per-token sqrt(mean x^2 + eps) of ln_final's input
        toks = order.batch(position, 2)
        _, cache = ref.run_with_cache(toks, names_filter="blocks.1.hook_resid_post")
        x = cache["blocks.1.hook_resid_post"].double()
        return toks, x, (x.pow(2).mean(-1) + ref.cfg.eps).sqrt()

    aux = []
    for pos in (0, 2):  # step 0's two micro-batches
        toks, x, rms = rms_of_final_input(pos)
        keep = torch.ones_like(rms, dtype=torch.bool)
        keep[:, 0] = False
        aux.append(float(((rms - rms[keep].mean()) ** 2).mean()))
        assert float(aux_norm_loss(x, toks, eps=ref.cfg.eps, center=False)) == pytest.approx(aux[-1], rel=1e-9)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["aux"] == pytest.approx(sum(aux) / 2, rel=1e-4)
    # ln_final is frozen at step 10 at the EMA (momentum 0.9 per micro-batch) of its input's mean RMS,
    # with the upstream sites frozen as the run froze them
    frozen_at = {e["step"]: e["sigma"] for e in events if e["event"] == "freeze"}
    ema = None
    for step in range(10):
        for site, sigma in frozen_at.get(step, {}).items():
            ref.freeze_ln(site, scales=sigma)
        for pos in (4 * step, 4 * step + 2):
            v = float(rms_of_final_input(pos)[2].mean())
            ema = v if ema is None else 0.9 * ema + 0.1 * v
    freeze = next(e for e in events if e["event"] == "freeze" and "ln_final" in e["sigma"])
    assert freeze["step"] == 10
    assert freeze["sigma"]["ln_final"] == pytest.approx(ema, rel=1e-5)


# ---- composing with resume, rollback, DDP, bf16 --------------------------------------------------------
VARIANT = dict(lora_rank=4, distill=0.5)


@pytest.mark.parametrize("arch", ["llama"])  # (GPT-2's full-variant resume: test_removal.py)
def test_lora_distill_resume_after_sigkill_is_bit_identical(tmp_path, arch):
    data = _data().numpy()
    killed = tmp_path / "killed"
    proc = mp.get_context("fork").Process(target=conftest.sigkill_mid_run, args=(killed, data, MAKERS[arch]),
                                          kwargs=VARIANT)
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL and latest_checkpoint(killed).name == "step_000004"
    resumed = remove_layernorm(MAKERS[arch](), data, **RUN, **VARIANT, out_dir=killed, resume=True)
    straight = remove_layernorm(MAKERS[arch](), data, **RUN, **VARIANT, out_dir=tmp_path / "straight")
    a, b = resumed.state_dict(), straight.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "step"] == list(range(1, 13))
    with pytest.raises(ValueError, match="not the one the run started from"):  # another teacher
        remove_layernorm(MAKERS[arch](seed=3), data, **RUN, **VARIANT, out_dir=killed, resume=True)


def test_lora_distill_nan_rolls_back(tmp_path):
    model = make_model()
    calls = [0]

    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 2 * 5 + 1:
                return output * float("nan")

    model.blocks[0].register_forward_hook(hook)
    events = []
    with pytest.warns(UserWarning, match="rolled back to step 4"):
        out = remove_layernorm(model, _data(), **RUN, **VARIANT, out_dir=tmp_path, callback=events.append)
    assert [e["failed_step"] for e in events if e["event"] == "rollback"] == [5]
    assert out.is_ln_free and all(bool(torch.isfinite(p).all()) for p in out.parameters())


def test_lora_distill_bf16_runs():
    out = remove_layernorm(make_llama(), _data(), **dict(RUN, checkpoint_every=100), **VARIANT, bf16=True)
    assert out.is_ln_free and all(bool(torch.isfinite(p).all()) for p in out.parameters())


def test_lora_distill_ddp_two_processes_match_one(tmp_path):
    data = _data().numpy()
    kw = dict(RUN, batch_size=8, micro_batch_size=2, **VARIANT)
    out = tmp_path / "ddp"
    r0, r1 = run_two_ranks(out, data, kw)
    single = remove_layernorm(make_model(), data, **kw).state_dict()
    for k in single:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], atol=2e-5, rtol=1e-4)
