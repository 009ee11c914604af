"""Norm-removable modern architectures: RMSNorm / RMSPre sites, grouped-query attention, rotary,
parallel attention + MLP, gated MLPs, split q/k/v inputs, attn_in, attn_result, QK-norm.

For a covering set of tiny random TransformerLens configs (not the full product of features):
- live LNFreeTransformer == HookedTransformer bit for bit (logits and every cache entry);
- freeze_ln == an independent, hand-written forward with the same fixed scales (Llama-like: RMS +
  GQA + rotary + gated MLP), and the hand-written live forward == TransformerLens (so the reference
  itself is right);
- remove_ln == frozen within 1e-5 relative, and the GQA fold writes the shared K/V weights;
- with every site removed, the residual decomposition sums to the logits;
- features lnfree cannot handle are refused at construction with the feature named.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from conftest import spread_hf_norms, spread_norms
from lnfree.model import LNFreeTransformer, unsupported_features

D_VOCAB = 53
BASE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=D_VOCAB, n_ctx=12, act_fn="silu")
ROT = dict(positional_embedding_type="rotary", rotary_dim=8)

# name -> config overrides. Each norm kind meets GQA, rotary, parallel, gated, split-qkv, attn_in
# and attn_result at least once; the named families mimic real models.
CONFIGS = {
    "ln-gqa-rotary": dict(normalization_type="LN", n_key_value_heads=2, **ROT),
    "lnpre-parallel-attnresult": dict(normalization_type="LNPre", parallel_attn_mlp=True, use_attn_result=True),
    "rms-gqa-split": dict(normalization_type="RMS", n_key_value_heads=2, use_split_qkv_input=True, **ROT),
    "rmspre-split-attnresult": dict(normalization_type="RMSPre", use_split_qkv_input=True, use_attn_result=True),
    "rms-attn_in-parallel-gated": dict(normalization_type="RMS", use_attn_in=True, parallel_attn_mlp=True,
                                       gated_mlp=True),
    "ln-split-gqa-ungrouped": dict(normalization_type="LN", n_key_value_heads=2, use_split_qkv_input=True,
                                   ungroup_grouped_query_attention=True),
    "ln-final_rms-hook_mlp_in": dict(normalization_type="LN", final_rms=True, use_hook_mlp_in=True),
    "rms-qknorm-gqa-softcap-local": dict(normalization_type="RMS", n_key_value_heads=1, use_qk_norm=True,
                                         attn_scores_soft_cap=20.0, use_local_attn=True, window_size=4,
                                         attn_types=["local", "global"], **ROT),
    "rms-attn_only-alibi": dict(normalization_type="RMS", attn_only=True, positional_embedding_type="alibi"),
    # Llama / Mistral / Qwen2: RMSNorm, GQA, rotary, SwiGLU (Qwen2 has q/k/v biases: randomised below).
    "llama-like": dict(normalization_type="RMS", n_key_value_heads=2, gated_mlp=True, final_rms=True, **ROT),
    # Gemma: RMSNorm (weights already 1 + w), multi-query attention, d_head > d_model / n_heads, GeGLU.
    "gemma-like": dict(normalization_type="RMS", n_key_value_heads=1, gated_mlp=True, final_rms=True,
                       d_head=16, act_fn="gelu_pytorch_tanh", positional_embedding_type="rotary", rotary_dim=16),
    # GPT-NeoX / Pythia: LayerNorm, partial rotary, parallel attention + MLP.
    "neox-like": dict(normalization_type="LN", parallel_attn_mlp=True, act_fn="gelu",
                      positional_embedding_type="rotary", rotary_dim=4),
    # GPT-J: LayerNorm, rotary on adjacent pairs, parallel attention + MLP.
    "gptj-like": dict(normalization_type="LN", parallel_attn_mlp=True, act_fn="gelu_new",
                      positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=True),
}


def make_cfg(name: str, **extra) -> HookedTransformerConfig:
    kw = {**BASE, **CONFIGS[name], **extra}
    return HookedTransformerConfig(seed=0, **kw)


def make_hooked(name: str, **extra) -> HookedTransformer:
    """A random HookedTransformer with non-trivial norm weights, biases and residual scale."""
    torch.manual_seed(0)
    # a gated MLP has no pre-activation bias to fold ln2's bias into (see the test below): spread_norms leaves it 0
    return spread_norms(HookedTransformer(make_cfg(name, **extra)).eval(), blocks_only=False,
                        extra_biases=("b_Q", "b_K", "b_V", "_b_K", "_b_V"))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", CONFIGS)
def test_live_is_bit_exact_transformer_lens(name, tokens):
    ht = make_hooked(name)
    model = LNFreeTransformer.from_hooked(ht).eval()
    logits_ht, cache_ht = ht.run_with_cache(tokens)
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(logits, logits_ht)
    assert set(cache_ht.keys()) <= set(cache.keys())
    for key in cache_ht.keys():
        assert torch.equal(cache[key], cache_ht[key]), key
    # Built directly (not wrapped) on the same weights: the same.
    direct = LNFreeTransformer(make_cfg(name)).eval()
    direct.load_state_dict(ht.state_dict())
    assert torch.equal(direct(tokens), logits_ht)


@pytest.mark.parametrize("name", CONFIGS)
def test_removed_equals_frozen_and_decomposition_sums_to_logits(name, tokens):
    model = LNFreeTransformer.from_hooked(make_hooked(name)).eval()
    scales = model.estimate_ln_scales(tokens)
    assert set(scales) == set(model.ln_sites)
    with model.ln_frozen():
        frozen = model(tokens)
    live = model(tokens)
    assert rel_err(frozen, live) > 1e-3  # freezing the scales really changes something
    model.remove_ln()
    assert model.is_ln_free and model.cfg.normalization_type is None
    logits, cache = model.run_with_cache(tokens)
    assert rel_err(logits, frozen) < 1e-5
    parts = cache.get_full_resid_decomposition(expand_neurons=False, apply_ln=True)
    recon = parts.sum(0) @ model.W_U + model.b_U
    assert rel_err(recon, logits) < 1e-5


@pytest.mark.parametrize("name", ["ln-gqa-rotary", "rms-gqa-split", "llama-like", "gemma-like"])
def test_sites_remove_one_at_a_time(name, tokens):
    """Each site removed alone equals that site frozen alone (the others live)."""
    model = LNFreeTransformer.from_hooked(make_hooked(name)).eval()
    model.estimate_ln_scales(tokens)
    for site in model.ln_sites:
        with model.ln_frozen(site):
            frozen = model(tokens)
        model.remove_ln(site)
        assert model.ln_mode(site) == "removed"
        assert rel_err(model(tokens), frozen) < 1e-5, site


def test_gqa_fold_writes_shared_kv_weights(tokens):
    ht = make_hooked("llama-like")
    model = LNFreeTransformer.from_hooked(ht).eval()
    scales = model.estimate_ln_scales(tokens)
    attn, src = model.blocks[0].attn, ht.blocks[0].attn
    w = model.blocks[0].ln1.w.detach().clone()
    old_K, old_V, old_Q = src._W_K.detach().clone(), src._W_V.detach().clone(), src.W_Q.detach().clone()
    assert [tuple(W.shape) for W, _, _ in model.site_readers("blocks.0.ln1.qk")] == [(4, 32, 8), (2, 32, 8)]
    assert model.site_readers("blocks.0.ln1.v")[0][0] is attn._W_V
    assert model._readers("blocks.0.ln2") == model.site_readers("blocks.0.ln2")  # old name still works
    model.remove_ln()
    s_qk, s_v = scales["blocks.0.ln1.qk"], scales["blocks.0.ln1.v"]
    assert attn._W_K.shape == (2, 32, 8) and isinstance(attn._W_K, torch.nn.Parameter)
    torch.testing.assert_close(attn._W_K, old_K * w[None, :, None] / s_qk)  # RMS: no centering
    torch.testing.assert_close(attn._W_V, old_V * w[None, :, None] / s_v)
    torch.testing.assert_close(attn.W_Q, old_Q * w[None, :, None] / s_qk)
    torch.testing.assert_close(attn.W_K, torch.repeat_interleave(attn._W_K, 2, dim=0))
    assert torch.equal(src._W_K, old_K) and torch.equal(src._W_V, old_V)  # the wrapped model is untouched
    gate_src = ht.blocks[0].mlp.W_gate.detach()
    torch.testing.assert_close(model.blocks[0].mlp.W_gate,
                               gate_src * model.blocks[0].ln2.w.detach()[:, None] / scales["blocks.0.ln2"])


# ---- an independent forward pass: Llama-like (RMS + GQA + rotary + gated), any fixed scales ------
def _rotary(x: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """GPT-NeoX-style rotary ("rotate half") on the first rotary_dim dims of [batch, pos, head, d_head]."""
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = pos[:, None] * inv_freq[None]  # [pos, rotary_dim / 2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def reference_forward(model: LNFreeTransformer, tokens: torch.Tensor, scales=None) -> torch.Tensor:
    """Logits of a Llama-like model in float64, norms live (scales=None) or at fixed scales."""
    cfg = model.cfg
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}

    def rms(x, name, site):
        sigma = (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt() if scales is None else scales[site]
        return x / sigma * sd[f"{name}.w"]

    x = sd["embed.W_E"][tokens]
    n_pos = tokens.shape[1]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    rep = cfg.n_heads // cfg.n_key_value_heads
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        qk_in, v_in = rms(x, f"{p}.ln1", f"{p}.ln1.qk"), rms(x, f"{p}.ln1", f"{p}.ln1.v")
        q = torch.einsum("bpd,hde->bphe", qk_in, sd[f"{p}.attn.W_Q"]) + sd[f"{p}.attn.b_Q"]
        k = torch.einsum("bpd,hde->bphe", qk_in, sd[f"{p}.attn._W_K"]) + sd[f"{p}.attn._b_K"]
        v = torch.einsum("bpd,hde->bphe", v_in, sd[f"{p}.attn._W_V"]) + sd[f"{p}.attn._b_V"]
        q, k = _rotary(q, cfg.rotary_dim, cfg.rotary_base), _rotary(k, cfg.rotary_dim, cfg.rotary_base)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        x = x + torch.einsum("bqhe,hed->bqd", z, sd[f"{p}.attn.W_O"]) + sd[f"{p}.attn.b_O"]
        m = rms(x, f"{p}.ln2", f"{p}.ln2")
        post = F.silu(m @ sd[f"{p}.mlp.W_gate"]) * (m @ sd[f"{p}.mlp.W_in"]) + sd[f"{p}.mlp.b_in"]
        x = x + post @ sd[f"{p}.mlp.W_out"] + sd[f"{p}.mlp.b_out"]
    return rms(x, "ln_final", "ln_final") @ sd["unembed.W_U"] + sd["unembed.b_U"]


def test_frozen_matches_hand_written_forward_rms_gqa_rotary(tokens):
    model = LNFreeTransformer.from_hooked(make_hooked("llama-like")).eval()
    live = model(tokens)
    assert rel_err(reference_forward(model, tokens).float(), live) < 1e-5  # the reference is right
    scales = model.estimate_ln_scales(tokens)
    # Independent check of the RMS scale estimate: mean over tokens of the input's RMS (no centering).
    _, cache = model.run_with_cache(tokens)
    resid = cache["blocks.1.hook_resid_mid"].double()
    assert math.isclose(scales["blocks.1.ln2"], float((resid.pow(2).mean(-1) + model.cfg.eps).sqrt().mean()),
                        rel_tol=1e-6)
    scales = {s: v * (1.5 if i % 2 else 0.7) for i, (s, v) in enumerate(scales.items())}  # not the live values
    model.freeze_ln(scales=scales)
    frozen = model(tokens)
    assert rel_err(reference_forward(model, tokens, scales).float(), frozen) < 1e-5
    model.remove_ln()
    assert rel_err(model(tokens), frozen) < 1e-5


def test_rms_frozen_site_is_x_over_sigma_times_w():
    model = LNFreeTransformer.from_hooked(make_hooked("llama-like")).eval()
    ln = model.blocks[0].ln2
    assert ln.kind == "RMS" and not ln.centered and not ln.has_bias and torch.equal(ln.b, torch.zeros(32))
    assert "blocks.0.ln2.b" not in model.state_dict()  # TransformerLens's state dict is unchanged
    x = torch.randn(2, 3, 32) + 3.0  # a mean far from 0: RMSNorm must not center it
    model.freeze_ln("blocks.0.ln2", scales=2.5)
    torch.testing.assert_close(ln(x), x / 2.5 * ln.w)


def test_split_qkv_model_equals_unsplit_in_every_mode(tokens):
    """use_split_qkv_input only adds per-head hooks: frozen / removed logits equal the unsplit model's."""
    ht = make_hooked("rms-gqa-split")
    split = LNFreeTransformer.from_hooked(ht).eval()
    plain = LNFreeTransformer.from_hooked(ht).eval()
    plain.cfg.use_split_qkv_input = False
    scales = split.estimate_ln_scales(tokens)
    assert scales == pytest.approx(plain.estimate_ln_scales(tokens), rel=1e-6)
    with split.ln_frozen(), plain.ln_frozen():
        assert rel_err(split(tokens), plain(tokens)) < 1e-5
    split.remove_ln()
    plain.remove_ln()
    assert rel_err(split(tokens), plain(tokens)) < 1e-5


