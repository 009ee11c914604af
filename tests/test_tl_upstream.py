"""TransformerLens 3.9's own offline tests, ported (rewritten) to run on LNFreeTransformer.

Every test is parametrized over ``cls`` in (HookedTransformer, LNFreeTransformer): the upstream
assertion must hold for TransformerLens itself (so the port is faithful) and for LNFreeTransformer
(built from the same seed, so on the same weights; the process_weights_ cases also compare the two
classes bit for bit).

Upstream files covered (TransformerLensOrg/TransformerLens, the 3.x development branch whose code
matches the installed 3.9 package):
- tests/unit/test_split_qkv.py (both cases), tests/unit/test_use_attn_result.py (both cases)
- tests/integration/test_grouped_query_attention.py: the model-level case
  (ungroup flag changes the k/v hook shapes); the two component-level cases (GQA module vs Attention
  module) are ported at model level: a GQA model equals a full-attention model with repeated K/V
- tests/unit/test_generate_no_tokenizer.py (all four cases)
- tests/integration/test_stop_at_layer.py (all seven cases)
- tests/integration/test_start_at_layer.py (the seven offline cases)
- tests/acceptance/test_hook_tokens.py (GPT-2's tokenizer from lnfree's offline copy)
- tests/unit/test_n_params_total.py (the four offline cases)
- tests/unit/test_direct_path_patching.py (shape, causal-structure and clean == corrupted cases on a
  weight-processed model)
- model-level counterparts of tests/unit/test_weight_processing.py's RMS / final_rms / GQA cases:
  `process_weights_` gives identical results on both classes
- tests/unit/test_split_qkv.py and GQA cases are also run with RMSNorm.

Also checked once by hand (not part of the suite: it needs the upstream repository): the upstream files
themselves (tests/unit: test_direct_path_patching, test_generate_no_tokenizer, test_n_params_total,
test_split_qkv, test_use_attn_result, test_optional_submodule, test_hooked_root_module, test_hook_points,
test_key_value_cache_entry, test_patching, test_svd_interpreter, test_utils, test_weight_processing,
tools/test_direct_logit_attribution; tests/integration: test_grouped_query_attention,
test_start_at_layer, test_stop_at_layer, test_d_vocab), run offline with
``transformer_lens.HookedTransformer`` replaced by LNFreeTransformer in a conftest, give exactly the
same outcome as with HookedTransformer: 214 passed, and the same 11 failed / 28 errors (hub downloads,
or differences between the development branch and the 3.9 release).

Not ported: component-only tests (tests/unit/components/*, factored_matrix, hook_points, config,
weight_conversion, utilities: they never build a HookedTransformer, so LNFreeTransformer changes
nothing there); tests that need hub downloads (pretrained weights or tokenizers: test_patching,
test_svd_interpreter, test_loading_from_pretrained_utilities, test_utils' model parts, the
integration/acceptance suites); test_start_at_layer.py::test_start_at_layer_kwargs (a shortformer
model, which LNFreeTransformer refuses by design, with a hub tokenizer); TransformerBridge tests.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lnfree.model import LNFreeTransformer

CLASSES = [HookedTransformer, LNFreeTransformer]
cls_param = pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)


def _build(cls, seed=0, **cfg_kw):
    torch.manual_seed(seed)
    return cls(HookedTransformerConfig(**cfg_kw)).eval()


def _twins(**cfg_kw):
    """The same random weights as a HookedTransformer and an LNFreeTransformer."""
    ht = _build(HookedTransformer, **cfg_kw)
    return ht, LNFreeTransformer.from_hooked(ht).eval()


# ---- tests/unit/test_split_qkv.py ------------------------------------------------------------
SPLIT = dict(d_model=64, d_head=8, n_heads=8, n_ctx=32, n_layers=1, attn_only=True, d_vocab=10)


@cls_param
@pytest.mark.parametrize("n_kv", [None, 2], ids=["normal", "grouped"])
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_split_qkv_input(cls, n_kv, norm):
    model = _build(cls, n_key_value_heads=n_kv, normalization_type=norm, **SPLIT)
    x = torch.arange(1, 9).unsqueeze(0)
    normal = model(x)
    model.set_use_split_qkv_input(True)
    names = ["blocks.0.hook_q_input", "blocks.0.hook_k_input", "blocks.0.hook_v_input"]
    split, cache = model.run_with_cache(x, names_filter=names)
    assert cache["blocks.0.hook_q_input"].shape[2] == 8
    assert cache["blocks.0.hook_k_input"].shape[2] == (n_kv or 8)
    assert cache["blocks.0.hook_v_input"].shape[2] == (n_kv or 8)
    assert torch.allclose(normal, split, atol=1e-6)


# ---- tests/unit/test_use_attn_result.py ------------------------------------------------------
@cls_param
@pytest.mark.parametrize("n_kv", [None, 2], ids=["normal", "grouped"])
def test_use_attn_result(cls, n_kv):
    model = _build(cls, n_key_value_heads=n_kv, **SPLIT)
    x = torch.arange(1, 9).unsqueeze(0)
    normal = model(x)
    model.set_use_attn_result(True)
    out, cache = model.run_with_cache(x)
    assert torch.allclose(normal, out, atol=1e-6)
    result = cache["blocks.0.attn.hook_result"]
    assert result.shape == (1, 8, 8, 64)
    assert torch.allclose(result.sum(2) + model.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"], atol=1e-5)


# ---- tests/integration/test_grouped_query_attention.py -------------------------------------
GQA = dict(d_model=64, d_head=8, n_heads=8, n_ctx=32, n_layers=1, act_fn="silu", d_vocab=10, n_key_value_heads=2)


@cls_param
def test_ungroup_gqa_flag_changes_kv_hook_shapes(cls):
    model = _build(cls, use_split_qkv_input=True, **GQA)
    x = torch.arange(1, 9).unsqueeze(0)
    names = ["blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.hook_k_input", "blocks.0.hook_v_input"]
    off, c_off = model.run_with_cache(x, names_filter=names)
    model.set_ungroup_grouped_query_attention(True)
    on, c_on = model.run_with_cache(x, names_filter=names)
    for name in names:
        assert c_on[name].shape[2] == c_off[name].shape[2] * 4  # n_heads / n_kv_heads
    assert torch.allclose(off, on, atol=1e-4, rtol=1e-4)


@cls_param
@pytest.mark.parametrize("split", [False, True])
def test_gqa_model_equals_full_attention_with_repeated_kv(cls, split):
    """The upstream component test (GQA == Attention with K/V repeated), at model level."""
    gqa = _build(cls, use_split_qkv_input=split, normalization_type="RMS", **GQA)
    full = _build(cls, use_split_qkv_input=split, normalization_type="RMS", **{**GQA, "n_key_value_heads": None})
    sd = gqa.state_dict()
    for key in list(sd):
        if "._W_" in key or "._b_" in key:
            sd[key.replace("._", ".")] = torch.repeat_interleave(sd.pop(key), 4, dim=0)
    full.load_state_dict(sd)
    x = torch.randint(0, 10, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gqa(x), full(x), atol=1e-5, rtol=1e-5)
    if cls is LNFreeTransformer:  # and in every site mode
        for m in (gqa, full):
            m.estimate_ln_scales(x)
        with gqa.ln_frozen(), full.ln_frozen():
            assert torch.allclose(gqa(x), full(x), atol=1e-5, rtol=1e-5)
        gqa.remove_ln()
        full.remove_ln()
        assert torch.allclose(gqa(x), full(x), atol=1e-5, rtol=1e-5)


# ---- tests/unit/test_generate_no_tokenizer.py ------------------------------------------------
@cls_param
@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("eos", [None, 0])
def test_generate_without_tokenizer(cls, kv_cache, eos):
    model = _build(cls, n_layers=1, d_model=16, d_head=4, n_heads=4, n_ctx=32, d_vocab=20, attn_only=True)
    assert model.tokenizer is None
    kw = dict(stop_at_eos=False) if eos is None else dict(stop_at_eos=True, eos_token_id=eos)
    out = model.generate(torch.zeros((1, 5), dtype=torch.long), max_new_tokens=3 if eos is None else 5,
                         use_past_kv_cache=kv_cache, return_type="tokens", verbose=False, **kw)
    if eos is None:
        assert out.shape == (1, 8)
    else:
        assert out.shape[0] == 1 and out.shape[1] >= 5


# ---- tests/integration/test_stop_at_layer.py and test_start_at_layer.py ---------------------
LAYERS = dict(n_layers=3, d_mlp=8, d_model=10, d_head=5, n_heads=2, n_ctx=20, d_vocab=50, act_fn="relu")


def _counting_hooks(counter):
    def count(act, hook):
        counter.append(hook.name)

    return [("hook_embed", count), ("blocks.0.attn.hook_k", count), ("blocks.1.mlp.hook_pre", count)]


@cls_param
def test_stop_at_layer(cls):
    model = _build(cls, **LAYERS)
    x = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, normal = model.run_with_cache(x)
    # test_stop_at_embed
    out, cache = model.run_with_cache(x, stop_at_layer=0)
    assert torch.allclose(out, normal["blocks.0.hook_resid_pre"])
    assert "hook_embed" in cache and "hook_pos_embed" in cache
    assert "blocks.0.hook_resid_pre" not in cache and "ln_final.hook_normalized" not in cache
    # test_run_with_hooks
    counter = []
    out = model.run_with_hooks(x, stop_at_layer=1, fwd_hooks=_counting_hooks(counter))
    assert torch.allclose(out, normal["blocks.0.hook_resid_post"]) and len(counter) == 2
    # test_manual_hooks
    counter = []
    for name, fn in _counting_hooks(counter):
        model.add_hook(name, fn)
    out = model(x, stop_at_layer=1)
    model.reset_hooks()
    assert torch.allclose(out, normal["blocks.0.hook_resid_post"]) and len(counter) == 2
    # test_stop_at_layer_1
    out, cache = model.run_with_cache(x, stop_at_layer=1)
    assert torch.allclose(out, normal["blocks.0.hook_resid_post"])
    assert "blocks.0.hook_resid_post" in cache and "blocks.1.hook_resid_pre" not in cache
    # test_stop_at_final
    out, cache = model.run_with_cache(x, stop_at_layer=-1)
    assert torch.allclose(out, normal["blocks.1.hook_resid_post"])
    assert "blocks.2.hook_resid_pre" not in cache and "ln_final.hook_normalized" not in cache
    # test_no_stop_logit_output / test_no_stop_no_output
    assert torch.allclose(model(x, stop_at_layer=None), logits)
    assert model(x, stop_at_layer=None, return_type=None) is None


@cls_param
def test_start_at_layer(cls):
    model = _build(cls, **LAYERS)
    x = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    embed, _, _, _ = model.input_to_embed(x)
    logits, normal = model.run_with_cache(x)
    # test_start_at_layer_1
    out, cache = model.run_with_cache(normal["blocks.1.hook_resid_pre"], start_at_layer=1)
    assert torch.allclose(out, logits)
    assert "hook_embed" not in cache and "blocks.0.hook_resid_pre" not in cache
    assert "blocks.1.hook_resid_pre" in cache and "ln_final.hook_normalized" in cache
    # test_run_with_hooks / test_manual_hooks
    counter = []
    model.run_with_hooks(embed, start_at_layer=1, fwd_hooks=_counting_hooks(counter))
    assert len(counter) == 1
    for name, fn in _counting_hooks(counter):
        model.add_hook(name, fn)
    model(embed, start_at_layer=1)
    model.reset_hooks()
    assert len(counter) == 2
    # test_start_at_final
    out, cache = model.run_with_cache(normal["blocks.2.hook_resid_pre"], start_at_layer=-1)
    assert torch.allclose(out, logits) and "blocks.1.hook_resid_post" not in cache
    # test_no_start_logit_output / test_no_start_none_output
    assert torch.allclose(model(embed, start_at_layer=0), logits)
    assert model(embed, start_at_layer=0, return_type=None) is None
    # test_start_and_stop
    out, cache = model.run_with_cache(normal["blocks.1.hook_resid_pre"], start_at_layer=1, stop_at_layer=2)
    assert torch.allclose(out, normal["blocks.1.hook_resid_post"])
    assert "blocks.0.hook_resid_pre" not in cache and "blocks.2.hook_resid_pre" not in cache
    assert "ln_final.hook_normalized" not in cache


# ---- tests/acceptance/test_hook_tokens.py ----------------------------------------------------
@cls_param
def test_patch_tokens(cls):
    from lnfree.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=1, d_mlp=10, d_model=10, d_head=5, n_heads=2, n_ctx=20, act_fn="relu",
                                  d_vocab=50257, use_hook_tokens=True)
    model = cls(cfg, tokenizer=gpt2_tokenizer())
    new_first = model.to_single_token("Hi")

    def replace_first(tokens, hook, new):
        assert tokens[0, 0].item() != new
        tokens[0, 0] = new
        return tokens

    hooked = model.run_with_hooks("Hello World!", prepend_bos=False,
                                  fwd_hooks=[("hook_tokens", functools.partial(replace_first, new=new_first))])
    torch.testing.assert_close(hooked, model("Hi World!", prepend_bos=False))


# ---- tests/unit/test_n_params_total.py -------------------------------------------------------
@cls_param
def test_n_params_total(cls):
    small = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, n_ctx=16, d_vocab=50)
    attn_only = _build(cls, attn_only=True, **small)
    with_mlp = _build(cls, d_mlp=64, act_fn="gelu", **small)
    assert attn_only.n_params_total == 12402  # upstream's hand count
    assert with_mlp.n_params_total == 20914
    assert attn_only.n_params_total - attn_only.cfg.n_params == 12402 - 8192
    assert isinstance(attn_only.n_params_total, int)


# ---- tests/unit/test_direct_path_patching.py -------------------------------------------------
@cls_param
def test_direct_path_patching(cls):
    from transformer_lens.tools.analysis.direct_path_patching import (
        get_act_patch_direct_path,
        get_act_patch_direct_path_all_sources,
    )

    model = _build(cls, n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=16,
                   act_fn="gelu", normalization_type="LN")
    model.process_weights_()
    g = torch.Generator().manual_seed(42)
    clean, corrupted = torch.randint(0, 100, (1, 8), generator=g), torch.randint(0, 100, (1, 8), generator=g)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
    kw = dict(model=model, corrupted_tokens=corrupted, clean_cache=clean_cache, corrupted_cache=corrupted_cache,
              patching_metric=lambda logits: logits[0, -1, :].sum(), verbose=False)
    with torch.no_grad():
        for component in ("q", "k", "v"):
            single = get_act_patch_direct_path(src_layer=0, src_head=1, component=component, **kw)
            assert single.shape == (3, 4)
            assert single[:1].eq(0).all() and not single[1:].eq(0).all()  # causal structure
        every = get_act_patch_direct_path_all_sources(component="q", **kw)
        assert every.shape == (3, 4, 3, 4)
        same = get_act_patch_direct_path(**{**kw, "corrupted_tokens": clean, "corrupted_cache": clean_cache},
                                         src_layer=0, src_head=0, component="q")
    baseline = float(model(clean)[0, -1].sum().detach())
    nonzero = same[same != 0]
    assert nonzero.numel() == 0 or torch.allclose(nonzero, torch.full_like(nonzero, baseline), atol=1e-4)


# ---- model-level weight processing (tests/unit/test_weight_processing.py's RMS / GQA cases) ----
@pytest.mark.parametrize("extra, tl_exact", [
    (dict(normalization_type="RMS", n_key_value_heads=2, gated_mlp=True, positional_embedding_type="rotary",
          rotary_dim=8), True),
    # TransformerLens 3.9's fold_ln changes the logits of final_rms LayerNorm models (it folds ln_final
    # as a LayerNorm); LNFreeTransformer reproduces TransformerLens exactly, bug included.
    (dict(normalization_type="LN", final_rms=True, n_key_value_heads=2), False),
    (dict(normalization_type="LN", parallel_attn_mlp=True), True),
], ids=["rms-gqa-rotary-gated", "ln-final_rms-gqa", "ln-parallel"])
def test_process_weights_identical(extra, tl_exact):
    ht, model = _twins(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=50, n_ctx=16, act_fn="silu",
                       **extra)
    x = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    before = ht(x)
    for m in (ht, model):
        m.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert model.cfg.normalization_type == ht.cfg.normalization_type
    assert torch.equal(model(x), ht(x))
    centered_err = (model(x) - model(x).mean(-1, keepdim=True)) - (before - before.mean(-1, keepdim=True))
    assert (float(centered_err.detach().abs().max()) < 1e-4) == tl_exact
    # The processed model still has removable sites (now the Pre kinds) that work in every mode.
    kinds = {model.blocks[0].ln1.kind, model.ln_final.kind}
    assert kinds <= {"LNPre", "RMSPre"}
    model.estimate_ln_scales(x)
    with model.ln_frozen():
        frozen = model(x)
    model.remove_ln()
    assert torch.allclose(model(x), frozen, atol=1e-4, rtol=1e-5)


# ---- rotary + GQA key/value cache (offline counterpart of tests/integration/test_kv_cache.py) ----
@cls_param
def test_rotary_gqa_kv_cache_generation(cls):
    model = _build(cls, n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48, d_vocab=50,
                   n_ctx=24, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                   rotary_dim=8, gated_mlp=True)
    x = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    assert torch.equal(model.generate(x, use_past_kv_cache=True, **kw), model.generate(x, use_past_kv_cache=False, **kw))
