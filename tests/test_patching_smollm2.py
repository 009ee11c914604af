"""Patching on SmolLM2-135M (a real pretrained Llama-architecture model: RMSNorm, rotary,
9 query heads sharing 3 key/value heads), against independent computations (see
tests/test_patching_arch.py for the helpers): TransformerLens's patching, finite differences,
and the model's own recomputed attention pattern. Short prompts keep it to a minute on 2 cores."""

import pytest
import torch

from lnfree.analysis.patching import activation_patching, attribution_patching
from lnfree.analysis.patching_core import n_heads_at
from test_patching_arch import check_against_transformer_lens, finite_difference, qk_fix_reference


@pytest.fixture(scope="module")
def smol(request):
    try:  # the session fixture (tests/conftest.py), when present, shares one load across modules
        return request.getfixturevalue("smollm2")
    except pytest.FixtureLookupError:
        from lnfree import zoo

        return zoo.load("smollm2-135m")


@pytest.fixture(scope="module")
def ioi_batch(smol):
    from lnfree.tasks import ioi

    return ioi(smol, 2, seed=0)


@pytest.fixture(scope="module")
def short(ioi_batch):
    """The first 6 tokens of two IOI pairs ("Then, B and A went"): clean and corrupt differ at the names."""
    from lnfree.tasks import logit_diff_metric

    clean, corrupt = ioi_batch.clean[:, :6], ioi_batch.corrupt[:, :6]
    return clean, corrupt, logit_diff_metric(ioi_batch.answer, ioi_batch.wrong)


def test_ioi_with_smollm2_tokenizer(smol, ioi_batch):
    from lnfree.tasks import NAMES, single_token_words

    names = single_token_words(smol.tokenizer, NAMES)
    assert len(names) >= 100 and {"Mary", "John"} <= set(names)
    assert len(smol.tokenizer.encode(" Mary", add_special_tokens=False)) == 1
    assert ioi_batch.clean.shape == ioi_batch.corrupt.shape and ioi_batch.model_name.startswith("smollm2")
    for i in range(2):
        text = smol.tokenizer.decode(ioi_batch.clean[i].tolist())
        assert text == ioi_batch.prompts[i]  # no BOS: SmolLM2 does not prepend one by default
    clean_ld, corrupt_ld = ioi_batch.logit_diffs(smol)
    assert float(clean_ld.mean()) > 1.0 > -1.0 > float(corrupt_ld.mean())  # a real model does IOI


@pytest.mark.parametrize("site,layers", [("resid_pre", (0, 12, 29)), ("z", (8,)), ("k", (15,))])
def test_activation_patching_matches_transformer_lens(smol, short, site, layers):
    clean, corrupt, metric = short
    diff, res = check_against_transformer_lens(smol, clean, corrupt, metric, site, n_check=8, layers=layers)
    assert diff < 1e-4
    assert res.model_name == "smollm2-135m (RMSNorm)" and res.layers == layers
    assert torch.isnan(res.scores[1]).all() and not torch.isnan(res.scores[layers[0]]).any()
    if site == "k":  # grouped-query attention: 3 key/value heads per layer
        assert res.scores.shape == (30, 3, 6)


@pytest.mark.parametrize("site,component", [("resid_pre", (12, 2)), ("z", (8, 4, 4)), ("k", (15, 1, 2))])
def test_atp_is_the_derivative_along_the_patch(smol, short, site, component):
    clean, corrupt, metric = short
    atp = attribution_patching(smol, clean, corrupt, metric, site=site)
    idx = (slice(None), component[0]) + tuple(component[1:])
    fd = finite_difference(smol, clean, corrupt, metric, site, component, eps=1e-2)
    assert fd.abs().max() > 1e-3
    assert torch.allclose(atp.per_prompt[idx].double(), fd, atol=5e-3, rtol=2e-2)


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_with_rotary_and_gqa_matches_the_recomputed_pattern(smol, short, site):
    clean, corrupt, metric = short
    fix = attribution_patching(smol, clean, corrupt, metric, site=site, method="atp+qk")
    assert fix.qk_fix and fix.scores.shape == (30, n_heads_at(smol, site), 6)
    for layer, head, pos in [(2, 0, 2), (17, n_heads_at(smol, site) - 1, 4)]:
        ref = qk_fix_reference(smol, clean, corrupt, metric, site, layer, head, pos)
        assert torch.allclose(fix.per_prompt[:, layer, head, pos].double(), ref, atol=1e-4, rtol=1e-3)