def test_split_qkv_per_head_patch_matches_transformer_lens(tokens):
    """A hook on one key head's input changes LNFreeTransformer exactly as it changes TransformerLens."""
    ht = make_hooked("rms-gqa-split")
    model = LNFreeTransformer.from_hooked(ht).eval()

    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def shift_head(act, hook):
        act = act.clone()
        act[:, :, 1] += 3.0 * direction
        return act

    hooks = [("blocks.0.hook_k_input", shift_head)]
    patched = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert torch.equal(patched, ht.run_with_hooks(tokens, fwd_hooks=hooks))
    assert rel_err(patched, model(tokens)) > 1e-4
    model.estimate_ln_scales(tokens)
    with model.ln_frozen():
        frozen_patched = model.run_with_hooks(tokens, fwd_hooks=hooks)
    model.remove_ln()  # per-head inputs read by folded per-head weights: the same patch, the same logits
    assert rel_err(model.run_with_hooks(tokens, fwd_hooks=hooks), frozen_patched) < 1e-5


def test_ln_with_gated_mlp_removal(tokens):
    """LayerNorm + gated MLP (StableLM): TransformerLens adds b_in after the gate product, so a
    nonzero ln2 bias cannot be folded: remove_ln refuses, naming the site, and changes nothing."""
    ht = make_hooked("ln-gqa-rotary", gated_mlp=True)
    model = LNFreeTransformer.from_hooked(ht).eval()
    model.estimate_ln_scales(tokens)
    with model.ln_frozen():
        frozen = model(tokens)
    model.remove_ln()  # ln2 bias is zero here: works
    assert rel_err(model(tokens), frozen) < 1e-5
    model = LNFreeTransformer.from_hooked(ht).eval()
    with torch.no_grad():
        model.blocks[0].ln2.b.add_(0.1)
    model.estimate_ln_scales(tokens)
    W_in = model.blocks[0].mlp.W_in
    with pytest.raises(ValueError, match="blocks.0.ln2.*bias.*gated"):
        model.remove_ln("blocks.0.ln2")
    assert model.blocks[0].mlp.W_in is W_in and model.ln_mode("blocks.0.ln2") == "frozen"


