"""First-token residual norms and attention-sink rates, checked against run_with_cache."""

import plotly.graph_objects as go
import pytest
import torch

from conftest import make_model
from lnfree.analysis.geometry import attention_sink_rate, first_token_norm


def test_first_token_norm_matches_cache(model, tokens):
    res = first_token_norm(model, tokens, batch_size=4)  # uneven batches: 4 + 2
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    acts = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(n)] + [cache[f"blocks.{n - 1}.hook_resid_post"]]
    assert res.labels == ("0_resid_pre", "1_resid_pre", "1_resid_post")
    for j, a in enumerate(acts):
        norms = torch.linalg.vector_norm(a.detach(), dim=-1)  # [batch, pos]
        torch.testing.assert_close(res.first[:, j], norms[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.rest[:, j], norms[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
        assert res.ratio[j] == pytest.approx(float(norms[:, 0].mean() / norms[:, 1:].mean()), rel=1e-5)
    df = res.to_frame()
    assert set(df.position) == {"first", "rest", "ratio"} and len(df) == 3 * len(res.labels)
    row = df[(df.site == "0_resid_pre") & (df.position == "first")].iloc[0]
    assert row.low <= row.value <= row.high
    fig = res.plot()
    assert isinstance(fig, go.Figure) and fig.layout.yaxis.type == "log"


def test_first_token_norm_sees_a_planted_large_first_position(tokens):
    m = make_model()
    with torch.no_grad():
        m.W_pos[0] *= 50  # position 0 dominates the residual stream
    res = first_token_norm(m, tokens)
    assert res.ratio[0] > 5 and (res.ratio > 2).all()
    assert (first_token_norm(make_model(), tokens).ratio < 2).all()  # unplanted: no outlier


@pytest.mark.parametrize("threshold", [0.3, 0.12])
def test_attention_sink_rate_matches_cache(model, tokens, threshold):
    res = attention_sink_rate(model, tokens, threshold=threshold, batch_size=4)
    _, cache = model.run_with_cache(tokens)
    expected = torch.stack(
        [cache[f"blocks.{i}.attn.hook_pattern"][:, :, 1:, 0].mean((0, 2)) for i in range(model.cfg.n_layers)]
    )
    torch.testing.assert_close(res.attention_to_first, expected, rtol=1e-5, atol=1e-6)
    assert res.rate.value == pytest.approx(float((expected >= threshold).float().mean()))
    df = res.to_frame()
    assert len(df) == model.cfg.n_layers * model.cfg.n_heads
    assert df.set_index("label").loc["L1H2", "attention_to_first"] == pytest.approx(float(expected[1, 2]), rel=1e-5)
    top = res.top(1).label[0]
    assert top == df.sort_values("attention_to_first", ascending=False).label.iloc[0]
    assert isinstance(res.plot(), go.Figure)


def test_attention_sink_rate_detects_a_planted_sink(tokens):
    m = make_model()
    d = m.cfg.d_model
    g = torch.Generator().manual_seed(2)
    u = torch.randn(d, generator=g)
    u = (u - u.mean()) / (u - u.mean()).norm()  # a centered unit direction
    with torch.no_grad():
        m.W_pos[0] += 100 * u  # position 0's normalized residual ~ sqrt(d) * u
        attn = m.blocks[0].attn
        attn.W_Q[0] = 0
        attn.b_Q[0] = 0
        attn.b_Q[0, 0] = 10.0  # head 0: the same query everywhere, reading key dim 0
        attn.W_K[0] = 0
        attn.b_K[0] = 0
        attn.W_K[0, :, 0] = u / m.blocks[0].ln1.w  # key dim 0 = normalized residual . u (+ LN bias term)
    res = attention_sink_rate(m, tokens, threshold=0.9)
    assert res.attention_to_first[0, 0] > 0.9
    assert bool(res.is_sink[0, 0]) and "L0H0" == res.top(1).label[0]
    assert res.rate.value == pytest.approx(float(res.is_sink.float().mean()))


def test_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match="2 positions"):
        first_token_norm(model, tokens[:, :1])
    with pytest.raises(ValueError, match="threshold"):
        attention_sink_rate(model, tokens, threshold=0)
    with pytest.raises(ValueError, match="batch_size"):
        attention_sink_rate(model, tokens, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        first_token_norm("gpt2", tokens)
    with pytest.raises(ValueError, match="token ids"):
        first_token_norm(model, tokens + 100)


def test_result_contract_bootstrap_settings_and_plots(model, tokens):
    from lnfree.stats import Estimate, bootstrap

    norms = first_token_norm(model, tokens, n_boot=300, level=0.8, seed=5)
    assert (norms.n_boot, norms.level, norms.seed, norms.model_name) == (300, 0.8, 5, "custom (LN)")
    ratio = norms.estimates()["ratio"][1]
    ref = bootstrap(norms.first[:, 1], lambda a, b: float(a.mean() / b.mean()), paired=norms.rest[:, 1],
                    n_boot=300, level=0.8, seed=5)
    assert (ratio.value, ratio.low, ratio.high, ratio.level) == (ref.value, ref.low, ref.high, 0.8)
    best = norms.max_ratio()
    assert isinstance(best, Estimate) and best.value == pytest.approx(float(norms.ratio.max()))
    top = norms.top(2)
    assert list(top.columns) == ["site", "index", "ratio", "low", "high", "n"]
    assert top.ratio[0] == pytest.approx(float(norms.ratio.max())) and top.ratio[0] >= top.ratio[1]
    fig = norms.plot()
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    text = repr(norms)
    assert text.startswith("ResidNorms(model='custom (LN)'") and "max_ratio=" in text and "tensor" not in text

    sinks = attention_sink_rate(model, tokens, threshold=0.12, n_boot=200, seed=2)
    assert isinstance(sinks.rate, Estimate) and sinks.rate.n == tokens.shape[0] and sinks.n_boot == 200
    assert sinks.rate.low <= sinks.rate.value <= sinks.rate.high
    torch.testing.assert_close(sinks.per_prompt.mean(0), sinks.attention_to_first)
    heat = sinks.plot()
    assert heat.layout.yaxis.dtick == 1 and heat.layout.yaxis.tickmode == "linear"  # integer layer ticks
    assert list(heat.data[0].y) == [0, 1] and heat.layout.xaxis.title.text == "head"
    assert "rate=" in repr(sinks) and sinks == sinks and hash(sinks)
    with pytest.raises(TypeError, match="positional"):
        attention_sink_rate(model, tokens, 0.3)
