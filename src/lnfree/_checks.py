"""Input validation shared by every analysis: tokens, attention masks, models, names, ints, batches.

One place for the checks, so they cannot drift apart between modules. Errors name the argument,
what was given and what is allowed.

Padding: a mask is explicit (``attention_mask=`` [batch, pos], 1 = real token) or comes with the
tokens (`TokenBatch` from `tokenize`); it is never guessed from token ids, since a real token may
share the pad id.

    >>> import torch
    >>> from lnfree._checks import check_attention_mask, last_positions
    >>> mask = check_attention_mask(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]]))
    >>> last_positions(mask, 4).tolist()
    [1, 3]
"""

from __future__ import annotations

import hashlib
import importlib.util
import weakref
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int

from lnfree.tokenizer import TokenizerId, tokenizer_id, with_tokenizer


# ---- plain values ------------------------------------------------------------------------------
def positive_int(value, name: str, *, allow_zero: bool = False) -> int:
    """``value`` as an int, refusing bools, floats and (unless allowed) zero or negatives."""
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    return int(value)


def check_choice(value, allowed: Sequence, name: str):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a confidence level in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


def check_names(names, n: int = 2) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or len(names) != n:
        raise ValueError(f"names must be a tuple of {n} strings, one per model; got {names!r}")
    if not all(isinstance(s, str) and s for s in names) or len(set(names)) != n:
        raise ValueError(f"names must be {n} distinct non-empty strings; got {names!r}")
    return tuple(names)


def check_device(device) -> Optional[torch.device]:
    """Refuse a CUDA/MPS device this machine lacks, saying what to pass instead."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda'): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available on this machine; pass device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; pass device='cpu'")
    return dev


# ---- tokens and masks --------------------------------------------------------------------------
class TokenBatch(NamedTuple):
    """Token ids with the attention mask their tokenizer produced (1 = real token, 0 = padding)."""

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]


def _cfg(model_or_cfg):
    return getattr(model_or_cfg, "cfg", model_or_cfg)


def check_tokens(model, tokens, *, name: str = "tokens", min_pos: int = 1) -> Int[torch.Tensor, "batch pos"]:
    """Validate a token batch: [batch, pos] integer ids inside the vocabulary and the context.

    Accepts a tensor, an integer numpy array or a nested list; a 1-d input is one sequence.
    """
    if isinstance(tokens, TokenBatch):
        tokens = tokens.tokens
    check_tokenizer(model, tokens, name=name)
    if isinstance(tokens, np.ndarray):
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"{name} must be integer token ids, got a numpy array of dtype {tokens.dtype}")
        tokens = torch.from_numpy(tokens.astype(np.int64))
    elif isinstance(tokens, (list, tuple)):
        try:
            tokens = torch.tensor(tokens)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{name}: a list of token ids must be rectangular ints ({e}); pad the rows and "
                            "pass attention_mask=, or use lnfree.tokenize(model, texts)") from None
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids [batch, pos] (or a list / numpy array), "
                        f"got {type(tokens).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"{name} must have shape [batch, pos] with batch, pos >= 1, got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    cfg = _cfg(model)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.d_vocab:
        raise ValueError(f"{name}: token ids must lie in [0, {cfg.d_vocab}); got min {lo}, max {hi}")
    if tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"{name}: sequences of {tokens.shape[1]} tokens exceed the context length n_ctx={cfg.n_ctx}")
    if tokens.shape[1] < min_pos:
        raise ValueError(f"{name} need at least {min_pos} positions, got shape {tuple(tokens.shape)}")
    return tokens.long()


def check_tokenizer(model, tokens, *, name: str = "tokens") -> None:
    """Refuse token ids written by a tokenizer other than the model's (ids of one vocabulary read in another).

    Only `Tokens` (from `tokenize`, `zoo.heldout`, `tasks.ioi`) and the IOI batches and metrics built
    on them know their tokenizer (a `tokenizer_id`); plain tensors, lists and arrays pass, as does
    any model without a tokenizer attached.
    """
    source = getattr(tokens, "tokenizer_id", None)
    if not isinstance(source, TokenizerId):
        return
    model_tok = getattr(model, "tokenizer", None)
    own = tokenizer_id(model_tok, tokenizer_label(model)) if model_tok is not None else None
    if own is None or own.fingerprint == source.fingerprint:
        return
    raise ValueError(
        f"{name} came from {source}, but the model reads them with {own}: the same ids stand for other "
        "text. Tokenize for this model (lnfree.tokenize(model, texts), zoo.heldout(name, model=model), "
        "tasks.ioi(model, n)), or pass tokens.plain() if these ids really are in the model's vocabulary")


def tokenizer_label(model) -> str:
    """How messages name a model's tokenizer, e.g. "the tokenizer of tiny-ln"."""
    return f"the tokenizer of {getattr(_cfg(model), 'model_name', None) or 'the model'}"


