"""Honest loading and saving of GPT-2 checkpoints as `LNFreeTransformer`s.

Sources `load_model` accepts:

- a local directory holding a Hugging Face GPT-2 checkpoint (``config.json`` + ``model.safetensors``,
  a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``; tokenizer files optional).
  Nothing touches the network: the TransformerLens config is built from ``config.json`` here and
  the weights go through TransformerLens's own GPT-2 converter.
- a hub id (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, the released LN-free checkpoints in
  `RELEASED_LN_FREE`, or any GPT-2-architecture repo): taken from the local HF cache when present,
  else downloaded with `huggingface_hub.snapshot_download`. Without network this fails within a few
  seconds (a 3 s probe request runs before any download) and says how to load a local copy.

The released LN-free format (Baroni et al. 2025; Heimersheim 2024): a plain ``GPT2LMHeadModel`` whose
every LN weight was multiplied by ``sqrt(eps) / sigma`` with ``layer_norm_epsilon = 1e12`` (so
``sqrt(eps) = 1e6``), so that HF computes ``(x - mean(x)) * w / sigma + b`` up to a relative error of
about ``var(x) / (2 eps)``. `load_model` detects it (``layer_norm_epsilon >= 1e6``) and loads it with
every LN site removed: LN weights divided by ``sqrt(eps)``, each site frozen at scale 1 and folded
into the weights that read it (`LNFreeTransformer.remove_ln`).

Pickle checkpoints (``*.bin``) are read with ``torch.load(weights_only=True)`` only: a pickle that
needs anything but tensors (e.g. one that would run code) is refused.

`save_pretrained` writes the HF GPT-2 format (``config.json`` + ``model.safetensors`` + tokenizer
files) that `transformers.GPT2LMHeadModel.from_pretrained` runs with the same logits; LN-free models
are written in the released format.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Union

import einops
import torch

from lnfree._checks import check_device
from lnfree._errors import CheckpointError
from lnfree.formats import _dir_tokenizer, chmod_umask
from lnfree.model import LNFreeTransformer

PathLike = Union[str, os.PathLike]

#: Short names and the released LN-free checkpoints -> hub repo ids.
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
RELEASED_LN_FREE = (
    "schaeff/gpt2-small_LNFree300",
    "schaeff/gpt2-medium_LNFree500",
    "schaeff/gpt2-large_LNFree600",
    "schaeff/gpt2-xl_LNFree800",
    "apollo-research/gpt2_noLN",
)
HUB_PATTERNS = ["config.json", "*.safetensors", "*.json", "*.txt", "tokenizer.model"]
PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin"]

#: layer_norm_epsilon at or above this marks the released LN-free format.
LN_FREE_EPS_THRESHOLD = 1e6
#: epsilon written by `save_pretrained` for LN-free models (as the released checkpoints use).
LN_FREE_EPS = 1e12
#: eps given to the (removed, hence unused) LN sites of a loaded LN-free checkpoint.
DEFAULT_EPS = 1e-5
#: activation functions with the same formula in transformers' ACT2FN and TransformerLens.
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu": "gelu", "gelu_fast": "gelu_fast",
               "gelu_pytorch_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
PROBE_TIMEOUT_S = 3.0
_IGNORED_KEY = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


class HubUnreachableError(ConnectionError):
    """The Hugging Face hub cannot be used (offline or unreachable) and the model is not cached."""




# ---- public API --------------------------------------------------------------------------
def load_model(
    name_or_path: PathLike,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    tokenizer=None,
    local_files_only: Optional[bool] = None,
    n_ctx: Optional[int] = None,
) -> LNFreeTransformer:
    """Load a checkpoint (local HF directory, ``.gguf`` file or hub id) as an `LNFreeTransformer`.

    Architectures: GPT-2 (read here, including the released LN-free format) and every model type in
    `lnfree.architectures.SUPPORTED` (GPT-Neo, GPT-NeoX/Pythia, OPT, GPT-J, Llama, Mistral, Qwen2,
    Qwen3, Gemma, Phi-3), converted by TransformerLens's own config and weight converters; GGUF
    files of llama/qwen2 architecture (`lnfree.gguf_file`), dequantised to float32.

    By default the weights are left unprocessed, so the logits equal transformers'
    ``GPT2LMHeadModel`` on the same files (to float rounding) and every LN site is ``live``.
    TransformerLens's processing is available through its flags: `fold_ln` (LN weights folded
    into the reading weights; sites become weightless, logits unchanged), `center_writing_weights`
    and `fold_value_biases` (logits unchanged), `center_unembed` (subtracts the mean logit over the
    vocabulary at each position: log-probs unchanged, logits not). Checkpoints in the released
    LN-free format load with every site removed (``model.is_ln_free``).

    Args:
        name_or_path: a local directory, or a hub id such as ``"gpt2"`` or
            ``"schaeff/gpt2-small_LNFree300"`` (see `HUB_MODELS`, `RELEASED_LN_FREE`).
        device: torch device; None picks TransformerLens's default (CUDA when available).
        dtype: parameter dtype (float32, float64, float16 or bfloat16).
        tokenizer: a transformers tokenizer to attach; None uses the directory's tokenizer if any,
            else GPT-2's (`lnfree.gpt2_tokenizer`) when the vocabulary has 50257 tokens;
            False attaches none.
        local_files_only: hub ids only. True: use the local HF cache, never the network. None:
            True when ``HF_HUB_OFFLINE`` is set.
        n_ctx: context length of the TransformerLens model (None: TransformerLens's default for the
            architecture). Rotary models allocate an n_ctx x n_ctx mask per layer, so a smaller value
            saves memory.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=16)
        >>> GPT2LMHeadModel(cfg).save_pretrained("/tmp/lnfree-doc-gpt2")
        >>> model = load_model("/tmp/lnfree-doc-gpt2", device="cpu")
        >>> model.ln_mode("ln_final"), model.to_tokens("Hello world").tolist()
        ('live', [[50256, 15496, 995]])
        >>> model = load_model("schaeff/gpt2-small_LNFree300")  # doctest: +SKIP
        >>> model.is_ln_free                                    # doctest: +SKIP
        True
    """
    _check_load_args(name_or_path, dtype, tokenizer, local_files_only)
    check_device(device)
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
        raise ValueError(f"n_ctx must be a positive int or None, got {n_ctx!r}")
    flags = dict(fold_ln=bool(fold_ln), center_writing_weights=bool(center_writing_weights),
                 center_unembed=bool(center_unembed), fold_value_biases=bool(fold_value_biases))
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.is_dir():
        return _load_dir(path, str(name_or_path), device, dtype, flags, tokenizer, n_ctx)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lnfree import formats

        return formats.load_gguf(path, path.name, device=device, dtype=dtype, flags=flags, tokenizer=tokenizer,
                                 n_ctx=n_ctx)
    if path.exists():
        raise CheckpointError(
            f"name_or_path must be a checkpoint directory, a .gguf file or a hub id; {str(name_or_path)!r} is a file. "
            f"Pass the directory that holds it (config.json + model.safetensors), or a .gguf file."
        )
    name = os.fspath(name_or_path)
    if not _looks_like_hub_id(name):
        raise CheckpointError(
            f"no such directory or .gguf file: {name!r} (and it is not a hub id like 'gpt2' or 'owner/name')"
        )
    snapshot = _hub_snapshot(HUB_MODELS.get(name, name), name, local_files_only)
    return _load_dir(Path(snapshot), name, device, dtype, flags, tokenizer, n_ctx)


def save_pretrained(model, path: PathLike) -> None:
    """Save `model` in HF GPT-2 format: ``config.json``, ``model.safetensors``, tokenizer files.

    ``transformers.GPT2LMHeadModel.from_pretrained(path)`` runs the saved model with the same
    logits, and `load_model(path)` restores the same model (same logits, same site modes).
    Representable: models whose LN sites are all ``live`` (normal LN, with or without TL's
    processing) or all ``removed`` (LN-free: written in the released format, LN weights
    ``1e6`` and ``layer_norm_epsilon = 1e12``, which the released tools read). Frozen or mixed
    sites have no HF equivalent: call ``model.remove_ln()`` first. A nonzero unembedding bias
    ``b_U`` (GPT-2's ``lm_head`` has none) is written exactly, through ``ln_f``'s bias and an
    untied ``lm_head`` (see `_absorb_unembed_bias`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=16)
        >>> GPT2LMHeadModel(cfg).save_pretrained("/tmp/lnfree-doc-gpt2")
        >>> model = load_model("/tmp/lnfree-doc-gpt2", device="cpu")
        >>> tokens = model.to_tokens("LayerNorm can go")
        >>> _ = model.estimate_ln_scales(tokens)
        >>> save_pretrained(model.remove_ln(), "/tmp/lnfree-doc-gpt2-ln-free")
        >>> hf = GPT2LMHeadModel.from_pretrained("/tmp/lnfree-doc-gpt2-ln-free")
        >>> torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4)
        True
    """
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise TypeError(f"model must be an LNFreeTransformer (or HookedTransformer), got {type(model).__name__}")
    model = LNFreeTransformer.from_hooked(model)
    out = Path(os.path.expanduser(os.fspath(path)))
    if out.exists() and not out.is_dir():
        raise ValueError(f"path must be a directory (it is created if needed); {str(path)!r} is a file")
    _check_representable(model.cfg)
    modes = set(model.ln_modes().values())
    if modes not in ({"live"}, {"removed"}):
        bad = {s: m for s, m in model.ln_modes().items() if m != "live"}
        raise ValueError(
            "save_pretrained needs every LN site live (a normal LN model) or every site removed (LN-free); "
            f"this model has {dict(list(bad.items())[:4])}{' ...' if len(bad) > 4 else ''}. The HF GPT-2 format "
            "has no fixed-scale LayerNorm: call model.remove_ln() (every site) first, or model.unfreeze_ln()."
        )
    ln_free = modes == {"removed"}
    if ln_free:
        _check_centered_readers(model)
    tensors, tied = _hf_state_dict(model, ln_free)
    config = _hf_config(model, ln_free, tied)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    chmod_umask(out / "model.safetensors")
    config.save_pretrained(str(out))
    if model.tokenizer is not None:
        _save_plain_tokenizer(model.tokenizer, out)


# ---- argument checks ---------------------------------------------------------------------
def _check_load_args(name_or_path, dtype, tokenizer, local_files_only) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise TypeError(f"name_or_path must be a non-empty str or path, got {name_or_path!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    if tokenizer not in (None, False) and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, None or False; got {type(tokenizer).__name__}")
    if local_files_only not in (None, True, False):
        raise TypeError(f"local_files_only must be None, True or False; got {local_files_only!r}")


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or "\\" in name or ".." in name or name.endswith("/"):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name) is not None


# ---- hub -----------------------------------------------------------------------------------
def _offline_env() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        (folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                         "pytorch_model.bin.index.json")
    )


def _how_to_load_locally(repo_id: str) -> str:
    return (
        f"To load it without network: on a machine with network run "
        f"`hf download {repo_id} --local-dir <dir>` (older huggingface_hub: `huggingface-cli download "
        f"{repo_id} --local-dir <dir>`), copy <dir> here, then "
        f'`LNFreeTransformer.from_pretrained("/path/to/dir")` (or `lnfree.load_model("/path/to/dir")`).'
    )


def _probe_url() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/") + "/api/models"


def _probe_hub(timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the hub answers an HTTP request within `timeout` seconds, else the reason.

    A real request rather than a TCP connect: some sandboxes accept every connection and never
    answer. It runs in a daemon thread, so a stuck DNS lookup or TLS handshake (not bounded by
    socket timeouts) cannot make the caller wait longer than `timeout`. Proxies from the
    environment are honoured (urllib reads HTTPS_PROXY).
    """
    import urllib.error
    import urllib.request

    url = _probe_url()
    result: dict = {}

    def request() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result["ok"] = True
        except urllib.error.HTTPError:  # any HTTP status means the hub is there
            result["ok"] = True
        except Exception as e:  # URLError, socket errors, TLS errors, timeouts
            result["error"] = getattr(e, "reason", e)

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if result.get("ok"):
        return None
    if "error" in result:
        return f"no answer from {url} ({result['error']})"
    return f"no answer from {url} within {timeout:g} s"


