"""DLA, exact direct effect, cross-entropy and geometry on modern architectures (tiny random models):
RMSNorm (no centering), grouped-query attention, rotary positions, gated MLPs, and a LayerNorm model
whose final norm is RMS (``final_rms``). DE is checked against brute-force forward passes, DLA
against a hand computation from the cache, and padded batches (left padding shifts rotary
positions) against each row alone."""

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from conftest import spread_norms
from lnfree.analysis.dla import direct_logit_attribution
from lnfree.analysis.geometry import attention_sink_rate, first_token_norm
from lnfree.evaluation import cross_entropy
from lnfree.model import LNFreeTransformer

VOCAB = 53
BASE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=VOCAB, n_ctx=16, act_fn="silu", seed=0)
ROT = dict(positional_embedding_type="rotary", rotary_dim=8)
CONFIGS = {
    "llama-like": dict(normalization_type="RMS", n_key_value_heads=2, gated_mlp=True, final_rms=True, **ROT),
    "ln-final_rms": dict(normalization_type="LN", final_rms=True),
}


def _model(name: str) -> LNFreeTransformer:
    torch.manual_seed(0)
    return spread_norms(LNFreeTransformer(HookedTransformerConfig(**BASE, **CONFIGS[name])).eval(), blocks_only=False)


@pytest.fixture(scope="module")
def data():
    return torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(4))


def _brute_de(model, tokens, vec, b_idx, p_idx, t):
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        clean = model(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda r, hook: r - vec)])
    return clean[b_idx, p_idx, t] - ablated[b_idx, p_idx, t]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_de_brute_force_and_dla_without_centering(name, data):
    model = _model(name)
    assert not model.ln_final.centered  # RMS final norm in both configs
    t = data[:, 2]
    res = direct_logit_attribution(model, data, targets=t, components="heads")
    model.set_use_attn_result(True)  # TransformerLens's own per-head outputs (GQA: K/V shared)
    with torch.no_grad():
        _, cache = model.run_with_cache(data)
    model.set_use_attn_result(False)
    b_idx, p_idx = torch.arange(data.shape[0]), torch.full((data.shape[0],), data.shape[1] - 1)
    scale = cache["ln_final.hook_scale"][b_idx, p_idx]  # [batch, 1]
    u = model.W_U[:, t].T.detach()
    for k, label in enumerate(res.labels):
        layer, head = int(label[1]), int(label[3:])
        c = cache[f"blocks.{layer}.attn.hook_result"][:, :, head]
        vec = torch.zeros_like(c)
        vec[b_idx, p_idx] = c[b_idx, p_idx]
        torch.testing.assert_close(res.direct_effect[k], _brute_de(model, data, vec, b_idx, p_idx, t), atol=2e-4, rtol=1e-4)
        # RMSNorm's linearisation: c / scale * w (no mean subtracted)
        expected = (c[b_idx, p_idx] / scale * model.ln_final.w * u).sum(-1)
        torch.testing.assert_close(res.dla[k], expected.detach(), atol=1e-5, rtol=1e-5)
    assert res.nmae().value > 0.5  # a live final RMSNorm: DLA is only a linearisation


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layers_de_brute_force_and_removed_norms_are_exact(name, data):
    model = _model(name)
    res = direct_logit_attribution(model, data, components="layers", pos=torch.tensor([3, 0, 8, 5, -2]))
    assert "pos_embed" not in res.labels or name == "ln-final_rms"
    with torch.no_grad():
        _, cache = model.run_with_cache(data)
    b_idx, p_idx = torch.arange(5), res.positions
    for k, label in enumerate(res.labels[:-1]):
        key = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}.get(label)
        if key is None:
            layer, kind = label.split("_", 1)
            key = f"blocks.{layer}.hook_{kind}"
        v = cache[key].expand(5, -1, -1)
        vec = torch.zeros_like(v)
        vec[b_idx, p_idx] = v[b_idx, p_idx]
        t = data[b_idx, p_idx + 1]
        torch.testing.assert_close(res.direct_effect[k], _brute_de(model, data, vec, b_idx, p_idx, t), atol=2e-4, rtol=1e-4)

    model.estimate_ln_scales(data)
    frozen = direct_logit_attribution(model.freeze_ln("ln_final"), data, components="heads")
    torch.testing.assert_close(frozen.dla, frozen.direct_effect, atol=1e-5, rtol=1e-5)
    free = model.remove_ln()
    exact = direct_logit_attribution(free, data, components="layers")
    assert exact.ln_final_mode == "removed" and exact.nmae().value < 1e-5
    with torch.no_grad():
        logits = free(data)
    torch.testing.assert_close(exact.dla.sum(0), logits[:, :-1].gather(-1, data[:, 1:, None])[..., 0], atol=1e-4, rtol=0)


def _left_padded(lengths=(4, 10, 7), seed=5):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    seq = max(lengths)
    tokens = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, seq - len(r):], mask[i, seq - len(r):] = r, 1
    return rows, tokens, mask


def test_rotary_left_padding_equals_each_row_alone():
    """Left padding moves every real token right: rotary positions must count from the first real token."""
    model = _model("llama-like")
    rows, tokens, mask = _left_padded()
    dla = direct_logit_attribution(model, tokens, attention_mask=mask, components="all")
    ce = cross_entropy(model, tokens, attention_mask=mask)
    norms = first_token_norm(model, tokens, attention_mask=mask)
    sinks = attention_sink_rate(model, tokens, attention_mask=mask)
    for i, row in enumerate(rows):
        n = len(row) - 1
        alone = direct_logit_attribution(model, row[None], components="all")
        torch.testing.assert_close(dla.direct_effect[:, i, :n], alone.direct_effect[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dla.dla[:, i, :n], alone.dla[:, 0], atol=1e-5, rtol=1e-5)
        assert ce.per_sequence[i] == pytest.approx(cross_entropy(model, row[None]).value, abs=1e-5)
        torch.testing.assert_close(norms.first[i], first_token_norm(model, row[None]).first[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norms.rest[i], first_token_norm(model, row[None]).rest[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sinks.per_prompt[i], attention_sink_rate(model, row[None]).per_prompt[0],
                                   atol=1e-5, rtol=1e-5)
    # without the mask the rotary positions (and the padding) change the numbers: the test can fail
    unmasked = cross_entropy(model, tokens)
    assert abs(float(unmasked.per_sequence[0]) - float(ce.per_sequence[0])) > 1e-3
