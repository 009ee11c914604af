"""The shipped norm-free SmolLM2-135M (issue 21): it loads offline by name, no norm site is live, every site is a
fixed map (removed, or frozen with a positional scale), DLA is its exact direct effect, and it stays close to
the original on held-out text. Slow: two SmolLM2 models."""

import pytest
import torch

import lnfree
from lnfree import zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def twin():
    return lnfree.load("smollm2-135m-normfree", device="cpu")


def test_twin_loads_offline_with_no_live_site(twin, smollm2):
    assert "smollm2-135m-normfree" in zoo.all_names()
    modes = twin.ln_modes()
    assert len(modes) == 91 and "live" not in modes.values()
    assert twin.is_norm_free
    frozen = [s for s, m in modes.items() if m == "frozen"]
    assert all(twin.is_positional(s) for s in frozen)
    # embeddings untouched by the fine-tune: still the original's, and W_U still W_E's transpose (tied)
    assert torch.equal(twin.W_E, smollm2.W_E)
    assert torch.equal(twin.W_U, smollm2.W_U)


def test_twin_dla_is_the_exact_direct_effect(twin):
    tokens = zoo.heldout("persuasion", model=twin, seq_len=24)[:2]
    dla = lnfree.direct_logit_attribution(twin, tokens, components="heads", n_boot=50)
    assert dla.ln_final_mode == "frozen"
    torch.testing.assert_close(dla.dla, dla.direct_effect, atol=1e-4, rtol=1e-4)


def test_twin_close_to_the_original_on_heldout_text(twin, smollm2):
    tokens = zoo.heldout("cfi", model=twin, seq_len=64)[:8]
    cmp = lnfree.compare_cross_entropy(twin, smollm2, tokens, n_boot=50)
    assert abs(cmp.difference().value) < 0.3  # the bound; docs/normfree_smollm2.md has the 64k-token CI


def test_twin_ships_small():
    """What builds the twin ships in the package (<= 60 MB): LoRA factors and scales, no rebuildable buffers."""
    from safetensors import safe_open

    from lnfree.io import zoo as io_zoo

    folder = io_zoo.derived_dir("smollm2-135m-normfree")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 60 * 2**20
    with safe_open(str(folder / "delta.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "rotary" in k]
