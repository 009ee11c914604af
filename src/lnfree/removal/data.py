"""Training data for the removal fine-tune: fixed-length token sequences in a seeded order.

Accepted sources (`load_tokens`):
- token arrays: a torch.Tensor / numpy array, or ``.npy`` files (memory-mapped), either a 1-D
  token stream (cut into ``seq_len`` chunks) or 2-D ``[n, width]`` rows (each row cut into
  ``width // seq_len`` chunks);
- text: ``.txt`` files (one document each) or ``.jsonl`` files (one document per line, in the
  ``text`` field), tokenized with the model's tokenizer; documents are each followed by
  end-of-text, concatenated and cut into ``seq_len`` chunks with NO BOS prepended (as in the paper;
  ``bos_token_id=`` prepends one to every chunk, for models pretrained that way);
- a directory (its ``.npy`` / ``.txt`` / ``.jsonl`` files, sorted by name);
- a Hugging Face dataset name (needs the ``datasets`` package and a network connection).

`TokenData` serves batches by position in an endless stream of seeded epoch permutations, so
the data position (an int: sequences consumed) is all a checkpoint needs to resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Int

TOKEN_EXT = (".npy",)
TEXT_EXT = (".txt", ".text", ".md")
JSONL_EXT = (".jsonl",)
DataArg = Union["TokenData", torch.Tensor, np.ndarray, str, os.PathLike, Sequence]


class TokenData:
    """Sequences ``[n, seq_len]`` served in a deterministic shuffled order.

    Position p of the stream is row ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a
    permutation drawn from ``numpy.random.default_rng([seed, e])``: every epoch visits each row once.

    Example:
        >>> data = TokenData(np.arange(40).reshape(10, 4), seed=0)
        >>> data.batch(0, 3).shape
        torch.Size([3, 4])
        >>> sorted(data.indices(0, 10).tolist()) == list(range(10))
        True
    """

    def __init__(self, sequences, seed: int = 0):
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.detach().cpu().numpy()
        if not isinstance(sequences, np.ndarray) or sequences.ndim != 2 or sequences.shape[0] < 1:
            shape = getattr(sequences, "shape", None)
            raise ValueError(f"sequences must be a 2-D array [n, seq_len] with n >= 1, got shape {shape}")
        if not np.issubdtype(sequences.dtype, np.integer):
            raise TypeError(f"token arrays must hold integer ids, got dtype {sequences.dtype}")
        self.sequences = sequences
        self.seed = int(seed)
        self._perm_cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    @property
    def n_sequences(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.sequences.shape[1])

    def __len__(self) -> int:
        return self.n_sequences

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(self.n_sequences))
        return self._perm_cache[1]

    def indices(self, position: int, count: int) -> np.ndarray:
        """Row indices of stream positions ``position .. position + count - 1``."""
        if position < 0 or count < 0:
            raise ValueError(f"position and count must be >= 0, got {position}, {count}")
        n = self.n_sequences
        out = np.empty(count, dtype=np.int64)
        for i in range(count):  # batches are small; epochs may be crossed mid-batch
            p = position + i
            out[i] = self._perm(p // n)[p % n]
        return out

    def batch(self, position: int, count: int) -> Int[torch.Tensor, "count seq_len"]:
        """The ``count`` sequences at stream position ``position``, as int64."""
        idx = self.indices(position, count)
        rows = np.stack([np.asarray(self.sequences[i]) for i in idx]) if count else self.sequences[:0]
        return torch.from_numpy(rows.astype(np.int64))

    def token_range(self) -> tuple[int, int]:
        """(min, max) token id of the whole data set."""
        return int(self.sequences.min()), int(self.sequences.max())

    def fingerprint(self) -> dict:
        """Shape and a content digest of the first and last rows, to detect changed data on resume."""
        first = np.asarray(self.sequences[0]).astype(np.int64)
        last = np.asarray(self.sequences[-1]).astype(np.int64)
        return {"n_sequences": self.n_sequences, "seq_len": self.seq_len,
                "head": int((first * np.arange(1, first.size + 1)).sum() % 1_000_000_007),
                "tail": int((last * np.arange(1, last.size + 1)).sum() % 1_000_000_007)}


def chunk(tokens, seq_len: int) -> np.ndarray:
    """Cut a 1-D stream into ``[n, seq_len]`` (remainder dropped), or 2-D rows into ``seq_len`` pieces.

    Example:
        >>> chunk(np.arange(10), 4).tolist()
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if tokens.ndim == 1:
        n = tokens.shape[0] // seq_len
        if n == 0:
            raise ValueError(f"the token stream has {tokens.shape[0]} tokens, fewer than seq_len={seq_len}")
        return tokens[: n * seq_len].reshape(n, seq_len)
    if tokens.ndim == 2:
        width = tokens.shape[1]
        if width < seq_len:
            raise ValueError(f"token rows have {width} tokens, fewer than seq_len={seq_len}; pass seq_len <= {width}")
        if width == seq_len:
            return tokens
        per_row = width // seq_len
        return tokens[:, : per_row * seq_len].reshape(-1, seq_len)
    raise ValueError(f"token arrays must be 1-D (a stream) or 2-D [n, seq], got shape {tokens.shape}")


