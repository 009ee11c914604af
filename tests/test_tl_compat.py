"""TransformerLens compatibility: with every LN site live, LNFreeTransformer IS a HookedTransformer.

Run on GPT-2-shaped LayerNorm models and on Llama-like (RMSNorm, GQA, rotary, SwiGLU) and
NeoX-like (parallel, rotary, split q/k/v input) ones (`ARCHS`).

Each test builds a HookedTransformer and an LNFreeTransformer on the same weights and checks that
a representative TransformerLens behaviour gives IDENTICAL results (``torch.equal``, not allclose):
forward (logits, loss, both, per-token loss, start/stop_at_layer), hooks (run_with_hooks,
``hooks()``, ``add_hook``) including patching hooks on ``blocks.0.hook_resid_pre`` and on LN scales,
run_with_cache (every common key), ActivationCache helpers (decompose_resid, accumulated_resid,
logit_attrs, stack_head_results, stack_neuron_results, get_full_resid_decomposition,
apply_ln_to_stack with and without recompute_ln, compute_head_results), greedy ``generate`` with and
without the KV cache, to_tokens / to_string / to_str_tokens with GPT-2's tokenizer, and
TransformerLens's weight processing (fold_ln, center_writing_weights, center_unembed,
fold_value_biases) through ``load_and_process_state_dict``.

Known, intended differences (the values of every common hook are identical):

- ``blocks.{i}.ln1`` is applied once per *path* (query/key, value) instead of once per input
  (query, key, value), unless `use_split_qkv_input` makes the query and key inputs separate tensors. So ``blocks.{i}.ln1.hook_scale`` / ``hook_normalized`` fire ONCE per forward
  pass (the q/k path) where HookedTransformer fires them three times, and the value path fires the
  extra hooks ``blocks.{i}.ln1.hook_scale_v`` / ``hook_normalized_v``. A hook that should act on all
  of ln1 (as a HookedTransformer hook on ``ln1.hook_scale`` does) must be added to both names; a hook
  on ``ln1.hook_scale`` alone acts on queries and keys only (which is how the paper's separate
  ln1.qk / ln1.v sites are patched). The cache therefore has those extra ``*_v`` keys.
- Gradients: with ln1 applied twice rather than three times, autograd sums the q and k gradients
  before ln1's backward rather than after, so gradients agree to float rounding (checked with
  allclose), not bit for bit. Forward values are bit-identical.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from conftest import make_model, spread_norms
from lnfree.model import LNFreeTransformer


# Every test runs on GPT-2-shaped LayerNorm models and on modern architectures: a Llama-like model
# (RMSNorm, grouped-query attention, rotary, SwiGLU) and a NeoX-like one (LayerNorm, partial rotary,
# parallel attention + MLP) with split q/k/v inputs.
ARCHS = {
    "gpt2": {},
    "llama": dict(normalization_type="RMS", n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8,
                  gated_mlp=True, act_fn="silu", final_rms=True),
    "neox-split": dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True,
                       use_split_qkv_input=True, act_fn="gelu"),
}


def _arch_model(arch: str) -> LNFreeTransformer:
    if arch == "gpt2":
        return make_model()
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, d_vocab=61, n_ctx=16,
                                  seed=0, **{"normalization_type": "LN", **ARCHS[arch]})
    return spread_norms(LNFreeTransformer(cfg), extra_biases=("b_Q", "_b_K", "_b_V")).eval()


@pytest.fixture(params=list(ARCHS))
def model(request) -> LNFreeTransformer:
    return _arch_model(request.param)


def _twin(model: LNFreeTransformer, tokenizer=None) -> HookedTransformer:
    """A HookedTransformer with the same config and weights (LN sigma buffers are not in the state dict)."""
    ht = HookedTransformer(copy.deepcopy(model.cfg), tokenizer=tokenizer)
    ht.load_state_dict(model.state_dict())
    return ht.eval()


@pytest.fixture
def pair(model):
    assert set(model.ln_modes().values()) == {"live"}
    return _twin(model), model


@pytest.fixture(scope="module")
def gpt2_pair():
    """A tiny model with GPT-2's vocabulary and tokenizer (offline), for generate and tokenization."""
    from lnfree.tokenizer import gpt2_tokenizer

    lm = make_model(d_vocab=50257, n_ctx=32, n_layers=2)
    lm.set_tokenizer(gpt2_tokenizer(add_bos_token=True))
    return _twin(lm, tokenizer=gpt2_tokenizer(add_bos_token=True)), lm