def check_attention_mask(tokens: torch.Tensor, attention_mask, *, name: str = "attention_mask"
                         ) -> Optional[Bool[torch.Tensor, "batch pos"]]:
    """Validate a padding mask for ``tokens``; None stays None (no padding).

    Each row's real tokens must be one contiguous run (left or right padding), at least one token.
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, np.ndarray):
        attention_mask = torch.from_numpy(attention_mask)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [batch, pos] of 0/1 (1 = real token), "
                        f"got {type(attention_mask).__name__}")
    if attention_mask.ndim == 1 and tokens.shape[0] == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"{name} must have the tokens' shape {tuple(tokens.shape)}, got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
    mask = attention_mask.bool().to(tokens.device)
    n_real = mask.sum(1)
    if bool((n_real == 0).any()):
        raise ValueError(f"{name}: rows {torch.nonzero(n_real == 0).flatten().tolist()} have no real token")
    first = mask.int().argmax(1)
    pos = torch.arange(mask.shape[1], device=mask.device)
    contiguous = (mask == ((pos >= first[:, None]) & (pos < (first + n_real)[:, None]))).all(1)
    if not bool(contiguous.all()):
        raise ValueError(f"{name}: the real tokens of rows {torch.nonzero(~contiguous).flatten().tolist()} are not "
                         "one contiguous run; only left or right padding is supported")
    return mask


def resolve_batch(model, tokens, attention_mask=None, *, name: str = "tokens", min_pos: int = 1
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(tokens, mask) from a token tensor / list / `TokenBatch` and an optional explicit mask."""
    if isinstance(tokens, TokenBatch):
        if attention_mask is not None:
            raise ValueError(f"{name} is a TokenBatch, which carries its attention mask; do not also pass attention_mask=")
        tokens, attention_mask = tokens
    tokens = check_tokens(model, tokens, name=name, min_pos=min_pos)
    mask = check_attention_mask(tokens, attention_mask)
    if mask is not None and min_pos > 1 and int(mask.sum(1).min()) < min_pos:
        raise ValueError(f"{name}: every row needs at least {min_pos} real tokens; the shortest has {int(mask.sum(1).min())}")
    return tokens, mask


def forward_kwargs(model, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> dict:
    """Keyword arguments that make a TransformerLens forward use ``mask`` (and never guess one).

    With a left-padding tokenizer and no mask, TransformerLens derives a mask from pad ids; an
    all-ones mask stops that (an unpadded row may contain the pad id as a real token).
    """
    if mask is not None:
        return {"attention_mask": mask.long()}
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, "padding_side", None) == "left":
        return {"attention_mask": torch.ones_like(tokens)}
    return {}


def last_positions(mask: Optional[torch.Tensor], seq_len: int, n: Optional[int] = None) -> Int[torch.Tensor, "batch"]:
    """Index of each row's last real token (``seq_len - 1`` for every row without a mask)."""
    if mask is None:
        return torch.full((n if n is not None else 1,), seq_len - 1, dtype=torch.long)
    pos = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, pos, -1).max(1).values.long()


def next_token_mask(mask: Optional[torch.Tensor]) -> Optional[Bool[torch.Tensor, "batch pos_minus_1"]]:
    """Which next-token predictions count: position t predicts t + 1, both real."""
    return None if mask is None else mask[:, :-1] & mask[:, 1:]


def tokenize(model, texts: Sequence[str], *, prepend_bos: Optional[bool] = None,
             padding_side: Optional[str] = None) -> TokenBatch:
    """Tokenize strings with the model's tokenizer, keeping the attention mask it produced.

    Example:
        >>> batch = lnfree.tokenize(model, ["It was a fine morning.", "A much longer sentence here."])  # doctest: +SKIP
        >>> lnfree.cross_entropy(model, batch).per_sequence                                             # doctest: +SKIP
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer attached: pass token ids instead, or set model.tokenizer")
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts) if isinstance(texts, (list, tuple, Iterator)) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts must be a string or a non-empty list of strings, got {texts!r}")
    side = padding_side or getattr(tok, "padding_side", None) or "right"
    check_choice(side, ("left", "right"), "padding_side")
    tokens = model.to_tokens(list(texts), prepend_bos=prepend_bos if prepend_bos is not None else model.cfg.default_prepend_bos,
                             padding_side=side)
    # Lengths from tokenizing each text alone: the mask comes from the tokenizer, not from pad ids.
    lengths = [model.to_tokens(t, prepend_bos=prepend_bos if prepend_bos is not None else model.cfg.default_prepend_bos).shape[1]
               for t in texts]
    pos = torch.arange(tokens.shape[1])
    n = torch.tensor(lengths)[:, None]
    mask = pos[None] < n if side == "right" else pos[None] >= tokens.shape[1] - n
    return TokenBatch(with_tokenizer(tokens, tok, tokenizer_label(model)), mask.long().to(tokens.device))


# ---- models ------------------------------------------------------------------------------------
def ln_state_label(model) -> str:
    """"LN-free" (every site removed), "LN" (every site live), "LN frozen" or "LN mixed"."""
    from lnfree.norm_algebra import is_rms  # here: it loads TransformerLens (lnfree.layernorm)

    modes = set(model.ln_modes().values()) if hasattr(model, "ln_modes") else {"live"}
    if not modes or modes == {"removed"}:
        return "norm-free" if is_rms(model) else "LN-free"
    if modes == {"live"}:
        return "RMSNorm" if is_rms(model) else "LN"
    return "frozen" if modes == {"frozen"} else "mixed"


def model_label(model) -> str:
    """A model's display label from its name and norm state, e.g. ``"tiny-ln (LN)"``."""
    name = getattr(model.cfg, "model_name", None) or "model"
    return f"{name} ({ln_state_label(model)})"


