"""DLA vs direct effect of every attention head, as the paper measures it
(mech_interp/attention_head_attribution/run_analysis.py)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lnfree._checks import check_tokens, model_id, model_label, positive_int
from lnfree._results import Result, result
from lnfree.analysis.dla import direct_logit_attribution
from lnfree.paper._process import paper_processed
from lnfree.paper.stats import crossed_bootstrap_nmae, nmae_pooled
from lnfree.stats import Estimate


NMAE_COLORSCALE = [[0.0, "#ffffff"], [0.25, "#fcbba1"], [0.5, "#fb6a4a"], [0.75, "#cb181d"], [1.0, "#67000d"]]


@result
class PaperDLA(Result):
    """The paper's DLA NMAE: every head, last position, target = the last input token.

    nmae: pooled NMAE (%) over heads x samples, CI from the paper's crossed bootstrap.
    per_head: [head] NMAE (%) of each head (run_analysis.py:212-218); dla, direct_effect: [head, sample].
    """

    nmae: Estimate
    per_head: Float[torch.Tensor, "head"]
    dla: Float[torch.Tensor, "head sample"]
    direct_effect: Float[torch.Tensor, "head sample"]
    labels: tuple[str, ...]
    n_boot: int
    level: float
    seed: int
    model_name: str = ""
    model_id: str = ""

    def to_frame(self) -> pd.DataFrame:
        """One row per head: head, nmae, mean_abs_error, mean_abs_direct_effect."""
        err = (self.dla - self.direct_effect).abs().mean(1)
        return pd.DataFrame({"head": list(self.labels), "nmae": self.per_head.numpy(),
                             "mean_abs_error": err.numpy(),
                             "mean_abs_direct_effect": self.direct_effect.abs().mean(1).numpy()})

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k heads with the largest mean |direct effect|."""
        k = positive_int(k, "k")
        return self.to_frame().sort_values("mean_abs_direct_effect", ascending=False).head(k).reset_index(drop=True)

    def plot(self):
        """Heatmap [layer, head] of per-head NMAE (the paper's per_head_nmae heatmap)."""
        import plotly.graph_objects as go

        n_layers = 1 + max(int(lab[1:].split("H")[0]) for lab in self.labels)
        z = self.per_head.reshape(n_layers, -1).numpy()
        # zero error is white (an LN-free model's all-zero map too, which an auto range would paint mid-scale)
        fig = go.Figure(go.Heatmap(z=z, colorscale=NMAE_COLORSCALE, zmin=0, zmax=max(float(z.max()), 1e-9),
                                   colorbar=dict(title="NMAE (%)")))
        fig.update_layout(title=f"{self.model_name}: per-head NMAE, DLA vs direct effect (overall {self.nmae}%)",
                          xaxis_title="head", yaxis_title="layer")
        return fig


def paper_dla(
    model,
    tokens: Int[torch.Tensor, "sample pos"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    batch_size: int = 5,
    progress: bool = False,
) -> PaperDLA:
    """DLA and direct effect of every head as the paper computes them, with its NMAE.

    On a processed copy (fold_ln, center_writing_weights, center_unembed, fold_value_biases; see
    `paper_processed`): at the last position, target = the last *input* token ``tokens[:, -1]``
    (run_analysis.py:131; the paper's choice, not a next-token label), DLA of each head's
    result through the cached final LN scale, DE = logit(r) - logit(r - head) with the final LN
    recomputed (on an LN-free model: no LN at all). Uses `lnfree.direct_logit_attribution`.

    Differences from run_analysis.py that do not change the number: the DE's LN uses the
    model's eps (GPT-2: 1e-5, the paper's hard-coded value, run_analysis.py:107), and
    arithmetic after the forward pass is float64 (the paper's is float32).

    Example:
        >>> import lnfree
        >>> model, tokens = lnfree.load("tiny-ln", device="cpu"), lnfree.zoo.heldout("persuasion")[:4, :32]
        >>> res = paper_dla(model, tokens, n_boot=100)
        >>> res.dla.shape, res.nmae.value > 0                 # [head, sample]
        (torch.Size([32, 4]), True)
    """
    proc = paper_processed(model)
    tokens = check_tokens(proc, tokens)
    res = direct_logit_attribution(proc, tokens, targets=tokens[:, -1], components="heads", pos=-1,
                                   batch_size=positive_int(batch_size, "batch_size"), progress=progress)
    dla, de = res.dla.double().cpu(), res.direct_effect.double().cpu()
    est = crossed_bootstrap_nmae(dla.numpy(), de.numpy(), n_boot=n_boot, level=level, seed=seed)
    per_head = torch.tensor([nmae_pooled(a[None], d[None]) for a, d in zip(dla.numpy(), de.numpy())])
    return PaperDLA(nmae=est, per_head=per_head, dla=dla, direct_effect=de, labels=tuple(res.labels),
                    n_boot=n_boot, level=level, seed=seed, model_name=model_label(model), model_id=model_id(model))


def dla_nmae(model, tokens: Int[torch.Tensor, "sample pos"], *, n_boot: int = 1000, level: float = 0.95,
             seed: int = 0, batch_size: int = 5) -> Estimate:
    """The paper's DLA NMAE (%) with its crossed-bootstrap CI; see `paper_dla`.

    Example:
        >>> import lnfree
        >>> free = lnfree.load("tiny-lnfree", device="cpu")
        >>> float(dla_nmae(free, lnfree.zoo.heldout("persuasion")[:4, :32], n_boot=50)) < 1e-3   # exact without LN
        True
    """
    return paper_dla(model, tokens, n_boot=n_boot, level=level, seed=seed, batch_size=batch_size).nmae