def _equal(a, b, what=""):
    assert type(a) is type(b), what
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert torch.equal(a, b), f"{what}: max |diff| {float((a.double() - b.double()).abs().max()):.3g}"
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


# ---- forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(return_type="loss"), dict(return_type="both"), dict(return_type="loss", loss_per_token=True),
     dict(stop_at_layer=1)],
    ids=["logits", "loss", "both", "loss_per_token", "stop_at_layer"],
)
def test_forward_identical(pair, tokens, kwargs):
    ht, lm = pair
    with torch.no_grad():
        a, b = ht(tokens, **kwargs), lm(tokens, **kwargs)
    _equal(tuple(a) if isinstance(a, tuple) else a, tuple(b) if isinstance(b, tuple) else b, str(kwargs))
    if kwargs.get("return_type") in ("loss", "both"):
        loss = a if kwargs["return_type"] == "loss" else a[1]
        assert torch.isfinite(loss).all() and float(loss.mean()) > 0


def test_start_at_layer_identical(pair, tokens):
    ht, lm = pair
    with torch.no_grad():
        resid = ht(tokens, stop_at_layer=1)
        _equal(ht(resid, start_at_layer=1), lm(resid, start_at_layer=1), "start_at_layer")
        _equal(lm(resid, start_at_layer=1), lm(tokens), "start_at_layer resumes the same forward pass")


# ---- hooks -----------------------------------------------------------------------------------------
def test_patching_hook_on_resid_pre_identical(pair, tokens):
    ht, lm = pair
    with torch.no_grad():
        _, source = ht.run_with_cache(tokens.flip(0), names_filter="blocks.0.hook_resid_pre")

        def patch(resid, hook):
            resid[:, 3] = source[hook.name][:, 3]
            return resid

        clean = ht(tokens)
        a = ht.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", patch)])
        b = lm.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", patch)])
    _equal(a, b, "patched logits")
    assert not torch.allclose(a, clean)  # the patch changed something
    assert torch.equal(a[:, :3], clean[:, :3])  # ...only from position 3 on (causal)


def _double(scale, hook):
    return scale * 2.0


@pytest.mark.parametrize("name", ["blocks.1.ln2.hook_scale", "ln_final.hook_scale", "blocks.0.ln1.hook_normalized"])
def test_patching_hook_on_ln_identical(pair, tokens, name):
    ht, lm = pair
    # HT's ln1 hooks act on q, k and v; ours on q and k, plus the *_v twin for v (module docstring)
    names = [name] + ([name + "_v"] if ".ln1." in name else [])
    with torch.no_grad():
        a = ht.run_with_hooks(tokens, fwd_hooks=[(name, _double)])
        b = lm.run_with_hooks(tokens, fwd_hooks=[(n, _double) for n in names])
        clean = lm(tokens)
    _equal(a, b, name)
    assert not torch.allclose(a, clean)


def test_ln1_scale_hook_covers_qk_then_v(pair, tokens):
    """HT's ln1.hook_scale acts on q, k and v; ours needs ln1.hook_scale and ln1.hook_scale_v."""
    ht, lm = pair
    name = "blocks.0.ln1.hook_scale"
    with torch.no_grad():
        a = ht.run_with_hooks(tokens, fwd_hooks=[(name, _double)])
        both = lm.run_with_hooks(tokens, fwd_hooks=[(name, _double), (name + "_v", _double)])
        qk_only = lm.run_with_hooks(tokens, fwd_hooks=[(name, _double)])
    _equal(a, both, "ln1 scale hooked on both paths")
    assert not torch.allclose(qk_only, a, atol=1e-4)  # the documented difference is real

    calls = {"ht": [], "lm": []}
    for key, model in (("ht", ht), ("lm", lm)):
        def count(x, hook, key=key):
            calls[key].append(hook.name)

        with torch.no_grad(), model.hooks(fwd_hooks=[(lambda n: "blocks.0.ln1.hook_scale" in n, count)]):
            model(tokens)
    assert calls["ht"] == [name] * 3
    # Split q/k/v inputs are separate tensors: ln1 then runs on the query and on the key input.
    assert calls["lm"] == [name] * (2 if lm.cfg.use_split_qkv_input else 1) + [name + "_v"]


def test_add_hook_and_reset_identical(pair, tokens):
    ht, lm = pair

    def zero_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    with torch.no_grad():
        outs = []
        for model in (ht, lm):
            model.add_hook("blocks.1.attn.hook_z", zero_head)
            outs.append(model(tokens))
            model.reset_hooks()
        _equal(*outs, "add_hook")
        _equal(ht(tokens), lm(tokens), "after reset_hooks")
        assert not torch.allclose(outs[0], ht(tokens))