def chunk_with_bos(stream, seq_len: int, bos_token_id: int) -> np.ndarray:
    """Rows ``[bos] + (seq_len - 1)`` consecutive stream tokens, for models pretrained with a BOS.

    The paper fine-tunes GPT-2 on plain chunks (GPT-2 never saw a BOS); a model pretrained with a
    BOS at position 0 should be fine-tuned on rows of this form instead.

    Example:
        >>> chunk_with_bos(np.arange(1, 7), 3, 0).tolist()
        [[0, 1, 2], [0, 3, 4], [0, 5, 6]]
    """
    body = chunk(np.asarray(stream).reshape(-1), seq_len - 1)
    bos = np.full((body.shape[0], 1), bos_token_id, dtype=body.dtype)
    return np.concatenate([bos, body], axis=1)


def tokenize_documents(
    documents: Iterable[str], tokenizer, eot_token_id: int, max_tokens: Optional[int] = None
) -> np.ndarray:
    """One 1-D stream: each document's tokens followed by end-of-text. No BOS is added.

    Stops after the document that reaches `max_tokens`.
    """
    parts, total = [], 0
    eot = np.array([eot_token_id], dtype=np.int64)
    for doc in documents:
        if not doc:
            continue
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        parts += [np.asarray(ids, dtype=np.int64), eot]
        total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    if not parts:
        raise ValueError("no text found in the given documents")
    stream = np.concatenate(parts)
    return stream.astype(np.uint16) if stream.max() < 2**16 else stream.astype(np.int32)


def _read_documents(files: Sequence[Path], text_column: str) -> Iterator[str]:
    for f in files:
        if f.suffix in JSONL_EXT:
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if text_column not in row:
                        raise ValueError(f"{f}:{i + 1} has no {text_column!r} field (keys: {sorted(row)[:5]})")
                    yield row[text_column]
        else:
            yield f.read_text(encoding="utf-8")


def _expand_paths(paths: Sequence[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in TOKEN_EXT + TEXT_EXT + JSONL_EXT)
            if not found:
                raise FileNotFoundError(f"directory {p} holds no .npy, .txt or .jsonl files")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"data file {p} does not exist")
    return files


def _looks_like_hub_name(s: str) -> bool:
    return not Path(s).suffix and not s.startswith((".", "/", "~")) and s.count("/") <= 1


def _hf_documents(name: str, split: str, text_column: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local path, and loading it as a Hugging Face dataset needs the 'datasets' "
            "package (pip install datasets); or pass .npy token arrays / .txt files"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, ...: one clear message
        raise ValueError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {type(e).__name__}: {e}; "
                         "pass local .npy token arrays or text files instead") from None
    for row in ds:
        if text_column not in row:
            raise ValueError(f"dataset {name!r} rows have no {text_column!r} column (columns: {sorted(row)[:6]})")
        yield row[text_column]


