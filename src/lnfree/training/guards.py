"""Divergence detection from the first step: a diverged state is never kept as good.

`DivergenceGuard.check(loss, ce=...)` flags, from step 0 on:

- a non-finite loss, cross-entropy or gradient norm;
- a loss (or CE) above ``factor`` x the run's initial value and above initial + ``margin``: an absolute
  bound that needs no history (``--lr 100`` goes 5.3 -> 2.6e12 at step 2; caught there);
- a loss spike: above ``spike_factor`` x the running median of the last ``window`` good steps and
  above median + ``spike_margin``, once ``min_history`` steps are known.

`sigma_problem` flags an LN scale estimate that is non-finite, not positive, or more than
``ratio`` away (either way) from the site's first estimate.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Mapping, Optional


class DivergedError(RuntimeError):
    """Training diverged and could not recover; the message names the last good checkpoint."""


class DivergenceGuard:
    """Decide whether a step's numbers are sane (see the module docstring).

    Example:
        >>> g = DivergenceGuard()
        >>> g.check(5.3, ce=5.3) is None            # the first step sets the reference
        True
        >>> g.record(5.3, ce=5.3); g.check(2.6e12, ce=2.6e12)
        'loss diverged: 2.6e+12 > 3 x the initial 5.3 (and > initial + 2)'
    """

    def __init__(self, factor: float = 3.0, margin: float = 2.0, spike_factor: float = 3.0,
                 spike_margin: float = 2.0, window: int = 50, min_history: int = 10):
        self.factor, self.margin = factor, margin
        self.spike_factor, self.spike_margin, self.min_history = spike_factor, spike_margin, min_history
        self.history: deque = deque(maxlen=window)
        self.initial: Optional[dict] = None  # {"loss": x, "ce": y} of the first good step

    def _bound(self, name: str, value: float, ref: float) -> Optional[str]:
        if value > self.factor * ref and value > ref + self.margin:
            return (f"{name} diverged: {value:.4g} > {self.factor:g} x the initial {ref:.4g} "
                    f"(and > initial + {self.margin:g})")
        return None

    def check(self, loss: float, *, ce: Optional[float] = None, grad_norm: Optional[float] = None) -> Optional[str]:
        """A reason string if the step is bad, else None."""
        for name, v in (("loss", loss), ("cross-entropy", ce), ("gradient norm", grad_norm)):
            if v is not None and not math.isfinite(v):
                return f"non-finite {name} ({v})"
        if self.initial is not None:
            reason = self._bound("loss", loss, self.initial["loss"])
            if reason is None and ce is not None and self.initial.get("ce") is not None:
                reason = self._bound("cross-entropy", ce, self.initial["ce"])
            if reason:
                return reason
        if len(self.history) >= self.min_history:
            med = statistics.median(self.history)
            if loss > self.spike_factor * med and loss > med + self.spike_margin:
                return (f"loss spike: {loss:.4g} > {self.spike_factor:g} x running median {med:.4g} "
                        f"(and > median + {self.spike_margin:g})")
        return None

    def record(self, loss: float, *, ce: Optional[float] = None) -> None:
        """Remember a good step's loss (the first one becomes the reference)."""
        if self.initial is None:
            self.initial = {"loss": float(loss), "ce": None if ce is None else float(ce)}
        self.history.append(float(loss))

    def state_dict(self) -> dict:
        return {"initial": self.initial, "history": list(self.history)}

    def load_state_dict(self, state: Mapping) -> None:
        self.initial = state.get("initial")
        self.history.clear()
        for x in state.get("history", []):
            self.history.append(float(x))


def sigma_problem(site: str, value: float, first: Optional[float], ratio: float = 100.0) -> Optional[str]:
    """A reason string if an LN scale estimate left the sane range, else None.

    Example:
        >>> sigma_problem("ln_final", 3e8, first=2.5)
        'LN scale of ln_final left the sane range: 3e+08 vs 2.5 at the start (limit x100)'
    """
    if not math.isfinite(value) or value <= 0:
        return f"LN scale of {site} is {value} (must be finite and > 0)"
    if first is not None and first > 0 and not (first / ratio <= value <= first * ratio):
        return f"LN scale of {site} left the sane range: {value:.4g} vs {first:.4g} at the start (limit x{ratio:g})"
    return None


class SpikeDetector(DivergenceGuard):
    """Only the running-median spike test (and non-finite values) of `DivergenceGuard`, no initial bound.

    Example:
        >>> d = SpikeDetector(min_history=3)
        >>> for x in (3.0, 3.1, 2.9): d.record(x)
        >>> d.check(3.2) is None, d.check(12.0) is not None
        (True, True)
    """

    def __init__(self, factor: float = 3.0, margin: float = 2.0, window: int = 50, min_history: int = 10):
        super().__init__(factor=math.inf, margin=math.inf, spike_factor=factor, spike_margin=margin,
                         window=window, min_history=min_history)
