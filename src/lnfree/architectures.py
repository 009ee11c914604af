"""Hugging Face causal-LM architectures -> TransformerLens config + weights, offline.

`SUPPORTED` maps each HF ``model_type`` that loads to its transformers class name (the
``original_architecture`` TransformerLens dispatches on). The TransformerLens config comes from
TransformerLens's own `get_pretrained_model_config` branch for that architecture, fed the local
``config.json``; the weights from its own per-architecture converter
(`transformer_lens.loading_from_pretrained.get_pretrained_state_dict` with the HF model given).
Nothing here touches the network.

Two workarounds, both for TransformerLens choosing a branch by *name* instead of by config:

- it picks the Llama branch for any path containing "llama" (and Gemma for "gemma") without reading
  the config, then fails; so the config is handed to it from a temporary directory with a neutral
  name;
- it has no config-driven Gemma branch at all (only the official Gemma names), so `_gemma_cfg`
  builds the Gemma config from ``config.json`` the way TransformerLens's Gemma branches do.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from lnfree._errors import CheckpointError

#: HF model_type -> transformers class (TransformerLens's ``original_architecture``).
SUPPORTED = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
    "gptj": "GPTJForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
_NAME_TRIGGERS = ("llama", "gemma")  # substrings that make TransformerLens ignore config.json


class UnsupportedArchitectureError(CheckpointError):
    """A checkpoint's architecture has no TransformerLens conversion that lnfree loads."""


def supported_text() -> str:
    """One line listing the loadable model types, for error messages."""
    return ", ".join(sorted(SUPPORTED))


def architecture(config: dict, where: str) -> str:
    """The transformers class name for a config.json dict; raises UnsupportedArchitectureError."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {model_type!r} (architectures {config.get('architectures')}) is not supported; "
            f"lnfree loads causal LMs of model_type {supported_text()} (from a local directory, a hub id, "
            "or a llama/qwen2 .gguf file)"
        )
    arch = SUPPORTED[model_type]
    declared = config.get("architectures") or [arch]
    if declared[0] != arch:
        raise UnsupportedArchitectureError(
            f"{where}: architectures {declared} is not the causal LM of model_type {model_type!r} ({arch}); "
            f"lnfree loads {', '.join(sorted(SUPPORTED.values()))}"
        )
    return arch


def tl_config(config: dict, *, name: str, device=None, dtype: torch.dtype = torch.float32):
    """HookedTransformerConfig for a config.json dict (every weight comes from the file, no processing)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    arch = architecture(config, name)
    config = {**config, "architectures": [arch]}
    if arch == "GemmaForCausalLM":
        cfg_dict = _gemma_cfg(config)
        cfg_dict.update(model_name=Path(name).name or name, init_weights=False, device=device, dtype=dtype,
                        n_devices=1, default_prepend_bos=True, from_checkpoint=False)
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
    else:
        folder = _neutral_config_dir(config)
        try:
            cfg = get_pretrained_model_config(str(folder), hf_cfg=config, device=device, dtype=dtype)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    cfg.model_name = Path(name).name or name
    cfg.tokenizer_name = None  # never re-load a tokenizer by name (the temp dir is gone; offline)
    return cfg


def _neutral_config_dir(config: dict) -> Path:
    for _ in range(10):
        folder = Path(tempfile.mkdtemp(prefix="lnfree-hfcfg-"))
        if not any(t in str(folder).lower() for t in _NAME_TRIGGERS):
            (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
            return folder
        shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"the temporary directory {tempfile.gettempdir()!r} contains 'llama' or 'gemma', which "
                       "makes TransformerLens ignore config.json; set TMPDIR to another directory")


def _gemma_cfg(c: dict) -> dict[str, Any]:
    """TransformerLens's Gemma (1) config, read from config.json instead of hard-coded per name."""
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    rope = c.get("rope_parameters") or {}
    return {
        "d_model": c["hidden_size"], "d_head": head_dim, "n_heads": c["num_attention_heads"],
        "d_mlp": c["intermediate_size"], "n_layers": c["num_hidden_layers"],
        "n_ctx": c.get("max_position_embeddings", 8192), "eps": c.get("rms_norm_eps", 1e-6),
        "d_vocab": c["vocab_size"], "act_fn": act, "initializer_range": c.get("initializer_range", 0.02),
        "normalization_type": "RMS", "rotary_base": c.get("rope_theta", rope.get("rope_theta", 10000.0)),
        "rotary_dim": head_dim, "positional_embedding_type": "rotary", "use_attn_scale": True,
        "n_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
        "gated_mlp": True, "final_rms": True, "original_architecture": "GemmaForCausalLM",
    }


def hf_model_from_dir(folder: Path):
    """The transformers model of a local directory, float32, offline (weights read by transformers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return model.eval()


def hf_model_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor]):
    """A transformers model built from a config dict and HF-named weights (no random init, strict keys)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with _no_init():  # every weight is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in state_dict:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"weights do not fit {type(model).__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def tl_state_dict(hf_model, cfg, *, where: str) -> dict[str, torch.Tensor]:
    """TransformerLens-keyed weights, through TransformerLens's converter for `cfg.original_architecture`."""
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    for p in hf_model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        sd = get_pretrained_state_dict(str(where), cfg, hf_model=hf_model, dtype=torch.float32)
    return {k: v.detach().float().contiguous() for k, v in sd.items()}