def test_recording_ln_std_uses_rms_for_rms_sites(tokens):
    """The removal trainer's recorder (`recording_ln_std`) sees the RMS, in every mode."""
    model = LNFreeTransformer.from_hooked(make_hooked("llama-like")).eval()
    _, cache = model.run_with_cache(tokens)
    resid = cache["blocks.0.hook_resid_pre"].double()
    want = float((resid.pow(2).mean(-1) + model.cfg.eps).sqrt().mean())
    for mode in ("live", "frozen"):
        if mode == "frozen":
            model.freeze_ln("blocks.0.ln1.v", scales=7.0)
        with model.recording_ln_std() as stats:
            model(tokens)
        assert stats.means()["blocks.0.ln1.v"] == pytest.approx(want, rel=1e-6)
        assert stats.means()["blocks.0.ln1.qk"] == pytest.approx(want, rel=1e-6)


# ---- refused features ------------------------------------------------------------------------
REFUSED = {
    "shortformer": (dict(normalization_type="LN", positional_embedding_type="shortformer"), "shortformer"),
    "gemma2-post-norms": (dict(normalization_type="RMS", use_normalization_before_and_after=True),
                          "use_normalization_before_and_after"),
    "solu": (dict(normalization_type="LN", act_fn="solu_ln"), "SoLU"),
    "bloom-embedding-ln": (dict(normalization_type="LN", post_embedding_ln=True, positional_embedding_type="alibi"),
                           "post_embedding_ln"),
    "moe": (dict(normalization_type="RMS", num_experts=4, experts_per_token=2, gated_mlp=True), "num_experts"),
    "logit-softcap": (dict(normalization_type="RMS", output_logits_soft_cap=30.0), "output_logits_soft_cap"),
    "olmo2-post-norm": (dict(normalization_type="RMS", original_architecture="Olmo2ForCausalLM"), "Olmo2ForCausalLM"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_features_are_refused(name):
    overrides, feature = REFUSED[name]
    cfg = HookedTransformerConfig(seed=0, **{**BASE, **overrides})
    assert any(feature in f for f in unsupported_features(cfg))
    with pytest.raises(ValueError, match=feature):
        LNFreeTransformer(cfg)
    torch.manual_seed(0)
    ht = HookedTransformer(cfg)
    with pytest.raises(ValueError, match=feature):
        LNFreeTransformer.from_hooked(ht)


def test_supported_configs_report_no_unsupported_features():
    for name in CONFIGS:
        assert unsupported_features(make_cfg(name)) == [], name


# ---- against transformers' own models: Gemma ((1 + w) RMSNorm, sqrt(d_model) embedding scale), Llama,
# GPT-NeoX (LayerNorm, partial rotary, parallel) and GPT-J (one shared LayerNorm, adjacent-pair rotary)
TINY_HF = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=48, d_vocab=D_VOCAB, n_ctx=12, seed=0)


def _hf_pair(arch: str):
    """A tiny random HF model and the LNFreeTransformer built from it by TransformerLens's converter."""
    import transformers
    from transformer_lens.pretrained.weight_conversions import (
        convert_gemma_weights,
        convert_gptj_weights,
        convert_llama_weights,
        convert_neox_weights,
    )

    llama_common = dict(vocab_size=D_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=12, rope_theta=10000.0, rms_norm_eps=1e-6)
    rms = dict(eps=1e-6, normalization_type="RMS", positional_embedding_type="rotary", rotary_base=10000,
               gated_mlp=True, final_rms=True)
    rotary_ln = dict(eps=1e-5, normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                     parallel_attn_mlp=True, d_head=8)
    torch.manual_seed(0)
    if arch == "gemma":
        hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(
            num_key_value_heads=1, head_dim=16, hidden_activation="gelu_pytorch_tanh", **llama_common))
        tl = dict(d_head=16, act_fn="gelu_pytorch_tanh", n_key_value_heads=1, rotary_dim=16, **rms)
        convert = convert_gemma_weights
    elif arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_key_value_heads=2, head_dim=8, hidden_act="silu", **llama_common))
        tl = dict(d_head=8, act_fn="silu", n_key_value_heads=2, rotary_dim=8, **rms)
        convert = convert_llama_weights
    elif arch == "neox":
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=D_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=12, use_parallel_residual=True, hidden_act="gelu", partial_rotary_factor=0.5))
        tl = dict(act_fn="gelu", **rotary_ln)
        convert = convert_neox_weights
    else:
        hf = transformers.GPTJForCausalLM(transformers.GPTJConfig(
            vocab_size=D_VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=12, n_inner=48,
            activation_function="gelu_new"))
        tl = dict(act_fn="gelu_new", rotary_adjacent_pairs=True, **rotary_ln)
        convert = convert_gptj_weights
    spread_hf_norms(hf, base=0.0 if arch == "gemma" else 1.0, embed=1.0 if arch == "gemma" else 50.0)
    model = LNFreeTransformer(HookedTransformerConfig(**TINY_HF, **tl)).eval()
    model.load_state_dict(convert(hf, model.cfg), strict=False)
    return hf.eval(), model


