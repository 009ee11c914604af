"""When each LayerNorm site is frozen during the removal fine-tune (the paper's schedule).

Order (the paper's, and `from_gaps` / `scaled`): every ``blocks.{i}.ln2`` layer by layer, then every
``blocks.{i}.ln1.qk``, then every ``blocks.{i}.ln1.v``, then ``ln_final``; `Schedule.from_order` takes
any order (e.g. cheapest first, `order_by_cost`). A site "removed at step s" is frozen at the
start of step s (0-based optimizer steps): steps ``0..s-1`` train it live (its sigma EMA is
tracked), steps ``s..`` train it with the fixed sigma. Every removal step lies in ``[1, steps-1]``,
so each sigma has seen at least one step of data and each frozen site gets at least one step
of fine-tuning.

The paper's presets (`PRESETS`) place groups back to back: ``start_ln1qk = start_ln2 +
n_layers * gap_ln2`` and so on. `Schedule.scaled` keeps GPT-2 Small's proportions for any depth
and step budget (see its docstring for the formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

GROUPS = ("ln2", "ln1-qk", "ln1-v", "ln_final")


def site_group(site: str) -> str:
    """Schedule group of an LN site name: 'ln2', 'ln1-qk', 'ln1-v' or 'ln_final'."""
    if site == "ln_final":
        return "ln_final"
    if site.endswith(".ln2"):
        return "ln2"
    if site.endswith(".ln1.qk"):
        return "ln1-qk"
    if site.endswith(".ln1.v"):
        return "ln1-v"
    raise ValueError(f"unknown LN site {site!r}; expected 'blocks.{{i}}.ln2', 'blocks.{{i}}.ln1.qk', "
                     "'blocks.{i}.ln1.v' or 'ln_final'")


def ordered_sites(n_layers: int) -> list[str]:
    """All sites of an n-layer model in the paper's removal order."""
    return (
        [f"blocks.{i}.ln2" for i in range(n_layers)]
        + [f"blocks.{i}.ln1.qk" for i in range(n_layers)]
        + [f"blocks.{i}.ln1.v" for i in range(n_layers)]
        + ["ln_final"]
    )


