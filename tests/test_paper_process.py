"""paper_processed leaves log-probabilities unchanged for every norm kind, live and removed (issue 22.3).

Writing weights are centred only where every reader of the residual stream centres; a mean component in
W_E (a constant over d_model per token) is what an RMSNorm reader sees and a LayerNorm reader ignores.
"""

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from lnfree.loading import load_model
from lnfree.model import LNFreeTransformer
from lnfree.paper import paper_processed

BASE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=53, n_ctx=12, act_fn="gelu_new",
            dtype=torch.float64, seed=0)
ROT = dict(positional_embedding_type="rotary", rotary_dim=8)
CONFIGS = {
    "ln": dict(normalization_type="LN"),
    "rms": dict(normalization_type="RMS"),
    "ln-final_rms": dict(normalization_type="LN", final_rms=True),
    "rms-gqa-rotary": dict(normalization_type="RMS", n_key_value_heads=2, gated_mlp=True, final_rms=True,
                           act_fn="silu", **ROT),
}
TOKENS = torch.tensor([[1, 5, 9, 14, 2, 33, 40, 7, 8, 51], [0, 3, 3, 12, 50, 21, 6, 17, 44, 29]])


def _from_config(name: str) -> LNFreeTransformer:
    torch.manual_seed(0)
    model = LNFreeTransformer(HookedTransformerConfig(**{**BASE, **CONFIGS[name]})).eval()
    gated = model.cfg.gated_mlp
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln" in n and n.endswith(".w"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "ln" in n and n.endswith(".b"):
                p.copy_(0 if gated and ".ln2." in n else 0.1 * torch.randn_like(p))
            elif p.ndim == 1 or n.split(".")[-1] in ("b_Q", "b_K", "b_V", "_b_K", "_b_V"):
                p.copy_(0.05 * torch.randn_like(p))
        model.W_E.mul_(5.0).add_(3.0 * torch.randn(model.cfg.d_vocab, 1, dtype=model.W_E.dtype))  # mean component
    return model


def _from_hf_dir(arch: str, tmp_path) -> LNFreeTransformer:
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=53,
                                                                 n_positions=12))
    else:  # llama: RMSNorm, grouped-query attention, rotary, SwiGLU
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=12, tie_word_embeddings=False))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "ln_" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
        emb = hf.get_input_embeddings().weight
        emb.mul_(20.0).add_(3.0 * torch.randn(emb.shape[0], 1))  # a mean component in W_E
    hf.save_pretrained(tmp_path / arch)
    return load_model(tmp_path / arch, device="cpu", dtype=torch.float64).eval()


def _log_probs(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(TOKENS).double(), -1)


def _check(model):
    for mode in ("live", "removed"):
        if mode == "removed":
            model.estimate_ln_scales(TOKENS)
            model.remove_ln()
        before = _log_probs(model)
        proc = paper_processed(model)
        gap = float((_log_probs(proc) - before).abs().max())
        assert gap < 1e-5, f"{mode}: log-probabilities changed by {gap:.3g}"
        assert torch.equal(_log_probs(model), before)  # the caller's model is untouched


@pytest.mark.parametrize("name", list(CONFIGS))
def test_processing_keeps_log_probs_for_tl_configs(name):
    _check(_from_config(name))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_processing_keeps_log_probs_for_hf_dirs(arch, tmp_path):
    _check(_from_hf_dir(arch, tmp_path))


def test_centring_is_done_where_every_reader_centres():
    """An LN model's writers are centred (the paper's processing); an RMS model's are left alone."""
    ln, rms = _from_config("ln"), _from_config("rms")
    assert paper_processed(ln).W_E.mean(-1).abs().max() < 1e-10
    assert paper_processed(rms).W_E.mean(-1).abs().max() > 0.1
