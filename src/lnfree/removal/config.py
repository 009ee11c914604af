"""Every setting of a removal run, validated; stored in each checkpoint and compared on resume."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from lnfree.training.optim import OptimConfig

# settings that may differ when a run is resumed (they do not change the trained weights)
RESUME_FREE_KEYS = {"checkpoint_every", "keep_checkpoints", "max_rollbacks"}
LORA_TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")


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
    lr_backoff: float = 0.5
    diverge_factor: float = 3.0
    diverge_margin: float = 2.0
    sigma_ratio: float = 100.0
    spike_factor: float = 3.0
    spike_margin: float = 2.0
    spike_window: int = 50
    spike_min_history: int = 10

    def __post_init__(self):
        if not isinstance(self.optim, OptimConfig):
            raise TypeError(f"optim must be an OptimConfig, got {type(self.optim).__name__}")
        ints = {"batch_size": 1, "micro_batch_size": 1, "seq_len": 2, "checkpoint_every": 1,
                "keep_checkpoints": 1, "max_rollbacks": 0, "seed": 0, "spike_window": 1, "spike_min_history": 1,
                "ln1_momentum_power": 1, "freeze_ramp": 0, "positional_sigma": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("aux_lambda", "distill", "diverge_margin", "spike_margin", "site_aux"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("distill_temperature", "diverge_factor", "sigma_ratio", "spike_factor", "lr_backoff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.distill > 1:
            raise ValueError(f"distill is the KL weight in [0, 1] (1: KL only), got {self.distill}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a rate in [0, 1), e.g. 0.1 (HF GPT-2's), got {self.dropout!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be None (full fine-tune) or an int >= 1, got {self.lora_rank!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora_targets {bad} unknown; allowed: {LORA_TARGETS}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
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
