"""Mean ablation of entropy neurons as the paper does it (mech_interp/entropy_neurons/ablate_all_models.py),
with Stolfo et al.'s LN-mediated fraction per token alongside lnfree's own."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lnfree._checks import batches, check_tokens, model_id, model_label, positive_int
from lnfree._results import Result, result
from lnfree.analysis.confidence import ablate_neurons, find_entropy_neurons
from lnfree.paper._process import paper_processed
from lnfree.paper.stats import median_iqr
from lnfree.stats import Estimate, bootstrap

#: ablate_all_models.py:504-505: the paper's last-layer entropy neurons of GPT-2 Small and Medium.
PAPER_NEURONS = {"small": (584, 2123, 2870), "medium": (1083, 1108, 3144)}
_SHAPES = {(12, 768, 3072, 50257): "small", (24, 1024, 4096, 50257): "medium"}
#: ablate_all_models.py:191, 274: the LN the paper re-applies adds 1e-12 to the variance.
PAPER_LN_EPS = 1e-12


def paper_neurons(model) -> Optional[tuple[int, ...]]:
    """The paper's neurons for a GPT-2 Small / Medium-shaped model, else None."""
    c = model.cfg
    size = _SHAPES.get((c.n_layers, c.d_model, c.d_mlp, c.d_vocab))
    return PAPER_NEURONS.get(size)


def _top_neurons(model, layer: int) -> tuple[int, ...]:
    """lnfree's three highest-scoring entropy neurons of `layer` (ints, whatever `top` returns)."""
    return tuple(n for _, n in find_entropy_neurons(model, layer=layer).pairs(3))


@torch.no_grad()
def _paper_means(proc, tokens, layer: int, batch_size: int) -> torch.Tensor:
    """Mean hook_post activation over every position but the last of every row (ablate_all_models.py:116-118, 233)."""
    post = f"blocks.{layer}.mlp.hook_post"
    total = torch.zeros(proc.cfg.d_mlp, dtype=torch.float64)
    for sl in batches(tokens.shape[0], batch_size, enabled=False):
        _, cache = proc.run_with_cache(tokens[sl].to(proc.cfg.device), names_filter=[post])
        total += cache[post][:, :-1].double().sum((0, 1)).cpu()
    return (total / (tokens.shape[0] * (tokens.shape[1] - 1))).to(proc.cfg.dtype)


