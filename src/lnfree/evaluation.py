"""Held-out next-token cross-entropy with a bootstrap confidence interval, and bits per byte.

Used before and after LN removal (`lnfree.removal`), and by anyone comparing models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int

from lnfree.stats import Estimate, bootstrap


@dataclass(frozen=True)
class CEResult:
    """Mean next-token cross-entropy (nats/token) over a token set.

    Attributes:
        mean: mean CE over every counted token, with a bootstrap CI over sequences.
        per_sequence: ``Float[Tensor, "n_seq"]`` mean CE of each sequence.
        labels: ``seq{i}`` for each sequence.
        n_tokens: number of predicted tokens counted.
        settings: the arguments used (batch_size, exclude_position_0, seq_len).
    """

    mean: Estimate
    per_sequence: Float[torch.Tensor, "n_seq"]
    labels: list[str]
    n_tokens: int
    settings: dict = field(default_factory=dict)

    @property
    def value(self) -> float:
        return self.mean.value

    def bits_per_byte(self, n_bytes: int) -> Estimate:
        """Bits per byte, given the number of text bytes the counted tokens cover.

        ``total nats / ln 2 / n_bytes``, with the CI mapped the same way.
        """
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes <= 0:
            raise ValueError(f"n_bytes must be a positive int (bytes of text predicted), got {n_bytes!r}")
        k = self.n_tokens / (math.log(2) * n_bytes)
        m = self.mean
        return Estimate(m.value * k, m.low * k, m.high * k, m.n, m.level)

    def to_frame(self):
        """One row per sequence: sequence label and its mean CE (nats/token)."""
        import pandas as pd

        return pd.DataFrame({"sequence": self.labels, "metric": "cross_entropy",
                             "value": self.per_sequence.double().numpy()})

    def plot(self):
        """Histogram of per-sequence CE with the mean marked (plotly Figure, not shown)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.per_sequence.numpy(), name="sequences"))
        fig.add_vline(x=self.mean.value, line_dash="dash", annotation_text=f"mean {self.mean}")
        fig.update_layout(title="Cross-entropy per sequence", xaxis_title="nats/token", yaxis_title="sequences")
        return fig

    def top(self, k: int = 10):
        """The k sequences with the highest CE (frame rows)."""
        return self.to_frame().nlargest(k, "value")

    def __str__(self) -> str:
        return f"CE {self.mean} nats/token over {self.n_tokens} tokens"


@torch.no_grad()
def cross_entropy(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    batch_size: int = 16,
    progress: bool = False,
    exclude_position_0: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> CEResult:
    """Next-token cross-entropy of `model` (any HookedTransformer) on `tokens`.

    The prediction made at position p is scored against token p+1. `exclude_position_0` drops the
    prediction made at position 0 (the one that sees a single token). The CI resamples whole
    sequences.

    Example:
        >>> res = cross_entropy(model, tokens)                # doctest: +SKIP
        >>> print(res.mean, res.bits_per_byte(n_bytes=4 * tokens[:, 1:].numel()))  # doctest: +SKIP
    """
    if isinstance(tokens, np.ndarray):
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must hold integer token ids, got a numpy array of dtype {tokens.dtype}")
        tokens = torch.from_numpy(tokens.astype(np.int64))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tokens = _check(model, tokens)
    first = 1 if exclude_position_0 else 0
    if tokens.shape[1] - 1 - first < 1:
        raise ValueError(f"sequences of {tokens.shape[1]} tokens leave no prediction to score "
                         f"(exclude_position_0={exclude_position_0})")
    from tqdm.auto import tqdm

    device = _device(model)
    was_training = model.training
    model.eval()
    per_seq = []
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc="cross-entropy"):
            batch = tokens[start : start + batch_size].to(device)
            logits = model(batch, return_type="logits")
            logp = torch.log_softmax(logits[:, first:-1].float(), dim=-1)
            nll = -logp.gather(-1, batch[:, first + 1 :, None])[..., 0]
            per_seq.append(nll.double().mean(-1).cpu())
    finally:
        model.train(was_training)
    per_seq = torch.cat(per_seq)
    n_pred = tokens.shape[1] - 1 - first
    return CEResult(
        mean=bootstrap(per_seq, n_boot=n_boot, seed=seed),
        per_sequence=per_seq.float(),
        labels=[f"seq{i}" for i in range(per_seq.shape[0])],
        n_tokens=int(per_seq.shape[0] * n_pred),
        settings={"batch_size": batch_size, "exclude_position_0": exclude_position_0,
                  "seq_len": int(tokens.shape[1])},
    )


def _check(model, tokens) -> torch.Tensor:
    from lnfree.model import LNFreeTransformer

    # the validation only reads model.cfg, so it serves any HookedTransformer
    return LNFreeTransformer._check_tokens(model, tokens)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
