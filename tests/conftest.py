"""Shared fixtures: tiny random GPT-2-shaped models, fast enough for every test."""

import os
import signal

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


def spread_norms(model, *, ln_bias: bool = True, bias=0.05, blocks_only: bool = True, extra_biases=(),
                 embed: float = 5.0):
    """In place, in parameter order (the same random draws as the per-file copies this replaced): norm
    weights 1 + 0.3 N(0, 1), LayerNorm biases 0.1 N(0, 1) (none on a gated MLP's ln2: nothing folds it),
    other 1-D parameters and `extra_biases` (of the blocks only, unless not `blocks_only`) `bias` N(0, 1)
    (None: left), W_E x `embed` (residual norms well above 1, so the scales matter). Returns the model."""
    gated = model.cfg.gated_mlp
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("ln" in name or "norm" in name) and name.endswith(".w"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "ln" in name and name.endswith(".b") and ln_bias:
                p.copy_(0 if gated and ".ln2." in name else 0.1 * torch.randn_like(p))
            elif (bias is not None and (name.startswith("blocks") or not blocks_only)
                  and (p.ndim == 1 or name.split(".")[-1] in extra_biases)):
                p.copy_(bias * torch.randn_like(p))
        model.W_E.mul_(embed)
    return model


def spread_hf_norms(hf, *, base: float = 1.0, bias=None, embed: float = 1.0):
    """The same for a transformers model, in parameter order: norm weights (names with "norm", or "ln" in the
    module name) `base` + 0.3 N(0, 1) (Gemma stores w - 1: base 0), norm biases 0.1 N(0, 1), other 1-D
    parameters `bias` N(0, 1) (None: left), input embeddings x `embed`. Returns the model."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            norm = "norm" in name or "ln" in name.split(".")[-2]
            if norm and name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif norm:
                p.copy_(base + 0.3 * torch.randn_like(p))
            elif bias is not None and p.ndim == 1:
                p.copy_(bias * torch.randn_like(p))
        hf.get_input_embeddings().weight.mul_(embed)
    return hf


def make_model(seed: int = 0, **kw) -> LNFreeTransformer:
    """A random LN model with non-trivial LN weights/biases and an uneven residual scale."""
    torch.manual_seed(seed)
    return spread_norms(LNFreeTransformer(make_cfg(seed=seed, **kw))).eval()


def make_llama(seed: int = 0, d_mlp: int = 128, **kw) -> LNFreeTransformer:
    """A tiny Llama-like model: RMSNorm, grouped-query attention, rotary, SwiGLU; uneven RMS weights."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=d_mlp, d_vocab=61, n_ctx=16,
                                  normalization_type="RMS", n_key_value_heads=2, positional_embedding_type="rotary",
                                  rotary_dim=8, gated_mlp=True, act_fn="silu", final_rms=True, seed=seed, **kw)
    return spread_norms(LNFreeTransformer(cfg), bias=None).eval()


# ---- padding, HF LayerNorm scales, no network ----------------------------------------------------------
def pad_rows(rows, side: str, *, pad_id: int = 0, width=None):
    """Token rows of different lengths (tensors or lists) as one padded batch: (tokens, attention mask)
    [len(rows), width], each row flush right ("left" padding) or left ("right"); width default: the longest."""
    width = max(len(r) for r in rows) if width is None else width
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, sl], mask[i, sl] = torch.as_tensor(r), 1
    return tokens, mask


def hf_ln_input_stds(hf, tokens) -> dict:
    """Mean over tokens of sqrt(var + eps) of each transformers LayerNorm's input (independent of lnfree)."""
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


def save_released_ln_free(hf, tokens, path) -> dict:
    """Save `hf` (a transformers GPT-2) as the paper's authors release LN-free checkpoints: each LN weight x
    1e6 / sigma (its input's std on `tokens`), eps = 1e12. Returns the sigmas by module name."""
    stds = hf_ln_input_stds(hf, tokens)
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.mul_(1e6 / stds[name])
    hf.config.layer_norm_epsilon = 1e12
    hf.save_pretrained(path)
    return stds


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# ---- the tiny removal run the removal tests share ------------------------------------------------------
def _removal_sched():
    from lnfree.removal import Schedule

    return Schedule.from_gaps(2, 12, 2, 1, 1, 2)  # 2 layers: ln2 at 2,3; ln1.qk at 4,5; ln1.v at 6,8; ln_final at 10


REMOVAL_SCHED = _removal_sched()
REMOVAL_RUN = dict(schedule=REMOVAL_SCHED, batch_size=4, micro_batch_size=2, seq_len=16, lr=3e-3, min_lr=1e-3,
                   warmup=2, checkpoint_every=4, progress=False)


def removal_data(n: int = 48, seed: int = 5) -> torch.Tensor:
    """[n, 16] random token rows for the tiny removal runs."""
    return torch.randint(0, 61, (n, 16), generator=torch.Generator().manual_seed(seed))


def removal_tl_dir(tmp_path):
    """A tiny `make_model()` written as an lnfree (TL) directory, ``tmp_path / "base"``, with ``train.npy``
    (`removal_data(64)` as one stream) beside it: what ``lnfree remove-ln BASE --data train.npy`` reads."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from lnfree.io.tl_dir import cfg_to_json

    model = make_model()
    src = tmp_path / "base"
    src.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model": cfg_to_json(model.cfg)}))
    np.save(tmp_path / "train.npy", removal_data(64).numpy().reshape(-1))
    return src


def sigkill_mid_run(out_dir, data, make, **kwargs):
    """The target of a forked child: `remove_layernorm(make(), data, out_dir=out_dir, **REMOVAL_RUN, **kwargs)`,
    SIGKILLed mid-way through step 6 (after the step-4 checkpoint), as a crash would stop it."""
    from lnfree.removal import remove_layernorm

    model = make()
    calls = [0]

    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 2 * 6 + 1:  # the 13th forward with gradients (two micro-batches a step)
                os.kill(os.getpid(), signal.SIGKILL)

    model.blocks[0].register_forward_hook(hook)
    remove_layernorm(model, data, out_dir=out_dir, **REMOVAL_RUN, **kwargs)
    os._exit(3)  # not reached


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