def _hub_snapshot(repo_id: str, name: str, local_files_only: Optional[bool]) -> str:
    """Local folder with `repo_id`'s config, weights and tokenizer: the HF cache, else a download."""
    import huggingface_hub
    from huggingface_hub import errors

    for candidate in dict.fromkeys([repo_id, name]):  # 'gpt2' may be cached under its old repo name
        try:
            cached = huggingface_hub.snapshot_download(candidate, allow_patterns=HUB_PATTERNS + PICKLE_PATTERNS,
                                                       local_files_only=True)
        except (errors.LocalEntryNotFoundError, errors.HFValidationError, OSError, ValueError):
            continue
        if _has_weights(Path(cached)):
            return cached
    not_local = f"{name!r} is not a local directory, and hub repo {repo_id!r} is not in the local Hugging Face cache"
    offline = _offline_env() if local_files_only is None else local_files_only
    if offline:
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        raise HubUnreachableError(f"{not_local}; the hub is disabled ({why}). {_how_to_load_locally(repo_id)}")
    reason = _probe_hub()
    if reason is not None:
        raise HubUnreachableError(f"{not_local}, and the hub is unreachable: {reason}. {_how_to_load_locally(repo_id)}")
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=10)
        if not _has_weights(Path(folder)):  # repos with pickle weights only (read with weights_only=True)
            folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + PICKLE_PATTERNS,
                                                       etag_timeout=10)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as e:
        raise CheckpointError(f"hub repo {repo_id!r} (from {name!r}) is not available: {e}") from e
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError) as e:
        raise HubUnreachableError(
            f"downloading {repo_id!r} failed, the hub is unreachable or refused the request: {e}. "
            f"{_how_to_load_locally(repo_id)}"
        ) from e
    return folder


