"""The removal fine-tune: freeze LN sites one by one on a schedule, fine-tune, fold them away.

`remove_layernorm` runs the paper's procedure on any `LNFreeTransformer` (or HookedTransformer
with LayerNorm). Not to be confused with `LNFreeTransformer.remove_ln()`, which only *folds*
already-frozen scales into the weights (no training): `remove_layernorm` fine-tunes the model so
that freezing costs little, and calls `remove_ln()` at the end. Per optimizer step:

1. sites whose removal step has come are frozen at their sigma EMA (`LNFreeTransformer.freeze_ln`);
2. each micro-batch: forward (optionally under bf16 autocast), the loss (next-token CE, or its mix
   with the KL to the original model when distilling, + lambda * aux on
   ``blocks.{L-1}.hook_resid_post``), backward; the per-site input std of live sites is recorded;
3. the step's numbers are combined across ranks and checked from the first step on
   (`lnfree.training.guards`): non-finite loss/gradient, a loss above 3x the initial one, a spike,
   an LN scale leaving its sane range. A bad step is rolled back to the last good checkpoint;
   otherwise gradients are clipped and AdamW steps at the warmup + cosine LR; the EMAs absorb the
   micro-batches;
4. every ``checkpoint_every`` steps the weights are verified (finite, and the next batch's loss
   within bounds) before they are written and marked good.

Variants: ``lora_rank=r`` trains LoRA adapters on a frozen backbone and merges them at the end;
``distill=w`` mixes in the KL divergence to the frozen original model. ``vanilla=True`` is the
paper's control: same data, steps and optimiser, LN kept live, no aux loss (unless ``vanilla_aux``).
``sites=[...]`` freezes and folds only the named sites; the run ends with the others live.
The settings are a `RemovalSettings` (`lnfree.removal.config`); its fields are also keyword arguments.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from lnfree.layernorm import RemovableLayerNorm
from lnfree.model import LNFreeTransformer, as_lnfree
from lnfree.removal.checkpoint import (  # noqa: F401  (re-exported: the historical import path)
    CHECKPOINT_FORMAT, cfg_from_json, cfg_to_json, latest_checkpoint, load_checkpoint, load_tl_dir, read_checkpoint,
    restore_sites,
)
from lnfree.removal.config import (  # noqa: F401  (check_arguments, ARGUMENTS: re-exported)
    ARGUMENTS, RESUME_FREE_KEYS, RemovalConfig, RemovalSettings, check_arguments,
)
from lnfree.removal.data import TokenData, as_token_source, load_tokens
from lnfree.removal.hf_training import dropout, resolve_tie, tie_embeddings, untie_embeddings
from lnfree.removal.loss import aux_norm_loss, distill_kl, next_token_ce, site_scale_loss, token_std
from lnfree.removal.schedule import PRESETS, Preset, Schedule, get_preset
from lnfree.removal.sigma import SigmaEMA, global_micro_batch_means, stats_tensor
from lnfree.training.checkpoints import CheckpointDir
from lnfree.training.device import resolve_device
from lnfree.training.files import atomic_write_text, fix_tree_modes, save_safetensors, state_dict_cpu
from lnfree.training.guards import DivergedError, DivergenceGuard, SpikeDetector, sigma_problem  # noqa: F401
from lnfree.training.interrupt import StopRequest, TrainingInterrupted, stop_on_interrupt
from lnfree.training.log import JsonlLog
from lnfree.tl_layout import contiguous_parameters, to_tl_layout
from lnfree.training.optim import OptimConfig, lr_at, make_optimizer

_weights = state_dict_cpu


# ---- distributed ---------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def _init_distributed() -> _Dist:
    """Join the process group torchrun set up (env WORLD_SIZE > 1), or one already initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, created=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    return x


class _Checkpoints:
    """Last-good-state storage: checkpoint directories under out_dir (rank 0 writes), or memory."""

    def __init__(self, out_dir: Optional[Path], keep: int, dist: _Dist):
        self.store = None if out_dir is None else CheckpointDir(out_dir, keep)
        self.dist = dist
        self.memory: Optional[dict] = None

    def save(self, weights: dict, optimizer: dict, state: dict) -> Optional[Path]:
        if self.store is None:
            self.memory = {"weights": {k: v.clone() for k, v in weights.items()},
                           "optimizer": _clone_tree(optimizer), "state": _clone_tree(state)}
            return None
        path = self.store.dir / f"step_{state['step']:06d}"
        if self.dist.rank == 0:
            path = self.store.write(state["step"], weights=weights, state=state, tensors=optimizer)
            self.store.mark_good(path)  # the weights were verified before this call
        self.dist.barrier()  # other ranks may roll back to it
        return path

    def load(self) -> Optional[dict]:
        if self.store is None:
            return self.memory
        path = self.store.latest()
        return None if path is None else read_checkpoint(path)


# ---- the run -------------------------------------------------------------------------------
@dataclass
class StepStats:
    loss: float
    ce: float
    aux: float
    kl: float
    grad_norm: float
    lr: float
    micro_means: list
    site: float = 0.0


