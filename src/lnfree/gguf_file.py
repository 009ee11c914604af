"""Reading llama.cpp GGUF files: metadata -> HF config, tensors -> dequantised HF-named weights.

Supported architectures (``general.architecture``): `GGUF_ARCHITECTURES` (llama, also Mistral and
SmolLM files, which llama.cpp writes as llama; and qwen2). Every tensor type that
`gguf.quants.dequantize` implements is accepted (`supported_types`: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types, ...) and dequantised to float32.

llama.cpp's converter permutes the rows of each Q and K projection of llama models (it pairs the two
halves of every head for its interleaved rotary kernel: ``convert_hf_to_gguf.py``, ``permute``);
`unpermute_qk` undoes it, so the weights are those of the HF ``LlamaForCausalLM`` the file was
made from. Qwen2 files are written unpermuted.

The header, metadata and tensor table are parsed here (`_parse`, GGUF v2/v3 little-endian); tensor
data stays memory-mapped until dequantised. The tokenizer is transformers' own conversion of the file's vocabulary and merges
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), offline.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple, Union

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


class _Tensor(NamedTuple):
    name: str
    shape: np.ndarray  # GGUF order: fastest-varying dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # raw bytes, shaped [rows..., bytes per row] (what gguf.quants.dequantize takes)
    n_bytes: int
    data_offset: int


class _Reader(NamedTuple):
    fields: dict
    tensors: list


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _parse(path: Path) -> _Reader:
    """GGUF v2/v3 (little-endian) metadata and tensor table, read directly with struct.

    `gguf.GGUFReader` makes a numpy view per array item, which takes 10-20 s for a 49k-token
    vocabulary; this reads the same fields as Python values in well under a second.
    """
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(mm)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("string runs past the end of the file")
        text = bytes(buf[pos:pos + n]).decode("utf-8")
        pos += n
        return text

    def value(kind: int):
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == 8:
            return string()
        if kind == 9:
            item, n = take("<I"), take("<Q")
            if n > len(buf):
                raise ValueError(f"array of {n} items is longer than the file")
            return [value(item) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {kind}")

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"bad magic {bytes(buf[:4])!r} (a GGUF file starts with b'GGUF')")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (lnfree reads versions 2 and 3, little-endian)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = string()
        fields[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        kind, offset = take("<I"), take("<Q")
        try:
            kind = GGMLQuantizationType(kind)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type id {kind}") from None
        infos.append((name, dims, kind, offset))
    align = int(fields.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = []
    for name, dims, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        count = math.prod(dims)
        n_bytes = count // block * size
        begin = start + offset
        if count % block or begin + n_bytes > len(mm):
            data = mm[begin: begin + n_bytes]  # short: reported as truncated by open_reader
        else:
            byte_shape = quant_shape_to_byte_shape(tuple(reversed(dims)), kind)
            data = mm[begin: begin + n_bytes].reshape(byte_shape)
        tensors.append(_Tensor(name, np.array(dims, dtype=np.int64), kind, data, n_bytes, begin))
    return _Reader(fields, tensors)


def open_reader(path: PathLike):
    """The file's metadata and tensor table; any parse failure becomes one GGUFError saying it is damaged."""
    path = Path(path)
    size = path.stat().st_size
    try:
        reader = _parse(path)
    except Exception as e:  # bad magic, short reads, bad offsets: the file is not a whole GGUF
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is corrupt or truncated "
            f"({size} bytes). Re-download or re-convert it."
        ) from None
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                            f"{t.data_offset + int(t.n_bytes)}, the file has {size}. Re-download it.")
    return reader


def field(reader, key: str, default=None):
    """A metadata value (str, number, bool, or list of them), or `default`."""
    return reader.fields.get(key, default)


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
