"""GGUF files (llama / qwen2) -> `Parts`: the reader behind ``lnfree.load("model.gguf")``.

GGUF conversion is slow the first time (parsing the vocabulary and dequantising: ~15 s for
SmolLM2-135M on one core), so its result (TransformerLens weights in float32 safetensors, the
config, the tokenizer) is cached under ``lnfree.tokenizer.cache_dir() / "gguf" / <sha256 of the
file>-v<GGUF_CACHE_VERSION>``; later loads read the cache (a second or two). A cache that cannot be
written only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from lnfree import architectures, gguf_file
from lnfree.io.parts import Parts
from lnfree.io.tokenizers import with_bos
from lnfree.training.files import fix_mode

#: bump when the conversion changes, so stale caches are not read.
GGUF_CACHE_VERSION = 1
_lock = threading.Lock()
_hash_memo: dict[tuple, str] = {}
_tokenizer_memo: dict[str, object] = {}


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
            tok = with_bos(AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True))
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
        fix_mode(tmp / "model.safetensors")
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
    tok = with_bos(tok) if tok is not None else None
    if folder is not None:
        _tokenizer_memo[str(folder)] = tok
    return config, facts, sd, tok


def read_gguf(path: Path, *, tokenizer=None, n_ctx=None, use_cache: bool = True) -> Parts:
    """The `Parts` of a GGUF file: every site live, float32, ``default_prepend_bos`` as the file says.

    Example:
        >>> parts = read_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))   # doctest: +SKIP
    """
    config, facts, sd, tok = gguf_parts(path, use_cache=use_cache)
    cfg = architectures.tl_config(config, name=path.name, device="cpu")
    if n_ctx is not None:
        cfg.n_ctx = n_ctx
    add_bos = facts.get("add_bos_token")
    cfg.default_prepend_bos = bool(add_bos) if add_bos is not None else facts.get("tokenizer_model") == "llama"
    if tokenizer is not None:
        tok = None if tokenizer is False else with_bos(tokenizer)
    return Parts(cfg, sd, tok, name=path.name, source=str(path), attrs={"gguf_path": str(path)})
