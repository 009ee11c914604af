"""What Hugging Face GPT-2's training forward has and a TransformerLens forward lacks: dropout and tied
embeddings (the paper's code fine-tuned an HF ``GPT2LMHeadModel`` in train mode; issue 22.4).

- `dropout(model, p)`: while active, drops (inverted dropout, rate p) the embeddings entering block 0
  (HF's ``embd_pdrop`` on token + position embeddings), every attention pattern (``attn_pdrop``, after
  the softmax) and every residual write, attention and MLP output (``resid_pdrop``). The trainer
  enters it around its training forward passes only, so the sigma EMA sees dropped-out activations as
  the paper's did, and evaluation, rollback checks and the returned model never drop anything.
- `tie_embeddings(model)` / `untie_embeddings(model)`: the unembedding reads ``W_E^T`` (one matrix,
  both gradients) instead of its own ``W_U``; untied at the end of the run, before ``remove_ln`` folds
  ``ln_final`` into ``W_U``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

_TIE_HOOK = "_lnfree_tie_handle"


def dropout_sites(model) -> list[str]:
    """Hook names dropout applies to, in forward order: block 0's input, then per block the attention
    pattern, the attention output and the MLP output (those the model has)."""
    names = ["blocks.0.hook_resid_pre"]
    for i in range(model.cfg.n_layers):
        names += [f"blocks.{i}.attn.hook_pattern", f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
    return [n for n in names if n in model.hook_dict]


@contextlib.contextmanager
def dropout(model, p: float) -> Iterator[None]:
    """Inverted dropout with rate `p` at `dropout_sites` while the context is open (p = 0: nothing).

    Example:
        >>> import torch, lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> t = torch.tensor([[1, 2, 3, 4]])
        >>> with dropout(model, 0.5):
        ...     noisy = model(t)
        >>> bool(torch.equal(model(t), model(t))), bool(torch.allclose(noisy, model(t)))
        (True, False)
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a rate in [0, 1), e.g. 0.1 (HF GPT-2's), got {p!r}")
    if p == 0:
        yield
        return

    def drop(module, inputs, output):
        return F.dropout(output, p, training=True)

    handles = [model.hook_dict[n].register_forward_hook(drop) for n in dropout_sites(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def embeddings_tied(model) -> bool:
    """Whether the unembedding is W_E^T: tied by `tie_embeddings`, or equal (as loaded from a config that ties)."""
    if hasattr(model.unembed, _TIE_HOOK):
        return True
    W_E, W_U = model.embed.W_E, model.unembed.W_U
    return W_U.shape == W_E.T.shape and bool(torch.equal(W_U, W_E.T))


def resolve_tie(value, model) -> bool:
    """A recipe's ``tie_embeddings``: True / False, or "auto" (the paper's recipe): tie when the model's
    embeddings are tied as loaded (HF GPT-2, any model whose HF config ties them)."""
    if value == "auto":
        return embeddings_tied(model)
    if not isinstance(value, bool):
        raise ValueError(f"tie_embeddings must be True, False or 'auto', got {value!r}")
    return value


def tie_embeddings(model) -> None:
    """Make the unembedding read W_E^T (its own W_U parameter goes); needs W_U == W_E^T already.

    Example:
        >>> import lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> model.unembed.W_U.data = model.embed.W_E.detach().T.clone()   # as a tying HF config loads it
        >>> tie_embeddings(model)
        >>> "unembed.W_U" in dict(model.named_parameters())
        False
        >>> untie_embeddings(model); "unembed.W_U" in dict(model.named_parameters())
        True
    """
    if hasattr(model.unembed, _TIE_HOOK):
        return
    if not embeddings_tied(model):
        raise ValueError("tie_embeddings: this model's W_U is not W_E^T (its config does not tie the embeddings); "
                         "train it untied (recipe={..., 'tie_embeddings': False})")
    del model.unembed.W_U  # the Parameter; the pre-hook supplies W_E^T on every forward

    def read_w_e(module, inputs):
        module.W_U = model.embed.W_E.T

    read_w_e(model.unembed, None)
    setattr(model.unembed, _TIE_HOOK, model.unembed.register_forward_pre_hook(read_w_e))


def untie_embeddings(model) -> None:
    """Give the unembedding its own W_U parameter again, equal to W_E^T now."""
    handle = getattr(model.unembed, _TIE_HOOK, None)
    if handle is None:
        return
    handle.remove()
    delattr(model.unembed, _TIE_HOOK)
    del model.unembed.W_U
    model.unembed.W_U = torch.nn.Parameter(model.embed.W_E.detach().T.clone())