@result
class PaperEntropyAblation(Result):
    """Per-token effects of mean-ablating each neuron alone (the paper's ``run_ablation``).

    loss_effect, entropy_effect: [neuron, token] |CE_clean - CE_ablated| and |H_clean - H_ablated|
    (final LN recomputed: the total effect); loss_direct, entropy_direct: [neuron, token] signed
    changes with the final LN scale frozen at the clean token's value; loss_total, entropy_total:
    the signed total changes. Tokens: every position but the last of every sequence;
    token_sequence: [token] the sequence each token comes from (the bootstrap's resampling unit).
    """

    layer: int
    neurons: tuple[int, ...]
    labels: tuple[str, ...]
    mean_activation: Float[torch.Tensor, "neuron"]
    loss_effect: Float[torch.Tensor, "neuron token"]
    entropy_effect: Float[torch.Tensor, "neuron token"]
    loss_total: Float[torch.Tensor, "neuron token"]
    entropy_total: Float[torch.Tensor, "neuron token"]
    loss_direct: Float[torch.Tensor, "neuron token"]
    entropy_direct: Float[torch.Tensor, "neuron token"]
    lnfree_fraction: tuple[Estimate, ...]
    token_sequence: Int[torch.Tensor, "token"]
    n_boot: int
    level: float
    seed: int
    model_name: str = ""
    model_id: str = ""

    def _i(self, neuron) -> int:
        if neuron in self.neurons:
            return self.neurons.index(neuron)
        if neuron in self.labels:
            return self.labels.index(neuron)
        raise ValueError(f"neuron must be one of {self.neurons} or {self.labels}, got {neuron!r}")

    def summary(self, neuron, metric: str = "loss") -> Estimate:
        """Median [IQR] of the per-token |change| (ablate_all_models.py:486-495)."""
        eff = {"loss": self.loss_effect, "entropy": self.entropy_effect}
        if metric not in eff:
            raise ValueError(f"metric must be 'loss' or 'entropy', got {metric!r}")
        return median_iqr(eff[metric][self._i(neuron)])

    def stolfo_fraction(self, neuron, metric: str = "loss") -> Estimate:
        """Stolfo et al.'s LN-mediated share, 1 - mean|direct| / mean|total| over tokens (bootstrap
        CI over sequences: a sequence's tokens are resampled together). 0 for an LN-free model,
        whose direct and total effects coincide."""
        d = {"loss": (self.loss_direct, self.loss_total), "entropy": (self.entropy_direct, self.entropy_total)}
        if metric not in d:
            raise ValueError(f"metric must be 'loss' or 'entropy', got {metric!r}")
        direct, total = (x[self._i(neuron)].abs() for x in d[metric])
        return bootstrap(direct, lambda a, b: 1.0 - a.mean() / b.mean(), paired=total, clusters=self.token_sequence,
                         n_boot=self.n_boot, level=self.level, seed=self.seed)

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron and metric: median, q1, q3 (the paper's table), Stolfo and lnfree fractions."""
        rows = []
        for i, lab in enumerate(self.labels):
            for metric in ("loss", "entropy"):
                s, f = self.summary(self.neurons[i], metric), self.stolfo_fraction(self.neurons[i], metric)
                rows.append({"neuron": lab, "metric": metric, "median": s.value, "q1": s.low, "q3": s.high,
                             "stolfo_fraction": f.value,
                             "lnfree_fraction": self.lnfree_fraction[i].value if metric == "entropy" else float("nan")})
        return pd.DataFrame(rows)

    def top(self, k: int = 10) -> pd.DataFrame:
        """Neurons ranked by median |dCE|."""
        k = positive_int(k, "k")
        f = self.to_frame()
        return f[f.metric == "loss"].sort_values("median", ascending=False).head(k).reset_index(drop=True)

    def plot(self, metric: str = "loss"):
        """Box plot of the per-token |change| per neuron (the paper's all_models_*_effect figure)."""
        import plotly.graph_objects as go

        eff = self.loss_effect if metric == "loss" else self.entropy_effect
        fig = go.Figure([go.Box(y=eff[i].numpy(), name=lab, boxpoints=False) for i, lab in enumerate(self.labels)])
        fig.update_layout(title=f"{self.model_name}: entropy-neuron mean ablation", xaxis_title="neuron",
                          yaxis_title="|Δ CE loss|" if metric == "loss" else "|Δ entropy|")
        return fig


@torch.no_grad()
def entropy_neuron_ablation(model, tokens: Int[torch.Tensor, "sample pos"], *, neurons: Optional[Sequence[int]] = None,
                            batch_size: int = 4, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                            ) -> PaperEntropyAblation:
    """Mean-ablate each last-layer neuron alone and record per-token |dCE| and |dH|, as the paper does.

    On the paper-processed copy; `neurons` default: the paper's for GPT-2 Small (584, 2123, 2870)
    and Medium (1083, 1108, 3144), else lnfree's top 3 entropy neurons (`find_entropy_neurons`).
    The mean is over every token but the last of each sequence (ablate_all_models.py:116-118, 233). The
    final LN is re-applied with variance + 1e-12 as the paper's simulation does (its
    ``run_simulation``; the model's own eps is 1e-5). The ablation is `lnfree.ablate_neurons` (its
    per-token total and direct effects, the direct one with the final LN scale frozen at the clean
    token's value), which gives Stolfo et al.'s per-token LN-mediated fraction and lnfree's
    per-prompt one. The entropy is exact; the paper's log(p + 1e-10) shifts H by at most
    d_vocab x 1e-10 and its changes by far less.

    Example:
        >>> import lnfree
        >>> model = lnfree.load("tiny-ln", device="cpu")
        >>> res = entropy_neuron_ablation(model, lnfree.zoo.heldout("persuasion")[:2, :32], neurons=[5, 9], n_boot=50)
        >>> res.loss_effect.shape, res.summary(5, "loss").level    # [neuron, token]; median [IQR]
        (torch.Size([2, 62]), 0.5)
    """
    proc = paper_processed(model)
    tokens = check_tokens(proc, tokens, min_pos=2)
    layer = proc.cfg.n_layers - 1
    if neurons is None:
        neurons = paper_neurons(proc) or _top_neurons(model, layer)
    neurons = tuple(int(n) for n in neurons)
    if not neurons or any(not 0 <= n < proc.cfg.d_mlp for n in neurons):
        raise ValueError(f"neurons must be indices in [0, {proc.cfg.d_mlp}) of the last MLP layer, got {neurons}")
    if proc.ln_mode("ln_final") == "live":
        proc.ln_final.eps = PAPER_LN_EPS  # the paper's re-applied LN (the copy only)
    batch_size = positive_int(batch_size, "batch_size")
    means = _paper_means(proc, tokens, layer, batch_size)[list(neurons)]
    abl = ablate_neurons(proc, tokens, list(neurons), layer=layer, means=means, batch_size=batch_size,
                         n_boot=n_boot, level=level, seed=seed)
    cat = {f"{m[0]}{e[0]}": torch.stack([abl.per_token(i, metric, e).double() for i in range(len(neurons))])
           for m, metric in (("l", "ce"), ("h", "entropy")) for e in ("total", "direct")}
    fractions = tuple(abl.ln_mediated_fraction(i, "entropy") for i in range(len(neurons)))
    return PaperEntropyAblation(
        layer=layer, neurons=neurons, labels=tuple(f"L{layer}N{n}" for n in neurons), mean_activation=means.cpu(),
        loss_effect=cat["lt"].abs(), entropy_effect=cat["ht"].abs(), loss_total=cat["lt"], entropy_total=cat["ht"],
        loss_direct=cat["ld"], entropy_direct=cat["hd"], lnfree_fraction=fractions,
        token_sequence=abl.token_prompt.cpu(), n_boot=n_boot, level=level,
        seed=seed, model_name=model_label(model), model_id=model_id(model),
    )