def order_by_cost(costs: Mapping[str, Optional[float]]) -> list[str]:
    """Sites sorted cheapest first by a measured cost (e.g. the CE increase of freezing each alone).

    A cost of None, NaN or infinity (freezing the site alone made the logits non-finite) sorts last;
    ties keep the order of `costs`.

    Example:
        >>> order_by_cost({"blocks.0.ln2": 0.3, "ln_final": None, "blocks.0.ln1.qk": 0.01})
        ['blocks.0.ln1.qk', 'blocks.0.ln2', 'ln_final']
    """
    if not isinstance(costs, Mapping):
        raise TypeError(f"costs must be a mapping site -> cost (float or None), got {type(costs).__name__}")

    def key(item):
        i, (site, c) = item
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))):
            raise TypeError(f"cost of {site} must be a number or None, got {c!r}")
        bad = c is None or not math.isfinite(c)
        return (bad, 0.0 if bad else float(c), i)

    return [site for _, (site, _) in sorted(enumerate(costs.items()), key=key)]


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even, which would shift some steps)."""
    return int(math.floor(x + 0.5))


def small_start(steps: int) -> int:
    """GPT-2 Small's first removal step, 20 of 300, scaled to a `steps`-step run (at least 1).

    Example:
        >>> small_start(300), small_start(12)
        (20, 1)
    """
    return max(1, _round(steps * 20 / 300))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """The step at which each LN site is frozen, for one model depth and step budget.

    Build with `Schedule.from_gaps` (the paper's form), `Schedule.scaled` (any depth/budget),
    `Schedule.from_order` (any order, e.g. one site per step cheapest first), or `PRESETS[name].schedule`.
    `removal_steps` lists the sites in removal order (steps non-decreasing).

    Example:
        >>> s = PRESETS["gpt2-small"].schedule
        >>> s.removal_step("blocks.0.ln2"), s.removal_step("blocks.1.ln1.v"), s.removal_step("ln_final")
        (20, 71, 104)
        >>> s.sites_removed_at(44)
        ['blocks.0.ln1.qk']
        >>> s.describe(45)
        'ln2 12/12, ln1-qk 1/12, ln1-v 0/12, ln_final 0/1'
    """

    n_layers: int
    steps: int
    removal_steps: tuple = field(repr=False)  # ((site, step), ...) in removal order
    name: str = "custom"

    def __post_init__(self):
        _check_int("n_layers", self.n_layers, 1)
        _check_int("steps", self.steps, 2)
        listed = [s for s, _ in self.removal_steps]
        steps = dict(self.removal_steps)
        expected = ordered_sites(self.n_layers)
        if len(listed) != len(steps) or set(steps) != set(expected):
            missing = [s for s in expected if s not in steps]
            extra = [s for s in steps if s not in expected]
            repeated = sorted({s for s in listed if listed.count(s) > 1})
            raise ValueError(
                f"removal_steps must list every site of a {self.n_layers}-layer model once (ln2, ln1.qk, ln1.v "
                f"per layer, and ln_final); missing {missing[:4]}, unexpected {extra[:4]}, repeated {repeated[:4]}"
            )
        previous = 1
        for site, step in steps.items():
            _check_int(f"removal step of {site}", step, 1)
            if step > self.steps - 1:
                raise ValueError(
                    f"{site} is removed at step {step}, outside the run: steps must lie in [1, {self.steps - 1}] "
                    f"for a {self.steps}-step run"
                )
            if step < previous:
                raise ValueError(f"{site} is removed at step {step}, before a site listed earlier (step {previous}); "
                                 "removal steps must be non-decreasing in the listed (removal) order")
            previous = step

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_gaps(
        cls,
        n_layers: int,
        steps: int,
        start_ln2: int,
        gap_ln2: int,
        gap_ln1qk: int,
        gap_ln1v: int,
        *,
        start_ln1qk: Optional[int] = None,
        start_ln1v: Optional[int] = None,
        start_lnf: Optional[int] = None,
        name: str = "custom",
    ) -> "Schedule":
        """The paper's form: group g removes layer i at ``start_g + i * gap_g``.

        Unset starts follow on from the previous group (``start_ln1qk = start_ln2 + n_layers *
        gap_ln2``, ``start_ln1v = start_ln1qk + n_layers * gap_ln1qk``, ``start_lnf = start_ln1v +
        n_layers * gap_ln1v``), as in all four paper presets.

        Example:
            >>> Schedule.from_gaps(2, 20, 2, 1, 1, 2).removal_step("ln_final")
            10
        """
        for arg, v in (("start_ln2", start_ln2), ("gap_ln2", gap_ln2), ("gap_ln1qk", gap_ln1qk), ("gap_ln1v", gap_ln1v)):
            _check_int(arg, v, 0)
        _check_int("n_layers", n_layers, 1)
        start_ln1qk = start_ln2 + n_layers * gap_ln2 if start_ln1qk is None else start_ln1qk
        start_ln1v = start_ln1qk + n_layers * gap_ln1qk if start_ln1v is None else start_ln1v
        start_lnf = start_ln1v + n_layers * gap_ln1v if start_lnf is None else start_lnf
        pairs = []
        for group_start, gap, fmt in (
            (start_ln2, gap_ln2, "blocks.{}.ln2"),
            (start_ln1qk, gap_ln1qk, "blocks.{}.ln1.qk"),
            (start_ln1v, gap_ln1v, "blocks.{}.ln1.v"),
        ):
            pairs += [(fmt.format(i), group_start + i * gap) for i in range(n_layers)]
        pairs.append(("ln_final", start_lnf))
        return cls(n_layers, steps, tuple(pairs), name)

    @classmethod
    def from_order(
        cls,
        n_layers: int,
        steps: int,
        order: Sequence[str],
        *,
        start: int = 1,
        gap: Union[None, int, Sequence[int]] = None,
        end: Optional[int] = None,
        name: str = "custom",
    ) -> "Schedule":
        """Sites frozen in an explicit order: ``order[0]`` at `start`, each later one `gap` steps after the one before.

        For models where the paper's order (all ln2, then ln1-qk, ln1-v, ln_final) freezes costly sites
        early or many at once (SmolLM2, docs/normfree_smollm2.md): e.g. one site per step, cheapest first
        (`order_by_cost`). `order` lists every site of an `n_layers`-layer model once, in any order. `gap`:
        steps between consecutive sites, one int for all (default 1) or one per site after the first
        (``len(order) - 1`` ints; 0 freezes a site together with the one before). With `end` instead of
        `gap`, the sites are spread evenly: ``step_k = start + round(k * (end - start) / (n - 1))``.

        Example:
            >>> s = Schedule.from_order(1, 10, ["ln_final", "blocks.0.ln2", "blocks.0.ln1.v", "blocks.0.ln1.qk"],
            ...                         start=2, gap=[1, 0, 3])
            >>> [s.removal_step(x) for x in s.sites]
            [2, 3, 3, 6]
            >>> Schedule.from_order(1, 10, ordered_sites(1), start=1, end=7).removal_steps[-1]
            ('ln_final', 7)
        """
        _check_int("n_layers", n_layers, 1)
        _check_int("start", start, 1)
        if isinstance(order, str) or not isinstance(order, Sequence) or not all(isinstance(s, str) for s in order):
            raise TypeError(f"order must be a sequence of site names (e.g. ordered_sites({n_layers}) reordered), "
                            f"got {type(order).__name__}")
        order, n = list(order), len(order)
        if end is not None:
            if gap is not None:
                raise ValueError(f"give gap= or end=, not both (got gap={gap!r}, end={end!r})")
            _check_int("end", end, start)
            offsets = [0 if n == 1 else _round(k * (end - start) / (n - 1)) for k in range(n)]
        else:
            gaps = [1 if gap is None else gap] * (n - 1) if gap is None or isinstance(gap, int) else list(gap)
            if isinstance(gap, bool) or len(gaps) != max(n - 1, 0):
                raise ValueError(f"gap must be an int or {max(n - 1, 0)} ints (one per site after the first), "
                                 f"got {gap!r}")
            for g in gaps:
                _check_int("gap", g, 0)
            offsets = [0]
            for g in gaps:
                offsets.append(offsets[-1] + g)
        return cls(n_layers, steps, tuple((site, start + o) for site, o in zip(order, offsets)), name)

    @classmethod
    def scaled(cls, n_layers: int, steps: int, name: Optional[str] = None) -> "Schedule":
        """GPT-2 Small's schedule shape for any depth and step budget.

        Small (12 layers, 300 steps) starts at step 20 (``20/300`` of the run), spends ``2, 2, 3``
        steps per layer on ln2, ln1-qk, ln1-v (7 per layer) and removes ln_final at 104
        (``104/300``). Scaled::

            start = max(1, round(steps * 20/300))
            end   = max(start, round(steps * 104/300))          # ln_final, ~35% into the run
            u     = (end - start) / (7 * n_layers)               # steps per unit of weight
            step(k-th site of ln2, ln1-qk, ln1-v in order) = start + round(u * W_k)
            step(ln_final) = end

        where ``W_k`` is the summed weight of the sites before it (2 per ln2 / ln1-qk site, 3 per
        ln1-v site). For Small ``u = 1`` and this is exactly the paper's schedule; with a short
        budget several sites may share a step.

        Example:
            >>> s = Schedule.scaled(4, 300)
            >>> [s.removal_step(f"blocks.{i}.ln2") for i in range(4)], s.removal_step("ln_final")
            ([20, 26, 32, 38], 104)
        """
        _check_int("n_layers", n_layers, 1)
        _check_int("steps", steps, 2)
        start = small_start(steps)
        end = min(steps - 1, max(start, _round(steps * 104 / 300)))
        u = (end - start) / (7 * n_layers)
        pairs, weight = [], 0
        for site in ordered_sites(n_layers)[:-1]:
            pairs.append((site, start + _round(u * weight)))
            weight += 3 if site.endswith(".ln1.v") else 2
        pairs.append(("ln_final", end))
        return cls(n_layers, steps, tuple(pairs), name or f"scaled-{n_layers}L-{steps}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Schedule":
        """Inverse of `to_dict`."""
        try:
            return cls(int(d["n_layers"]), int(d["steps"]), tuple((s, int(v)) for s, v in d["removal_steps"].items()),
                       str(d.get("name", "custom")))
        except KeyError as e:
            raise ValueError(f"schedule dict lacks key {e}; expected n_layers, steps, removal_steps") from None

    def to_dict(self) -> dict:
        return {"name": self.name, "n_layers": self.n_layers, "steps": self.steps,
                "removal_steps": dict(self.removal_steps)}

    # ---- queries -------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """Every site, in removal order."""
        return [s for s, _ in self.removal_steps]

    def removal_step(self, site: str) -> int:
        """The step at whose start `site` is frozen."""
        for s, step in self.removal_steps:
            if s == site:
                return step
        raise ValueError(f"site {site!r} is not in this {self.n_layers}-layer schedule; sites are {self.sites[:3]}...")

    def _check_step(self, step) -> int:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        return step

    def sites_removed_at(self, step: int) -> list[str]:
        """Sites frozen at the start of `step`, in removal order."""
        step = self._check_step(step)
        return [s for s, v in self.removal_steps if v == step]

    def live_sites(self, step: int) -> list[str]:
        """Sites still live during `step` (removed at a later step)."""
        step = self._check_step(step)
        return [s for s, v in self.removal_steps if v > step]

    def frozen_sites(self, step: int) -> list[str]:
        """Sites frozen during `step` (removed at this step or earlier)."""
        step = self._check_step(step)
        return [s for s, v in self.removal_steps if v <= step]

    def progress(self, step: int, sites: Optional[list[str]] = None) -> dict[str, tuple[int, int]]:
        """Per group: (frozen, total) during `step`, over `sites` (default: all)."""
        sites = self.sites if sites is None else sites
        frozen = set(self.frozen_sites(step))
        out = {}
        for g in GROUPS:
            members = [s for s in sites if site_group(s) == g]
            if members:
                out[g] = (sum(s in frozen for s in members), len(members))
        return out

    def describe(self, step: int, sites: Optional[list[str]] = None) -> str:
        """Stage text for progress bars, e.g. 'ln2 3/12, ln1-qk 0/12, ln1-v 0/12, ln_final 0/1'."""
        return ", ".join(f"{g} {a}/{b}" for g, (a, b) in self.progress(step, sites).items())

    @property
    def end(self) -> int:
        """The last removal step (ln_final's)."""
        return max(v for _, v in self.removal_steps)

    def to_frame(self):
        """pandas DataFrame: one row per site with its group, layer and removal step."""
        import pandas as pd

        rows = []
        for site, step in self.removal_steps:
            layer = None if site == "ln_final" else int(site.split(".")[1])
            rows.append({"site": site, "group": site_group(site), "layer": layer, "step": step})
        return pd.DataFrame(rows)

    def plot(self):
        """Plotly timeline: removal step of each site (never shown implicitly)."""
        import plotly.express as px

        df = self.to_frame()
        fig = px.scatter(df, x="step", y="site", color="group", title=f"LN removal schedule ({self.name})")
        fig.update_xaxes(range=[0, self.steps])
        fig.update_yaxes(autorange="reversed")
        return fig


@dataclass(frozen=True)
class Preset:
    """One of the paper's GPT-2 removal runs: schedule and optimisation hyper-parameters.

    Batches are ``batch_size`` sequences of ``seq_len`` tokens (512 x 1024 = 524,288 tokens).
    """

    name: str
    model: str
    schedule: Schedule
    aux_lambda: float
    lr: float
    min_lr: float
    warmup: int
    batch_size: int = 512
    seq_len: int = 1024

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def n_layers(self) -> int:
        return self.schedule.n_layers

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model, "steps": self.steps, "aux_lambda": self.aux_lambda,
                "lr": self.lr, "min_lr": self.min_lr, "warmup": self.warmup, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "schedule": self.schedule.to_dict()}


def _preset(name, model, n_layers, steps, start, gaps, aux_lambda, lr, min_lr, warmup) -> Preset:
    return Preset(name, model, Schedule.from_gaps(n_layers, steps, start, *gaps, name=name), aux_lambda, lr,
                  min_lr, warmup)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("gpt2-small", "gpt2", 12, 300, 20, (2, 2, 3), 0.1, 6e-4, 3e-4, 25),
        _preset("gpt2-medium", "gpt2-medium", 24, 500, 20, (2, 2, 3), 0.1, 6e-4, 3e-4, 10),
        _preset("gpt2-large", "gpt2-large", 36, 600, 30, (4, 4, 6), 0.03, 3e-4, 4e-5, 15),
        _preset("gpt2-xl", "gpt2-xl", 48, 800, 50, (4, 4, 6), 0.01, 1e-4, 2e-5, 20),
    )
}


