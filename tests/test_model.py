"""LNFreeTransformer: live == HookedTransformer, frozen == hand-written forward, removal exact."""

import pytest
import torch
from transformer_lens import HookedTransformer

from conftest import make_cfg, make_model
from lnfree.model import LNFreeTransformer


def test_live_is_bit_for_bit_hooked_transformer(model, tokens):
    ht = HookedTransformer(model.cfg)
    ht.load_state_dict(model.state_dict())
    assert torch.equal(ht(tokens), model(tokens))
    _, c1 = ht.run_with_cache(tokens)
    _, c2 = model.run_with_cache(tokens)
    for name in c1.keys():
        if name in c2.cache_dict:
            assert torch.equal(c1[name], c2[name]), name
    # TL helpers that read ln_final / ln1 scales from the cache agree too
    assert torch.equal(c1.accumulated_resid(layer=1, apply_ln=True), c2.accumulated_resid(layer=1, apply_ln=True))
    assert torch.equal(c1.decompose_resid(apply_ln=True), c2.decompose_resid(apply_ln=True))


def test_sites_and_modes(model):
    assert model.ln_sites == [
        "blocks.0.ln1.qk", "blocks.0.ln1.v", "blocks.0.ln2",
        "blocks.1.ln1.qk", "blocks.1.ln1.v", "blocks.1.ln2", "ln_final",
    ]
    assert set(model.ln_modes().values()) == {"live"}
    assert model.site_hook("blocks.1.ln1.v") == "blocks.1.ln1.hook_scale_v"
    assert model.site_hook("blocks.1.ln1.qk", "normalized") == "blocks.1.ln1.hook_normalized"


def _hand_forward(model, tokens, scales):
    """Independent GPT-2 forward pass with fixed LN scales, written from the weights."""
    x = model.W_E[tokens] + model.W_pos[: tokens.shape[1]]

    def ln(x, site, w, b):
        xc = x - x.mean(-1, keepdim=True)
        return xc / scales[site] * w + b

    n = tokens.shape[1]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        hqk = ln(x, f"blocks.{i}.ln1.qk", blk.ln1.w, blk.ln1.b)
        hv = ln(x, f"blocks.{i}.ln1.v", blk.ln1.w, blk.ln1.b)
        q = torch.einsum("bpd,hde->bphe", hqk, a.W_Q) + a.b_Q
        k = torch.einsum("bpd,hde->bphe", hqk, a.W_K) + a.b_K
        v = torch.einsum("bpd,hde->bphe", hv, a.W_V) + a.b_V
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / a.cfg.d_head ** 0.5
        p = s.masked_fill(mask, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhe->bqhe", p, v)
        x = x + torch.einsum("bqhe,hed->bqd", z, a.W_O) + a.b_O
        h = ln(x, f"blocks.{i}.ln2", blk.ln2.w, blk.ln2.b)
        pre = h @ blk.mlp.W_in + blk.mlp.b_in
        post = 0.5 * pre * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre ** 3)))
        x = x + post @ blk.mlp.W_out + blk.mlp.b_out
    x = ln(x, "ln_final", model.ln_final.w, model.ln_final.b)
    return x @ model.W_U + model.b_U


def test_frozen_matches_hand_written_forward(model, tokens):
    g = torch.Generator().manual_seed(3)
    scales = {s: float(0.5 + 3 * torch.rand(1, generator=g)) for s in model.ln_sites}
    live = model(tokens)
    with torch.no_grad():
        expected = _hand_forward(model, tokens, scales)
        with model.ln_frozen(scales=scales):
            got = model(tokens)
            assert set(model.ln_modes().values()) == {"frozen"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, live, atol=1e-3)  # the scales really changed something
    assert torch.equal(model(tokens), live)  # leaving the context restores exactly
    assert set(model.ln_modes().values()) == {"live"}


def test_hook_scale_shows_frozen_value(model, tokens):
    model.freeze_ln("blocks.0.ln1.v", scales=2.5)
    _, cache = model.run_with_cache(tokens)
    assert torch.all(cache["blocks.0.ln1.hook_scale_v"] == 2.5)
    assert not torch.all(cache["blocks.0.ln1.hook_scale"] == 2.5)  # qk path independent
    model.unfreeze_ln()
    assert model.ln_mode("blocks.0.ln1.v") == "live"


def test_remove_ln_keeps_frozen_logits(model, tokens):
    model.estimate_ln_scales(tokens)
    model.freeze_ln()
    frozen = model(tokens)
    model.remove_ln()
    assert model.is_ln_free and model.cfg.normalization_type is None
    removed = model(tokens)
    rel = (removed - frozen).abs().max() / frozen.abs().max()
    assert rel < 1e-5


