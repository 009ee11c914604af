"""LayerNorm removal by fine-tuning (Baroni et al. 2025), for any TransformerLens model with LayerNorm.

>>> from lnfree.removal import remove_layernorm, PRESETS, Schedule       # doctest: +SKIP
>>> ln_free = remove_layernorm(model, "train_tokens.npy", steps=300, out_dir="runs/rm")  # doctest: +SKIP

Modules: `schedule` (when each site is frozen, the paper's presets), `sigma` (EMA of each live
site's scale), `loss` (CE and the auxiliary residual-norm loss), `data` (token sources, seeded
order), `trainer` (the loop, checkpoints, rollback, DDP), `cli` (``lnfree remove-ln``).
Names are imported lazily so that the ``lnfree`` command starts fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "remove_layernorm": "trainer",
    "RemovalConfig": "trainer",
    "load_checkpoint": "trainer",
    "read_checkpoint": "trainer",
    "latest_checkpoint": "trainer",
    "load_tl_dir": "trainer",
    "lr_at": "trainer",
    "SpikeDetector": "trainer",
    "Schedule": "schedule",
    "Preset": "schedule",
    "PRESETS": "schedule",
    "get_preset": "schedule",
    "SigmaEMA": "sigma",
    "aux_norm_loss": "loss",
    "token_std": "loss",
    "TokenData": "data",
    "load_tokens": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lnfree.removal.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lnfree.removal' has no attribute {name!r}")


def __dir__():
    return __all__
