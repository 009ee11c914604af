"""The one resolver: `load(spec)` turns any model reference lnfree knows into an `LNFreeTransformer`.

`read_parts` is the only dispatcher (every entry point, `lnfree.load`, `load_model`,
`LNFreeTransformer.from_pretrained`, `zoo.load`, `removal.load_checkpoint`, reads through it) and
`build` the only place for the device / dtype / float16 policy. Kinds, tried in this order:

1. a zoo name (`lnfree.io.zoo`): ``tiny-ln``, ``tiny-vanilla``, ``tiny-lnfree``, ``smollm2-135m``, and
   any derived model the zoo registers;
2. a ``.gguf`` file (llama / qwen2; `lnfree.io.gguf`);
3. a derived model directory (``derived.json``: a base spec + deltas; `lnfree.io.derived`);
4. a removal run directory (``checkpoints/latest``; its ``final_tl/`` when the run finished, else the
   latest checkpoint) or one removal checkpoint directory (``state.json``; `lnfree.io.checkpoint`);
5. an lnfree directory (what `save_pretrained` writes for a model HF GPT-2 cannot hold), a
   TransformerLens weights directory or a zoo pretraining run directory (`lnfree.io.tl_dir`);
6. a Hugging Face directory (``config.json`` with a ``model_type``; `lnfree.io.hf`);
7. a hub id (``gpt2``, ``owner/name``): offline-first, failing fast.

Anything else raises `lnfree.CheckpointError` (a ValueError) listing these kinds, with the closest known
name when there is one ("did you mean 'tiny-ln'?"). Names: a zoo name, a hub id as given, a file's or
directory's name (a run's name for its ``final_tl/`` and checkpoints).

Policy (`build`): the device is checked once per load (a CUDA or MPS device this machine lacks, or
``"meta"``, is refused); None means TransformerLens's default (CUDA when available). ``dtype=None``
keeps what the source stores (float32 for HF directories, GGUF files and the zoo); float16 for a model
with frozen or removed sites (its residual stream overflows float16) loads in float32 with a warning.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from lnfree._checks import check_device
from lnfree._errors import CheckpointError
from lnfree.io import checkpoint as ck
from lnfree.io import derived, hf, tl_dir, zoo
from lnfree.io.gguf import read_gguf
from lnfree.io.parts import FLAGS, Parts, assemble
from lnfree.io.tokenizers import with_bos

PathLike = Union[str, os.PathLike]
KINDS = (
    "a zoo name ({zoo})",
    "a .gguf file (llama, qwen2)",
    "a derived model directory (derived.json)",
    "a removal run or checkpoint directory",
    "an lnfree or TransformerLens weights directory (model.safetensors + config.json, e.g. final_tl/) or zoo run "
    "directory",
    "a Hugging Face model directory (config.json + weights)",
    "a Hugging Face hub id such as 'gpt2' or 'owner/name'",
)
#: the options only Hugging Face directories, GGUF files and hub ids take (the rest are stored models).
SOURCE_OPTIONS = FLAGS + ("local_files_only", "n_ctx")
OPTIONS = SOURCE_OPTIONS + ("tokenizer", "data_dir")


def kinds_text() -> str:
    """The accepted kinds of model reference, as one line for error messages."""
    return "; ".join(KINDS).format(zoo=", ".join(zoo.all_names()))


def load(spec: PathLike, *, device: Optional[Union[str, torch.device]] = None,
         dtype: Optional[torch.dtype] = None, fold_ln: bool = False, center_writing_weights: bool = False,
         center_unembed: bool = False, fold_value_biases: bool = False, tokenizer=None,
         local_files_only: Optional[bool] = None, n_ctx: Optional[int] = None, data_dir: Optional[PathLike] = None):
    """Load any model reference as an `LNFreeTransformer` (see the module docstring for the kinds).

    By default the weights are left unprocessed, so an HF model's logits equal transformers' on the same
    files (to float rounding) and every site is as the source stored it (HF and GGUF: ``live``; the
    released LN-free GPT-2 format: ``removed``). The options below apply to HF directories, GGUF files
    and hub ids (`tokenizer` to every kind); stored models (zoo, runs, lnfree directories) refuse them.

    Args:
        spec: a zoo name, a path (file or directory) or a hub id.
        device: None (TransformerLens's default: CUDA when available), ``"cpu"``, ``"cuda"``...
        dtype: a floating torch dtype; None keeps the source's (float32 for HF, GGUF and the zoo).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: TransformerLens's weight
            processing (`fold_ln` folds LN weights into the reading weights; `center_unembed` changes the
            logits by a per-position constant, the others leave them unchanged).
        tokenizer: a transformers tokenizer to attach; None uses the source's (GPT-2's for a 50257-token
            vocabulary without one); False attaches none.
        local_files_only: hub ids only. True: never the network; None: True when ``HF_HUB_OFFLINE`` is set.
        n_ctx: context length (None: the architecture's). Rotary models allocate an n_ctx x n_ctx mask
            per layer, so a smaller value saves memory.
        data_dir: zoo family names only: another exported family (default ``$LNFREE_ZOO_DATA``, else the
            package's).

    Example:
        >>> import lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> model.cfg.n_layers, model.ln_mode("ln_final")
        (4, 'live')
        >>> lnfree.load("smollm2-135m", device="cpu").cfg.n_key_value_heads   # doctest: +SKIP
        3
    """
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                 fold_value_biases=fold_value_biases)
    options = {k: True for k, v in flags.items() if v}
    options.update({k: v for k, v in (("tokenizer", tokenizer), ("local_files_only", local_files_only),
                                      ("n_ctx", n_ctx), ("data_dir", data_dir)) if v is not None})
    _check_args(spec, dtype, tokenizer, local_files_only, n_ctx)
    device = _device(device)
    parts = read_parts(spec, **options)
    return _build(parts, device, dtype, {k: bool(v) for k, v in flags.items()})


def load_model(name_or_path: PathLike, **kwargs):
    """`lnfree.load` under its older name: the same arguments, the same kinds, the same model.

    Example:
        >>> from lnfree.loading import load_model
        >>> load_model("tiny-ln", device="cpu").ln_mode("ln_final")
        'live'
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise TypeError(f"name_or_path must be a non-empty str or path, got {name_or_path!r}")
    return load(name_or_path, **kwargs)


def build(parts: Parts, *, device=None, dtype: Optional[torch.dtype] = None, flags: Optional[dict] = None):
    """The `LNFreeTransformer` of `parts`, under the resolver's device and dtype policy (module docstring).

    Example:
        >>> model = build(read_parts("tiny-ln"), device="cpu")
        >>> model.cfg.model_name
        'tiny-ln'
    """
    if dtype is not None:
        _check_dtype(dtype)
    return _build(parts, _device(device), dtype, flags)


def read_parts(spec: PathLike, **options) -> Parts:
    """The `Parts` of a model reference: the one dispatcher (kinds in the module docstring).

    `options` (`SOURCE_OPTIONS`) reach the HF, GGUF and hub readers, other kinds refuse them; ``tokenizer``
    (a tokenizer to attach, or False for none) applies to every kind, ``data_dir`` to the zoo family.

    Example:
        >>> read_parts("tiny-lnfree").ln_state["ln_final"]["mode"]
        'removed'
    """
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise TypeError(f"spec must be a non-empty str or path: {kinds_text()}; got {spec!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; the options are {list(OPTIONS)}")
    options = dict(options)
    tok = options.pop("tokenizer", None)
    name = os.fspath(spec)
    if zoo.kind(name) == "family":
        _no_options({k: v for k, v in options.items() if k != "data_dir"}, "a zoo name")
        return _with_tokenizer(_zoo_parts(name, options.get("data_dir")), tok)
    if "data_dir" in options:
        raise TypeError(f"data_dir applies to the zoo's family ({', '.join(zoo.NAMES)}), not to {name!r}")
    if zoo.kind(name) is not None:
        _no_options(options, "a zoo name")
        return _with_tokenizer(_zoo_parts(name), tok)
    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return read_gguf(path, tokenizer=tok, n_ctx=options.get("n_ctx"))
    if path.is_dir():
        return _dir_parts(path, options, tok)
    if path.exists():
        raise CheckpointError(f"spec {name!r} is a file but not a .gguf; accepted: {kinds_text()} (for weights "
                              "files, pass the directory that holds them)")
    if _looks_like_path(name):
        raise CheckpointError(f"spec {name!r}: no such file or directory (and not a zoo name); "
                              f"accepted: {kinds_text()}")
    guess = did_you_mean(name)
    if guess is not None or not hf.looks_like_hub_id(name):
        hint = f"did you mean {guess!r}? " if guess is not None else ""
        raise CheckpointError(f"spec {name!r} is not a model reference lnfree knows; {hint}accepted: {kinds_text()}")
    folder = hf.hub_snapshot(name, options.get("local_files_only"))
    return hf.read_hf_dir(folder, name, tokenizer=tok, n_ctx=options.get("n_ctx"))


def load_checkpoint(path: PathLike, device: Optional[str] = None):
    """Rebuild the model of a removal checkpoint (a ``step_*`` dir, or a run dir: its latest checkpoint).

    Returns ``(model, state)``: weights loaded (LoRA adapters of a LoRA run merged), sites in their
    checkpointed modes and scales.

    Example:
        >>> model, state = load_checkpoint("runs/removal")     # doctest: +SKIP
        >>> state["step"], model.ln_modes()["ln_final"]         # doctest: +SKIP
        (300, 'frozen')
    """
    parts, state = ck.read_checkpoint_parts(path)
    return build(parts, device=device), state


def load_tl_dir(path: PathLike, device: Optional[str] = None, tokenizer=None):
    """Load an lnfree / TransformerLens weights dir (``final_tl/``, zoo pretraining ``final/``).

    Example:
        >>> model = load_tl_dir("runs/zoo/pretrain/final")    # doctest: +SKIP
    """
    parts = tl_dir.read_tl_dir(path)
    if tokenizer is not None:
        parts.tokenizer = tokenizer
    return build(parts, device=device)


# ---- kinds ---------------------------------------------------------------------------------------
def _zoo_parts(name: str, data_dir: Optional[PathLike] = None) -> Parts:
    kind = zoo.kind(name)
    if kind == "family":
        return zoo.family_parts(name, data_dir)
    if kind == "derived":
        folder = zoo.derived_dir(name)
        parts = _derived_parts(folder)
    else:
        entry = zoo.REAL_MODELS[name]
        path = zoo.real_model_path(name)
        parts = read_gguf(path, n_ctx=entry["n_ctx"])
        parts.attrs["zoo_info"] = {"source": entry["source"], "file": str(path)}
    parts.name = name
    parts.attrs["zoo_name"] = name
    return parts


def _derived_parts(folder: Path) -> Parts:
    return derived.read_derived(folder, read_parts(derived.base_spec(folder)))


def _dir_parts(folder: Path, options: dict, tok) -> Parts:
    if derived.is_derived(folder):
        _no_options(options, "a derived model directory")
        return _with_tokenizer(_derived_parts(folder), tok)
    latest = ck.latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
    if ck.is_checkpoint(folder) or ck.is_checkpoint(latest):
        _no_options(options, "a removal run or checkpoint directory")
        if (folder / "summary.json").is_file() and tl_dir.tl_config(folder / "final_tl") is not None:
            return _with_tokenizer(tl_dir.read_tl_dir(folder / "final_tl"), tok)
        return _with_tokenizer(ck.read_checkpoint_parts(folder)[0], tok)
    weights_dir = folder if tl_dir.tl_config(folder) is not None else tl_dir.run_weights_dir(folder)
    if weights_dir is not None:
        _no_options(options, "an lnfree / TransformerLens weights directory")
        return _with_tokenizer(tl_dir.read_tl_dir(weights_dir), tok)
    if (folder / "config.json").is_file():
        return hf.read_hf_dir(folder, tl_dir.dir_name(folder), tokenizer=tok, n_ctx=options.get("n_ctx"))
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise CheckpointError(f"directory {str(folder)!r} holds no model lnfree can read (found: {found or 'nothing'}); "
                          f"accepted: {kinds_text()}")


def _with_tokenizer(parts: Parts, tok) -> Parts:
    """`parts` with the tokenizer the caller gave (False: none) instead of the stored one."""
    if tok is not None:
        parts.tokenizer = None if tok is False else with_bos(tok)
    return parts


# ---- policy --------------------------------------------------------------------------------------
def _build(parts: Parts, device, dtype: Optional[torch.dtype], flags: Optional[dict]):
    dtype = parts.dtype if dtype is None else dtype
    if dtype == torch.float16 and parts.has_fixed_scales():
        warnings.warn(f"{parts.name or parts.source} has frozen or removed LN sites: its residual stream overflows "
                      "float16 (max 65504), so it is loaded in float32 instead (bfloat16 also works)", stacklevel=3)
        dtype = torch.float32
    return assemble(parts, device=device, dtype=dtype, flags=flags)


def _device(device) -> str:
    """The device to load on (checked once: absent accelerators and 'meta' are refused)."""
    dev = check_device(device)
    if dev is not None and dev.type == "meta":
        raise ValueError("device='meta' holds no weights: a model loaded there cannot compute anything. Pass "
                         "device='cpu' or 'cuda' (an empty model for shapes only: LNFreeTransformer(cfg) under "
                         "torch.device('meta'))")
    if dev is None:
        from transformer_lens.utilities import get_device

        return str(get_device())
    return str(dev)


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}")


def _check_args(spec, dtype, tokenizer, local_files_only, n_ctx) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise TypeError(f"spec must be a non-empty str or path: {kinds_text()}; got {spec!r}")
    if dtype is not None:
        _check_dtype(dtype)
    if tokenizer not in (None, False) and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, None or False; got {type(tokenizer).__name__}")
    if local_files_only not in (None, True, False):
        raise TypeError(f"local_files_only must be None, True or False; got {local_files_only!r}")
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
        raise ValueError(f"n_ctx must be a positive int or None, got {n_ctx!r}")


def _no_options(options: dict, kind: str) -> None:
    if options:
        raise TypeError(f"{sorted(options)} apply to HF directories, .gguf files and hub ids, not to {kind}")


def _looks_like_path(name: str) -> bool:
    """A path that does not exist (rather than a hub id): absolute, relative, or a file name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(
        ("/", ".gguf", ".safetensors", ".json", ".bin", ".pt"))


def did_you_mean(name: str) -> Optional[str]:
    """The known name closest to a bare `name` that is none (zoo names, GPT-2's short hub names), or None."""
    known = zoo.all_names() + list(hf.HUB_MODELS)
    if "/" in name or name in known:
        return None
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    return close[0] if close else None