def test_gradients_agree(pair, tokens):
    ht, lm = pair
    grads = []
    for model in (ht, lm):
        model.zero_grad(set_to_none=True)
        model(tokens, return_type="loss").backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


# ---- run_with_cache and ActivationCache helpers -----------------------------------------------------
@pytest.fixture
def caches(pair, tokens):
    ht, lm = pair
    with torch.no_grad():
        la, ca = ht.run_with_cache(tokens)
        lb, cb = lm.run_with_cache(tokens)
    _equal(la, lb, "logits")
    return ca, cb


def test_run_with_cache_every_common_key(caches):
    ca, cb = caches
    keys_a, keys_b = set(ca.keys()), set(cb.keys())
    assert keys_a <= keys_b
    assert keys_b - keys_a == {f"blocks.{i}.ln1.hook_{k}_v" for i in range(2) for k in ("scale", "normalized")}
    assert len(keys_a) >= 40 and {"blocks.1.ln2.hook_scale", "ln_final.hook_normalized", "blocks.0.attn.hook_pattern"} <= keys_a
    for key in sorted(keys_a):
        _equal(ca[key], cb[key], key)
    for i in range(2):  # the value path's scale equals the shared ln1 scale
        _equal(cb[f"blocks.{i}.ln1.hook_scale_v"], cb[f"blocks.{i}.ln1.hook_scale"], "scale_v")


def test_run_with_cache_filtered_and_without_batch_dim(pair, tokens):
    ht, lm = pair
    names = lambda n: n.endswith(("hook_scale", "hook_z"))  # noqa: E731
    with torch.no_grad():
        _, ca = ht.run_with_cache(tokens[:1], names_filter=names, remove_batch_dim=True)
        _, cb = lm.run_with_cache(tokens[:1], names_filter=names, remove_batch_dim=True)
    assert set(ca.keys()) == set(cb.keys()) - {"blocks.0.ln1.hook_scale_v", "blocks.1.ln1.hook_scale_v"}
    for key in ca.keys():
        _equal(ca[key], cb[key], key)


HELPERS = {
    "decompose_resid": lambda c, t: c.decompose_resid(apply_ln=True, return_labels=True),
    "decompose_resid_mlp_input": lambda c, t: c.decompose_resid(layer=1, mlp_input=True, apply_ln=True),
    "decompose_resid_attn_mode": lambda c, t: c.decompose_resid(mode="attn", pos_slice=-1, apply_ln=True),
    "accumulated_resid": lambda c, t: c.accumulated_resid(apply_ln=True, incl_mid=True, return_labels=True),
    "accumulated_resid_mlp_input": lambda c, t: c.accumulated_resid(layer=1, mlp_input=True, apply_ln=True),
    "logit_attrs": lambda c, t: c.logit_attrs(c.decompose_resid(apply_ln=True, pos_slice=-1), t[:, -1],
                                              incorrect_tokens=t[:, 0], pos_slice=-1),
    "stack_head_results": lambda c, t: c.stack_head_results(apply_ln=True, incl_remainder=True, return_labels=True),
    "stack_head_results_layer1": lambda c, t: c.stack_head_results(layer=1, pos_slice=-1, apply_ln=True),
    "stack_neuron_results": lambda c, t: c.stack_neuron_results(layer=1, apply_ln=True, return_labels=True),
    "get_full_resid_decomposition": lambda c, t: c.get_full_resid_decomposition(expand_neurons=True, apply_ln=True,
                                                                                return_labels=True),
    "apply_ln_to_stack_final": lambda c, t: c.apply_ln_to_stack(c.decompose_resid(), layer=None),
    "apply_ln_to_stack_ln1": lambda c, t: c.apply_ln_to_stack(c.decompose_resid(layer=1), layer=1),
    "apply_ln_to_stack_ln2": lambda c, t: c.apply_ln_to_stack(c.decompose_resid(layer=1, mlp_input=True), layer=1,
                                                             mlp_input=True),
    "apply_ln_to_stack_recompute": lambda c, t: c.apply_ln_to_stack(c.accumulated_resid(layer=1), layer=1,
                                                                   recompute_ln=True),
}