def _hf_norms(hf, arch: str) -> list[tuple[torch.nn.Module, list[str]]]:
    """Every HF norm module and the lnfree sites that read its output."""
    if arch in ("gemma", "llama"):
        body, final = hf.model.layers, hf.model.norm
        pairs = [(layer.input_layernorm, [f"blocks.{i}.ln1.qk", f"blocks.{i}.ln1.v"]) for i, layer in enumerate(body)]
        pairs += [(layer.post_attention_layernorm, [f"blocks.{i}.ln2"]) for i, layer in enumerate(body)]
    elif arch == "neox":
        body, final = hf.gpt_neox.layers, hf.gpt_neox.final_layer_norm
        pairs = [(layer.input_layernorm, [f"blocks.{i}.ln1.qk", f"blocks.{i}.ln1.v"]) for i, layer in enumerate(body)]
        pairs += [(layer.post_attention_layernorm, [f"blocks.{i}.ln2"]) for i, layer in enumerate(body)]
    else:  # GPT-J: one LayerNorm feeds attention and MLP
        body, final = hf.transformer.h, hf.transformer.ln_f
        pairs = [(layer.ln_1, [f"blocks.{i}.ln1.qk", f"blocks.{i}.ln1.v", f"blocks.{i}.ln2"])
                 for i, layer in enumerate(body)]
    return pairs + [(final, ["ln_final"])]


