"""An independent transcription of the paper's computations (github.com/submarat/removing-layer-norm).

Plain transformers / TransformerLens / torch / numpy, following the paper's code step by step; no
lnfree analysis code. File:line references are to the paper's repository (main, 583a9e6; the
per-layer AtP error from branch attribution_vs_activation_patching). Tests compare lnfree.paper
against these functions.
"""

from __future__ import annotations

import copy
import random

import einops
import numpy as np
import torch
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import GPT2LMHeadModel


# ---- models (mech_interp/load_models.py) ---------------------------------------------------
def _tl_cfg(hf_cfg, dtype=torch.float32) -> HookedTransformerConfig:
    """What HookedTransformer.from_pretrained('gpt2', hf_model=...) builds, for any GPT-2 shape."""
    return HookedTransformerConfig(
        n_layers=hf_cfg.n_layer, d_model=hf_cfg.n_embd, n_heads=hf_cfg.n_head, d_head=hf_cfg.n_embd // hf_cfg.n_head,
        d_mlp=4 * hf_cfg.n_embd, n_ctx=hf_cfg.n_positions, d_vocab=hf_cfg.vocab_size, act_fn="gelu_new",
        eps=1e-5, normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True, device="cpu", dtype=dtype,
    )


def load_paper_model(hf_dir, *, no_ln: bool, processing: bool = True, dtype=torch.float32) -> HookedTransformer:
    """StandardModelLoader / NoLNModelLoader (load_models.py:87-171) with ModelFactory's defaults
    (fold_ln, center_unembed, center_writing_weights; from_pretrained's fold_value_biases)."""
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).to(dtype)
    if no_ln:  # load_models.py:139-145
        for block in hf.transformer.h:
            block.ln_1.weight.data = block.ln_1.weight.data / 1e6
            block.ln_2.weight.data = block.ln_2.weight.data / 1e6
        hf.transformer.ln_f.weight.data = hf.transformer.ln_f.weight.data / 1e6
    cfg = _tl_cfg(hf.config, dtype)
    model = HookedTransformer(cfg)
    sd = convert_gpt2_weights(hf, cfg)
    model.load_and_process_state_dict(sd, fold_ln=processing, center_writing_weights=processing,
                                      center_unembed=processing, fold_value_biases=processing)
    if no_ln:  # load_models.py:148-166
        for b in model.blocks:
            b.ln1 = torch.nn.Identity()
            b.ln2 = torch.nn.Identity()
        model.ln_final = torch.nn.Identity()
        model.cfg.normalization_type = None
    return model.eval()


# ---- DLA NMAE (attention_head_attribution/run_analysis.py:104-233, 358-408) ---------------
def _apply_layer_norm(x):
    eps = 1e-5
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


@torch.no_grad()
def dla_and_de(model, tokens, *, no_ln: bool, batch_size: int = 5):
    model.cfg.use_attn_result = True
    all_dla, all_de = [], []
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i:i + batch_size]
        _, cache = model.run_with_cache(batch)
        target = batch[:, -1]
        W = model.W_U[:, target].T
        b = model.b_U[target]
        final = cache["resid_post", -1][:, -1, :]
        scaled_final = final if no_ln else cache.apply_ln_to_stack(final, layer=-1, pos_slice=-1)
        logits = einops.reduce(scaled_final * W, "batch d_model -> batch", "sum") + b
        per_head = cache.stack_head_results(layer=-1, pos_slice=-1)
        scaled_heads = per_head if no_ln else cache.apply_ln_to_stack(per_head, layer=-1, pos_slice=-1)
        dla = einops.einsum(scaled_heads, W, "head batch d_model, batch d_model -> head batch")
        ablated = final - per_head
        scaled_ablated = ablated if no_ln else _apply_layer_norm(ablated)
        logits_without = einops.einsum(scaled_ablated, W, "head batch d_model, batch d_model -> head batch") + b
        all_dla.append(dla)
        all_de.append(logits - logits_without)
    model.cfg.use_attn_result = False
    return torch.cat(all_dla, 1), torch.cat(all_de, 1)


def global_nmae(dla, de):
    return (dla - de).abs().mean().item() / (de.abs().mean().item() + 1e-10) * 100


def nmae_bootstrap(dla, de, n_boot, seed):
    """run_analysis.py:385-408 with numpy's global draws replaced by a seeded Generator (same call order)."""
    rng = np.random.default_rng(seed)
    dla, de = torch.as_tensor(dla), torch.as_tensor(de)
    H, N = dla.shape
    boots = []
    for _ in range(n_boot):
        hi = rng.integers(0, H, H)
        si = rng.integers(0, N, N)
        boots.append(global_nmae(dla[hi][:, si], de[hi][:, si]))
    return np.percentile(boots, [2.5, 97.5])


# ---- sink rate (utils.py:65-102, sink_rate.py:144-211) ---------------------------------------
def calculate_sink_rate(hf_model, attentions, eps=0.3):
    config = hf_model.config
    T = attentions[0].shape[2]
    H, L, B = config.n_head, config.n_layer, attentions[0].shape[0]
    rate = torch.zeros((B,))
    for attn in attentions:
        y = attn[:, :, :, 0] > eps
        y = y.sum(dim=(1, 2)).float()
        rate += y / T
    return rate.mean() / (L * H)


@torch.no_grad()
def sink_rates(hf_model, tokens, batch_size=8, layer=None):
    rates = []
    for i in range(0, len(tokens), batch_size):
        out = hf_model(input_ids=tokens[i:i + batch_size], output_attentions=True)
        att = out.attentions if layer is None else [out.attentions[layer]]
        rates.append(calculate_sink_rate(hf_model, att).item())
    rates = np.array(rates)
    return rates.mean(), np.percentile(rates, 2.5), np.percentile(rates, 97.5)


# ---- residual norms (residual_stream/residual_norms.py:75-95, 227-279, 340-366) -------------
@torch.no_grad()
def residual_norms(model, tokens, *, no_ln: bool):
    names = ["hook_embed", "hook_pos_embed"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_resid_post"]
    names.append("ln_final.hook_normalized")
    store = {n: [] for n in names}
    for i in range(len(tokens)):
        acts = {}

        def capture(act, hook):
            acts[hook.name] = act.detach().cpu()
            return act

        model.run_with_hooks(tokens[i:i + 1], fwd_hooks=[(n, capture) for n in names if n in model.hook_dict])
        if no_ln:
            acts["ln_final.hook_normalized"] = acts[f"blocks.{len(model.blocks) - 1}.hook_resid_post"].clone()
        for n, a in acts.items():
            store[n].append(torch.norm(a, p=2, dim=-1))
    out = {}
    for n in names:
        v = torch.cat(store[n], 0)
        first, rest = v[:, 0], v[:, 1:].reshape(-1)
        out[n] = (first.mean().item(), first.std().item(), rest.mean().item(), rest.std().item())
    return out
