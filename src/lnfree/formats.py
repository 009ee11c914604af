"""Loading every architecture: local HF directories (non-GPT-2) and GGUF files -> `LNFreeTransformer`.

Loading produces parts (a TransformerLens config, TransformerLens-keyed weights, a tokenizer, an LN
state); `assemble` puts them into an `LNFreeTransformer` through its public API only. GPT-2
directories keep their own reader in `lnfree.loading` (it also knows the released LN-free format).

GGUF conversion is slow the first time (parsing the vocabulary and dequantising: ~15 s for
SmolLM2-135M on one core), so its result (TransformerLens weights in float32 safetensors, the
config, the tokenizer) is cached under ``lnfree.tokenizer.cache_dir() / "gguf" / <sha256 of the
file>-v<GGUF_CACHE_VERSION>``; later loads read the cache (a second or two). A cache that cannot be
written only costs the speed-up.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from lnfree import architectures, gguf_file
from lnfree._errors import CheckpointError

#: bump when the conversion changes, so stale caches are not read.
GGUF_CACHE_VERSION = 1
_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
_lock = threading.Lock()
_hash_memo: dict[tuple, str] = {}
_tokenizer_memo: dict[str, object] = {}


def chmod_umask(path: os.PathLike) -> None:
    """Give a written file the mode the umask asks for (safetensors writes 0600 whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


# ---- assembling ------------------------------------------------------------------------------
def assemble(cfg, state_dict: dict[str, torch.Tensor], tokenizer, flags: dict, ln_state: Optional[dict] = None):
    """An `LNFreeTransformer` from a config, TransformerLens weights, a tokenizer and (optionally) an LN state.

    Without processing flags the weights are loaded in one `load_state_dict` call (TransformerLens's
    `load_and_process_state_dict` loads key by key: 20x slower on a 30-layer model); with flags its
    processing is used as it is.
    """
    from lnfree.model import LNFreeTransformer

    model = LNFreeTransformer(cfg, tokenizer=tokenizer)
    if any(flags.get(f) for f in _FLAGS):
        model.load_and_process_state_dict(dict(state_dict), refactor_factored_attn_matrices=False,
                                          **{f: bool(flags.get(f)) for f in _FLAGS})
    else:
        full = model.fill_missing_keys(dict(state_dict))
        # TransformerLens's Phi-3 converter writes zero biases for its RMSNorms, which have none
        zeros = [k for k, v in full.items() if k.endswith(".b") and k not in model.state_dict() and not v.any()]
        for k in zeros:
            del full[k]
        missing, unexpected = model.load_state_dict(full, strict=False)
        missing = [k for k in missing if not k.endswith((".IGNORE", ".mask"))]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if ln_state is not None:
        model.load_ln_state(ln_state)
    return model.eval()


# ---- tokenizers ------------------------------------------------------------------------------
def _dir_tokenizer(folder: Path, d_vocab: int, tokenizer):
    """The tokenizer to attach (with add_bos_token=True, as TransformerLens sets up GPT-2), or None."""
    if tokenizer is False:
        return None
    if tokenizer is not None:
        return _with_bos(tokenizer)
    if any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, add_bos_token=True)
        except Exception as e:  # any failure here only costs the tokenizer, never the weights
            warnings.warn(f"could not load the tokenizer in {folder} ({type(e).__name__}: {e})", stacklevel=4)
        else:
            if len(tok) > d_vocab:
                warnings.warn(f"the tokenizer in {folder} has {len(tok)} tokens but the model only {d_vocab}: "
                              f"ids >= {d_vocab} will fail", stacklevel=4)
            return tok
    if d_vocab == 50257:
        from lnfree.tokenizer import gpt2_tokenizer

        return gpt2_tokenizer(add_bos_token=True)
    warnings.warn(
        f"no tokenizer in {folder} and the vocabulary ({d_vocab} tokens) is not GPT-2's: loading without a "
        f"tokenizer (pass tokenizer= to attach one; model.to_tokens needs it)", stacklevel=4,
    )
    return None


def _with_bos(tokenizer):
    """A copy that prepends BOS, so TransformerLens does not try to re-load it by name."""
    if getattr(tokenizer, "add_bos_token", False) or tokenizer.bos_token is None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    try:
        tokenizer.add_bos_token = True
    except (AttributeError, ValueError):
        return tokenizer
    tokenizer.init_kwargs["add_bos_token"] = True  # what TransformerLens reads
    tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    return tokenizer