def as_token_source(data, *, argument: str = "data"):
    """Turn nested lists / tuples of token ids into an int64 array; anything else is returned as is.

    Lists of paths stay lists of paths. A list that is neither raises a TypeError saying what is accepted.

    Example:
        >>> as_token_source([[1, 2, 3]]).tolist()
        [[1, 2, 3]]
    """
    if not isinstance(data, (list, tuple)) or not data:
        if isinstance(data, (list, tuple)):
            raise ValueError(f"{argument} is an empty {type(data).__name__}")
        return data
    if all(isinstance(x, (str, os.PathLike)) for x in data):
        return data
    accepted = ("a token tensor/array, a (nested) list of token ids, a path or a list of paths, a TokenData, "
                "or a dataset name")
    if any(isinstance(x, (str, os.PathLike)) for x in data):
        raise TypeError(f"{argument} mixes paths and other values; pass {accepted}")
    try:
        arr = np.asarray([x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in data])
    except ValueError:
        raise ValueError(f"{argument}: the token lists have different lengths; pass rows of equal length "
                         "(or one flat list: a token stream)") from None
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
        raise TypeError(f"{argument} must be {accepted}; got a {type(data).__name__} giving an array of dtype "
                        f"{arr.dtype} and shape {arr.shape}")
    return arr.astype(np.int64)


def load_tokens(
    data,
    *,
    seq_len: int,
    tokenizer=None,
    eot_token_id: Optional[int] = None,
    max_tokens: Optional[int] = None,
    split: str = "train",
    text_column: str = "text",
    bos_token_id: Optional[int] = None,
) -> np.ndarray:
    """Resolve any accepted data source to token sequences ``[n, seq_len]`` (see module docstring).

    With `bos_token_id`, token streams and text are cut into ``[bos] + (seq_len - 1)``-token rows
    (`chunk_with_bos`) instead of plain chunks; 2-D arrays are used as they are.

    Example:
        >>> load_tokens(np.arange(100), seq_len=16).shape
        (6, 16)
    """
    def cut(arr):
        if bos_token_id is not None and np.ndim(arr) == 1:
            return chunk_with_bos(arr, seq_len, bos_token_id)
        return chunk(arr, seq_len)

    data = as_token_source(data)
    if isinstance(data, TokenData):
        return chunk(data.sequences, seq_len)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return cut(data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data)
    if isinstance(data, (str, os.PathLike)):
        if isinstance(data, str) and not os.path.exists(data) and _looks_like_hub_name(data):
            docs = _hf_documents(data, split, text_column)
            return cut(tokenize_documents(docs, *_text_args(tokenizer, eot_token_id), max_tokens))
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise TypeError(f"data must be a token tensor/array, a path, a list of paths, a TokenData or a dataset "
                        f"name; got {type(data).__name__}")
    files = _expand_paths([Path(p) for p in data])
    kinds = {"tokens" if f.suffix in TOKEN_EXT else "text" for f in files}
    if len(kinds) > 1:
        raise ValueError("data mixes .npy token arrays and text files; pass one kind")
    if kinds == {"tokens"}:
        arrays = [cut(np.load(f, mmap_mode="r")) for f in files]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    docs = _read_documents(files, text_column)
    return cut(tokenize_documents(docs, *_text_args(tokenizer, eot_token_id), max_tokens))


def _text_args(tokenizer, eot_token_id):
    if tokenizer is None:
        raise ValueError("text data needs a tokenizer: the model has none (model.tokenizer is None); "
                         "pass token arrays (.npy) or a model with a tokenizer")
    if eot_token_id is None:
        eot_token_id = getattr(tokenizer, "eos_token_id", None)
    if eot_token_id is None:
        raise ValueError("documents are joined with end-of-text, but the tokenizer has no eos_token_id: "
                         "pass eot_token_id=")
    return tokenizer, int(eot_token_id)


def split_holdout(sequences: np.ndarray, n_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): the last `n_eval` sequences are held out for evaluation."""
    if n_eval < 1 or n_eval >= sequences.shape[0]:
        raise ValueError(f"n_eval must lie in [1, {sequences.shape[0] - 1}] for {sequences.shape[0]} sequences, "
                         f"got {n_eval}")
    return sequences[:-n_eval], sequences[-n_eval:]