_MODEL_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_id(model) -> str:
    """A short fingerprint of a model's weights and norm state: results from different models differ.

    Cached per model while its fingerprinted tensors are the same objects at the same version
    (in-place edits bump a tensor's version; remove_ln writes new Parameters), since hashing
    |W_E| and |W_U| costs about a second for a 49k-token vocabulary.
    """
    params = (model.W_E, model.W_U, model.blocks[0].attn.W_Q if model.cfg.n_layers else model.W_E)
    key = (tuple((id(p), p._version) for p in params),
           tuple(sorted(model.ln_modes().items())) if hasattr(model, "ln_modes") else (), model.cfg.model_name)
    try:
        cached = _MODEL_IDS.get(model)
    except TypeError:  # not weak-referenceable: no cache
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = _model_digest(model)
    try:
        _MODEL_IDS[model] = (key, digest)
    except TypeError:
        pass
    return digest


def _model_digest(model) -> str:
    h = hashlib.sha1()
    h.update(repr((model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab)).encode())
    h.update(repr(sorted(model.ln_modes().items())).encode() if hasattr(model, "ln_modes") else b"")
    with torch.no_grad():
        for p in (model.W_E, model.W_U, model.blocks[0].attn.W_Q if model.cfg.n_layers else model.W_E):
            flat = p.detach().reshape(-1)
            h.update(np.float64(flat[:4096].double().sum().item()).tobytes())
            h.update(np.float64(_abs_sum(flat)).tobytes())
    return h.hexdigest()[:12]


def _abs_sum(flat: torch.Tensor, chunk: int = 1 << 20) -> float:
    """sum |x| in float64, in chunks: a float64 copy of W_E / W_U would be the biggest allocation of
    an analysis (226 MiB for a 49k x 576 embedding) and dominate its peak memory."""
    return sum(float(torch.linalg.vector_norm(flat[i:i + chunk], 1, dtype=torch.float64))
               for i in range(0, flat.numel(), chunk))


def compare_names(model_a, model_b, names=None) -> tuple[str, str]:
    """Labels for two models: ``names`` when given, else from each model's name and norm state."""
    if names is not None:
        return check_names(names)  # type: ignore[return-value]
    a, b = model_label(model_a), model_label(model_b)
    return (a, b) if a != b else (f"{a} [a]", f"{b} [b]")


def check_same_vocab(model_a, model_b, names: Sequence[str] = ("model_a", "model_b")) -> None:
    """Two models must share vocabulary and tokenizer for token-level comparisons."""
    va, vb = model_a.cfg.d_vocab, model_b.cfg.d_vocab
    if va != vb:
        raise ValueError(f"{names[0]} and {names[1]} have different vocabularies (d_vocab {va} vs {vb}); "
                         "compare models that share a tokenizer")
    ta, tb = getattr(model_a, "tokenizer", None), getattr(model_b, "tokenizer", None)
    if ta is not None and tb is not None and ta is not tb:
        probe = "The quick brown fox, 1234 -- Mary and John went to the store."
        if ta(probe)["input_ids"] != tb(probe)["input_ids"] or len(ta) != len(tb):
            raise ValueError(f"{names[0]} and {names[1]} have different tokenizers (they encode the same text "
                             "differently); compare models that share a tokenizer")


def check_same_model(a, b, what: str = "results") -> None:
    """Refuse to combine two results computed on different models."""
    ia, ib = getattr(a, "model_id", None), getattr(b, "model_id", None)
    if ia is not None and ib is not None and ia != ib:
        raise ValueError(f"{what} come from different models ({getattr(a, 'model_name', '?')} [{ia}] vs "
                         f"{getattr(b, 'model_name', '?')} [{ib}]); compute both on the same model")


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains {n} non-finite values (NaN or inf); the result would be meaningless")
    return x


# ---- long work ---------------------------------------------------------------------------------
def progress(iterable, *, enabled: bool = True, desc: Optional[str] = None, total: Optional[int] = None):
    """A tqdm bar that works in Jupyter without ipywidgets (tqdm.auto would warn "IProgress not found")."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(iterable, disable=not enabled, desc=desc, total=total)


def batches(n: int, batch_size, *, enabled: bool = True, desc: Optional[str] = None) -> Iterator[slice]:
    """Slices of ``range(n)`` in steps of ``batch_size``, with a progress bar."""
    batch_size = positive_int(batch_size, "batch_size")
    starts = range(0, n, batch_size)
    for start in progress(starts, enabled=enabled, desc=desc, total=len(starts)):
        yield slice(start, min(start + batch_size, n))
