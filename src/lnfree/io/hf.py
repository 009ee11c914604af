"""Hugging Face directories and hub ids -> `Parts` (the reader behind ``lnfree.load("./gpt2")``).

- a local directory holding a Hugging Face GPT-2 checkpoint (``config.json`` + ``model.safetensors``,
  a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``; tokenizer files optional).
  Nothing touches the network: the TransformerLens config is built from ``config.json`` here and
  the weights go through TransformerLens's own GPT-2 converter.
- a hub id (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, the released LN-free checkpoints in
  `RELEASED_LN_FREE`, or any GPT-2-architecture repo): taken from the local HF cache when present,
  else downloaded with `huggingface_hub.snapshot_download`. Without network this fails within a few
  seconds (a 3 s probe request runs before any download) and says how to load a local copy.
- a local directory of any other architecture in `lnfree.architectures.SUPPORTED`: TransformerLens's
  own config and weight converters, fed from transformers' model.

The released LN-free format (Baroni et al. 2025; Heimersheim 2024): a plain ``GPT2LMHeadModel`` whose
every LN weight was multiplied by ``sqrt(eps) / sigma`` with ``layer_norm_epsilon = 1e12`` (so
``sqrt(eps) = 1e6``), so that HF computes ``(x - mean(x)) * w / sigma + b`` up to a relative error of
about ``var(x) / (2 eps)``. `read_hf_dir` detects it (``layer_norm_epsilon >= 1e6``) and loads it with
every LN site removed: LN weights divided by ``sqrt(eps)``, each site frozen at scale 1 and folded
into the weights that read it (`LNFreeTransformer.remove_ln`).

Pickle checkpoints (``*.bin``) are read with ``torch.load(weights_only=True)`` only: a pickle that
needs anything but tensors (e.g. one that would run code) is refused.

The writer of this format is `lnfree.io.hf_write`.
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

import torch

from lnfree._errors import CheckpointError
from lnfree.io.parts import Parts
from lnfree.io.tokenizers import dir_tokenizer

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
#: epsilon written by `lnfree.io.hf_write` for LN-free models (as the released checkpoints use).
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


# ---- argument checks ---------------------------------------------------------------------
def looks_like_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a hub id (``gpt2``, ``owner/name``)."""
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
        f'`lnfree.load("/path/to/dir")`.'
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


def read_hf_dir(folder: Path, name: str, *, tokenizer=None, n_ctx=None) -> Parts:
    """The `Parts` of a local HF directory: GPT-2 (and the released LN-free format) read here, other
    architectures through TransformerLens's converters. `name` becomes the model's name.

    Example:
        >>> parts = read_hf_dir(Path("./gpt2"), "gpt2")   # doctest: +SKIP
    """
    config = _read_config(folder)
    if config.get("model_type") == "gpt2":
        return _read_gpt2_dir(folder, config, name, tokenizer, n_ctx)
    from lnfree import architectures

    try:
        architectures.architecture(config, str(folder / "config.json"))
    except architectures.UnsupportedArchitectureError as e:
        raise CheckpointError(str(e)) from None
    cfg = architectures.tl_config(config, name=name, device="cpu")
    if n_ctx is not None:
        cfg.n_ctx = n_ctx
    try:
        hf_model = architectures.hf_model_from_dir(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"transformers cannot read the weights in {folder}: {e}. The files are corrupt, "
                              "truncated or incomplete; re-download them.") from e
    sd = architectures.tl_state_dict(hf_model, cfg, where=folder)
    del hf_model
    return Parts(cfg, sd, dir_tokenizer(folder, cfg.d_vocab, tokenizer), name=name, source=str(folder))


def hub_snapshot(name: str, local_files_only: Optional[bool]) -> Path:
    """The local folder of hub id `name` (short names in `HUB_MODELS`): the HF cache, else a download."""
    return Path(_hub_snapshot(HUB_MODELS.get(name, name), name, local_files_only))


def _read_gpt2_dir(folder: Path, config: dict, name: str, tokenizer, n_ctx=None) -> Parts:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

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
    cfg = HookedTransformerConfig(
        n_layers=fields["n_layers"], d_model=fields["d_model"], n_heads=fields["n_heads"], d_head=fields["d_head"],
        d_mlp=fields["d_mlp"], n_ctx=fields["n_ctx"], d_vocab=fields["d_vocab"], act_fn=fields["act_fn"],
        eps=fields["eps"], use_attn_scale=fields["use_attn_scale"], use_local_attn=False,
        scale_attn_by_inverse_layer_idx=fields["scale_attn_by_inverse_layer_idx"], normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", tokenizer_name=None,
        default_prepend_bos=True, model_name=name, device="cpu", init_weights=False,
    )
    tok = dir_tokenizer(folder, cfg.d_vocab, tokenizer)
    tl_sd = convert_gpt2_weights(_hf_view(sd, cfg.n_layers), cfg)
    tl_sd["unembed.b_U"] = torch.zeros(cfg.d_vocab)  # GPT-2's lm_head has no bias
    parts = Parts(cfg, tl_sd, tok, name=name, source=str(folder))
    if ln_free:  # every site removed at scale 1: the LN weights carry 1/sigma
        parts.fold, parts.fold_scale = "all", 1.0
    return parts