class _Run:
    """State and loop of one removal (or vanilla) fine-tune."""

    def __init__(self, model: LNFreeTransformer, data: TokenData, cfg: RemovalConfig, schedule: Schedule, *,
                 out_dir: Optional[Path], dist: _Dist, device: torch.device, eval_tokens=None,
                 progress: bool = True, callback: Optional[Callable[[dict], Any]] = None,
                 teacher: Optional[LNFreeTransformer] = None):
        from lnfree.removal.lora import apply_lora

        self.model, self.data, self.cfg, self.schedule = model, data, cfg, schedule
        self.out_dir, self.dist, self.device = out_dir, dist, device
        self.eval_tokens, self.progress, self.callback = eval_tokens, progress, callback
        self.teacher = teacher
        self.k_local = cfg.batch_size // (cfg.micro_batch_size * dist.world)
        chosen = set(model.ln_sites if cfg.sites is None else cfg.sites)  # sites=: the only ones frozen
        self.sites = [s for s in schedule.sites if s in chosen]
        live = [s for s in self.sites if model.ln_mode(s) == "live"]
        ln1 = {s: cfg.momentum ** cfg.ln1_momentum_power for s in live if ".ln1." in s} \
            if cfg.ln1_momentum_power != 1 else None
        # positional_sigma k: positions 0..k-1 of each site are tracked apart, under "site@p" keys
        tracked = [key for s in live for key in [f"{s}@{p}" for p in range(cfg.positional_sigma)] + [s]]
        ln1 = None if ln1 is None else {k: ln1[k.split("@")[0]] for k in tracked if k.split("@")[0] in ln1}
        self.ema = SigmaEMA([] if cfg.vanilla else tracked, cfg.momentum, site_momentum=ln1)
        self.first_token = _first_token(data) if cfg.positional_sigma and not cfg.vanilla else None
        self.guard = DivergenceGuard(cfg.diverge_factor, cfg.diverge_margin, cfg.spike_factor, cfg.spike_margin,
                                     cfg.spike_window, cfg.spike_min_history)
        # weights in the layout TransformerLens copies them into every pass (bit-identical, no per-pass copy;
        # gradients and AdamW state follow): SmolLM2's CPU step 20% faster (docs/performance.md)
        to_tl_layout(model)
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
        if cfg.tie_embeddings:  # before the optimizer: W_E is then the one parameter for both
            tie_embeddings(model)
        self.optimizer = make_optimizer(model, cfg.optim)
        self.ckpts = _Checkpoints(out_dir, cfg.keep_checkpoints, dist)
        self.log = JsonlLog(out_dir / "log.jsonl" if out_dir is not None and dist.rank == 0 else None)
        self.step = self.position = self.tokens_seen = self.n_rollbacks = self.n_skips = 0
        self.lr_scale = 1.0
        self.ce_before = None
        self.wall_prev = 0.0
        self.t0 = time.time()
        self.last_good: Optional[str] = None
        self.saved_step: Optional[int] = None
        self.stop = StopRequest()  # set by stop_on_interrupt around train(): Ctrl-C checkpoints, then stops
        self.center = model.cfg.normalization_type not in ("RMS", "RMSPre")
        self.ddp = None
        if dist.active:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # buffers (sigma, masks) are identical on every rank by construction: no per-forward sync
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            self.ddp = DistributedDataParallel(model, device_ids=ids, **no_sync)
        self._resid = None
        self._hook_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    # -- bookkeeping ---------------------------------------------------------------------
    def _emit(self, record: dict) -> None:
        if self.dist.rank != 0:
            return
        self.log.write(record)
        if self.callback is not None:
            self.callback(record)

    def wall_time(self) -> float:
        return self.wall_prev + time.time() - self.t0

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": 2, "step": self.step, "position": self.position,
            "tokens_seen": self.tokens_seen, "lr_scale": self.lr_scale, "n_rollbacks": self.n_rollbacks,
            "n_skips": self.n_skips,
            "sigma_ema": self.ema.state_dict(), "site_modes": self.model.ln_modes(),
            "site_scales": {s: self.model.ln_scale(s) for s in self.model.ln_sites}, "ln_state": self.model.ln_state(),
            "guard": self.guard.state_dict(), "loss_history": list(self.guard.history), "rng": _rng_state(),
            "config": self.cfg.to_dict(), "model_config": cfg_to_json(self.model.cfg),
            "data": self.data.fingerprint(), "teacher": _fingerprint(self.teacher),
            "ce_before": None if self.ce_before is None else self.ce_before.to_dict(),
            "wall_time": self.wall_time(), "world_size": self.dist.world,
        }

    def verify(self) -> Optional[str]:
        """Why the current weights must not be kept (None if they may): non-finite parameters, or a loss
        on the next batch that is non-finite or diverged."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        bad = torch.tensor(float(bool(bad)))
        self.apply_ramp()  # the next step's blend: the state the checkpoint will be resumed into
        m = self.cfg.micro_batch_size
        tokens = self.data.batch(self.position + self.dist.rank * self.k_local * m, m).to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            ce = next_token_ce(self.model(tokens, return_type="logits"), tokens, ignore_label=self._ignore())
        both = self._all_reduce_sum(torch.stack([ce.detach().double().cpu(), bad.double()])) / self.dist.world
        if float(both[1]) > 0:
            return "non-finite parameters"
        ce_value, reason = float(both[0]), None
        if not math.isfinite(ce_value):
            return f"non-finite cross-entropy ({ce_value}) of the weights about to be checkpointed"
        init = self.guard.initial
        if init is not None and init.get("ce") is not None:
            reason = self.guard._bound("cross-entropy of the weights about to be checkpointed", ce_value, init["ce"])
        return reason

    def checkpoint(self) -> None:
        reason = self.verify()
        if reason:  # never store a broken model as the last good state
            raise FloatingPointError(reason)
        optimizer = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": {"step": self.step, "lr_scale": self.lr_scale}}
        path = self.ckpts.save(_weights(self.model), optimizer, self.state())
        self.last_good, self.saved_step = (None if path is None else str(path)), self.step
        self._emit({"event": "checkpoint", "step": self.step, "path": self.last_good})

    def restore(self, ck: dict, keep_position: bool = False) -> None:
        """Load a checkpoint's model, optimizer, EMA and counters (the data cursor too, unless kept)."""
        state = ck["state"]
        self.model.load_state_dict({k: v.to(self.device) for k, v in ck["weights"].items()})
        restore_sites(self.model, state)
        self.set_first_token()
        # cloned: Optimizer.load_state_dict may alias the given tensors, and the snapshot must stay intact
        self.optimizer.load_state_dict(_clone_tree(ck["optimizer"]["optimizer"]))
        self.ema.load_state_dict(state["sigma_ema"])
        self.guard.load_state_dict(state.get("guard", {"history": state.get("loss_history", [])}))
        self.step = state["step"]
        if not keep_position:
            self.position, self.tokens_seen = state["position"], state["tokens_seen"]
            self.lr_scale, self.n_rollbacks = state["lr_scale"], state["n_rollbacks"]
            self.n_skips = state.get("n_skips", 0)
            self.wall_prev = state["wall_time"]
            self.t0 = time.time()
        if state.get("ce_before") is not None:
            from lnfree.stats import Estimate

            self.ce_before = Estimate(**state["ce_before"])
        _set_rng_state(state["rng"])
        self.last_good = ck.get("path")

    def check_resume(self, state: dict) -> None:
        diff = self.cfg.differences(state["config"])
        if diff:
            raise ValueError("cannot resume: settings differ from the checkpoint's: " + ", ".join(diff))
        if state["data"] != self.data.fingerprint():
            raise ValueError(f"cannot resume: the training data differ from the checkpoint's "
                             f"({state['data']} vs {self.data.fingerprint()})")
        if state.get("teacher") != _fingerprint(self.teacher):
            raise ValueError("cannot resume: the model passed is not the one the run started from (its weights, "
                             "the distillation teacher, differ)")
        if state["world_size"] != self.dist.world:
            warnings.warn(f"resuming a {state['world_size']}-process run with {self.dist.world} processes: "
                          "same global batch, but float rounding differs")

    # -- schedule ------------------------------------------------------------------------
    def apply_schedule(self) -> None:
        """Freeze every tracked site whose removal step has come (idempotent, so resume-safe)."""
        if self.cfg.vanilla:
            return
        k = self.cfg.positional_sigma
        due = [s for s in self.ema.sites if "@" not in s and self.schedule.removal_step(s) <= self.step]
        if due:
            keys = {s: [f"{s}@{p}" for p in range(k)] + [s] for s in due}
            scales = {s: tuple(self.ema.value(key) for key in keys[s]) if k else self.ema.value(s) for s in due}
            self.model.freeze_ln(due, scales=scales)
            self.ema.drop([key for s in due for key in keys[s]])
            self._emit({"event": "freeze", "step": self.step, "sigma": scales})
            self.sync_shared_ln1()
        self.set_first_token()
        self.apply_ramp()

    def set_first_token(self) -> None:
        """Positional scales record the fixed first token of the training rows (resume-safe)."""
        if self.first_token is None:
            return
        for site in self.sites:
            if self.model.ln_mode(site) == "frozen" and self.model.is_positional(site):
                module, path = self.model._site(site)
                module.first_token[path] = self.first_token

    def apply_ramp(self) -> None:
        """``freeze_ramp`` R: a site frozen at step s uses ``live ** (1 - a) * sigma ** a`` during this step, with
        ``a = (step - s + 1) / (R + 1)`` (1 from step s + R on). A function of the step only: resume-safe."""
        ramp, step = self.cfg.freeze_ramp, self.step
        if not ramp or self.cfg.vanilla:
            return
        for site in self.sites:
            s = self.schedule.removal_step(site)
            if s <= step and self.model.ln_mode(site) == "frozen":
                module, path = self.model._site(site)
                module.set_blend(path, min(1.0, (step - s + 1) / (ramp + 1)))

    def end_ramp(self) -> None:
        """Every site fully frozen (blend 1) before folding: mid-ramp scales are not a fixed sigma."""
        for site in self.model.ln_sites:
            if self.model.ln_mode(site) == "frozen":
                module, path = self.model._site(site)
                module.set_blend(path, 1.0)

    def sync_shared_ln1(self) -> None:
        """``share_ln1_sigma``: a frozen ln1 q/k path takes the current EMA of its live v path (the same input):
        the paper's ln1 keeps one sigma that tracks until its v path is removed."""
        if not self.cfg.share_ln1_sigma:
            return
        tracked = set(self.ema.sites)
        shared = {}
        for site in self.sites:
            if site.endswith(".ln1.qk") and self.model.ln_mode(site) == "frozen":
                v = site[: -len("qk")] + "v"
                if v in tracked and self.ema.values.get(v) is not None:
                    shared[site] = self.ema.value(v)
        if shared:
            self.model.freeze_ln(list(shared), scales=shared)

    # -- one step ------------------------------------------------------------------------
    def _ignore(self) -> Optional[int]:
        return self.cfg.eot_token_id if self.cfg.mask_eot_labels else None

    def _micro_batches(self):
        m = self.cfg.micro_batch_size
        first = self.position + self.dist.rank * self.k_local * m
        for j in range(self.k_local):
            yield j, self.data.batch(first + j * m, m).to(self.device)

    def _capture(self, module, inputs, output):
        self._resid = output

    def forward_backward(self) -> StepStats:
        cfg, model = self.cfg, self.model
        forward = self.ddp if self.ddp is not None else model
        track = bool(self.ema.sites)
        handle = model.hook_dict[self._hook_name].register_forward_hook(self._capture) if cfg.use_aux else None
        try:
            sums, local_stats = self._accumulate(forward, track)
        finally:
            if handle is not None:
                handle.remove()
            self._resid = None
        sums = self._all_reduce_sum(sums).cpu() / (self.k_local * self.dist.world)
        micro = global_micro_batch_means(local_stats, self.ema.sites, device=self._comm_device()) if track else []
        lr = lr_at(self.step, cfg.optim) * self.lr_scale
        grad_norm = clip_grad_norm(model.parameters(), cfg.optim.grad_clip)
        ce, aux, kl, site = (float(x) for x in sums)
        return StepStats(self._total(ce, aux, kl, site), ce, aux, kl, grad_norm, lr, micro, site)

    def _total(self, ce, aux, kl, site=0.0):
        cfg = self.cfg
        main = (1 - cfg.distill) * ce + cfg.distill * kl if self.teacher is not None else ce
        return main + (cfg.aux_lambda * aux if cfg.use_aux else 0.0) + cfg.site_aux * site

    @contextlib.contextmanager
    def _norm_input_scales(self):
        """While active, the per-token scale (std, or RMS for RMSNorm) of every norm module's input in the forward
        pass, with gradients (``site_aux``): live, frozen or removed alike, one entry per module."""
        scales: dict = {}
        if not self.cfg.site_aux:
            yield scales
            return
        eps, center = self.model.cfg.eps, self.center

        def grab(module, inputs):  # ln1's q/k and v paths read one input: one entry per module
            scales[id(module)] = token_std(inputs[0], eps, center=center)[..., None]

        handles = [m.register_forward_pre_hook(grab) for m in self.model.modules() if isinstance(m, RemovableLayerNorm)]
        try:
            yield scales
        finally:
            for h in handles:
                h.remove()

    def _accumulate(self, forward, track: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of this rank's micro-batches (gradients sum to the step's mean loss).

        Returns the summed (CE, aux, KL, site aux) [4] and each micro-batch's per-site (std sum, count) [k, sites, 2].
        """
        cfg, model = self.cfg, self.model
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        local_stats = torch.zeros(self.k_local, len(self.ema.sites), 2, dtype=torch.float64)
        zero = torch.zeros((), device=self.device)
        for j, tokens in self._micro_batches():
            sync = self.ddp is None or j == self.k_local - 1
            with contextlib.ExitStack() as stack:
                if not sync:
                    stack.enter_context(self.ddp.no_sync())
                rec = stack.enter_context(model.recording_ln_std(positional=cfg.positional_sigma)) if track else None
                stack.enter_context(dropout(model, cfg.dropout))  # training forwards only
                scales = stack.enter_context(self._norm_input_scales())
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits = forward(tokens, return_type="logits")
                    ce = next_token_ce(logits, tokens, ignore_label=self._ignore())
                    aux = aux_norm_loss(self._resid, tokens, eot_token_id=cfg.eot_token_id, eps=model.cfg.eps,
                                        center=self.center) if cfg.use_aux else zero
                    site = site_scale_loss(list(scales.values()), tokens, eot_token_id=cfg.eot_token_id) if cfg.site_aux else zero
                    kl = zero
                    if self.teacher is not None:
                        with torch.no_grad():
                            target = self.teacher(tokens, return_type="logits")
                        kl = distill_kl(logits, target, temperature=cfg.distill_temperature)
                    loss = self._total(ce, aux, kl, site)
                (loss / self.k_local).backward()
            self._resid = None
            sums += torch.stack([ce.detach(), aux.detach(), kl.detach(), site.detach()]).double()  # on device: no sync
            if rec is not None:
                local_stats[j] = stats_tensor(rec.sums, self.ema.sites)
        return sums, local_stats

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.dist.active:
            return t
        t = t.to(self._comm_device())
        torch.distributed.all_reduce(t)
        return t.cpu()

    def check(self, stats: StepStats) -> Optional[str]:
        """Why this step must not be applied (None if it may)."""
        reason = self.guard.check(stats.loss, ce=stats.ce, grad_norm=stats.grad_norm)
        if reason:
            return reason
        first = dict(self.ema.first)
        for means in stats.micro_means:
            for site, v in means.items():
                reason = sigma_problem(site, v, first.get(site), self.cfg.sigma_ratio)
                if reason:
                    return reason
                first.setdefault(site, v)
        return None

    def optimizer_step(self, stats: StepStats) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = stats.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for means in stats.micro_means:
            self.ema.update(means)
        self.sync_shared_ln1()
        self.guard.record(stats.loss, ce=stats.ce)
        self.step += 1
        self.position += self.cfg.batch_size
        self.tokens_seen += self.cfg.batch_size * self.cfg.seq_len

    def skippable(self, stats: StepStats) -> bool:
        """A non-finite step within the ``skip_nonfinite`` budget (a diverged or spiking one never is)."""
        finite = math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
        return not finite and self.n_skips < self.cfg.skip_nonfinite

    def skip(self, reason: str) -> None:
        """Drop this step's gradients and batch: no update, no EMA or guard record, the same step next."""
        self.optimizer.zero_grad(set_to_none=True)
        self.n_skips += 1
        self.position += self.cfg.batch_size
        self._emit({"event": "skip", "step": self.step, "reason": reason, "skips": self.n_skips})

    def rollback(self, reason: str) -> None:
        """Return to the last good checkpoint with a lower LR; the failed batch is not replayed."""
        self.optimizer.zero_grad(set_to_none=True)
        failed_step = self.step
        self.n_rollbacks += 1
        where = self.last_good or "in memory (no out_dir)"
        if self.n_rollbacks > self.cfg.max_rollbacks:
            raise DivergedError(
                f"LN removal gave up at step {failed_step}: {reason}. {self.cfg.max_rollbacks} rollbacks did not "
                f"help (LR scale now {self.lr_scale:g}). Last good checkpoint: {where}; "
                "try a lower lr, a longer schedule, or check the data")
        ck = self.ckpts.load()
        if ck is None:
            raise DivergedError(f"LN removal failed at step {failed_step}: {reason}, and there is no good "
                                "checkpoint to roll back to")
        position, tokens_seen = self.position + self.cfg.batch_size, self.tokens_seen
        self.restore(ck, keep_position=True)
        self.position, self.tokens_seen = position, tokens_seen
        self.lr_scale *= self.cfg.lr_backoff
        record = {"event": "rollback", "failed_step": failed_step, "reason": reason, "to_step": self.step,
                  "lr_scale": self.lr_scale, "rollbacks": self.n_rollbacks}
        self._emit(record)
        warnings.warn(f"LN removal: {reason} at step {failed_step}; rolled back to step {self.step}, "
                      f"LR scale {self.lr_scale:g} (rollback {self.n_rollbacks}/{self.cfg.max_rollbacks})")

    def stage(self) -> str:
        if self.cfg.vanilla:
            return "vanilla (LN kept)"
        return self.schedule.describe(min(self.step, self.schedule.steps - 1), self.sites)

    def stop_here(self) -> None:
        """After Ctrl-C: checkpoint this step (unless just done; a state failing the checks is not kept) and stop."""
        if self.saved_step != self.step:
            with contextlib.suppress(FloatingPointError):
                self.checkpoint()
        raise TrainingInterrupted(self.step, self.last_good)

    # -- loop ----------------------------------------------------------------------------
    def train(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.progress or self.dist.rank != 0,
                   desc="remove LN" if not self.cfg.vanilla else "vanilla FT", dynamic_ncols=True)
        was_training = self.model.training
        self.model.train()
        try:
            while self.step < self.cfg.steps:
                self.apply_schedule()
                stats = self.forward_backward()
                reason = self.check(stats)
                if reason and self.skippable(stats):
                    self.skip(reason)
                    continue
                if reason:
                    self.rollback(reason)
                    bar.n = self.step
                    bar.refresh()
                    continue
                stage = self.stage()
                self.optimizer_step(stats)
                record = {"event": "step", "step": self.step, "loss": stats.loss, "ce": stats.ce, "aux": stats.aux,
                          "lr": stats.lr, "grad_norm": stats.grad_norm, "stage": stage, "tokens": self.tokens_seen,
                          "wall_time": round(self.wall_time(), 3)}
                if self.teacher is not None:
                    record["kl"] = stats.kl
                if self.cfg.site_aux:
                    record["site_aux"] = stats.site
                self._emit(record)
                bar.update(1)
                bar.set_postfix_str(f"loss {stats.loss:.3f} aux {stats.aux:.3g} lr {stats.lr:.2e} | {stage}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    try:
                        self.checkpoint()
                    except FloatingPointError as e:
                        self.rollback(str(e))
                if self.stop.requested:
                    self.stop_here()
        finally:
            bar.close()
            self.model.train(was_training)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` (2-norm) with each gradient's norm summed in the ordinary layout's memory
    order: a run in TransformerLens's weight layout (`to_tl_layout`) clips by the very factor a run in the
    ordinary layout does, so both train bit for bit alike. Returns the total norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norms = [torch.linalg.vector_norm(g.contiguous()) for g in grads]  # no copy for contiguous gradients
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return float(total)


def _first_token(data: TokenData) -> int:
    """The one token every training row starts with (positional scales assume it)."""
    first = np.unique(data.sequences[:, 0])
    if first.size != 1:
        raise ValueError(f"positional_sigma needs every training row to start with one fixed token, but rows start "
                         f"with {first[:5].tolist()}...: pass bos_token_id= (e.g. the tokenizer's BOS)")
    return int(first[0])


def _fingerprint(model: Optional[torch.nn.Module]) -> Optional[float]:
    """A cheap digest of a model's weights (detects a different teacher on resume)."""
    if model is None:
        return None
    with torch.no_grad():
        # contiguous: the same sum in whatever layout the weights are stored (a run's teacher is in TL's)
        total = sum(float(p.detach().contiguous().double().abs().sum()) for p in model.parameters())
    return round(total, 6)


# ---- public entry point --------------------------------------------------------------------
def _resolve_settings(model, s: RemovalSettings, data):
    """(Schedule, dict of hyper-parameters, preset or None) from a preset name, a Schedule, or None."""
    n_layers, schedule, steps, seq_len = model.cfg.n_layers, s.schedule, s.steps, s.seq_len
    preset: Optional[Preset] = None
    if isinstance(schedule, str):
        preset = get_preset(schedule)
        if preset.n_layers != n_layers:
            raise ValueError(f"preset {preset.name!r} is for {preset.n_layers}-layer models; this model has {n_layers} "
                             "layers: use schedule=None (Small's schedule scaled to the model) or a Schedule")
        sched = preset.schedule
        if steps is not None and steps != preset.steps:
            warnings.warn(f"preset {preset.name} runs {preset.steps} steps; steps={steps} uses its hyper-parameters "
                          "with Schedule.scaled(n_layers, steps)")
            sched = Schedule.scaled(n_layers, steps)
    elif isinstance(schedule, Schedule):
        if steps is not None and steps != schedule.steps:
            raise ValueError(f"steps={steps} disagrees with the schedule's {schedule.steps} steps")
        sched = schedule
    else:  # None (RemovalSettings refuses other types)
        sched = Schedule.scaled(n_layers, 300 if steps is None else steps)
    if sched.n_layers != n_layers:
        raise ValueError(f"the schedule is for {sched.n_layers} layers; the model has {n_layers}")
    base = preset or PRESETS["gpt2-small"]
    if seq_len is None:
        if isinstance(data, (str, os.PathLike)) and str(data).endswith(".npy") and os.path.isfile(data):
            data = np.load(data, mmap_mode="r")  # a 2-D .npy keeps its row width, like an array
        if isinstance(data, TokenData):
            width = data.seq_len
        else:
            width = getattr(data, "shape", (0, 0))[-1] if getattr(data, "ndim", 0) == 2 else model.cfg.n_ctx
        seq_len = min(int(width), model.cfg.n_ctx, 1024 if preset is None else preset.seq_len)
    hp = {
        "lr": base.lr if s.lr is None else s.lr,
        "min_lr": base.min_lr if s.min_lr is None else s.min_lr,
        "aux_lambda": base.aux_lambda if s.aux_lambda is None else s.aux_lambda,
        "warmup": (base.warmup if preset is not None and sched is preset.schedule
                   else max(1, round(sched.steps * 25 / 300))) if s.warmup is None else s.warmup,
        "batch_size": (preset.batch_size if preset is not None else 32) if s.batch_size is None else s.batch_size,
        "seq_len": seq_len,
    }
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    return sched, hp, preset


def _micro_batch(s: RemovalSettings, rec: dict, batch_size: int, dist: _Dist) -> int:
    """Sequences per forward pass per process: the user's, else the recipe's (if it divides), else the whole share."""
    per_rank = batch_size // dist.world
    mbs = (rec.get("micro_batch_size") or per_rank) if s.micro_batch_size is None else s.micro_batch_size
    if rec.get("micro_batch_size") and s.micro_batch_size is None and batch_size % (mbs * dist.world):
        mbs = per_rank  # the paper's micro-batch does not divide this process count's share: one per rank
    if batch_size % (mbs * dist.world):
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({mbs}) x "
                         f"processes ({dist.world})")
    return mbs


def _check_ramp(s: RemovalSettings, sched: Schedule) -> None:
    """Every ramp (of the sites this run freezes) must end inside the run."""
    last = sched.end if s.sites is None else max(sched.removal_step(x) for x in s.sites)
    if s.freeze_ramp and not s.vanilla and last + s.freeze_ramp > sched.steps - 1:
        raise ValueError(f"freeze_ramp={s.freeze_ramp}: the last site, frozen at step {last}, would be fully "
                         f"frozen only at step {last + s.freeze_ramp}, past the run's last step "
                         f"{sched.steps - 1}; lengthen the run or shorten the ramp")


def _resolve_config(model: LNFreeTransformer, s: RemovalSettings, data, dist: _Dist) -> tuple[RemovalConfig, Schedule]:
    """The run's `RemovalConfig` and `Schedule`: the settings with the preset's, recipe's and model's defaults."""
    eot = s.eot_token_id if s.eot_token_id is not None else getattr(model.tokenizer, "eos_token_id", None)
    sched, hp, preset = _resolve_settings(model, s, data)
    rec = _recipe(s.recipe, preset)
    _check_ramp(s, sched)
    if s.batch_size is None and "batch_size" in rec:
        hp["batch_size"] = rec["batch_size"]
    mbs = _micro_batch(s, rec, hp["batch_size"], dist)
    optim = OptimConfig(steps=sched.steps, lr=float(hp["lr"]), min_lr=float(hp["min_lr"]), warmup=hp["warmup"],
                        weight_decay=rec.get("weight_decay", 0.01) if s.weight_decay is None else float(s.weight_decay),
                        betas=(0.9, 0.999), grad_clip=1.0, horizon=rec.get("horizon"),
                        no_decay=rec.get("no_decay", "ndim<2"), warmup_from_zero=rec.get("warmup_from_zero", False))
    cfg = RemovalConfig(optim=optim, batch_size=hp["batch_size"], micro_batch_size=mbs, seq_len=hp["seq_len"],
                        aux_lambda=float(hp["aux_lambda"]), vanilla=bool(s.vanilla), seed=s.seed, bf16=bool(s.bf16),
                        schedule=sched.to_dict(), eot_token_id=eot,
                        momentum=rec.get("momentum", 0.9) if s.momentum is None else float(s.momentum),
                        lora_rank=s.lora_rank, lora_alpha=None if s.lora_alpha is None else float(s.lora_alpha),
                        distill=float(s.distill), distill_temperature=float(s.distill_temperature),
                        share_ln1_sigma=rec.get("share_ln1_sigma", False),
                        ln1_momentum_power=rec.get("ln1_momentum_power", 1),
                        mask_eot_labels=rec.get("mask_eot_labels", False),
                        vanilla_aux=bool(s.vanilla) and rec.get("vanilla_aux", False),
                        dropout=rec.get("dropout", 0.0),
                        tie_embeddings=resolve_tie(rec.get("tie_embeddings", False), model),
                        freeze_ramp=s.freeze_ramp, positional_sigma=s.positional_sigma,
                        checkpoint_every=s.checkpoint_every, keep_checkpoints=s.keep_checkpoints,
                        max_rollbacks=s.max_rollbacks, skip_nonfinite=s.skip_nonfinite,
                        diverge_factor=float(s.diverge_factor),
                        spike_factor=float(s.spike_factor), site_aux=float(s.site_aux), sites=s.sites)
    return cfg, sched


def _training_data(model: LNFreeTransformer, data, cfg: RemovalConfig, bos_token_id: Optional[int]) -> TokenData:
    """The run's token rows (enough for every step, and a little more), in the seeded order."""
    needed = cfg.steps * cfg.batch_size * cfg.seq_len
    seqs = load_tokens(data, seq_len=cfg.seq_len, tokenizer=model.tokenizer, eot_token_id=cfg.eot_token_id,
                       max_tokens=int(needed * 1.05) + cfg.seq_len, bos_token_id=bos_token_id)
    tdata = TokenData(seqs, seed=cfg.seed)
    _warn_repeats(cfg, tdata.n_sequences)
    lo, hi = tdata.token_range()
    if lo < 0 or hi >= model.cfg.d_vocab:
        raise ValueError(f"data token ids span [{lo}, {hi}], outside the model's vocabulary [0, {model.cfg.d_vocab})")
    return tdata


def _check_sites(model: LNFreeTransformer, sites: Optional[tuple]) -> None:
    """`sites=` names sites of this model that are not removed yet (a typo gets the nearest name)."""
    if sites is None:
        return
    import difflib

    for site in sites:
        if site not in model.ln_sites:
            near = difflib.get_close_matches(site, model.ln_sites, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"its sites are {model.ln_sites[:4]}... (model.ln_sites)"
            raise ValueError(f"sites: {site!r} is not a norm site of this model; {hint}")
    removed = [s for s in sites if model.ln_mode(s) == "removed"]
    if removed:
        raise ValueError(f"sites {removed} are already removed from the model: name sites that are live or frozen")


def _check_scheduled(model: LNFreeTransformer, cfg: RemovalConfig, sched: Schedule) -> None:
    targets = model.ln_sites if cfg.sites is None else cfg.sites
    unscheduled = [s for s in targets if model.ln_mode(s) == "live" and s not in sched.sites]
    if unscheduled:
        raise ValueError(f"live sites {unscheduled[:3]} are not in the schedule")


MAX_EPOCHS = 3  # the paper's runs read each sequence about once; far more overfits the fine-tune's data


def _warn_repeats(cfg: RemovalConfig, n_sequences: int) -> None:
    epochs = cfg.steps * cfg.batch_size / n_sequences
    if epochs > MAX_EPOCHS:
        warnings.warn(f"the run reads its {n_sequences} training sequences {epochs:.0f} times over ({cfg.steps} steps x "
                      f"batch {cfg.batch_size}): fine-tuning on repeated data overfits it (train loss falls while "
                      "held-out CE rises); give more data or fewer steps", stacklevel=4)


def _resolve_device(model, device, dist: _Dist) -> torch.device:
    dev = resolve_device(device)
    if dev is None:
        if dist.active and torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank)
        return next(model.parameters()).device
    return dev


def _eval_tokens(eval_data, model, seq_len: int, tokenizer, eot, bos=None) -> Optional[torch.Tensor]:
    if eval_data is None:
        return None
    eval_data = as_token_source(eval_data, argument="eval_data")
    if isinstance(eval_data, (str, os.PathLike)) and str(eval_data).endswith(".npy"):
        eval_data = np.load(eval_data, mmap_mode="r")
    if isinstance(eval_data, (np.ndarray, torch.Tensor)) and eval_data.ndim == 2 and eval_data.shape[1] <= model.cfg.n_ctx:
        arr = eval_data
    else:
        arr = load_tokens(eval_data, seq_len=seq_len, tokenizer=tokenizer, eot_token_id=eot, bos_token_id=bos)
    t = torch.as_tensor(np.asarray(arr).astype(np.int64)) if not isinstance(arr, torch.Tensor) else arr.long()
    return model._check_tokens(t)


def remove_layernorm(
    model,
    data,
    *,
    settings: Optional[RemovalSettings] = None,
    out_dir: Union[None, str, os.PathLike] = None,
    resume: Union[bool, str] = False,
    eval_data=None,
    progress: bool = True,
    device: Union[None, str, torch.device] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    **setting_kwargs,
) -> LNFreeTransformer:
    """Fine-tune LayerNorm away (the paper's procedure); returns the LN-free model.

    This trains. `LNFreeTransformer.remove_ln()` is the other, training-free step: it folds frozen
    scales into the weights; `remove_layernorm` fine-tunes while freezing sites one by one and
    calls `remove_ln()` at the end.

    Args:
        model: HookedTransformer or LNFreeTransformer with LayerNorm. Trained IN PLACE (no copy, so large
            models fit; a HookedTransformer's parameters are shared with the returned model): pass a
            copy to keep the original.
        data: training tokens or text (see `lnfree.removal.data.load_tokens`): a [n, seq] / 1-D token
            tensor, array or nested list of ids, .npy / .txt / .jsonl paths, a directory, or a HF dataset name.
        settings: a `RemovalSettings` (schedule, steps, batch sizes, lr, variants, ramp, guard factors,
            ``sites``: every field is documented there). The short form: its fields as keyword arguments
            (``steps=300, lr=1e-3``), which build one; giving both is an error.
        out_dir: where checkpoints, ``log.jsonl``, ``summary.json`` and the final model (``final/``
            via `save_pretrained`, and ``final_tl/`` as TransformerLens weights + config) go.
        resume: True: continue the run in `out_dir` from its latest good checkpoint (an error if there
            is none); "auto": continue if there is one, else start; False: start (refused if `out_dir`
            holds a run).
        eval_data: held-out tokens (same forms as `data`; 2-D arrays keep their width): CE with a
            bootstrap CI is measured before and after and written to the summary.
        progress: show a progress bar.
        device: where to train (default: the model's device; cuda:LOCAL_RANK under torchrun with GPUs).
        callback: called (on rank 0) with a dict for every step and event (freeze, checkpoint, rollback).

    With ``sites=[...]`` only those sites are frozen (each at its schedule step) and folded at the end: the
    returned model keeps every other site live. Under ``torchrun --nproc_per_node N`` each process runs this
    same call: the model is wrapped in DistributedDataParallel, each rank takes its share of every global
    batch, sigma statistics are all-reduced so all ranks freeze the same sigma, and only rank 0 writes files
    (out_dir must be on a filesystem every rank can read, for rollbacks and resume).

    The summary dict is also attached to the returned model as ``model.removal_summary``.

    Example:
        >>> ln_free = remove_layernorm(model, "train_tokens.npy", steps=300, batch_size=16, seq_len=256,
        ...                            eval_data="heldout.npy", out_dir="runs/removal")  # doctest: +SKIP
        >>> ln_free.is_ln_free                                                            # doctest: +SKIP
        True
        >>> settings = RemovalSettings(steps=300, batch_size=16, seq_len=256, freeze_ramp=3)
        >>> partial = remove_layernorm(model, "train_tokens.npy", settings=settings.replace(sites=["blocks.0.ln1"]))
        ... # doctest: +SKIP
    """
    s = RemovalSettings.from_kwargs(settings, setting_kwargs)
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    model = as_lnfree(model)
    if model.is_ln_free:
        raise ValueError("the model has no LayerNorm left (every site removed): nothing to remove")
    _check_sites(model, s.sites)
    data = as_token_source(data)
    out = None if out_dir is None else Path(out_dir)
    found = _check_out_dir(out, resume)
    dist = _init_distributed()
    try:
        dev = _resolve_device(model, device, dist)
        if next(model.parameters()).device != dev:
            model.to(dev, print_details=False)
        cfg, sched = _resolve_config(model, s, data, dist)
        tdata = _training_data(model, data, cfg, s.bos_token_id)
        _check_scheduled(model, cfg, sched)
        teacher = _teacher(model) if cfg.distill > 0 else None
        try:
            run = _Run(model, tdata, cfg, sched, out_dir=out, dist=dist, device=dev,
                       eval_tokens=_eval_tokens(eval_data, model, cfg.seq_len, model.tokenizer, cfg.eot_token_id,
                                                s.bos_token_id),
                       progress=progress, callback=callback, teacher=teacher)
            _start(run, out, found, model)
            with stop_on_interrupt(enabled=not run.dist.active) as run.stop:
                run.train()
        finally:
            contiguous_parameters(model)  # the model as passed leaves in the ordinary layout, finished or not
        return _finish(run, out, model)
    finally:
        if dist.created:
            torch.distributed.destroy_process_group()


def _recipe(recipe, preset: Optional[Preset]) -> dict:
    """The settings a recipe fixes: {} for lnfree's; the paper's per preset; or a dict of the switches."""
    from lnfree.removal.schedule import PAPER_RECIPES, RECIPE_KEYS

    if recipe is None:
        return {}
    if isinstance(recipe, dict):  # individual departures (e.g. to measure one at a time)
        bad = sorted(set(recipe) - set(RECIPE_KEYS))
        if bad:
            raise ValueError(f"recipe keys {bad} unknown; allowed: {sorted(RECIPE_KEYS)}")
        return dict(recipe)
    if recipe != "paper":
        raise ValueError(f"recipe must be None (lnfree's), 'paper' or a dict of {sorted(RECIPE_KEYS)}, got {recipe!r}")
    if preset is None:
        raise ValueError("recipe='paper' needs a preset schedule (schedule='gpt2-small', ...): the paper's runs are "
                         "per model size")
    return dict(PAPER_RECIPES[preset.name])


def _teacher(model: LNFreeTransformer) -> LNFreeTransformer:
    """A frozen copy of the model as passed: the distillation target."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    to_tl_layout(teacher)  # private to the run: no per-pass weight copies
    return teacher.eval()


def _check_out_dir(out: Optional[Path], resume) -> Optional[Path]:
    """The checkpoint to resume from (None: start), refusing the combinations that would surprise."""
    if out is None:
        if resume is True:
            raise ValueError("resume=True needs out_dir (where the run's checkpoints are)")
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a directory")
    found = CheckpointDir(out).latest() if out.is_dir() else None
    if found is not None and resume is False:
        raise ValueError(f"{out} already holds a removal run (checkpoint {found.name}); pass resume=True "
                         "(--resume) to continue it, or choose another out_dir")
    if found is None and resume is True:
        what = "does not exist" if not out.exists() else "holds no removal checkpoint (no checkpoints/latest)"
        raise ValueError(f"nothing to resume: {out} {what}; check the path, or start a new run without "
                         "resume (--resume)")
    return found


def _start(run: _Run, out: Optional[Path], found: Optional[Path], model: LNFreeTransformer) -> None:
    from lnfree.evaluation import cross_entropy

    if found is not None:
        ck = read_checkpoint(found)
        run.check_resume(ck["state"])
        run.restore(ck)
        if run.dist.rank == 0:
            dropped = run.log.rewind(run.step)
        run._emit({"event": "resume", "step": run.step, "from": str(found),
                   "dropped_log_records": dropped if run.dist.rank == 0 else None})
        return
    if out is not None and run.dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(str(out / "tokenizer"))
    if run.eval_tokens is not None and run.dist.rank == 0:
        run.ce_before = cross_entropy(model, run.eval_tokens, batch_size=run.cfg.micro_batch_size,
                                      progress=run.progress).mean
    try:
        run.checkpoint()  # step 0: something to roll back to before the first periodic checkpoint
    except FloatingPointError as e:
        raise DivergedError(f"LN removal cannot start: the model as given fails the checks ({e})") from None


def _finish(run: _Run, out: Optional[Path], model: LNFreeTransformer) -> LNFreeTransformer:
    from lnfree.evaluation import cross_entropy
    from lnfree.removal.lora import is_lora, merge_lora

    run.end_ramp()
    untie_embeddings(model)  # remove_ln folds ln_final into a W_U of its own
    frozen_sigma = {s: model.ln_scale(s) for s in model.ln_sites if model.ln_mode(s) == "frozen"}
    if is_lora(model):
        merge_lora(model)
    if not run.cfg.vanilla:  # positional scales cannot be folded: those sites stay frozen (still norm-free)
        chosen = model.ln_sites if run.cfg.sites is None else run.cfg.sites  # sites=: the others stay live
        model.remove_ln([s for s in chosen if model.ln_mode(s) != "removed" and not model.is_positional(s)])
    model.eval()
    ce_after = None
    if run.eval_tokens is not None and run.dist.rank == 0:
        ce_after = cross_entropy(model, run.eval_tokens, batch_size=run.cfg.micro_batch_size,
                                 progress=run.progress).mean
    summary = {
        "vanilla": run.cfg.vanilla, "steps": run.step, "tokens": run.tokens_seen,
        "wall_time_s": round(run.wall_time(), 3), "world_size": run.dist.world,
        "ce_before": None if run.ce_before is None else run.ce_before.to_dict(),
        "ce_after": None if ce_after is None else ce_after.to_dict(),
        "ce_delta": None if (ce_after is None or run.ce_before is None) else ce_after.value - run.ce_before.value,
        "ln_free": model.is_ln_free, "norm_free": model.is_norm_free, "rollbacks": run.n_rollbacks, "skips": run.n_skips, "lr_scale": run.lr_scale,
        "sigma": frozen_sigma, "schedule": run.schedule.to_dict(), "config": run.cfg.to_dict(),
        "variant": ("lora" if run.cfg.lora_rank else "full") + ("+distill" if run.cfg.distill > 0 else ""),
    }
    if out is not None and run.dist.rank == 0:
        summary["final"] = _save_final(model, out)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    run.dist.barrier()
    model.removal_summary = summary
    return model


def _save_final(model: LNFreeTransformer, out: Path) -> dict:
    """final_tl/ (TransformerLens weights + config, always) and final/ (HF format via lnfree.loading)."""
    saved = {}
    tl = out / "final_tl"
    tl.mkdir(parents=True, exist_ok=True)
    save_safetensors(_weights(model), tl / "model.safetensors")
    atomic_write_text(tl / "config.json", json.dumps({"model": cfg_to_json(model.cfg), "ln_modes": model.ln_modes(),
                                                      "ln_state": model.ln_state()}, indent=1))
    saved["final_tl"] = str(tl)
    from lnfree.loading import hf_gpt2_problems

    problems = hf_gpt2_problems(model.cfg)
    if problems:  # not GPT-2-shaped (Llama, NeoX, ...): final_tl is its format
        saved["final_error"] = f"no HF GPT-2 export for this architecture: {sorted(problems)}"
        return saved
    try:
        model.save_pretrained(str(out / "final"))
        fix_tree_modes(out / "final")  # safetensors writes 0600
        saved["final"] = str(out / "final")
    except Exception as e:  # lnfree.loading may not support this model: keep final_tl
        warnings.warn(f"save_pretrained failed ({type(e).__name__}: {e}); the model is in {tl}")
        saved["final_error"] = f"{type(e).__name__}: {e}"
    return saved
