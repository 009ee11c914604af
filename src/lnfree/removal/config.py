"""Every setting of a removal run, validated in one place.

`RemovalSettings` is what a user chooses (`remove_layernorm(model, data, settings=...)`; its keyword
arguments build one); `RemovalConfig` is what a run resolved from it for one model (preset and recipe
defaults filled in), stored in each checkpoint and compared on resume. Both validate their numbers
with `check_arguments` (one table, `ARGUMENTS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from lnfree.training.optim import OptimConfig

# settings that may differ when a run is resumed (they do not change the trained weights)
RESUME_FREE_KEYS = {"checkpoint_every", "keep_checkpoints", "max_rollbacks", "skip_nonfinite"}
LORA_TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")

# name -> (kind, lower bound, None allowed); kinds: int, num (finite >= bound), pos (finite > 0), frac ([0, 1]),
# mom ([0, 1)). The user's settings (`RemovalSettings`) and a run's resolved ones (`RemovalConfig`) share it.
ARGUMENTS = {
    "steps": ("int", 2, True), "batch_size": ("int", 1, True), "micro_batch_size": ("int", 1, True),
    "seq_len": ("int", 2, True), "lr": ("pos", 0, True), "min_lr": ("num", 0, True), "warmup": ("int", 0, True),
    "aux_lambda": ("num", 0, True), "checkpoint_every": ("int", 1, False), "max_rollbacks": ("int", 0, False),
    "skip_nonfinite": ("int", 0, False),
    "keep_checkpoints": ("int", 1, False), "seed": ("int", 0, False), "momentum": ("mom", 0, True),
    "lora_rank": ("int", 1, True), "lora_alpha": ("pos", 0, True), "distill": ("frac", 0, False),
    "distill_temperature": ("pos", 0, False), "weight_decay": ("num", 0, True), "freeze_ramp": ("int", 0, False),
    "positional_sigma": ("int", 0, False), "diverge_factor": ("pos", 0, False), "spike_factor": ("pos", 0, False),
    "site_aux": ("num", 0, False),
    # resolved-only settings (`RemovalConfig`: the paper's recipe switches and the guard's internals)
    "ln1_momentum_power": ("int", 1, False), "spike_window": ("int", 1, False), "spike_min_history": ("int", 1, False),
    "diverge_margin": ("num", 0, False), "spike_margin": ("num", 0, False), "sigma_ratio": ("pos", 0, False),
    "lr_backoff": ("pos", 0, False), "dropout": ("mom", 0, False),
}


def check_arguments(values: dict, *, flag: Callable[[str], str] = lambda n: n, required=()) -> None:
    """Validate settings by their names (`flag` maps a name to how the user spelt it, e.g. ``--steps``;
    names in `required` may not be None); raises ValueError naming the first bad one.

    Example:
        >>> check_arguments({"steps": 1})
        Traceback (most recent call last):
        ...
        ValueError: steps must be an integer >= 2, got 1
    """
    for name, v in values.items():
        kind, low, none_ok = ARGUMENTS[name]
        if v is None and none_ok and name not in required:
            continue
        shown = flag(name)
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{shown} must be an integer >= {low}, got {v!r}")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{shown} must be a finite number, got {v!r}")
        if kind == "pos" and v <= 0:
            raise ValueError(f"{shown} must be > 0, got {v!r}")
        if kind == "num" and v < low:
            raise ValueError(f"{shown} must be >= {low}, got {v!r}")
        if kind == "frac" and not 0 <= v <= 1:
            raise ValueError(f"{shown} must lie in [0, 1], got {v!r}")
        if kind == "mom" and not 0 <= v < 1:
            raise ValueError(f"{shown} must lie in [0, 1), got {v!r}")


@dataclass(frozen=True)
class RemovalSettings:
    """What a removal run does, as the user chooses it: `remove_layernorm(model, data, settings=...)`.

    None means "the preset's / the recipe's / lnfree's default", resolved per model when the run starts
    (into a `RemovalConfig`). Every number is validated here, on construction.

    Attributes:
        schedule: None (GPT-2 Small's schedule scaled to the model's depth and `steps`, see
            `Schedule.scaled`), a preset name ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl",
            which also supplies lr, min_lr, warmup, aux_lambda, batch_size and seq_len defaults), or a
            `Schedule`.
        steps: optimizer steps (default: the preset's / schedule's, else 300).
        batch_size: sequences per optimizer step, over all processes (default 32; presets 512).
        micro_batch_size: sequences per forward pass on one process (default: the whole per-process
            batch); gradients are accumulated.
        seq_len: tokens per sequence (default: the data's row width for 2-D arrays, else n_ctx).
        lr, min_lr, warmup: AdamW peak LR, final LR of the cosine decay, warmup steps (defaults: GPT-2
            Small's 6e-4, 3e-4 and 25/300 of the run, or the preset's).
        aux_lambda: weight of the auxiliary residual-norm loss (default 0.1, or the preset's).
        vanilla: the control run: same data and optimisation, LN kept live, no aux loss, no freezing.
        lora_rank, lora_alpha: train rank-r LoRA adapters (scale alpha / r, default alpha = r) on the
            attention and MLP weights of a frozen backbone, merged at the end (`lnfree.removal.lora`).
        distill: weight w of the KL divergence to the original model's next-token distribution:
            loss = (1 - w) CE + w KL (+ aux); 0 disables it (no teacher). The teacher is a frozen copy
            of the model as passed (one more model in memory, one more forward pass per micro-batch).
        distill_temperature: softmax temperature T of the KL (scaled by T^2).
        checkpoint_every: steps between checkpoints (a checkpoint is also written at step 0 and at the end).
        seed: data order seed (and the LoRA initialisation's).
        bf16: autocast forward passes to bfloat16 (weights and optimizer stay float32).
        eot_token_id: end-of-text id excluded from the aux loss's sigma_hat (default: tokenizer's eos).
        bos_token_id: if set, token streams and text are cut into ``[bos] + (seq_len - 1)`` rows (for a
            model pretrained with a BOS at position 0); default: plain chunks, no BOS, as in the paper.
        momentum: sigma EMA momentum per micro-batch (default 0.9, or the recipe's).
        max_rollbacks: bad steps (non-finite, diverged, spiking) are rolled back to the last good
            checkpoint with the LR halved; after this many the run stops with `DivergedError`
            (a RuntimeError) naming the last good checkpoint.
        skip_nonfinite: up to this many steps whose loss or gradient is not finite are skipped instead (no
            update, the batch consumed, a "skip" event logged) before such steps are rolled back: one rare
            token overflowing a model whose norms are frozen then costs one batch, not half the LR. Only
            non-finite steps are skipped (a diverged or spiking loss is still rolled back); resume-free.
        keep_checkpoints: checkpoints kept in ``out_dir`` (older ones are deleted).
        weight_decay: AdamW weight decay on matrices (default 0.01, or the recipe's).
        recipe: "paper" with a preset: the paper's code's run of that size (see
            `lnfree.removal.schedule.PAPER_RECIPES` and docs/removal.md); a dict of some of its switches
            (`RECIPE_KEYS`: one departure at a time); None: lnfree's recipe.
        freeze_ramp: R > 0 phases each freeze in over R steps instead of at once: from its removal step s
            a site's per-token scale is ``live ** (1 - a) * sigma ** a``, ``a = (step - s + 1) / (R + 1)``,
            fully frozen from step s + R (every site must reach that by the last step). For models with
            tokens far above the average scale (SmolLM2's position 0: docs/normfree_smollm2.md).
        positional_sigma: k > 0 freezes each site at a positional scale (positions 0..k-1 keep their own EMA
            sigma, later ones share one; every training row must start with one fixed token: `bos_token_id`).
            A positional scale is a fixed linear map per position, so the model is norm-free, but it cannot
            be folded into weights: those sites end frozen, not removed (`model.is_norm_free`).
        diverge_factor, spike_factor: the fail-safe's loss bounds: a step is rolled back when its loss exceeds
            ``diverge_factor`` x the first loss (and the first + 2), or ``spike_factor`` x the running median of
            recent losses (and it + 2); non-finite values always are. Raise them to watch a run the defaults
            would stop (an experiment, not a recipe).
        site_aux: weight w of lnfree's norm-input loss (`lnfree.removal.loss.site_scale_loss`, not the paper's):
            at every norm's input (live, frozen or removed), each token's scale is pulled towards the typical
            one: what the norm did, kept up where it is gone. Without it SmolLM2's gated MLPs, reading frozen
            scales, square a rare token's excess layer after layer until it overflows (docs/normfree_smollm2.md).
            Also in the loss of the vanilla control (only freezing differs).
        sites: None (every site) or the names of the sites to remove (``model.ln_sites`` names): only these are
            frozen, each at its step of the schedule, and folded (or kept positional-frozen) at the end; every
            other site stays live. The run ends with a model whose other sites are live (not LN-free).

    Example:
        >>> s = RemovalSettings(steps=24, batch_size=8, lr=1e-3, sites=["blocks.0.ln1"])
        >>> s.steps, s.sites
        (24, ('blocks.0.ln1',))
        >>> s.replace(steps=48).steps
        48
        >>> RemovalSettings(stepz=3)
        Traceback (most recent call last):
        ...
        TypeError: RemovalSettings.__init__() got an unexpected keyword argument 'stepz'
    """

    schedule: Any = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup: Optional[int] = None
    aux_lambda: Optional[float] = None
    vanilla: bool = False
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    distill: float = 0.0
    distill_temperature: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    bf16: bool = False
    eot_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    momentum: Optional[float] = None
    max_rollbacks: int = 3
    skip_nonfinite: int = 0
    keep_checkpoints: int = 2
    weight_decay: Optional[float] = None
    recipe: Union[None, str, dict] = None
    freeze_ramp: int = 0
    positional_sigma: int = 0
    diverge_factor: float = 3.0
    spike_factor: float = 3.0
    site_aux: float = 0.0
    sites: Optional[tuple] = None

    def __post_init__(self):
        check_arguments({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in ARGUMENTS})
        from lnfree.removal.schedule import PRESETS, Schedule

        if self.schedule is not None and not isinstance(self.schedule, (str, Schedule)):
            raise TypeError(f"schedule must be None, a preset name {sorted(PRESETS)} or a Schedule, "
                            f"got {type(self.schedule).__name__}")
        if self.sites is not None:
            object.__setattr__(self, "sites", _site_names(self.sites))
            if self.vanilla:
                raise ValueError("sites= names the sites to remove, but vanilla=True removes none (the control keeps "
                                 "every site live); drop one of them")

    def replace(self, **changes) -> "RemovalSettings":
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, settings: Optional["RemovalSettings"], kwargs: dict, *,
                    where: str = "remove_layernorm") -> "RemovalSettings":
        """`settings`, or the settings that `where`'s keyword arguments `kwargs` spell (never both)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            near = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; settings are {names}"
            raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}{hint}")
        if settings is None:
            return cls(**kwargs)
        if not isinstance(settings, cls):
            raise TypeError(f"settings must be a {cls.__name__}, got {type(settings).__name__}")
        if kwargs:
            given = ", ".join(f"{k}=" for k in kwargs)
            raise TypeError(f"{where}() got settings= and the setting keyword(s) {given}: give each setting once, "
                            f"e.g. settings.replace({next(iter(kwargs))}=...)")
        return settings


def _site_names(sites) -> tuple:
    """`sites` as a tuple of distinct site names (their existence is checked against the model later)."""
    if isinstance(sites, str) or not isinstance(sites, (list, tuple)):
        raise TypeError(f"sites must be a list of site names (e.g. ['blocks.0.ln1']), got {sites!r}")
    bad = [s for s in sites if not isinstance(s, str)]
    if bad or not sites:
        raise ValueError(f"sites must be a non-empty list of site names (model.ln_sites), got {list(sites)!r}")
    repeated = sorted({s for s in sites if list(sites).count(s) > 1})
    if repeated:
        raise ValueError(f"sites names {repeated} more than once")
    return tuple(sites)


@dataclass(frozen=True)
class RemovalConfig:
    """A removal (or vanilla) fine-tune: the optimiser (`optim`), batches, losses, variants, safety.

    Variants: ``lora_rank`` trains rank-r adapters on the attention and MLP weights of a frozen
    backbone (`lnfree.removal.lora`); ``distill`` > 0 mixes the KL divergence to the original model's
    next-token distribution into the loss (``(1 - distill) * CE + distill * KL``).
    Paper-recipe switches (`lnfree.removal.schedule.PAPER_RECIPES`): ``share_ln1_sigma`` (ln1's q/k
    and v paths share one sigma that keeps tracking while the v path is live), ``mask_eot_labels``
    (no CE on end-of-text labels), ``vanilla_aux`` (the vanilla control keeps the aux loss),
    ``ln1_momentum_power`` (ln1's EMA momentum is ``momentum ** k`` per micro-batch: the paper's code
    updates it on each of its k = 3 calls per forward), ``dropout`` (HF GPT-2's train-mode dropout rate on
    embeddings, attention patterns and residual writes, training forwards only) and ``tie_embeddings``
    (W_U is W_E^T throughout training; `lnfree.removal.hf_training`).
    ``freeze_ramp`` = R > 0 phases each freeze in over R steps: from its removal step s, a site's
    per-token scale is ``live ** (1 - a) * sigma ** a`` with ``a = (step - s + 1) / (R + 1)``, fully
    frozen (a = 1) from step s + R on (for models whose sites cost too much to freeze at once: SmolLM2).
    ``positional_sigma`` = k > 0 freezes each site at a positional scale: positions 0..k-1 keep their own
    EMA sigma, later positions share one (`RemovableLayerNorm`); such sites stay frozen (not folded) at the end.
    ``site_aux`` = w > 0 adds ``w * site_scale_loss`` over every norm module's input, live, frozen or removed
    (`lnfree.removal.loss`): each token's scale is pulled towards the typical scale there. It is part of the
    loss in the vanilla control too, so that the control differs from the removal run only by the freezing.
    ``sites`` (None: every site) are the only sites the run freezes and folds; the others stay live.

    Example:
        >>> cfg = RemovalConfig(optim=OptimConfig(steps=12, lr=1e-3), batch_size=4, micro_batch_size=2,
        ...                     seq_len=16, aux_lambda=0.1, vanilla=False, seed=0, bf16=False, schedule={})
        >>> cfg.steps, cfg.n_micro
        (12, 2)
    """

    optim: OptimConfig
    batch_size: int
    micro_batch_size: int
    seq_len: int
    aux_lambda: float
    vanilla: bool
    seed: int
    bf16: bool
    schedule: dict
    eot_token_id: Optional[int] = None
    momentum: float = 0.9
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_targets: tuple = LORA_TARGETS
    distill: float = 0.0
    distill_temperature: float = 1.0
    share_ln1_sigma: bool = False
    ln1_momentum_power: int = 1
    mask_eot_labels: bool = False
    vanilla_aux: bool = False
    dropout: float = 0.0
    tie_embeddings: bool = False
    freeze_ramp: int = 0
    positional_sigma: int = 0
    site_aux: float = 0.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_rollbacks: int = 3
    skip_nonfinite: int = 0
    lr_backoff: float = 0.5
    diverge_factor: float = 3.0
    diverge_margin: float = 2.0
    sigma_ratio: float = 100.0
    spike_factor: float = 3.0
    spike_margin: float = 2.0
    spike_window: int = 50
    spike_min_history: int = 10
    sites: Optional[tuple] = None

    def __post_init__(self):
        if not isinstance(self.optim, OptimConfig):
            raise TypeError(f"optim must be an OptimConfig, got {type(self.optim).__name__}")
        check_arguments({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in ARGUMENTS},
                        required=("batch_size", "micro_batch_size", "seq_len", "aux_lambda", "momentum"))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora_targets {bad} unknown; allowed: {LORA_TARGETS}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.sites is not None:
            object.__setattr__(self, "sites", _site_names(self.sites))
        if self.optim.warmup >= self.optim.steps:
            raise ValueError(f"warmup ({self.optim.warmup}) must be shorter than the run (steps={self.optim.steps})")
        if self.positional_sigma and self.share_ln1_sigma:
            raise ValueError("positional_sigma and share_ln1_sigma (the paper's shared ln1 sigma) cannot be combined")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")

    @property
    def steps(self) -> int:
        return self.optim.steps

    @property
    def n_micro(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def use_aux(self) -> bool:
        return self.aux_lambda > 0 and (not self.vanilla or self.vanilla_aux)

    def to_dict(self) -> dict:
        """JSON values (tuples as lists), as stored in state.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def differences(self, stored: dict) -> list[str]:
        """Settings that differ from a checkpoint's config (``name=old (now new)``), resume-free keys aside."""
        def flat(d, prefix=""):
            out = {}
            for k, v in d.items():
                if isinstance(v, dict) and k == "optim":
                    out.update(flat(v, f"{k}."))
                else:
                    out[prefix + k] = v
            return out

        old, new = flat(stored), flat(self.to_dict())
        # a key added after the checkpoint was written reads as its default there
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        return [f"{k}={old.get(k, defaults.get(k))!r} (now {v!r})" for k, v in new.items()
                if k not in RESUME_FREE_KEYS and old.get(k, defaults.get(k)) != v]