def test_partial_removal_and_unfreeze_exact(model, tokens):
    live = model(tokens)
    model.estimate_ln_scales(tokens)
    model.freeze_ln(["blocks.1.ln2", "blocks.0.ln1.qk"])
    frozen = model(tokens)
    model.remove_ln("blocks.1.ln2")
    torch.testing.assert_close(model(tokens), frozen, rtol=1e-5, atol=1e-5)
    assert model.ln_mode("blocks.1.ln2") == "removed" and not model.is_ln_free
    model.unfreeze_ln()  # all unfrozen except the removed one
    assert model.ln_mode("blocks.0.ln1.qk") == "live"
    with pytest.raises(ValueError, match="permanent"):
        model.unfreeze_ln("blocks.1.ln2")
    assert not torch.allclose(model(tokens), live)


def test_ln_free_resid_decomposition_sums_to_logits(ln_free_model, tokens):
    logits, cache = ln_free_model.run_with_cache(tokens)
    parts, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    recon = parts.sum(0) @ ln_free_model.W_U + ln_free_model.b_U
    torch.testing.assert_close(recon, logits, rtol=1e-4, atol=1e-4)


def test_from_hooked_shares_weights_and_leaves_source_alone(tokens):
    torch.manual_seed(0)
    ht = HookedTransformer(make_cfg())
    before = ht(tokens)
    m = LNFreeTransformer.from_hooked(ht)
    assert m.W_E.data_ptr() == ht.W_E.data_ptr()
    m.estimate_ln_scales(tokens)
    m.remove_ln()
    assert torch.equal(ht(tokens), before)
    assert ht.cfg.normalization_type == "LN"


def test_fold_ln_processing_keeps_sites(model, tokens):
    ht = HookedTransformer(model.cfg)
    ht.load_and_process_state_dict(model.state_dict())
    m = LNFreeTransformer(make_cfg())
    m.load_and_process_state_dict(model.state_dict())
    assert m.cfg.normalization_type == "LNPre"
    assert torch.equal(m(tokens), ht(tokens))
    m.estimate_ln_scales(tokens)
    with m.ln_frozen():
        frozen = m(tokens)
    m.remove_ln()
    torch.testing.assert_close(m(tokens), frozen, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.ln_mode("blocks.9.ln2"), "unknown LN site"),
        (lambda m: m.ln_mode("blocks.0.ln1"), "unknown LN site"),
        (lambda m: m.freeze_ln(scales=-1.0), "positive"),
        (lambda m: m.freeze_ln(scales="big"), "scales must be"),
        (lambda m: m.freeze_ln(), "estimate_ln_scales"),
        (lambda m: m.freeze_ln(scales={"ln_final": 1.0, "nope": 2.0}), "unknown LN site"),
        (lambda m: m.estimate_ln_scales(torch.zeros(2, 3)), "integer"),
        (lambda m: m.estimate_ln_scales(torch.full((2, 3), 999)), r"\[0, 61\)"),
    ],
)
def test_bad_input(model, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)


def test_estimate_on_ln_free_model_refuses(ln_free_model, tokens):
    with pytest.raises(ValueError, match="LN-free"):
        ln_free_model.estimate_ln_scales(tokens)


def test_exclude_position_0_changes_estimate(model, tokens):
    a = model.estimate_ln_scales(tokens, store=False)
    b = model.estimate_ln_scales(tokens, exclude_position_0=True, store=False)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(torch.tensor(b["ln_final"], dtype=torch.float64), cache["ln_final.hook_scale"][:, 1:].double().mean(),
                               rtol=1e-6, atol=0)
    assert a["ln_final"] != b["ln_final"]


def test_ln_state_round_trip_rebuilds_ln_free_model(ln_free_model, tokens):
    state = ln_free_model.ln_state()
    fresh = make_model(seed=5)  # different weights, then overwritten
    fresh.load_state_dict(ln_free_model.state_dict())
    fresh.load_ln_state(state)
    assert fresh.is_ln_free and fresh.cfg.normalization_type is None
    assert torch.equal(fresh(tokens), ln_free_model(tokens))
    with pytest.raises(ValueError, match="mode"):
        fresh.load_ln_state({**state, "ln_final": {"mode": "gone", "scale": 1.0}})


def test_models_built_from_one_config_do_not_share_ln_state(tokens):
    cfg = make_cfg()
    a, b = LNFreeTransformer(cfg), LNFreeTransformer(cfg)
    b.load_state_dict(a.state_dict())
    a.estimate_ln_scales(tokens)
    a.remove_ln()
    assert cfg.normalization_type == "LN" and b.cfg.normalization_type == "LN"
    assert b.ln_mode("ln_final") == "live"
    _, cache = b.run_with_cache(tokens)
    assert "ln_final.hook_scale" in cache.cache_dict  # b still applies its final LayerNorm