def get_preset(name: str) -> Preset:
    """`PRESETS[name]` with a clear error."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# The paper's code's runs (github submarat/removing-layer-norm, config.py `*_aux` configs + train.py,
# transformers 4.48), where they depart from lnfree's recipe; docs/removal.md, "The recipe as the paper
# ran it", explains each key. Used by remove_layernorm(recipe="paper").
RECIPE_KEYS = ("batch_size", "micro_batch_size", "momentum", "ln1_momentum_power", "share_ln1_sigma",
               "mask_eot_labels", "no_decay", "weight_decay", "horizon", "warmup_from_zero", "vanilla_aux",
               "dropout", "tie_embeddings")


def _paper(micro: int, momentum: float, horizon: int) -> dict:
    # gradient_accumulation_steps = int(512 // micro): 512 / 506 / 504 / 504 sequences per step
    return {"batch_size": micro * (512 // micro), "micro_batch_size": micro, "momentum": momentum,
            "ln1_momentum_power": 3, "share_ln1_sigma": True, "mask_eot_labels": True, "no_decay": "bias",
            "weight_decay": 0.01, "horizon": horizon, "warmup_from_zero": True, "vanilla_aux": True,
            # HF GPT-2 trained in train mode (GPT2Config's 0.1 dropouts) with W_E and W_U tied ("auto": tied
            # when the model's are as loaded, as GPT-2's and any model's whose HF config ties them)
            "dropout": 0.1, "tie_embeddings": "auto"}


PAPER_RECIPES: dict[str, dict] = {
    "gpt2-small": _paper(32, 0.9, 300),
    "gpt2-medium": _paper(22, 0.9, 500),
    "gpt2-large": _paper(28, 0.9 ** (28 / 32), 1200),
    "gpt2-xl": _paper(18, 0.9 ** (18 / 32), 1200),
}
