"""Shared fixtures: tiny random GPT-2-shaped models, fast enough for every test."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("LNFREE_TEST_THREADS", "1")))

from transformer_lens import HookedTransformerConfig  # noqa: E402

from lnfree.model import LNFreeTransformer  # noqa: E402


def make_cfg(n_layers=2, d_model=32, n_heads=4, d_vocab=61, n_ctx=16, seed=0, **kw) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu_new",
        normalization_type="LN", seed=seed, **kw,
    )


def make_model(seed: int = 0, **kw) -> LNFreeTransformer:
    """A random LN model with non-trivial LN weights/biases and an uneven residual scale."""
    torch.manual_seed(seed)
    model = LNFreeTransformer(make_cfg(seed=seed, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") and "ln" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".b") and "ln" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif name.startswith("blocks") and p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
        model.W_E.mul_(5.0)  # residual norms well above 1, so LN scales matter
    return model.eval()


@pytest.fixture
def model() -> LNFreeTransformer:
    return make_model()


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 61, (6, 12), generator=g)


@pytest.fixture
def ln_free_model(tokens) -> LNFreeTransformer:
    m = make_model()
    m.estimate_ln_scales(tokens)
    return m.remove_ln()


@pytest.fixture(scope="session")
def smollm2() -> LNFreeTransformer:
    """The real SmolLM2-135M (`lnfree.zoo.load("smollm2-135m")`, CPU, fp32, every site live), loaded once
    per session. Shared: do not change it in place (no remove_ln/freeze_ln/set_tokenizer); a test that
    needs to change it loads its own copy with `lnfree.zoo.load("smollm2-135m", device="cpu")`."""
    from lnfree import zoo

    return zoo.load("smollm2-135m", device="cpu")
