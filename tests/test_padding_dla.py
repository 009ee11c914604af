"""Padding (issue 13) for DLA, cross-entropy, first-token norms and attention sinks: a padded batch
(rows of different lengths, left and right padded) gives each row's numbers as if it ran alone."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import pad_rows
from lnfree import TokenBatch
from lnfree.analysis.dla import compare_dla, direct_logit_attribution
from lnfree.analysis.geometry import attention_sink_rate, first_token_norm
from lnfree.evaluation import cross_entropy

LENGTHS = (5, 12, 3, 9)
PAD = 7  # also used as a real token id inside the rows: it must not be mistaken for padding


def _rows(lengths=LENGTHS, vocab=61, seed=3):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    rows[0][1] = PAD
    rows[1][0] = PAD
    return rows


SIDES = ("right", "left")


# ---- DLA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("components,layer", [("heads", None), ("layers", None), ("neurons", 1)])
def test_dla_next_token_every_position_equals_each_row_alone(model, side, components, layer):
    rows = _rows()
    tokens, mask = pad_rows(rows, side, pad_id=PAD)
    res = direct_logit_attribution(model, tokens, attention_mask=mask, components=components, layer=layer)
    assert res.dla.shape[2] == max(LENGTHS) - 1
    errs, effects = [], []
    for i, row in enumerate(rows):
        alone = direct_logit_attribution(model, row[None], components=components, layer=layer)
        n = len(row) - 1
        torch.testing.assert_close(res.dla[:, i, :n], alone.dla[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.direct_effect[:, i, :n], alone.direct_effect[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.logit[i, :n], alone.logit[0], atol=1e-5, rtol=1e-5)
        assert torch.isnan(res.dla[:, i, n:]).all() and res.valid[i].sum() == n  # padding: NaN, never counted
        errs.append((alone.dla - alone.direct_effect).abs().double().sum((1, 2)))
        effects.append(alone.direct_effect.abs().double().sum((1, 2)))
    # NMAE over the padded batch = NMAE over every real entry of the rows run alone
    err, de = torch.stack(errs).sum(0), torch.stack(effects).sum(0)
    assert res.nmae().value == pytest.approx(float(100 * err.sum() / de.sum()), rel=1e-5)
    np.testing.assert_allclose(res.nmae_by_component().to_numpy(), (100 * err / de).numpy(), rtol=1e-4, atol=1e-4)
    assert np.isfinite(res.nmae().low) and len(res.to_frame()) == len(res.labels) * sum(n - 1 for n in LENGTHS)
    assert np.isfinite(res.top(3).mean_direct_effect).all()


@pytest.mark.parametrize("side", SIDES)
def test_dla_last_real_token_logit_diff_and_positions(model, side):
    rows = _rows()
    tokens, mask = pad_rows(rows, side, pad_id=PAD)
    t, o = torch.tensor([1, 2, 3, 4]), torch.tensor([9, 8, 7, 6])
    res = direct_logit_attribution(model, tokens, attention_mask=mask, targets=(t, o), components="all")
    assert res.positions.tolist() == [n - 1 for n in LENGTHS]  # pos=-1: each row's last real token
    at = torch.tensor([0, 4, 1, 2])  # explicit positions count real tokens, whichever side is padded
    res_at = direct_logit_attribution(model, TokenBatch(tokens, mask), targets=t, components="heads", pos=at)
    for i, row in enumerate(rows):
        alone = direct_logit_attribution(model, row[None], targets=(t[i:i + 1], o[i:i + 1]), components="all")
        torch.testing.assert_close(res.direct_effect[:, i], alone.direct_effect[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.dla[:, i], alone.dla[:, 0], atol=1e-5, rtol=1e-5)
        one = direct_logit_attribution(model, row[None], targets=t[i:i + 1], components="heads", pos=int(at[i]))
        torch.testing.assert_close(res_at.direct_effect[:, i], one.direct_effect[:, 0], atol=1e-5, rtol=1e-5)
    assert res.valid is None and res.nmae().n == len(rows)


@pytest.mark.parametrize("side", SIDES)
def test_dla_ln_free_padded_components_still_sum_to_the_logit(ln_free_model, side):
    tokens, mask = pad_rows(_rows(), side, pad_id=PAD)
    res = direct_logit_attribution(ln_free_model, tokens, attention_mask=mask, components="layers")
    with torch.no_grad():
        logits = ln_free_model(tokens, attention_mask=mask)
    for i, n in enumerate(LENGTHS):
        start = 0 if side == "right" else tokens.shape[1] - n
        expected = logits[i, start:start + n - 1].gather(-1, tokens[i, start + 1:start + n, None])[..., 0]
        torch.testing.assert_close(res.dla[:, i, :n - 1].sum(0), expected, atol=1e-4, rtol=0)
    assert res.nmae().value < 1e-5


def test_compare_dla_with_a_mask(model, ln_free_model):
    tokens, mask = pad_rows(_rows(), "left", pad_id=PAD)
    cmp = compare_dla(model, ln_free_model, tokens, attention_mask=mask, n_boot=100)
    alone = direct_logit_attribution(model, tokens, attention_mask=mask, n_boot=100)
    assert cmp.a.nmae().value == pytest.approx(alone.nmae().value) and cmp.b.nmae().value < 1e-5


def test_dla_padding_errors(model):
    tokens, mask = pad_rows(_rows(), "left", pad_id=PAD)
    with pytest.raises(ValueError, match="row 2 has n=3"):
        direct_logit_attribution(model, tokens, attention_mask=mask, targets=0, pos=4)
    with pytest.raises(ValueError, match="has no label"):
        direct_logit_attribution(model, tokens, attention_mask=mask, pos=2)  # row 2's last real token
    short, short_mask = pad_rows(_rows((4, 1)), "right", pad_id=PAD)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        direct_logit_attribution(model, short, attention_mask=short_mask)
    with pytest.raises(ValueError, match="attention_mask must have the tokens' shape"):
        direct_logit_attribution(model, tokens, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="TokenBatch"):
        direct_logit_attribution(model, TokenBatch(tokens, mask), attention_mask=mask)


# ---- cross-entropy -------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("exclude", [False, True])
def test_cross_entropy_equals_each_row_alone(model, side, exclude):
    rows = _rows()
    tokens, mask = pad_rows(rows, side, pad_id=PAD)
    res = cross_entropy(model, tokens, attention_mask=mask, exclude_position_0=exclude, batch_size=3)
    alone = [cross_entropy(model, r[None], exclude_position_0=exclude) for r in rows]
    torch.testing.assert_close(res.per_sequence, torch.tensor([a.value for a in alone], dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    counts = [len(r) - 1 - exclude for r in rows]
    assert res.tokens_per_sequence.tolist() == counts and res.n_tokens == sum(counts) and res.padded
    # the mean is per token: total nats / counted tokens, as if the rows were concatenated
    total = sum(a.value * n for a, n in zip(alone, counts))
    assert res.value == pytest.approx(total / sum(counts), rel=1e-5)
    unmasked = cross_entropy(model, tokens, exclude_position_0=exclude)
    assert not torch.allclose(unmasked.per_sequence, res.per_sequence, atol=1e-3)  # padding scored: wrong


def test_cross_entropy_padding_errors(model):
    tokens, mask = pad_rows(_rows((4, 2)), "right", pad_id=PAD)
    with pytest.raises(ValueError, match=r"rows \[1\] have too few real tokens"):
        cross_entropy(model, tokens, attention_mask=mask, exclude_position_0=True)
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        cross_entropy(model, tokens, attention_mask=mask * 2)
    with pytest.raises(ValueError, match="not one contiguous run"):
        cross_entropy(model, tokens, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]]))


# ---- geometry ------------------------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES)
def test_first_token_norm_equals_each_row_alone(model, side):
    rows = _rows()
    tokens, mask = pad_rows(rows, side, pad_id=PAD)
    res = first_token_norm(model, tokens, attention_mask=mask, batch_size=3)
    for i, row in enumerate(rows):
        alone = first_token_norm(model, row[None])
        torch.testing.assert_close(res.first[i], alone.first[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.rest[i], alone.rest[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", SIDES)
def test_attention_sink_rate_equals_each_row_alone(model, side):
    rows = _rows()
    tokens, mask = pad_rows(rows, side, pad_id=PAD)
    res = attention_sink_rate(model, TokenBatch(tokens, mask), threshold=0.2, batch_size=3)
    alone = torch.cat([attention_sink_rate(model, r[None], threshold=0.2).per_prompt for r in rows])
    torch.testing.assert_close(res.per_prompt, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.attention_to_first, alone.mean(0), atol=1e-5, rtol=1e-5)
    assert res.rate.value == pytest.approx(float((alone.mean(0) >= 0.2).float().mean()))


def test_geometry_padding_errors(model):
    tokens, mask = pad_rows(_rows((4, 1)), "left", pad_id=PAD)
    with pytest.raises(ValueError, match=r"rows \[1\] have fewer than 2 real tokens"):
        first_token_norm(model, tokens, attention_mask=mask)
    with pytest.raises(ValueError, match=r"rows \[1\] have fewer than 2 real tokens"):
        attention_sink_rate(model, tokens, attention_mask=mask)


# ---- the pad id is never guessed -----------------------------------------------------------
def test_pad_id_in_an_unpadded_batch_is_a_real_token(model, tokens):
    """A left-padding tokenizer makes TransformerLens guess a mask from pad ids; every function
    here passes an explicit all-ones mask instead, so a real token equal to the pad id counts."""
    tokens = tokens.clone()
    tokens[:, 0] = PAD  # a real leading token that shares the pad id
    tokens[2, 5] = PAD
    def four():  # the same four analyses, before and after the tokenizer sets a pad id
        return {
            "dla": direct_logit_attribution(model, tokens, components="heads").direct_effect,
            "ce": cross_entropy(model, tokens).per_sequence,
            "norm": first_token_norm(model, tokens).first,
            "sink": attention_sink_rate(model, tokens).per_prompt,
        }

    plain = four()
    model.tokenizer = SimpleNamespace(padding_side="left", pad_token_id=PAD, bos_token_id=60, eos_token_id=PAD)
    with torch.no_grad():  # the trap is real: TransformerLens alone would mask those tokens
        assert not torch.allclose(model(tokens), model(tokens, attention_mask=torch.ones_like(tokens)), atol=1e-3)
    left = four()
    for key in plain:
        torch.testing.assert_close(left[key], plain[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.slow
def test_readme_example_each_sentence_gets_its_own_cross_entropy():
    """Issue 13's example: ``m.to_tokens([short, long])`` pads the short row; with the tokenizer's
    mask (`lnfree.tokenize`) each sentence scores as it does alone (unmasked: 12.1 vs 4.4 nats)."""
    import lnfree

    m = lnfree.zoo.load("tiny-ln")
    short, long = "It was a fine morning.", "The committee published a long report about the harbour and its ships."
    batch = lnfree.tokenize(m, [short, long])
    assert torch.equal(batch.tokens, m.to_tokens([short, long]))
    alone = torch.tensor([cross_entropy(m, m.to_tokens(s)).value for s in (short, long)], dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(m, batch).per_sequence, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cross_entropy(m, batch.tokens, attention_mask=batch.attention_mask).per_sequence, alone, atol=1e-5, rtol=1e-5)
    assert cross_entropy(m, batch.tokens).per_sequence[0] > alone[0] + 1  # without the mask: pads are scored
    left = lnfree.tokenize(m, [short, long], padding_side="left")
    torch.testing.assert_close(cross_entropy(m, left).per_sequence, alone, atol=1e-5, rtol=1e-5)
    res = direct_logit_attribution(m, left, components="heads")
    one = direct_logit_attribution(m, m.to_tokens(short), components="heads")
    n = one.dla.shape[-1]
    torch.testing.assert_close(res.direct_effect[:, 0, :n], one.direct_effect[:, 0], atol=1e-5, rtol=1e-5)