# ---- reading a checkpoint directory ---------------------------------------------------------
def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise CheckpointError(
            f"{str(folder)!r} is not a Hugging Face checkpoint directory: it has no config.json "
            f"(found: {found or 'nothing'}). Expected config.json + model.safetensors (or pytorch_model.bin)."
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); the file is corrupt or truncated") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def _gpt2_fields(config: dict, file: Path) -> dict:
    """Validated GPT-2 hyper-parameters from a config.json dict."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(
            f"{file} has model_type {model_type!r} (architectures {config.get('architectures')}); lnfree loads "
            f"GPT-2-architecture checkpoints only (model_type 'gpt2': gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
            f"the released LN-free checkpoints {list(RELEASED_LN_FREE)}, and fine-tunes of them)"
        )

    def integer(key: str, *fallbacks: str) -> int:
        for k in (key, *fallbacks):
            v = config.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        raise CheckpointError(f"{file}: {key!r} must be a positive integer, got {config.get(key)!r}")

    d_model, n_heads = integer("n_embd"), integer("n_head")
    if d_model % n_heads:
        raise CheckpointError(f"{file}: n_embd={d_model} is not divisible by n_head={n_heads}")
    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{file}: activation_function {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise CheckpointError(f"{file}: layer_norm_epsilon must be a positive number, got {eps!r}")
    if config.get("add_cross_attention"):
        raise CheckpointError(f"{file}: add_cross_attention=True (encoder-decoder GPT-2) is not supported")
    n_inner = config.get("n_inner")
    return dict(
        n_layers=integer("n_layer"), d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=integer("n_inner") if n_inner is not None else 4 * d_model,
        n_ctx=integer("n_positions", "n_ctx"), d_vocab=integer("vocab_size"), act_fn=ACTIVATIONS[act],
        eps=float(eps), use_attn_scale=bool(config.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        single = folder / index_name.replace(".index.json", "")
        if single.is_file():
            return [single]
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e!r}); the file is corrupt") from e
            files = [folder / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing[:3]}")
            return files
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(
        f"{str(folder)!r} has config.json but no weights: expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin (found: {found})"
    )


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: {e}. The file is corrupt or truncated; re-download it.") from e
    try:
        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {file}: it is a pickle that needs more than tensors (weights_only=True rejected "
            f"it: {str(e).splitlines()[0]}). Such a file can run arbitrary code; lnfree never unpickles it. "
            f"If you trust its source, convert it to safetensors where you can inspect it."
        ) from e
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}. The file is corrupt or truncated; re-download it.") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{file} does not hold a state dict (a dict of tensors); got {type(data).__name__}")
    return data


def _expected_shapes(f: dict) -> dict[str, tuple[int, ...]]:
    D, M, V = f["d_model"], f["d_mlp"], f["d_vocab"]
    shapes = {"wte.weight": (V, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(f["n_layers"]):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (D,), p + "ln_1.bias": (D,), p + "ln_2.weight": (D,), p + "ln_2.bias": (D,),
            p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
            p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
            p + "mlp.c_fc.weight": (D, M), p + "mlp.c_fc.bias": (M,),
            p + "mlp.c_proj.weight": (M, D), p + "mlp.c_proj.bias": (D,),
        })
    return shapes


def _read_state_dict(folder: Path, f: dict) -> dict[str, torch.Tensor]:
    """GPT-2 weights with keys as in GPT2Model ('wte.weight', 'h.0.ln_1.weight', ...) plus 'lm_head.weight'."""
    files = _weight_files(folder)
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        raw.update(_read_weight_file(file))
    where = files[0].name if len(files) == 1 else f"{files[0].parent}/*"
    sd = {}
    for key, value in raw.items():
        key = key[len("transformer."):] if key.startswith("transformer.") else key
        if not _IGNORED_KEY.match(key):
            sd[key] = value
    expected = _expected_shapes(f)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{folder / where} lacks GPT-2 weights {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if "wpe.weight" not in sd or sd["wpe.weight"].ndim != 2:
        raise CheckpointError(f"{folder / where} lacks the position embedding 'wpe.weight'")
    expected["wpe.weight"] = (f["n_ctx"], f["d_model"])
    if not f["tie_word_embeddings"] or "lm_head.weight" in sd:
        if "lm_head.weight" not in sd:
            raise CheckpointError(
                f"{folder / where} lacks 'lm_head.weight' although config has tie_word_embeddings=False"
            )
        expected["lm_head.weight"] = (f["d_vocab"], f["d_model"])
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(
                f"{folder / where}: {key} has shape {tuple(sd[key].shape)}, but config.json implies {shape}"
            )
        if not sd[key].dtype.is_floating_point or not bool(torch.isfinite(sd[key]).all()):
            raise CheckpointError(f"{folder / where}: {key} holds non-finite or non-float values; the file is corrupt")
    extra = sorted(set(sd) - set(expected))
    if extra:
        warnings.warn(f"{folder / where}: ignoring weights that GPT-2 does not use: {extra[:5]}", stacklevel=4)
    if f["tie_word_embeddings"] or "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["wte.weight"]
    return {k: sd[k].float() for k in expected.keys() | {"lm_head.weight"}}


def _hf_view(sd: dict[str, torch.Tensor], n_layers: int) -> SimpleNamespace:
    """Attribute view of a GPT-2 state dict, shaped like GPT2LMHeadModel for TL's converter."""

    def linear(prefix: str) -> SimpleNamespace:
        return SimpleNamespace(weight=sd[prefix + ".weight"], bias=sd[prefix + ".bias"])

    blocks = [
        SimpleNamespace(
            ln_1=linear(f"h.{i}.ln_1"), ln_2=linear(f"h.{i}.ln_2"),
            attn=SimpleNamespace(c_attn=linear(f"h.{i}.attn.c_attn"), c_proj=linear(f"h.{i}.attn.c_proj")),
            mlp=SimpleNamespace(c_fc=linear(f"h.{i}.mlp.c_fc"), c_proj=linear(f"h.{i}.mlp.c_proj")),
        )
        for i in range(n_layers)
    ]
    transformer = SimpleNamespace(wte=SimpleNamespace(weight=sd["wte.weight"]),
                                  wpe=SimpleNamespace(weight=sd["wpe.weight"]), h=blocks, ln_f=linear("ln_f"))
    return SimpleNamespace(transformer=transformer, lm_head=SimpleNamespace(weight=sd["lm_head.weight"]))


