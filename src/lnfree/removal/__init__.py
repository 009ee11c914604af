"""LayerNorm removal by fine-tuning (Baroni et al. 2025), for any TransformerLens model with LayerNorm.

>>> from lnfree.removal import remove_layernorm, PRESETS, Schedule       # doctest: +SKIP
>>> ln_free = remove_layernorm(model, "train_tokens.npy", steps=300, out_dir="runs/rm")  # doctest: +SKIP

Modules: `schedule` (when each site is frozen, the paper's presets), `sigma` (EMA of each live
site's scale), `loss` (CE, the auxiliary residual-norm loss, the distillation KL), `data` (token
sources, seeded order), `config` (`RemovalSettings`, `RemovalConfig`), `lora` (adapters on a frozen backbone),
`checkpoint` (restore_sites; reading and rebuilding checkpoints is `lnfree.io`), `trainer` (the
loop, rollback, DDP), `cli` (``lnfree remove-ln``), `costs` (`site_costs`: what freezing each site alone
costs: the order for ``--site-order``; ``lnfree site-costs`` in `costs_cli`). Optimiser, checkpoint
directories, the run log and the divergence guard
are shared with the zoo pretraining in `lnfree.training`.
Names are imported lazily so that the ``lnfree`` command starts fast.
"""

from __future__ import annotations

from lnfree._lazy import lazy_getattr

_EXPORTS = {
    "remove_layernorm": "trainer",
    "check_arguments": "config",
    "RemovalSettings": "config",
    "RemovalConfig": "config",
    "OptimConfig": "trainer",
    "DivergedError": "trainer",
    "load_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "load_tl_dir": "checkpoint",
    "lr_at": "trainer",
    "SpikeDetector": "trainer",
    "apply_lora": "lora",
    "merge_lora": "lora",
    "distill_kl": "loss",
    "PAPER_RECIPES": "schedule",
    "Schedule": "schedule",
    "Preset": "schedule",
    "PRESETS": "schedule",
    "get_preset": "schedule",
    "order_by_cost": "schedule",
    "site_costs": "costs",
    "SiteCosts": "costs",
    "SigmaEMA": "sigma",
    "aux_norm_loss": "loss",
    "token_std": "loss",
    "TokenData": "data",
    "load_tokens": "data",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__():
    return __all__
