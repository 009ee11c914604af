"""GPT-2's tokenizer, offline, as a Hugging Face tokenizer object.

TransformerLens (`to_tokens`, `to_string`, `generate`) needs a `transformers` tokenizer. The hub is
not always reachable, so this module builds GPT-2's byte-level BPE from the ranks shipped in
`lnfree/assets/gpt2.tiktoken` (OpenAI's r50k/GPT-2 ranks, base64 token + rank per line):

- vocab: every token's bytes mapped through GPT-2's byte-to-unicode table (the printable stand-in
  characters HF's byte-level BPE uses), plus ``<|endoftext|>`` = 50256;
- merges: for each multi-byte token, the pair of lower-rank tokens whose merge makes it (found by
  running tiktoken's BPE on the token with only lower ranks), in rank order: GPT-2's 50000 merges.
  HF's BPE then makes tiktoken's choices, so both produce the same ids (checked in the tests).

The derived vocab/merges are cached in memory and on disk (``$LNFREE_CACHE_DIR``, default
``~/.cache/lnfree``), so only the first call in a fresh environment pays for the derivation. The
tokenizer is also saved there once in HF format; that directory is its `name_or_path`, so when
TransformerLens re-loads it by name (it does so for tokenizers without add_bos_token) it stays offline.

`Tokens` is a tensor of token ids that remembers the tokenizer that wrote it (`tokenizer_id`: a
fingerprint of the vocabulary, cached per tokenizer object); `zoo.heldout`, `tasks.ioi` and
`lnfree.tokenize` return them, and `lnfree._checks.check_tokens` refuses them for a model whose
tokenizer has another vocabulary.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import weakref
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Optional

import torch

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
GPT2_VOCAB_SIZE = 50257
GPT2_CONTEXT = 1024
# sha256 of assets/gpt2.tiktoken; equals tiktoken's published hash of r50k_base.tiktoken.
ASSET_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenization regex (the one HF's ByteLevel pre-tokenizer uses).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _asset_bytes() -> bytes:
    data = resources.files("lnfree").joinpath("assets/gpt2.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != ASSET_SHA256:
        raise RuntimeError(
            f"lnfree/assets/gpt2.tiktoken is corrupt (sha256 {digest}, expected {ASSET_SHA256}); reinstall lnfree"
        )
    return data


@functools.lru_cache(maxsize=1)
def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks: token bytes -> rank (0..50255), from the shipped asset.

    Example:
        >>> gpt2_ranks()[b"Hello"]
        15496
    """
    ranks = {}
    for line in _asset_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (as in OpenAI's encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_pieces(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes, using only merges that yield ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks to HF byte-level BPE `vocab` and `merges` (the standard conversion).

    The merge that creates a token of rank r is found by running tiktoken's own BPE on the
    token's bytes with only the ranks below r: it stops at exactly two pieces, the pair whose
    merge made the token. Merges are ordered by rank, so HF's lowest-merge-first BPE makes the
    same choices as tiktoken's lowest-rank-pair-first BPE (for GPT-2 this reproduces its 50000
    original merges).

    Example:
        >>> vocab, merges = ranks_to_vocab_and_merges({b"a": 0, b"b": 1, b"ab": 2})
        >>> vocab, merges
        ({'a': 0, 'b': 1, 'ab': 2}, [('a', 'b')])
    """
    table = bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        pieces = _bpe_pieces(ranks, token, rank)
        if len(pieces) != 2:
            raise ValueError(
                f"ranks are not a BPE: token {token!r} (rank {rank}) is not a merge of two lower-rank tokens"
            )
        merges.append((as_str(pieces[0]), as_str(pieces[1])))
    return vocab, merges


def cache_dir() -> Path:
    """Where lnfree caches derived files: $LNFREE_CACHE_DIR, else $XDG_CACHE_HOME/lnfree or ~/.cache/lnfree."""
    if os.environ.get("LNFREE_CACHE_DIR"):
        return Path(os.environ["LNFREE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lnfree"


def _cache_file() -> Path:
    return cache_dir() / f"gpt2_bpe_{ASSET_SHA256[:16]}.json"


def _read_cache() -> tuple[dict[str, int], list[tuple[str, str]]] | None:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
        vocab, merges = data["vocab"], [tuple(m) for m in data["merges"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A damaged cache file is ignored (and rebuilt), never trusted.
    if len(vocab) != GPT2_VOCAB_SIZE - 1 or data.get("asset_sha256") != ASSET_SHA256:
        return None
    return vocab, merges


def _write_cache(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    path = _cache_file()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"asset_sha256": ASSET_SHA256, "vocab": vocab, "merges": merges}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
        tmp = None
    except OSError as e:  # a read-only home is fine: we just rebuild next time
        warnings.warn(f"could not cache the GPT-2 BPE tables in {path.parent}: {e}", stacklevel=3)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    cached = _read_cache()
    if cached is None:
        cached = ranks_to_vocab_and_merges(gpt2_ranks())
        _write_cache(*cached)
    vocab, merges = cached
    return vocab, tuple(merges)


def _build(add_bos_token: bool, name_or_path: str):
    from transformers import GPT2TokenizerFast

    vocab, merges = _vocab_and_merges()
    vocab = dict(vocab)
    vocab[ENDOFTEXT] = ENDOFTEXT_ID
    tok = GPT2TokenizerFast(
        vocab=vocab,
        merges=list(merges),
        unk_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        add_bos_token=bool(add_bos_token),
        model_max_length=GPT2_CONTEXT,
        name_or_path=name_or_path,
    )
    if len(tok) != GPT2_VOCAB_SIZE or tok.convert_tokens_to_ids(ENDOFTEXT) != ENDOFTEXT_ID:
        raise RuntimeError(f"GPT-2 tokenizer built with {len(tok)} tokens, expected {GPT2_VOCAB_SIZE}")
    return tok


def _saved_tokenizer_dir() -> Path | None:
    """A local directory holding this tokenizer in HF format (written once into the cache dir).

    It becomes the tokenizer's `name_or_path`: TransformerLens re-loads a tokenizer by that name
    when it lacks add_bos_token, and a local directory keeps that re-load offline.
    """
    target = cache_dir() / f"gpt2_tokenizer_{ASSET_SHA256[:16]}"
    if (target / "tokenizer.json").is_file():
        return target
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=".gpt2_tokenizer_")
        _build(False, str(target)).save_pretrained(tmp)
        os.replace(tmp, target)  # atomic; fails harmlessly if another process got there first
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target if (target / "tokenizer.json").is_file() else None


def gpt2_tokenizer(add_bos_token: bool = False):
    """GPT-2's tokenizer (a `transformers.GPT2TokenizerFast`), built offline from the shipped ranks.

    ``<|endoftext|>`` (50256) is bos, eos, unk and pad. With `add_bos_token=True` every encoding
    starts with it, which is how TransformerLens sets up GPT-2's tokenizer (`load_model` does
    that). Each call returns a new object, so callers may change settings such as `padding_side`.

    Example:
        >>> tok = gpt2_tokenizer()
        >>> tok("Hello world")["input_ids"]
        [15496, 995]
        >>> tok.decode([15496, 995])
        'Hello world'
    """
    saved = _saved_tokenizer_dir()
    return _build(add_bos_token, str(saved) if saved is not None else "gpt2")


# ---- token ids that remember the tokenizer that wrote them -----------------------------------
class TokenizerId(NamedTuple):
    """Who wrote a batch of token ids: a fingerprint of the tokenizer's vocabulary and a label for messages."""

    fingerprint: str
    n_tokens: int
    label: str

    def __str__(self) -> str:
        return f"{self.label} ({self.n_tokens} tokens, vocabulary {self.fingerprint})"


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocab(tok) -> Optional[dict]:
    get_vocab = getattr(tok, "get_vocab", None)
    if not callable(get_vocab):
        return None
    try:
        vocab = get_vocab(with_added_tokens=True) if type(tok).__module__.startswith("tokenizers") else get_vocab()
    except TypeError:
        vocab = get_vocab()
    return vocab if isinstance(vocab, dict) and vocab else None


