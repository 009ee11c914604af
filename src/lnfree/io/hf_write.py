"""Writing Hugging Face formats: what `save_pretrained(..., format="hf")` writes (GPT-2, and live Llama-shaped
models as HF Llama, the inverse of TransformerLens's Llama converter).

``transformers.GPT2LMHeadModel.from_pretrained(path)`` runs the written model with the same logits
(to float rounding) and `lnfree.load(path)` reads it back with the same site modes. Representable:
GPT-2-shaped models (`hf_gpt2_problems`) whose sites are all ``live`` or all ``removed`` (LN-free:
written in the released format, LN weights ``1e6`` and ``layer_norm_epsilon = 1e12``, whose
LayerNorm still subtracts the mean, so every weight reading a removed site must be centered). A
nonzero unembedding bias ``b_U`` (GPT-2's ``lm_head`` has none) is written exactly, through
``ln_f``'s bias and an untied ``lm_head`` (see `_absorb_unembed_bias`). Everything else is written
as an lnfree directory (`lnfree.io.tl_dir`), which reads back bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import einops
import torch

from lnfree.io.hf import ACTIVATIONS, LN_FREE_EPS
from lnfree.io.tokenizers import save_plain_tokenizer
from lnfree.training.files import fix_mode


def write_hf_gpt2(model, out: Path) -> None:
    """Write `model` (an `LNFreeTransformer` with no `hf_problem`) to the directory `out` in HF GPT-2 format:
    ``config.json``, ``model.safetensors``, tokenizer files.

    Example:
        >>> from lnfree import zoo
        >>> write_hf_gpt2(zoo.load("tiny-ln", device="cpu"), Path("/tmp/lnfree-doc-hf"))
        >>> from transformers import GPT2LMHeadModel
        >>> GPT2LMHeadModel.from_pretrained("/tmp/lnfree-doc-hf").config.n_layer
        4
    """
    from safetensors.torch import save_file

    ln_free = model.is_ln_free
    tensors, tied = _hf_state_dict(model, ln_free)
    config = _hf_config(model, ln_free, tied)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    fix_mode(out / "model.safetensors")
    config.save_pretrained(str(out))
    if model.tokenizer is not None:
        save_plain_tokenizer(model.tokenizer, out)


def hf_problem(model) -> str | None:
    """Why `model` cannot be written in a Hugging Face format (one sentence), or None when it can."""
    problems = hf_gpt2_problems(model.cfg)
    if not problems:
        return _gpt2_mode_problem(model)
    llama = hf_llama_problems(model)
    if not llama:
        return None
    bad = {k: v for k, (v, _) in problems.items()}
    wants = {k: want for k, (_, want) in problems.items()}
    return (f"its architecture is not GPT-2's: {bad} (GPT-2 needs {wants}), nor a live Llama's: "
            f"{ {k: v for k, (v, _) in llama.items()} } (Llama needs { {k: w for k, (_, w) in llama.items()} })")


def write_hf(model, out: Path) -> None:
    """Write `model` (with no `hf_problem`) to `out` as HF GPT-2 or, for a Llama-shaped model, HF Llama."""
    (write_hf_gpt2 if not hf_gpt2_problems(model.cfg) else write_hf_llama)(model, out)


def _gpt2_mode_problem(model) -> str | None:
    modes = model.ln_modes()
    if set(modes.values()) not in ({"live"}, {"removed"}):
        bad = {s: m for s, m in modes.items() if m != "live"}
        return (f"the HF GPT-2 format has no fixed-scale LayerNorm and no partly removed model, and this model has "
                f"{dict(list(bad.items())[:4])}{' ...' if len(bad) > 4 else ''}")
    return _uncentered_site(model) if model.is_ln_free else None


# ---- Llama ---------------------------------------------------------------------------------------
_BIASES = ("b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_O", "b_in", "b_out", "b_U")


def hf_llama_problems(model) -> dict:
    """What keeps `model` from being written as HF Llama: {what: (value, wanted)}, empty if nothing.

    HF Llama's RMSNorm has no fixed-scale or identity form, so every site must be live.

    Example:
        >>> from lnfree import zoo
        >>> sorted(hf_llama_problems(zoo.load("tiny-ln", device="cpu")))[:2]
        ['act_fn', 'final_rms']
    """
    cfg = model.cfg
    want = {
        "normalization_type": (cfg.normalization_type, "RMS"), "final_rms": (cfg.final_rms, True),
        "gated_mlp": (cfg.gated_mlp, True), "act_fn": (cfg.act_fn, "silu"),
        "positional_embedding_type": (cfg.positional_embedding_type, "rotary"),
        "rotary_dim": (cfg.rotary_dim, cfg.d_head), "rotary_adjacent_pairs": (cfg.rotary_adjacent_pairs, False),
        "use_NTK_by_parts_rope": (cfg.use_NTK_by_parts_rope, False), "parallel_attn_mlp": (cfg.parallel_attn_mlp, False),
        "attn_only": (cfg.attn_only, False), "use_local_attn": (cfg.use_local_attn, False),
        "attention_dir": (cfg.attention_dir, "causal"), "d_vocab_out": (cfg.d_vocab_out, cfg.d_vocab),
        "use_qk_norm": (getattr(cfg, "use_qk_norm", False), False),
        "attn_scores_soft_cap": (cfg.attn_scores_soft_cap > 0, False),
        "output_logits_soft_cap": (cfg.output_logits_soft_cap > 0, False),
        "use_attn_scale": (cfg.use_attn_scale and math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head), rel_tol=1e-6),
                           True),
        "modes": (sorted(set(model.ln_modes().values())), ["live"]),
    }
    out = {k: (v, w) for k, (v, w) in want.items() if v != w}
    nonzero = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in _BIASES and bool(p.detach().any())]
    if nonzero:
        out["biases"] = (nonzero[:3], "all zero (Llama has none)")
    return out


def write_hf_llama(model, out: Path) -> None:
    """Write a live Llama-shaped `model` as HF Llama: the inverse of TransformerLens's `convert_llama_weights`.

    Example:
        >>> write_hf_llama(llama_like_model, Path("/tmp/lnfree-doc-llama"))   # doctest: +SKIP
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = model.cfg
    kv = cfg.n_key_value_heads or cfg.n_heads
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    sd = {"model.embed_tokens.weight": cpu(model.W_E), "model.norm.weight": cpu(model.ln_final.w),
          "lm_head.weight": cpu(model.W_U).T}
    for i, block in enumerate(model.blocks):
        p, a = f"model.layers.{i}.", block.attn
        sd[p + "input_layernorm.weight"] = cpu(block.ln1.w)
        sd[p + "post_attention_layernorm.weight"] = cpu(block.ln2.w)
        sd[p + "self_attn.q_proj.weight"] = einops.rearrange(cpu(a.W_Q), "n m h -> (n h) m")
        for name, W in (("k_proj", a._W_K if cfg.n_key_value_heads else a.W_K),
                        ("v_proj", a._W_V if cfg.n_key_value_heads else a.W_V)):
            sd[p + f"self_attn.{name}.weight"] = einops.rearrange(cpu(W), "n m h -> (n h) m")
        sd[p + "self_attn.o_proj.weight"] = einops.rearrange(cpu(a.W_O), "n h m -> m (n h)")
        sd[p + "mlp.up_proj.weight"] = cpu(block.mlp.W_in).T
        sd[p + "mlp.gate_proj.weight"] = cpu(block.mlp.W_gate).T
        sd[p + "mlp.down_proj.weight"] = cpu(block.mlp.W_out).T
    tok = model.tokenizer
    config = LlamaConfig(
        vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=kv, head_dim=cfg.d_head, hidden_act="silu",
        max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.eps, rope_theta=cfg.rotary_base,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
        bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=getattr(tok, "eos_token_id", None),
    )
    config.dtype = str(model.W_E.dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    fix_mode(out / "model.safetensors")
    config.save_pretrained(str(out))
    if tok is not None:
        save_plain_tokenizer(tok, out)


# ---- writing -------------------------------------------------------------------------------
def hf_gpt2_problems(cfg) -> dict:
    """What keeps a model of this config from being written as HF GPT-2: {field: (value, wanted)}, empty if nothing.

    Example:
        >>> from lnfree import zoo
        >>> hf_gpt2_problems(zoo.load("tiny-ln").cfg)
        {}
    """
    problems = {
        "positional_embedding_type": (cfg.positional_embedding_type, "standard"),
        "act_fn": (cfg.act_fn, "one of " + str(sorted(set(ACTIVATIONS.values())))),
        "attn_only": (cfg.attn_only, False),
        "parallel_attn_mlp": (cfg.parallel_attn_mlp, False),
        "gated_mlp": (cfg.gated_mlp, False),
        "use_local_attn": (cfg.use_local_attn, False),
        "d_head * n_heads": (cfg.d_head * cfg.n_heads, cfg.d_model),
        "d_vocab_out": (cfg.d_vocab_out, cfg.d_vocab),
        "attention_dir": (cfg.attention_dir, "causal"),
        "final_rms": (cfg.final_rms, False),
    }
    if cfg.act_fn in ACTIVATIONS.values():
        problems.pop("act_fn")
    if cfg.use_attn_scale and not math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head), rel_tol=1e-6):
        problems["attn_scale"] = (cfg.attn_scale, f"sqrt(d_head) = {math.sqrt(cfg.d_head):g}")
    return {k: (v, want) for k, (v, want) in problems.items() if v != want}