@pytest.mark.parametrize("helper", list(HELPERS))
def test_activation_cache_helpers_identical(caches, tokens, helper):
    ca, cb = caches
    with torch.no_grad():
        try:
            a = HELPERS[helper](ca, tokens)
        except (RuntimeError, KeyError) as e:
            # TransformerLens's own helpers cannot read ln1's per-head scale of split q/k/v models, nor
            # the (absent) resid_mid of parallel ones: LNFreeTransformer must fail the same way.
            assert ca.model.cfg.use_split_qkv_input or ca.model.cfg.parallel_attn_mlp
            with pytest.raises(type(e), match=re.escape(str(e)[:40])):
                HELPERS[helper](cb, tokens)
            return
        b = HELPERS[helper](cb, tokens)
    _equal(a, b, helper)
    first = a[0] if isinstance(a, tuple) else a
    assert first.abs().max() > 0  # non-trivial


def test_compute_head_results_identical(caches):
    ca, cb = caches
    ca.compute_head_results()
    cb.compute_head_results()
    for i in range(2):
        _equal(ca[f"blocks.{i}.attn.hook_result"], cb[f"blocks.{i}.attn.hook_result"], f"result {i}")


# ---- generate and tokenization ----------------------------------------------------------------------
@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_generate_greedy_identical(gpt2_pair, use_past_kv_cache):
    ht, lm = gpt2_pair
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, use_past_kv_cache=use_past_kv_cache, verbose=False)
    prompt = ht.to_tokens(["The cat sat on", "LayerNorm is not"])
    a, b = ht.generate(prompt, **kw), lm.generate(prompt, **kw)
    _equal(a, b, "generated tokens")
    assert a.shape == (2, prompt.shape[1] + 6) and torch.equal(a[:, : prompt.shape[1]], prompt)
    text_a = ht.generate("Hello world", return_type="str", **kw)
    assert isinstance(text_a, str) and text_a == lm.generate("Hello world", return_type="str", **kw)


def test_generate_kv_cache_matches_full_recompute(gpt2_pair):
    """Independent of HookedTransformer: the cached and uncached greedy continuations agree."""
    _, lm = gpt2_pair
    prompt = lm.to_tokens("Once upon a time")
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(lm.generate(prompt, use_past_kv_cache=True, **kw),
                       lm.generate(prompt, use_past_kv_cache=False, **kw))


def test_tokenization_identical(gpt2_pair):
    ht, lm = gpt2_pair
    text = ["Hello world", "Transformers don't need LayerNorm at inference time."]
    _equal(ht.to_tokens(text), lm.to_tokens(text), "to_tokens")
    _equal(ht.to_tokens(text[0], prepend_bos=False), lm.to_tokens(text[0], prepend_bos=False), "no bos")
    assert lm.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]  # GPT-2's ids, BOS first
    ids = lm.to_tokens(text[1])[0]
    assert ht.to_string(ids) == lm.to_string(ids) == "<|endoftext|>" + text[1]
    assert ht.to_str_tokens(text[1]) == lm.to_str_tokens(text[1])
    assert ht.to_single_token(" world") == lm.to_single_token(" world") == 995
    with torch.no_grad():
        _equal(ht(text), lm(text), "forward on strings")


# ---- weight processing --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
     dict(fold_ln=True, center_writing_weights=False, center_unembed=False, fold_value_biases=False),
     dict(fold_ln=False, center_writing_weights=True, center_unembed=True, fold_value_biases=True)],
    ids=["all", "fold_ln_only", "no_fold_ln"],
)
def test_load_and_process_state_dict_identical(model, tokens, flags):
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ht = HookedTransformer(copy.deepcopy(model.cfg))
    lm = LNFreeTransformer(copy.deepcopy(model.cfg))
    ht.load_and_process_state_dict({k: v.clone() for k, v in raw.items()}, **flags)
    lm.load_and_process_state_dict({k: v.clone() for k, v in raw.items()}, **flags)
    kind = model.cfg.normalization_type
    assert lm.cfg.normalization_type == ht.cfg.normalization_type == (kind + "Pre" if flags["fold_ln"] else kind)
    assert set(lm.ln_modes().values()) == {"live"}
    sa, sb = ht.state_dict(), lm.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        _equal(sa[k], sb[k], k)
    with torch.no_grad():
        a, b = ht.eval()(tokens), lm.eval()(tokens)
        _equal(a, b, "processed logits")
        # processing keeps the model: log-probs as the unprocessed model's (center_unembed shifts logits)
        torch.testing.assert_close(b.log_softmax(-1), model(tokens).log_softmax(-1), rtol=1e-4, atol=1e-4)
    if flags["fold_ln"]:
        assert not lm.blocks[0].ln1.has_params
        assert not torch.equal(sa["blocks.0.attn.W_Q"], raw["blocks.0.attn.W_Q"])  # LN weights were folded in