def tokenizer_id(tok, label: Optional[str] = None) -> Optional[TokenizerId]:
    """The identity of `tok` (a Hugging Face or `tokenizers` tokenizer): a hash of its vocabulary.

    Two tokenizer objects with the same vocabulary (the same model loaded twice) get the same
    fingerprint. Hashing a 50k-token vocabulary takes ~0.1 s, so the fingerprint is cached per
    tokenizer object (and recomputed if tokens were added). None for objects without `get_vocab`.

    Example:
        >>> a, b = tokenizer_id(gpt2_tokenizer(), "GPT-2"), tokenizer_id(gpt2_tokenizer(True))
        >>> a.fingerprint == b.fingerprint, a.n_tokens
        (True, 50257)
    """
    if tok is None:
        return None
    try:
        size = len(tok)
        cached = _FINGERPRINTS.get(tok)
    except TypeError:  # unsized or not weak-referenceable: no cache
        size, cached = None, None
    if cached is None or cached[0] != size:
        vocab = _vocab(tok)
        if vocab is None:
            return None
        digest = hashlib.sha1(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:12]
        cached = (size, digest, len(vocab))
        with contextlib.suppress(TypeError):
            _FINGERPRINTS[tok] = cached
    name = Path(str(getattr(tok, "name_or_path", "") or "")).name or type(tok).__name__
    return TokenizerId(cached[1], cached[2], label or f"the tokenizer {name!r}")