def load_saved_tokenizer(path: str | os.PathLike, *, name: str = "tokenizer"):
    """A tokenizer saved with a model: an HF tokenizer directory, or a ``tokenizer.json`` (file or its folder).

    A ``tokenizer.json`` with GPT-2's ``<|endoftext|>`` (the zoo's) gets it as bos/eos/pad (TransformerLens
    needs both) and no automatic BOS, like GPT-2 (`lnfree.zoo.train.load_tokenizer`). ``name`` is what
    errors call the argument.

    Example:
        >>> tok = load_saved_tokenizer("runs/zoo/tokenizer.json")   # doctest: +SKIP
    """
    p = Path(path)
    if p.is_dir() and (p / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    from transformers import PreTrainedTokenizerFast

    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.exists():
        raise FileNotFoundError(f"{name} {path}: no tokenizer.json there")
    if "<|endoftext|>" in file.read_text(encoding="utf-8"):
        from lnfree.zoo.train import load_tokenizer

        return load_tokenizer(file)
    return PreTrainedTokenizerFast(tokenizer_file=str(file), name_or_path=str(file.parent), model_max_length=1 << 30)


# ---- HF directories of any supported architecture --------------------------------------------
def load_hf_dir(folder: Path, config: dict, name: str, *, device, dtype, flags: dict, tokenizer, n_ctx=None):
    """A local HF directory of a non-GPT-2 architecture (see `architectures.SUPPORTED`)."""
    cfg = architectures.tl_config(config, name=name, device=device, dtype=dtype)
    if n_ctx is not None:
        cfg.n_ctx = n_ctx
    try:
        hf_model = architectures.hf_model_from_dir(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"transformers cannot read the weights in {folder}: {e}. The files are corrupt, "
                              "truncated or incomplete; re-download them.") from e
    sd = architectures.tl_state_dict(hf_model, cfg, where=folder)
    del hf_model
    tok = _dir_tokenizer(folder, cfg.d_vocab, tokenizer)
    return assemble(cfg, sd, tok, flags)


# ---- GGUF ----------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _hash_memo:
            return _hash_memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    with _lock:
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def gguf_cache_dir(path: Path) -> Path:
    from lnfree.tokenizer import cache_dir

    return cache_dir() / "gguf" / f"{file_sha256(path)[:32]}-v{GGUF_CACHE_VERSION}"


def _convert_gguf(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor], object]:
    """(HF config, file facts, TransformerLens weights, tokenizer or None) straight from the file."""
    reader = gguf_file.open_reader(path)
    config = gguf_file.hf_config(reader, path)
    facts = {"add_bos_token": gguf_file.field(reader, "tokenizer.ggml.add_bos_token"),
             "tokenizer_model": gguf_file.field(reader, "tokenizer.ggml.model"),
             "name": gguf_file.field(reader, "general.name")}
    hf_sd = gguf_file.hf_state_dict(reader, path, config)
    del reader
    try:
        hf_model = architectures.hf_model_from_state_dict(config, hf_sd)
    except ValueError as e:
        raise gguf_file.GGUFError(f"{path}: {e}") from None
    cfg = architectures.tl_config(config, name=str(path), device="cpu")
    sd = architectures.tl_state_dict(hf_model, cfg, where=path)
    del hf_model, hf_sd
    try:
        tok = gguf_file.tokenizer(path)
    except gguf_file.GGUFError as e:
        warnings.warn(f"{e}; loading without a tokenizer", stacklevel=4)
        tok = None
    return config, facts, sd, tok


def _read_cache(folder: Path):
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "lnfree_gguf.json").read_text(encoding="utf-8"))
        sd = load_file(str(folder / "model.safetensors"))
    except Exception:  # missing, partial or damaged: rebuilt from the file
        return None
    key = str(folder)
    tok = _tokenizer_memo.get(key)
    if tok is None and (folder / "tokenizer" / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = _with_bos(AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True))
        except Exception:
            return None
        _tokenizer_memo[key] = tok
    return meta["config"], meta["facts"], sd, tok


def _write_cache(folder: Path, config: dict, facts: dict, sd: dict, tok) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        save_file(sd, str(tmp / "model.safetensors"))
        chmod_umask(tmp / "model.safetensors")
        if tok is not None:
            tok.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "lnfree_gguf.json").write_text(json.dumps({"config": config, "facts": facts}), encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.replace(tmp, folder)  # atomic; another process may have won the race, which is fine
        tmp = None
    except OSError as e:
        if not (folder / "lnfree_gguf.json").is_file():  # else another process cached it first: fine
            warnings.warn(f"could not cache the converted GGUF in {folder.parent}: {e}", stacklevel=4)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_parts(path: Path, *, use_cache: bool = True):
    """(HF config, file facts, TransformerLens weights, tokenizer) of a GGUF file, cached on disk."""
    folder = gguf_cache_dir(path) if use_cache else None
    if folder is not None and folder.is_dir():
        cached = _read_cache(folder)
        if cached is not None:
            return cached
    config, facts, sd, tok = _convert_gguf(path)
    if folder is not None:
        _write_cache(folder, config, facts, sd, tok)
    tok = _with_bos(tok) if tok is not None else None
    if folder is not None:
        _tokenizer_memo[str(folder)] = tok
    return config, facts, sd, tok


def load_gguf(path: Path, name: str, *, device, dtype, flags: dict, tokenizer, n_ctx=None, use_cache=True):
    """A GGUF file as an `LNFreeTransformer` (every site live, no processing unless `flags` ask)."""
    config, facts, sd, tok = gguf_parts(path, use_cache=use_cache)
    cfg = architectures.tl_config(config, name=name, device=device, dtype=dtype)
    if n_ctx is not None:
        cfg.n_ctx = n_ctx
    add_bos = facts.get("add_bos_token")
    cfg.default_prepend_bos = bool(add_bos) if add_bos is not None else facts.get("tokenizer_model") == "llama"
    if tokenizer is False:
        tok = None
    elif tokenizer is not None:
        tok = tokenizer
    tok = _with_bos(tok) if tok is not None else None
    model = assemble(cfg, sd, tok, flags)
    model.gguf_path = str(path)
    return model