def _save_plain_tokenizer(tokenizer, out: Path) -> None:
    """Save without automatic BOS, the way GPT-2 tokenizers are stored on the hub.

    The flag is switched off for the save and restored after (a deepcopy of a fast tokenizer
    costs seconds).
    """
    had_bos = getattr(tokenizer, "add_bos_token", False)
    saved_kwarg = tokenizer.init_kwargs.get("add_bos_token", None)
    if had_bos:
        try:
            tokenizer.add_bos_token = False
        except (AttributeError, ValueError):  # a tokenizer without the switch is saved as it is
            had_bos = False
    try:
        if had_bos:
            tokenizer.init_kwargs["add_bos_token"] = False
        tokenizer.save_pretrained(str(out))
    finally:
        if had_bos:
            tokenizer.add_bos_token = True
            if saved_kwarg is None:
                tokenizer.init_kwargs.pop("add_bos_token", None)
            else:
                tokenizer.init_kwargs["add_bos_token"] = saved_kwarg


def _load_dir(folder: Path, name: str, device, dtype, flags: dict, tokenizer, n_ctx=None) -> LNFreeTransformer:
    config = _read_config(folder)
    if config.get("model_type") != "gpt2":
        from lnfree import architectures, formats

        try:
            architectures.architecture(config, str(folder / "config.json"))
        except architectures.UnsupportedArchitectureError as e:
            raise CheckpointError(str(e)) from None
        return formats.load_hf_dir(folder, config, name, device=device, dtype=dtype, flags=flags,
                                   tokenizer=tokenizer, n_ctx=n_ctx)
    return _load_gpt2_dir(folder, config, name, device, dtype, flags, tokenizer, n_ctx)