def _uncentered_site(model) -> str | None:
    """HF's released LN-free format still subtracts the mean: exact only if every reading weight is centered."""
    for site in model.ln_sites:
        for weight, _, dim in model.site_readers(site):
            W = weight.detach().double()
            if W.mean(dim).abs().max() > 1e-5 * W.abs().max().clamp_min(1e-30):
                return (f"the released HF LN-free format subtracts the mean of the residual stream, and the "
                        f"weights reading {site} are not centered over d_model (the model was fine-tuned with the "
                        f"site removed, so nothing keeps them centered)")
    return None


def _absorb_unembed_bias(W_U: torch.Tensor, b_U: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """`lm_head` ([d_model, d_vocab]) and `ln_f` bias giving W_U^T (w*z + b) + b_U with no lm_head bias.

    For any centered z: with u = 1/w, W = W_U + u c^T adds c * sum(z) = 0 on the normalized input, and
    on the bias b' = b + gamma * w it adds c * (u^T b + gamma * d) = c * d. Choosing gamma so that
    u^T b + gamma * d = d and c = (b_U - gamma W_U^T w) / d reproduces the bias exactly.
    """
    if not bool(b_U.abs().max() > 0):
        return W_U, b
    if bool((w == 0).any()):
        raise ValueError("cannot write the unembedding bias b_U: the final LayerNorm has zero weights")
    W_U, b_U, w, b = (t.double() for t in (W_U, b_U, w, b))
    d = w.numel()
    u = 1.0 / w
    gamma = 1.0 - float(u @ b) / d
    c = (b_U - gamma * (W_U.T @ w)) / d
    return W_U + torch.outer(u, c), b + gamma * w


def _ln_params(module, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    if module.has_params:
        return module.w.detach().float(), module.b.detach().float()
    return torch.ones(d_model), torch.zeros(d_model)


def _hf_state_dict(model, ln_free: bool) -> tuple[dict[str, torch.Tensor], bool]:
    cfg = model.cfg
    D = cfg.d_model
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731

    def ln(module) -> tuple[torch.Tensor, torch.Tensor]:
        if ln_free:  # removed: HF must compute x - mean(x), i.e. weight sqrt(eps) * 1, bias 0
            return torch.full((D,), math.sqrt(LN_FREE_EPS)), torch.zeros(D)
        return tuple(cpu(t) for t in _ln_params(module, D))

    sd = {"transformer.wte.weight": cpu(model.W_E), "transformer.wpe.weight": cpu(model.W_pos)}
    for i, block in enumerate(model.blocks):
        p, a = f"transformer.h.{i}.", block.attn
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = ln(block.ln1)
        qkv = [einops.rearrange(cpu(W), "i m h -> m (i h)") for W in (a.W_Q, a.W_K, a.W_V)]
        sd[p + "attn.c_attn.weight"] = torch.cat(qkv, dim=1)
        sd[p + "attn.c_attn.bias"] = torch.cat([cpu(x).reshape(-1) for x in (a.b_Q, a.b_K, a.b_V)])
        sd[p + "attn.c_proj.weight"] = einops.rearrange(cpu(a.W_O), "i h m -> (i h) m")
        sd[p + "attn.c_proj.bias"] = cpu(a.b_O)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = ln(block.ln2)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = cpu(block.mlp.W_in), cpu(block.mlp.b_in)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = cpu(block.mlp.W_out), cpu(block.mlp.b_out)
    w_f, b_f = (torch.ones(D), torch.zeros(D)) if ln_free else _ln_params(model.ln_final, D)
    W_U, b_f = _absorb_unembed_bias(cpu(model.W_U), cpu(model.b_U), w_f.cpu(), b_f.cpu())
    sd["transformer.ln_f.weight"] = torch.full((D,), math.sqrt(LN_FREE_EPS)) if ln_free else w_f.cpu()
    sd["transformer.ln_f.bias"] = b_f.float()
    lm_head = W_U.T.float()
    tied = torch.equal(lm_head, sd["transformer.wte.weight"])
    if not tied:
        sd["lm_head.weight"] = lm_head
    dtype = model.W_E.dtype
    return {k: v.to(dtype).contiguous().clone() for k, v in sd.items()}, tied


def _hf_config(model, ln_free: bool, tied: bool):
    from transformers import GPT2Config

    cfg = model.cfg
    tok = model.tokenizer
    special = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else 50256
    special = special if 0 <= special < cfg.d_vocab else None
    config = GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function=cfg.act_fn,
        layer_norm_epsilon=LN_FREE_EPS if ln_free else cfg.eps, scale_attn_weights=cfg.use_attn_scale,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx, tie_word_embeddings=tied,
        bos_token_id=special, eos_token_id=special, architectures=["GPT2LMHeadModel"],
    )
    config.lnfree = {"ln_free": ln_free, "format": "released LN-free (LN weight 1e6, eps 1e12)" if ln_free else "GPT-2"}
    config.dtype = str(model.W_E.dtype).removeprefix("torch.")
    return config