# Methods whose result holds the same ids (a slice, a copy, another device): the identity carries over.
_KEEPS_IDENTITY = frozenset({torch.Tensor.__getitem__, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda,
                             torch.Tensor.clone, torch.Tensor.contiguous, torch.Tensor.long, torch.Tensor.detach})


class Tokens(torch.Tensor):
    """Token ids (a torch.Tensor) that remember the tokenizer that wrote them (`tokenizer_id`).

    Slices, copies and moves keep the identity; every other op returns a plain tensor, so model
    outputs and arithmetic stay ordinary. Analyses refuse Tokens whose tokenizer differs from the
    model's (`lnfree._checks.check_tokens`); plain tensors are taken as they are.

    Example:
        >>> t = Tokens.wrap(torch.tensor([[0, 5, 7]]), TokenizerId("abc123", 8, "demo"))
        >>> t[:, :2].tokenizer_id.label, type(t + 1).__name__
        ('demo', 'Tensor')
    """

    tokenizer_id: Optional[TokenizerId]

    @staticmethod
    def wrap(ids: torch.Tensor, identity: Optional[TokenizerId]) -> "Tokens":
        out = ids.as_subclass(Tokens)
        out.tokenizer_id = identity
        return out

    def plain(self) -> torch.Tensor:
        """The same ids as a plain tensor (no identity)."""
        return self.as_subclass(torch.Tensor)

    def __deepcopy__(self, memo):
        return Tokens.wrap(self.plain().clone(), self.tokenizer_id)

    def __reduce_ex__(self, protocol):
        return (_rebuild_tokens, (self.plain(), self.tokenizer_id))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if func in _KEEPS_IDENTITY and isinstance(src, Tokens) and type(out) is torch.Tensor:
            return Tokens.wrap(out, src.tokenizer_id)
        return out


def _rebuild_tokens(ids: torch.Tensor, identity) -> Tokens:
    return Tokens.wrap(ids, identity)


def with_tokenizer(ids: torch.Tensor, tok, label: Optional[str] = None) -> torch.Tensor:
    """`ids` marked as written by `tok` (a `Tokens`), or unchanged when `tok` has no vocabulary to fingerprint."""
    identity = tokenizer_id(tok, label)
    return ids if identity is None else Tokens.wrap(ids, identity)


def tokens_tokenizer(ids) -> Optional[TokenizerId]:
    """The tokenizer identity `ids` carry (None for plain tensors, lists, arrays)."""
    return getattr(ids, "tokenizer_id", None) if isinstance(ids, Tokens) else None