def _load_gpt2_dir(folder: Path, config: dict, name: str, device, dtype, flags: dict, tokenizer,
                   n_ctx=None) -> LNFreeTransformer:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    from lnfree.formats import assemble

    fields = _gpt2_fields(config, folder / "config.json")
    if n_ctx is not None and n_ctx != fields["n_ctx"]:
        raise ValueError(f"n_ctx={n_ctx}: GPT-2's context is fixed by its position embedding ({fields['n_ctx']} "
                         "positions); pass n_ctx=None")
    sd = _read_state_dict(folder, fields)
    ln_free = fields["eps"] >= LN_FREE_EPS_THRESHOLD
    ln_keys = [k for k in sd if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))]
    ln_weights = torch.cat([sd[k].abs() for k in ln_keys])
    if not ln_free and float(ln_weights.median()) > 1e3:
        warnings.warn(
            f"{folder}: LayerNorm weights are huge (median |w| = {float(ln_weights.median()):.3g}) but "
            f"layer_norm_epsilon = {fields['eps']:g}, so this is not the released LN-free format (which sets it "
            f"to 1e12); loading it as a normal LN model, as transformers runs it", stacklevel=3,
        )
    if ln_free:
        # Released format: HF computes (x - mean) * w / sqrt(var + eps) ~= (x - mean) * (w / sqrt(eps)).
        root = math.sqrt(fields["eps"])
        for key in ln_keys:
            sd[key] = sd[key] / root
        fields["eps"] = DEFAULT_EPS
    if ln_free and dtype == torch.float16:
        warnings.warn(
            f"{folder} is an LN-free checkpoint: its residual stream overflows float16, loading it in "
            "float32 instead (bfloat16 also works)", stacklevel=3,
        )
        dtype = torch.float32
    cfg = HookedTransformerConfig(
        n_layers=fields["n_layers"], d_model=fields["d_model"], n_heads=fields["n_heads"], d_head=fields["d_head"],
        d_mlp=fields["d_mlp"], n_ctx=fields["n_ctx"], d_vocab=fields["d_vocab"], act_fn=fields["act_fn"],
        eps=fields["eps"], use_attn_scale=fields["use_attn_scale"], use_local_attn=False,
        scale_attn_by_inverse_layer_idx=fields["scale_attn_by_inverse_layer_idx"], normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", tokenizer_name=None,
        default_prepend_bos=True, model_name=name, device=device, dtype=dtype, init_weights=False,
    )
    tok = _dir_tokenizer(folder, cfg.d_vocab, tokenizer)
    tl_sd = convert_gpt2_weights(_hf_view(sd, cfg.n_layers), cfg)
    tl_sd["unembed.b_U"] = torch.zeros(cfg.d_vocab)  # GPT-2's lm_head has no bias
    model = assemble(cfg, tl_sd, tok, flags)
    if ln_free:
        model.freeze_ln(scales=1.0).remove_ln()
    return model.eval()


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


def _check_representable(cfg) -> None:
    problems = hf_gpt2_problems(cfg)
    if problems:
        bad = {k: v for k, (v, _) in problems.items()}
        wants = {k: want for k, (_, want) in problems.items()}
        raise ValueError(f"this model cannot be written as HF GPT-2: {bad} (GPT-2 needs {wants})")


def _check_centered_readers(model: LNFreeTransformer) -> None:
    """HF's LN-free format still subtracts the mean; exact only if every reading weight is centered."""
    for site in model.ln_sites:
        for weight, _, dim in model.site_readers(site):
            W = weight.detach().double()
            if W.mean(dim).abs().max() > 1e-5 * W.abs().max().clamp_min(1e-30):
                raise ValueError(
                    f"cannot write this LN-free model in the released format: the weights reading {site} are not "
                    f"centered over d_model (the model never had a LayerNorm there), and HF's format subtracts "
                    f"the mean of the residual stream"
                )


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


def _hf_state_dict(model: LNFreeTransformer, ln_free: bool) -> tuple[dict[str, torch.Tensor], bool]:
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


def _hf_config(model: LNFreeTransformer, ln_free: bool, tied: bool):
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
