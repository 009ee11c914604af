"""lnfree.paper against an independent transcription of the paper's code (tests/paper_reference.py)."""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import paper_reference as ref
import lnfree.paper as P
from lnfree.loading import load_model

VOCAB = 50257  # GPT-2's, so the IOI prompts tokenize with its tokenizer


def rel_close(a, b, rel=1e-4, abs_=0.0):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.abs(a - b) <= rel * np.abs(b) + abs_), (a, b, np.max(np.abs(a - b)))


def _hf(seed):
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "ln_" in name and name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        hf.transformer.wte.weight.mul_(5.0)
    return hf.eval()


def _ln_stds(hf, tokens):
    stds, handles = {}, []
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            def hook(m, inp, out, name=name):
                stds[name] = float((inp[0].var(-1, unbiased=False) + m.eps).sqrt().mean())
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        hf(tokens)
    for h in handles:
        h.remove()
    return stds


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (11, 20), generator=g)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, data):
    """An LN GPT-2 and a released-format LN-free GPT-2 (LN weight * 1e6 / sigma, eps = 1e12)."""
    root = tmp_path_factory.mktemp("paper")
    _hf(0).save_pretrained(root / "ln")
    hf = _hf(1)
    stds = _ln_stds(hf, data)
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.mul_(1e6 / stds[name])
    hf.config.layer_norm_epsilon = 1e12
    hf.save_pretrained(root / "lnfree")
    return {"ln": root / "ln", "lnfree": root / "lnfree"}


@pytest.fixture(scope="module")
def models(dirs):
    return {k: load_model(v, device="cpu") for k, v in dirs.items()}


@pytest.fixture(scope="module")
def models64(dirs):
    """float64 copies: DE is a difference of logits, and float32 cancellation would hide a 1e-4 comparison."""
    return {k: load_model(v, device="cpu", dtype=torch.float64) for k, v in dirs.items()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, dict(model.ln_modes()), model.cfg.normalization_type


def _unchanged(model, before):
    sd, modes, norm = before
    after = model.state_dict()
    assert set(after) == set(sd) and all(torch.equal(after[k], sd[k]) for k in sd)
    assert model.ln_modes() == modes and model.cfg.normalization_type == norm


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_dla_nmae_matches_paper(models64, dirs, data, kind):
    model = models64[kind]
    before = _state(model)
    res = P.paper_dla(model, data, n_boot=200, seed=5)
    _unchanged(model, before)
    paper = ref.load_paper_model(dirs[kind], no_ln=kind == "lnfree", dtype=torch.float64)
    dla, de = ref.dla_and_de(paper, data, no_ln=kind == "lnfree")
    scale = float(de.abs().mean())
    rel_close(res.dla, dla, rel=1e-4, abs_=1e-5 * scale)
    rel_close(res.direct_effect, de, rel=1e-4, abs_=1e-5 * scale)
    low, high = ref.nmae_bootstrap(dla.double(), de.double(), 200, 5)
    if kind == "ln":
        rel_close(res.nmae.value, ref.global_nmae(dla, de))
        rel_close([res.nmae.low, res.nmae.high], [low, high], rel=1e-3)
        assert res.nmae.value > 1  # DLA is a poor linearisation of a random LN model
    else:  # DLA is exact without LN: both are float noise
        assert res.nmae.value < 1e-3 and ref.global_nmae(dla, de) < 1e-3
    assert float(P.dla_nmae(model, data, n_boot=20)) == pytest.approx(res.nmae.value)


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_sink_rate_matches_paper(models, dirs, data, kind):
    model = models[kind]
    before = _state(model)
    hf = GPT2LMHeadModel.from_pretrained(dirs[kind], attn_implementation="eager").eval()  # the paper runs HF models (eps 1e12 for LN-free)
    est = P.sink_rate(model, data)
    mean, lo, hi = ref.sink_rates(hf, data)
    rel_close([est.value, est.low, est.high], [mean, lo, hi])
    assert 0 < est.value < 1
    # The paper's layer-3 quirk: one layer's count divided by every layer's heads.
    est1 = P.sink_rate(model, data, layers=[1])
    rel_close(est1.value, ref.sink_rates(hf, data, layer=1)[0])
    per = P.sink_rate_per_sample(model, data)
    brute = []
    with torch.no_grad():
        att = hf(input_ids=data, output_attentions=True).attentions
    brute = torch.stack([(a[..., 0] > 0.3).float().mean(dim=(1, 2)) for a in att], 1).mean(1)
    rel_close(per, brute)
    _unchanged(model, before)


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_first_token_norm_matches_paper(models, dirs, data, kind):
    model = models[kind]
    before = _state(model)
    res = P.first_token_norm(model, data)
    _unchanged(model, before)
    paper = ref.load_paper_model(dirs[kind], no_ln=kind == "lnfree")
    want = ref.residual_norms(paper, data, no_ln=kind == "lnfree")
    assert res.labels == tuple(want)
    got = np.stack([res.first_mean, res.first_std, res.rest_mean, res.rest_std], 1)
    rel_close(got, np.array([want[n] for n in res.labels]), abs_=1e-6)  # pos 0 embeddings: std of equal values
    frame = res.to_frame()
    assert set(frame.position) == {"first", "rest"} and len(frame) == 2 * len(res.labels)
    assert res.final_first().value == pytest.approx(float(res.first_mean[-1]), rel=1e-6)
