"""Reading llama.cpp GGUF files: metadata -> HF config, tensors -> dequantised HF-named weights.

Supported architectures (``general.architecture``): `GGUF_ARCHITECTURES` (llama, also Mistral and
SmolLM files, which llama.cpp writes as llama; and qwen2). Every tensor type that
`gguf.quants.dequantize` implements is accepted (`supported_types`: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types, ...) and dequantised to float32.

llama.cpp's converter permutes the rows of each Q and K projection of llama models (it pairs the two
halves of every head for its interleaved rotary kernel: ``convert_hf_to_gguf.py``, ``permute``);
`unpermute_qk` undoes it, so the weights are those of the HF ``LlamaForCausalLM`` the file was
made from. Qwen2 files are written unpermuted.

The tokenizer is transformers' own conversion of the file's vocabulary and merges
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), offline.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

from lnfree._errors import CheckpointError

PathLike = Union[str, os.PathLike]

#: general.architecture -> HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED_QK = {"llama"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be loaded: corrupt, truncated, or of an unsupported architecture or type."""


def supported_types() -> list[str]:
    """Names of the GGUF tensor types this installation can dequantise (from `gguf.quants`)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    types = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    return [t.name for t in sorted(types)]


def open_reader(path: PathLike):
    """A `gguf.GGUFReader` for `path`; any parse failure becomes one GGUFError saying the file is damaged."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # bad magic, short reads (numpy), bad offsets: the file is not a whole GGUF
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt or truncated "
            f"({path.stat().st_size} bytes). Re-download or re-convert it."
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                            f"{t.data_offset + int(t.n_bytes)}, the file has {size}. Re-download it.")
    return reader


def field(reader, key: str, default=None):
    """A metadata value (str, number, bool, or list of them), or `default`."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise GGUFError(f"metadata field {key!r} is unreadable ({e}); the file is corrupt") from None


def architecture(reader, path: PathLike) -> str:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; lnfree reads GGUF files of architecture "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} (for other models load a Hugging Face directory)"
        )
    return arch


def hf_config(reader, path: PathLike) -> dict:
    """The HF config.json dict the file describes (llama / qwen2 keys)."""
    arch = architecture(reader, path)

    def need(key: str):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing; the file is incomplete")
        return value

    d_model, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(field(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = d_model // n_heads
    rope_dim = field(reader, f"{arch}.rope.dimension_count", head_dim)
    key_len = field(reader, f"{arch}.attention.key_length", head_dim)
    if d_model % n_heads or rope_dim != head_dim or key_len != head_dim:
        raise GGUFError(f"{path}: heads of size {key_len} with rotary dimension {rope_dim} (d_model {d_model}, "
                        f"{n_heads} heads) are not supported; lnfree reads files with head size = rotary "
                        f"dimension = d_model / n_heads")
    scaling = field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"{path}: rotary scaling ({scaling or 'rope_freqs'}) is not supported")
    names = {t.name for t in reader.tensors}
    tokens = field(reader, "tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{path} has no token_embd.weight tensor; the file is incomplete")
    vocab = int(embed.shape[1]) if len(embed.shape) == 2 else len(tokens or [])
    config = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": d_model, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "num_hidden_layers": int(need("block_count")), "intermediate_size": int(need("feed_forward_length")),
        "max_position_embeddings": int(field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu", "head_dim": head_dim,
    }
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        value = field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[key] = int(value)
    if arch == "llama":
        config["attention_bias"] = False  # TransformerLens's Llama has no Q/K/V biases
        config["mlp_bias"] = False
    return config


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K weight ([n_heads * d_head, d_model] rows).

    llama.cpp writes row ``h * d + 2 i + j`` (j in {0, 1}) from HF row ``h * d + j * d / 2 + i``.

    Example:
        >>> hf = np.arange(8)[:, None]                          # one head of size 8
        >>> gguf_rows = hf.reshape(1, 2, 4, 1).swapaxes(1, 2).reshape(8, 1)   # llama.cpp's permute
        >>> unpermute_qk(gguf_rows, 1)[:, 0].tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"a Q/K weight with {rows} rows cannot hold {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantise(t, path: PathLike, supported: set[str]) -> np.ndarray:
    from gguf.quants import dequantize

    kind = t.tensor_type.name
    if kind not in supported:
        raise GGUFError(f"{path}: tensor {t.name!r} has type {kind}, which cannot be dequantised; "
                        f"supported types: {', '.join(sorted(supported))}")
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
    try:
        values = dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise GGUFError(f"{path}: tensor {t.name!r} ({kind}) cannot be dequantised ({e}); the file is corrupt") from None
    if values.size != math.prod(shape):
        raise GGUFError(f"{path}: tensor {t.name!r} holds {values.size} values, its shape {shape} needs "
                        f"{math.prod(shape)}; the file is corrupt")
    return np.array(values.reshape(shape), dtype=np.float32, order="C", copy=True)  # off the memmap


def hf_state_dict(reader, path: PathLike, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to float32 under its HF name, Q/K rows un-permuted for llama files."""
    arch = architecture(reader, path)
    supported = set(supported_types())
    sd = {}
    for t in reader.tensors:
        name = _GLOBAL_NAMES.get(t.name)
        if name is None:
            parts = t.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_NAMES:
                raise GGUFError(f"{path}: unexpected tensor {t.name!r} for a {arch} model; "
                                "the file holds something lnfree does not read")
            name = f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
        values = _dequantise(t, path, supported)
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute_qk(values, config["num_attention_heads"])
        elif arch in _PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute_qk(values, config["num_key_value_heads"])
        if not np.isfinite(values).all():
            raise GGUFError(f"{path}: tensor {t.name!r} holds non-finite values; the file is corrupt")
        sd[name] = torch.from_numpy(values)
    if not config["tie_word_embeddings"] and "lm_head.weight" not in sd:
        raise GGUFError(f"{path} has no output.weight")
    return sd


def tokenizer(path: PathLike):
    """transformers' fast tokenizer built from the file's vocabulary and merges (offline)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # the weights load without it; the caller warns
        raise GGUFError(f"{path}: cannot build the tokenizer from the file's vocabulary ({type(e).__name__}: {e})") from None
