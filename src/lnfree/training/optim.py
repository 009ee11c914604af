"""The optimiser settings shared by every training loop (removal fine-tune, zoo pretraining).

`OptimConfig` is one frozen, validated record of what AdamW and its learning-rate schedule need;
`make_optimizer` and `lr_at` are the only places that turn it into an optimiser and a rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

# which parameters get no weight decay
NO_DECAY_RULES = ("ndim<2", "bias")


def _int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def _num(name: str, v, low: float, strict: bool = False) -> None:
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or v < low or (strict and v == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {v!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warmup + cosine decay, validated on construction.

    Attributes:
        steps: optimizer steps of the run.
        lr, min_lr: peak learning rate and the floor of the cosine.
        warmup: linear warmup steps (``lr * (step + 1) / warmup``).
        weight_decay: AdamW decoupled weight decay, applied as `no_decay` says.
        betas, eps: AdamW's.
        grad_clip: gradient-norm clip (the norm is always measured and logged).
        horizon: the step at which the cosine reaches `min_lr` (default ``steps - 1``: the last step).
            A horizon past the run (the paper's ``max_steps`` > checkpoint step) stops the run mid-decay.
        no_decay: ``"ndim<2"`` (no decay on biases and norm weights) or ``"bias"`` (decay on every
            tensor whose name does not end in a bias, norm weights included, as HF Trainer does for
            models whose norm layers are not ``nn.LayerNorm`` modules, e.g. the paper's).
        warmup_from_zero: warm up as HF Trainer's schedulers do, ``lr * step / warmup`` (0 at step 0),
            instead of ``lr * (step + 1) / warmup``.

    Example:
        >>> cfg = OptimConfig(steps=100, lr=1.0, min_lr=0.5, warmup=10)
        >>> lr_at(0, cfg), lr_at(10, cfg), round(lr_at(99, cfg), 6)
        (0.1, 1.0, 0.5)
    """

    steps: int
    lr: float
    min_lr: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    horizon: Optional[int] = None
    no_decay: str = "ndim<2"
    warmup_from_zero: bool = False

    def __post_init__(self):
        _int("steps", self.steps, 1)
        _int("warmup", self.warmup, 0)
        _num("lr", self.lr, 0.0, strict=True)
        _num("min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        _num("weight_decay", self.weight_decay, 0.0)
        _num("eps", self.eps, 0.0, strict=True)
        _num("grad_clip", self.grad_clip, 0.0, strict=True)
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        if self.horizon is not None:
            _int("horizon", self.horizon, 1)
        if self.no_decay not in NO_DECAY_RULES:
            raise ValueError(f"no_decay must be one of {NO_DECAY_RULES}, got {self.no_decay!r}")

    @property
    def decay_end(self) -> int:
        return self.steps - 1 if self.horizon is None else self.horizon

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OptimConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in names})


def lr_at(step: int, cfg: OptimConfig, time_frac: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``cfg.decay_end``.

    `time_frac` (elapsed / wall-clock budget) can only move the cosine forward, so a time-limited run
    completes its schedule by the deadline.

    Example:
        >>> cfg = OptimConfig(steps=22, lr=1.0, min_lr=0.2, warmup=5)
        >>> [round(lr_at(s, cfg), 3) for s in (0, 4, 13, 21)]
        [0.2, 1.0, 0.6, 0.2]
    """
    if step < cfg.warmup:
        return cfg.lr * (step + (0 if cfg.warmup_from_zero else 1)) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.decay_end - cfg.warmup)
    progress = min(1.0, max(time_frac, progress))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def decay_groups(model: torch.nn.Module, rule: str = "ndim<2") -> tuple[list, list]:
    """(decayed, not decayed) trainable parameters under `rule` (see `OptimConfig.no_decay`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 if rule == "ndim<2" else name.split(".")[-1].startswith("b")
        (no_decay if skip else decay).append(p)
    return decay, no_decay


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (frozen ones get no optimiser state), two decay groups.

    Example:
        >>> opt = make_optimizer(torch.nn.Linear(3, 2), OptimConfig(steps=10, lr=1e-3, weight_decay=0.1))
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    decay, no_decay = decay_groups(model, cfg.no_decay)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
