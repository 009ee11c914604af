"""Running estimate of each live LN site's scale (sigma_avg), frozen when the site is removed.

Per micro-batch, each site's input std is averaged over the micro-batch's tokens (recorded with
`LNFreeTransformer.recording_ln_std`) and folded into an exponential moving average:
``ema = momentum * ema + (1 - momentum) * batch_mean`` (the first micro-batch initialises it).

With several processes, the per-micro-batch (sum, count) pairs of every rank are combined with
one all-reduce per optimizer step and applied in global micro-batch order, so every rank holds
the same EMA and a distributed run tracks exactly what a single process with the same global
batch tracks.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch


class SigmaEMA:
    """Exponential moving average of the mean per-token std, one per tracked site.

    Example:
        >>> ema = SigmaEMA(["ln_final"], momentum=0.9)
        >>> ema.update({"ln_final": 2.0}); ema.update({"ln_final": 4.0})
        >>> round(ema.value("ln_final"), 6)
        2.2
    """

    def __init__(self, sites: Sequence[str], momentum: float = 0.9,
                 site_momentum: Optional[Mapping[str, float]] = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        # per-site overrides (the paper's code updates ln1's EMA three times per forward: momentum ** 3)
        self.site_momentum = {s: float(m) for s, m in (site_momentum or {}).items()}
        self.values: dict[str, Optional[float]] = {s: None for s in sites}
        self.n_updates: dict[str, int] = {s: 0 for s in sites}
        self.first: dict[str, float] = {}  # each site's first micro-batch mean: the sane-range reference

    @property
    def sites(self) -> list[str]:
        return list(self.values)

    def update(self, means: Mapping[str, float]) -> None:
        """Fold one micro-batch's mean std per site in; sites not tracked are ignored."""
        for site, mean in means.items():
            if site not in self.values:
                continue
            if not math.isfinite(mean):
                raise FloatingPointError(f"non-finite LN input std {mean} at {site}")
            old = self.values[site]
            self.first.setdefault(site, float(mean))
            m = self.site_momentum.get(site, self.momentum)
            self.values[site] = mean if old is None else m * old + (1 - m) * mean
            self.n_updates[site] += 1

    def value(self, site: str) -> float:
        """Current EMA of `site`; raises if it has seen no data yet."""
        if site not in self.values:
            raise ValueError(f"site {site!r} is not tracked; tracked sites are {self.sites}")
        v = self.values[site]
        if v is None:
            raise ValueError(f"no data seen yet for {site}: its sigma EMA is empty (remove it at step >= 1)")
        return v

    def drop(self, sites: Sequence[str]) -> None:
        """Stop tracking `sites` (once frozen their sigma no longer changes)."""
        for s in sites:
            self.values.pop(s, None)
            self.n_updates.pop(s, None)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "values": dict(self.values), "n_updates": dict(self.n_updates),
                "first": dict(self.first), "site_momentum": dict(self.site_momentum)}

    def load_state_dict(self, state: Mapping) -> None:
        self.momentum = float(state["momentum"])
        self.values = {s: (None if v is None else float(v)) for s, v in state["values"].items()}
        self.n_updates = {s: int(v) for s, v in state["n_updates"].items()}
        self.first = {s: float(v) for s, v in state.get("first", {}).items()}
        self.site_momentum = {s: float(v) for s, v in state.get("site_momentum", {}).items()}


def stats_tensor(sums: Mapping[str, tuple[float, int]], sites: Sequence[str]) -> torch.Tensor:
    """[n_sites, 2] float64 (sum of std, token count) from `LNStdStats.sums`, zeros where absent."""
    out = torch.zeros(len(sites), 2, dtype=torch.float64)
    for i, site in enumerate(sites):
        if site in sums:
            out[i, 0], out[i, 1] = sums[site]
    return out


def global_micro_batch_means(
    local: torch.Tensor, sites: Sequence[str], group=None, device: Optional[torch.device] = None
) -> list[dict[str, float]]:
    """Per-site mean std of every micro-batch of the step, across ranks, in global order.

    `local` is [k_local, n_sites, 2] (sum, count) for this rank's micro-batches. Rank r's
    micro-batch j is global micro-batch ``r * k_local + j`` (ranks take contiguous slices of the
    global batch). One all-reduce of a [world, k_local, n_sites, 2] tensor combines them.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        full = torch.zeros((world,) + tuple(local.shape), dtype=torch.float64, device=device)
        full[rank] = local.to(device)
        dist.all_reduce(full, group=group)
        local = full.reshape(-1, *local.shape[1:]).cpu()
    out = []
    for mb in local:
        out.append({s: float(mb[i, 0] / mb[i, 1]) for i, s in enumerate(sites) if mb[i, 1] > 0})
    return out
