"""Positional frozen scales (issue 21): a site frozen with its own scale at position 0 and one for every later
position. Checked against hand-written per-position norms, brute-force cache means, padded batches, the saved
LN state, DLA's exact direct effect, the removal trainer and the first-token assumption."""

import json
import warnings

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from lnfree._checks import TokenBatch
from lnfree.analysis.dla import direct_logit_attribution
from lnfree.layernorm import RemovableLayerNorm
from lnfree.model import LNFreeTransformer

VOCAB, BOS = 41, 0
LLAMA = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=VOCAB, n_ctx=16, act_fn="silu",
             normalization_type="RMS", n_key_value_heads=2, gated_mlp=True, positional_embedding_type="rotary",
             rotary_dim=8, seed=0)


def _llama() -> LNFreeTransformer:
    torch.manual_seed(0)
    m = LNFreeTransformer(HookedTransformerConfig(**LLAMA)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".w"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        m.W_E.mul_(5.0)
        m.W_E[BOS].mul_(20.0)  # a sink-like first token: position 0's scale is far from the rest's
    return m


def _tokens(n=6, pos=10, seed=3):
    t = torch.randint(1, VOCAB, (n, pos), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


def test_layernorm_positional_forward_matches_hand_written():
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=10, act_fn="gelu")
    for kind in ("LN", "RMS"):
        ln = RemovableLayerNorm(cfg, paths=("main",), kind=kind)
        with torch.no_grad():
            ln.w.copy_(torch.linspace(0.5, 2, 8))
        ln.set_mode("main", "frozen", sigma=(5.0, 3.0, 2.0))
        x = torch.randn(2, 6, 8, dtype=torch.float64).float()
        xc = x - x.mean(-1, keepdim=True) if kind == "LN" else x
        scale = torch.tensor([5.0, 3.0, 2.0, 2.0, 2.0, 2.0])[None, :, None]
        expected = xc / scale * ln.w + (ln.b if kind == "LN" else 0)
        torch.testing.assert_close(ln(x), expected)
        assert ln.get_sigma("main") == (5.0, 3.0, 2.0)
    with pytest.raises(ValueError, match=">= 2 values"):
        ln.store_sigma("main", [1.0])


def test_estimate_positional_equals_cache_means_and_padding_is_ignored():
    m, t = _llama(), _tokens()
    scales = m.estimate_ln_scales(t, positional=1)
    _, cache = m.run_with_cache(t)
    for site, hook in [("blocks.1.ln2", "blocks.1.ln2.hook_scale"), ("ln_final", "ln_final.hook_scale"),
                       ("blocks.0.ln1.v", "blocks.0.ln1.hook_scale_v")]:
        s = cache[hook][..., 0].double()
        assert scales[site][0] == pytest.approx(float(s[:, 0].mean()), rel=1e-6)
        assert scales[site][1] == pytest.approx(float(s[:, 1:].mean()), rel=1e-6)
    assert scales["blocks.1.ln2"][0] > 3 * scales["blocks.1.ln2"][1]  # the sink-like first token
    # padding, left and right, gives the scales of the rows alone (token-weighted)
    rows = [t[0, :10], t[1, :6], t[2, :8]]
    for side in ("left", "right"):
        toks, mask = torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, 10, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(10 - len(r), 10) if side == "left" else slice(0, len(r))
            toks[i, sl], mask[i, sl] = r, 1
        padded = m.estimate_ln_scales(TokenBatch(toks, mask), positional=1, store=False)
        # brute force: every row alone, sums weighted by tokens
        sums = {}
        for r in rows:
            _, c = m.run_with_cache(r[None])
            s = c["ln_final.hook_scale"][0, :, 0].double()
            sums.setdefault(0, []).append(s[:1])
            sums.setdefault(1, []).append(s[1:])
        expected = tuple(float(torch.cat(sums[k]).mean()) for k in (0, 1))
        assert padded["ln_final"] == pytest.approx(expected, rel=1e-5)


def test_estimate_refuses_mixed_first_tokens_and_non_finite():
    m, t = _llama(), _tokens()
    t[1, 0] = 5
    with pytest.raises(ValueError, match="one fixed first token"):
        m.estimate_ln_scales(t, positional=1)
    with torch.no_grad():
        m.blocks[1].mlp.W_out[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="blocks.1.ln2|ln_final"):
        m.estimate_ln_scales(_tokens())


def test_frozen_positional_model_is_exact_for_dla_and_round_trips_through_ln_state():
    m, t = _llama(), _tokens()
    m.estimate_ln_scales(t, positional=1)
    m.freeze_ln()
    assert m.is_norm_free and not m.is_ln_free and m.is_positional("ln_final")
    res = direct_logit_attribution(m, t, components="heads")
    torch.testing.assert_close(res.dla, res.direct_effect, atol=1e-5, rtol=1e-5)
    assert res.nmae().value < 1e-3  # percent: float rounding only
    # the JSON LN state restores the same function on a fresh copy of the weights
    state = json.loads(json.dumps(m.ln_state()))
    assert state["ln_final"]["first_token"] == BOS and len(state["ln_final"]["scale"]) == 2
    fresh = _llama().load_ln_state(state)
    torch.testing.assert_close(fresh(t), m(t), atol=0, rtol=0)
    # removal would need one weight per position: refused, naming the site and what to do
    with pytest.raises(ValueError, match="positional"):
        m.remove_ln("ln_final")


def test_frozen_positional_left_padding_equals_rows_alone_and_first_token_warns():
    m, t = _llama(), _tokens()
    m.estimate_ln_scales(t, positional=1)
    m.freeze_ln()
    row = t[2, :7]
    toks = torch.cat([torch.full((3,), 7), row])[None]
    mask = torch.cat([torch.zeros(3), torch.ones(7)]).long()[None]
    with torch.no_grad():
        torch.testing.assert_close(m(toks, attention_mask=mask)[0, 3:], m(row[None])[0], atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(t[:, 1:])  # rows that do not start with the calibrated BOS
    assert any("calibrated with token [0]" in str(w.message) for w in caught)


def test_removal_trainer_freezes_every_site_at_a_positional_scale(tmp_path):
    from lnfree.removal import remove_layernorm

    m = _llama()
    data = torch.randint(1, VOCAB, (48, 10), generator=torch.Generator().manual_seed(1))
    data[:, 0] = BOS
    out = remove_layernorm(m, data, steps=16, batch_size=4, seq_len=10, lr=1e-3, aux_lambda=0.0,
                           positional_sigma=1, progress=False, out_dir=tmp_path / "run")
    assert set(out.ln_modes().values()) == {"frozen"} and out.is_norm_free
    assert all(out.is_positional(s) for s in out.ln_sites)
    assert out.removal_summary["norm_free"]
    saved = json.loads((tmp_path / "run" / "final_tl" / "config.json").read_text())["ln_state"]
    assert saved == json.loads(json.dumps(out.ln_state()))
    bad = data.clone()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="bos_token_id"):
        remove_layernorm(_llama(), bad, steps=16, batch_size=4, seq_len=10, positional_sigma=1, progress=False)



def test_guard_factors_are_arguments_of_remove_layernorm(tmp_path):
    """The fail-safe's loss bounds are settings of the run (issue 20.5: no monkeypatching), checked by name."""
    from lnfree.removal import remove_layernorm

    data = torch.randint(1, VOCAB, (48, 10), generator=torch.Generator().manual_seed(1))
    remove_layernorm(_llama(), data, steps=4, batch_size=4, seq_len=10, aux_lambda=0.0, progress=False,
                     out_dir=tmp_path / "run", diverge_factor=10.0, spike_factor=7.5)
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["config"]["diverge_factor"] == 10.0 and state["config"]["spike_factor"] == 7.5
    with pytest.raises(ValueError, match="diverge_factor"):
        remove_layernorm(_llama(), data, steps=4, batch_size=4, seq_len=10, progress=False, diverge_factor=0)