def _freeze_hf_norms(hf, arch: str, scales: dict) -> None:
    """Replace every HF norm's per-token scale by our fixed sigma (the independent frozen model)."""
    import types

    def frozen_forward(sigma):
        def forward(self, x):
            x = x.float()
            if isinstance(self, torch.nn.LayerNorm):
                return (x - x.mean(-1, keepdim=True)) / sigma * self.weight + self.bias
            w = (1.0 + self.weight.float()) if arch == "gemma" else self.weight.float()
            return x / sigma * w
        return forward

    for module, sites in _hf_norms(hf, arch):
        assert len({scales[s] for s in sites}) == 1  # one HF module: one scale for the sites it feeds
        module.forward = types.MethodType(frozen_forward(scales[sites[0]]), module)


@pytest.mark.parametrize("arch", ["gemma", "llama", "neox", "gptj"])
def test_every_mode_matches_transformers(arch, tokens):
    hf, model = _hf_pair(arch)
    with torch.no_grad():
        hf_live = hf(tokens).logits
    assert rel_err(model(tokens), hf_live) < 1e-4
    if arch == "gemma":  # TransformerLens stores Gemma's scaled embedding and 1 + w
        torch.testing.assert_close(model.W_E, hf.model.embed_tokens.weight * 32**0.5)
        torch.testing.assert_close(model.blocks[0].ln1.w, 1 + hf.model.layers[0].input_layernorm.weight)
    estimates = model.estimate_ln_scales(tokens)
    scales = {}
    for _, sites in _hf_norms(hf, arch):  # sites fed by one HF module read the same input: one scale
        assert max(estimates[s] for s in sites) == pytest.approx(min(estimates[s] for s in sites), rel=1e-6)
        scales.update({s: estimates[sites[0]] * 1.3 for s in sites})
    _freeze_hf_norms(hf, arch, scales)
    with torch.no_grad():
        hf_frozen = hf(tokens).logits
    assert rel_err(hf_frozen, hf_live) > 1e-3
    model.freeze_ln(scales=scales)
    frozen = model(tokens)
    assert rel_err(frozen, hf_frozen) < 1e-4
    model.remove_ln()
    assert rel_err(model(tokens), hf_frozen) < 1e-4


def test_overflow_without_the_per_token_scale_warns(tokens):
    """Frozen scales far below the real ones blow the residual stream up (gated MLPs square it):
    the non-finite logits come with a warning saying why, in eval mode; live models never warn."""
    import warnings

    model = LNFreeTransformer.from_hooked(make_hooked("llama-like")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(tokens)
        with model.ln_frozen(scales=1.0):
            assert torch.isfinite(model(tokens)).all()  # finite: no warning (it would raise here)
    with model.ln_frozen(scales=1e-30), pytest.warns(RuntimeWarning, match="non-finite outputs .* overflowed"):
        assert not torch.isfinite(model(tokens)).all()
