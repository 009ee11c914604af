"""The removal fine-tune: freeze LN sites one by one on a schedule, fine-tune, fold them away.

`remove_layernorm` runs the paper's procedure on any `LNFreeTransformer` (or HookedTransformer
with LayerNorm). Per optimizer step:

1. sites whose removal step has come are frozen at their sigma EMA (`LNFreeTransformer.freeze_ln`);
2. each micro-batch: forward (optionally under bf16 autocast), next-token CE + lambda * aux loss
   (`loss.aux_norm_loss` on ``blocks.{L-1}.hook_resid_post``), backward; the per-site input std of
   live sites is recorded (`recording_ln_std`);
3. the step's losses and per-micro-batch std statistics are combined across ranks, the step is
   checked (non-finite loss/gradient, or a loss spike: rolled back), gradients are clipped to
   1.0 and AdamW steps at the warmup + cosine learning rate; the EMAs absorb the micro-batches;
4. every ``checkpoint_every`` steps an atomic checkpoint is written.

At the end every site is folded into the weights (`remove_ln`): the returned model is LN-free.
``vanilla=True`` is the paper's control: same data, steps and optimiser, LN kept live, no aux loss.

Checkpoints (``out_dir/checkpoints/step_XXXXXX/``): ``model.safetensors`` (weights),
``state.json`` (step, data position, sigma EMAs, site modes and scales, RNG states, loss history,
configuration) and ``optimizer.pt`` (AdamW state and LR-scheduler state, plain tensors: readable
with ``torch.load(weights_only=True)``). A directory is complete before it is renamed into place,
and ``checkpoints/latest`` (the name of the newest complete one) is replaced atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lnfree.model import LNFreeTransformer
from lnfree.removal.data import TokenData, chunk, load_tokens
from lnfree.removal.loss import aux_norm_loss, next_token_ce
from lnfree.removal.schedule import PRESETS, Preset, Schedule, get_preset
from lnfree.removal.sigma import SigmaEMA, global_micro_batch_means, stats_tensor

CHECKPOINT_FORMAT = "lnfree-removal-checkpoint"
# settings that may differ when a run is resumed (they do not change the trained weights)
RESUME_FREE_KEYS = {"checkpoint_every", "keep_checkpoints", "max_rollbacks"}


# ---- configuration -------------------------------------------------------------------------
@dataclass(frozen=True)
class RemovalConfig:
    """Every setting of a run (JSON-serialisable); stored in each checkpoint."""

    steps: int
    batch_size: int
    micro_batch_size: int
    seq_len: int
    lr: float
    min_lr: float
    warmup: int
    aux_lambda: float
    vanilla: bool
    seed: int
    bf16: bool
    schedule: dict
    eot_token_id: Optional[int] = None
    momentum: float = 0.9
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.999)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_rollbacks: int = 3
    lr_backoff: float = 0.5
    spike_factor: float = 3.0
    spike_margin: float = 2.0
    spike_window: int = 50
    spike_min_history: int = 10

    def __post_init__(self):
        ints = {"steps": 1, "batch_size": 1, "micro_batch_size": 1, "seq_len": 2, "warmup": 0,
                "checkpoint_every": 1, "keep_checkpoints": 1, "max_rollbacks": 0, "seed": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("lr", "min_lr", "aux_lambda", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than the run (steps={self.steps})")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_at(step: int, cfg: RemovalConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at the last step.

    Example:
        >>> cfg = RemovalConfig(steps=100, batch_size=1, micro_batch_size=1, seq_len=8, lr=1.0, min_lr=0.5,
        ...                     warmup=10, aux_lambda=0.0, vanilla=True, seed=0, bf16=False, schedule={})
        >>> lr_at(0, cfg), lr_at(10, cfg), round(lr_at(99, cfg), 6)
        (0.1, 1.0, 0.5)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: RemovalConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and LayerNorm weights, as HF Trainer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8)


class SpikeDetector:
    """Flags a loss above ``factor`` x the running median and above ``median + margin``.

    Example:
        >>> d = SpikeDetector(min_history=3)
        >>> for x in (3.0, 3.1, 2.9): d.record(x)
        >>> d.check(3.2) is None, d.check(12.0) is not None
        (True, True)
    """

    def __init__(self, factor: float = 3.0, margin: float = 2.0, window: int = 50, min_history: int = 10):
        self.factor, self.margin, self.min_history = factor, margin, min_history
        self.history: deque = deque(maxlen=window)

    def check(self, loss: float) -> Optional[str]:
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if len(self.history) >= self.min_history:
            med = statistics.median(self.history)
            if loss > self.factor * med and loss > med + self.margin:
                return f"loss spike: {loss:.4g} > {self.factor:g} x running median {med:.4g} (and > median + {self.margin:g})"
        return None

    def record(self, loss: float) -> None:
        self.history.append(float(loss))


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


# ---- model config (de)serialisation --------------------------------------------------------
def cfg_to_json(cfg: HookedTransformerConfig) -> dict:
    """The init fields of a HookedTransformerConfig as JSON values (dtype as a string, no device)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in ("device", "n_devices"):
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[f.name] = v
    return out


def cfg_from_json(d: dict, device: Optional[str] = None) -> HookedTransformerConfig:
    """Inverse of `cfg_to_json`."""
    d = dict(d)
    if isinstance(d.get("dtype"), str):
        d["dtype"] = getattr(torch, d["dtype"])
    names = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    return HookedTransformerConfig(**{k: v for k, v in d.items() if k in names}, device=device or "cpu")


# ---- checkpoint files ----------------------------------------------------------------------
def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # directories on some filesystems; best effort
        pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict as contiguous CPU tensors, cloning only where storages are shared."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def latest_checkpoint(out_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest complete checkpoint directory of a run (None if there is none)."""
    ckdir = Path(out_dir) / "checkpoints"
    pointer = ckdir / "latest"
    if not pointer.exists():
        return None
    path = ckdir / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


class _Checkpoints:
    """Last-good-state storage: checkpoint directories under out_dir, or memory when out_dir is None."""

    def __init__(self, out_dir: Optional[Path], keep: int, dist: _Dist):
        self.dir = None if out_dir is None else out_dir / "checkpoints"
        self.keep, self.dist = keep, dist
        self.memory: Optional[dict] = None

    def save(self, weights: dict, optimizer: dict, state: dict) -> Optional[Path]:
        if self.dir is None:
            self.memory = {"weights": {k: v.clone() for k, v in weights.items()},
                           "optimizer": _clone_tree(optimizer), "state": json.loads(json.dumps(state))}
            return None
        path = None
        if self.dist.rank == 0:
            path = self._write(weights, optimizer, state)
        self.dist.barrier()  # other ranks may roll back to it
        return path if path is not None else self.dir / f"step_{state['step']:06d}"

    def _write(self, weights: dict, optimizer: dict, state: dict) -> Path:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step_{state['step']:06d}"
        tmp = self.dir / f".{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        final = self.dir / name
        current = latest_checkpoint(self.dir.parent)
        if final.exists():  # left by a run killed before it moved `latest`; never the pointed-to one
            if current is not None and current.resolve() == final.resolve():
                raise RuntimeError(f"refusing to overwrite the latest good checkpoint {final}")
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.dir)
        _atomic_write_text(self.dir / "latest", name + "\n")
        self._prune(name)
        return final

    def _prune(self, latest: str) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for p in done[: max(0, len(done) - self.keep)]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".step_*.tmp*"):  # debris of killed writers
            shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Optional[Path] = None) -> Optional[dict]:
        """{'weights', 'optimizer', 'state'} of `path` or the latest checkpoint (None if none)."""
        if self.dir is None:
            return self.memory
        path = path or latest_checkpoint(self.dir.parent)
        return None if path is None else read_checkpoint(path)


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    return x


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """{'weights': state dict, 'optimizer': .pt contents, 'state': state.json} of one checkpoint dir."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a removal checkpoint (state.json format {state.get('format')!r})")
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return {"weights": load_file(str(path / "model.safetensors")), "optimizer": optimizer, "state": state,
            "path": str(path)}


def load_checkpoint(path: Union[str, os.PathLike], device: Optional[str] = None) -> tuple[LNFreeTransformer, dict]:
    """Rebuild the model of a checkpoint (a ``step_*`` dir, or a run dir: its latest checkpoint).

    Returns ``(model, state)``: weights loaded, sites in their checkpointed modes and scales.

    Example:
        >>> model, state = load_checkpoint("runs/removal")     # doctest: +SKIP
        >>> state["step"], model.ln_modes()["ln_final"]         # doctest: +SKIP
        (300, 'frozen')
    """
    path = Path(path)
    if not (path / "state.json").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} is neither a removal checkpoint nor a run dir with checkpoints/latest")
        path = found
    ck = read_checkpoint(path)
    model = LNFreeTransformer(cfg_from_json(ck["state"]["model_config"], device), tokenizer=_load_tokenizer(path))
    model.load_state_dict(ck["weights"])
    _restore_sites(model, ck["state"])
    return model.eval(), ck["state"]


def _load_tokenizer(ckpt_path: Path):
    tok_dir = ckpt_path.parent.parent / "tokenizer"
    if not tok_dir.exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def _restore_sites(model: LNFreeTransformer, state: dict) -> None:
    for site, mode in state["site_modes"].items():
        current = model.ln_mode(site)
        if mode == "frozen":
            model.freeze_ln(site, scales=state["site_scales"][site])
        elif mode == "live" and current == "frozen":
            model.unfreeze_ln(site)
        elif mode != current and "removed" in (mode, current):
            raise ValueError(f"checkpoint has {site} {mode}, the model has it {current}; removal is permanent")


# ---- the run -------------------------------------------------------------------------------
@dataclass
class StepStats:
    loss: float
    ce: float
    aux: float
    grad_norm: float
    lr: float
    micro_means: list


class _Run:
    """State and loop of one removal (or vanilla) fine-tune."""

    def __init__(self, model: LNFreeTransformer, data: TokenData, cfg: RemovalConfig, schedule: Schedule, *,
                 out_dir: Optional[Path], dist: _Dist, device: torch.device, eval_tokens=None,
                 progress: bool = True, callback: Optional[Callable[[dict], Any]] = None):
        self.model, self.data, self.cfg, self.schedule = model, data, cfg, schedule
        self.out_dir, self.dist, self.device = out_dir, dist, device
        self.eval_tokens, self.progress, self.callback = eval_tokens, progress, callback
        self.k_local = cfg.batch_size // (cfg.micro_batch_size * dist.world)
        self.sites = [s for s in schedule.sites if s in set(model.ln_sites)]
        live = [s for s in self.sites if model.ln_mode(s) == "live"]
        self.ema = SigmaEMA([] if cfg.vanilla else live, cfg.momentum)
        self.spike = SpikeDetector(cfg.spike_factor, cfg.spike_margin, cfg.spike_window, cfg.spike_min_history)
        self.optimizer = make_optimizer(model, cfg)
        self.ckpts = _Checkpoints(out_dir, cfg.keep_checkpoints, dist)
        self.step = self.position = self.tokens_seen = self.n_rollbacks = 0
        self.lr_scale = 1.0
        self.ce_before = None
        self.wall_prev = 0.0
        self.t0 = time.time()
        self.last_good: Optional[str] = None
        self.ddp = None
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # buffers (sigma, masks) are identical on every rank by construction: no per-forward sync
            import inspect

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
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.callback is not None:
            self.callback(record)

    def wall_time(self) -> float:
        return self.wall_prev + time.time() - self.t0

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": 1, "step": self.step, "position": self.position,
            "tokens_seen": self.tokens_seen, "lr_scale": self.lr_scale, "n_rollbacks": self.n_rollbacks,
            "sigma_ema": self.ema.state_dict(), "site_modes": self.model.ln_modes(),
            "site_scales": {s: self.model.ln_scale(s) for s in self.model.ln_sites},
            "loss_history": list(self.spike.history), "rng": _rng_state(), "config": self.cfg.to_dict(),
            "model_config": cfg_to_json(self.model.cfg), "data": self.data.fingerprint(),
            "ce_before": None if self.ce_before is None else self.ce_before.to_dict(),
            "wall_time": self.wall_time(), "world_size": self.dist.world,
        }

    def checkpoint(self) -> None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # never store a broken model as the last good state
            raise FloatingPointError(f"non-finite parameters {bad[:3]}")
        optimizer = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": {"step": self.step, "lr_scale": self.lr_scale}}
        path = self.ckpts.save(_weights(self.model), optimizer, self.state())
        self.last_good = None if path is None else str(path)
        self._emit({"event": "checkpoint", "step": self.step, "path": self.last_good})

    def restore(self, ck: dict, keep_position: bool = False) -> None:
        """Load a checkpoint's model, optimizer, EMA and counters (the data cursor too, unless kept)."""
        state = ck["state"]
        self.model.load_state_dict({k: v.to(self.device) for k, v in ck["weights"].items()})
        _restore_sites(self.model, state)
        # cloned: Optimizer.load_state_dict may alias the given tensors, and the snapshot must stay intact
        self.optimizer.load_state_dict(_clone_tree(ck["optimizer"]["optimizer"]))
        self.ema.load_state_dict(state["sigma_ema"])
        self.spike.history.clear()
        for x in state["loss_history"]:
            self.spike.record(x)
        self.step = state["step"]
        if not keep_position:
            self.position, self.tokens_seen = state["position"], state["tokens_seen"]
            self.lr_scale, self.n_rollbacks = state["lr_scale"], state["n_rollbacks"]
            self.wall_prev = state["wall_time"]
            self.t0 = time.time()
        if state.get("ce_before") is not None:
            from lnfree.stats import Estimate

            self.ce_before = Estimate(**state["ce_before"])
        _set_rng_state(state["rng"])
        self.last_good = ck.get("path")

    def check_resume(self, state: dict) -> None:
        old, new = state["config"], self.cfg.to_dict()
        diff = [k for k in new if k not in RESUME_FREE_KEYS and old.get(k) != new[k]]
        if diff:
            raise ValueError("cannot resume: settings differ from the checkpoint's: "
                             + ", ".join(f"{k}={old.get(k)!r} (now {new[k]!r})" for k in diff))
        if state["data"] != self.data.fingerprint():
            raise ValueError(f"cannot resume: the training data differ from the checkpoint's "
                             f"({state['data']} vs {self.data.fingerprint()})")
        if state["world_size"] != self.dist.world:
            warnings.warn(f"resuming a {state['world_size']}-process run with {self.dist.world} processes: "
                          "same global batch, but float rounding differs")

    # -- schedule ------------------------------------------------------------------------
    def apply_schedule(self) -> None:
        """Freeze every tracked site whose removal step has come (idempotent, so resume-safe)."""
        if self.cfg.vanilla:
            return
        due = [s for s in self.ema.sites if self.schedule.removal_step(s) <= self.step]
        if not due:
            return
        scales = {s: self.ema.value(s) for s in due}
        self.model.freeze_ln(due, scales=scales)
        self.ema.drop(due)
        self._emit({"event": "freeze", "step": self.step, "sigma": scales})

    # -- one step ------------------------------------------------------------------------
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
        use_aux = not cfg.vanilla and cfg.aux_lambda > 0
        handle = model.hook_dict[self._hook_name].register_forward_hook(self._capture) if use_aux else None
        try:
            sums, local_stats = self._accumulate(forward, track, use_aux)
        finally:
            if handle is not None:
                handle.remove()
            self._resid = None
        sums = self._all_reduce_sum(sums).cpu() / (self.k_local * self.dist.world)
        micro = global_micro_batch_means(local_stats, self.ema.sites, device=self._comm_device()) if track else []
        lr = lr_at(self.step, cfg) * self.lr_scale
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        ce_mean, aux_mean = float(sums[0]), float(sums[1])
        total = ce_mean + (cfg.aux_lambda * aux_mean if use_aux else 0.0)
        return StepStats(total, ce_mean, aux_mean, grad_norm, lr, micro)

    def _accumulate(self, forward, track: bool, use_aux: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of this rank's micro-batches (gradients sum to the step's mean loss).

        Returns the summed (CE, aux) [2] and each micro-batch's per-site (std sum, count) [k, sites, 2].
        """
        cfg, model = self.cfg, self.model
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        local_stats = torch.zeros(self.k_local, len(self.ema.sites), 2, dtype=torch.float64)
        for j, tokens in self._micro_batches():
            sync = self.ddp is None or j == self.k_local - 1
            with contextlib.ExitStack() as stack:
                if not sync:
                    stack.enter_context(self.ddp.no_sync())
                rec = stack.enter_context(model.recording_ln_std()) if track else None
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits = forward(tokens, return_type="logits")
                    ce = next_token_ce(logits, tokens)
                    aux = aux_norm_loss(self._resid, tokens, eot_token_id=cfg.eot_token_id, eps=model.cfg.eps) \
                        if use_aux else torch.zeros((), device=self.device)
                    loss = ce + cfg.aux_lambda * aux if use_aux else ce
                (loss / self.k_local).backward()
            self._resid = None
            sums += torch.stack([ce.detach(), aux.detach()]).double()  # stays on device: no sync per micro-batch
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

    def optimizer_step(self, stats: StepStats) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = stats.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for means in stats.micro_means:
            self.ema.update(means)
        self.spike.record(stats.loss)
        self.step += 1
        self.position += self.cfg.batch_size
        self.tokens_seen += self.cfg.batch_size * self.cfg.seq_len

    def rollback(self, reason: str) -> None:
        """Return to the last good checkpoint with a lower LR; the failed batch is not replayed."""
        self.optimizer.zero_grad(set_to_none=True)
        failed_step = self.step
        self.n_rollbacks += 1
        if self.n_rollbacks > self.cfg.max_rollbacks:
            raise RuntimeError(
                f"LN removal gave up at step {failed_step}: {reason}. {self.cfg.max_rollbacks} rollbacks did not "
                f"help (LR scale now {self.lr_scale:g}). Last good checkpoint: {self.last_good or 'in memory'}; "
                "try a lower lr, a longer schedule, or check the data"
            )
        ck = self.ckpts.load()
        if ck is None:
            raise RuntimeError(f"step {failed_step}: {reason}, and there is no checkpoint to roll back to")
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
                reason = self.spike.check(stats.loss) or (
                    None if math.isfinite(stats.grad_norm) else f"non-finite gradient norm ({stats.grad_norm})") or (
                    None if all(math.isfinite(v) for m in stats.micro_means for v in m.values())
                    else "non-finite LN input std")
                if reason:
                    self.rollback(reason)
                    bar.n = self.step
                    bar.refresh()
                    continue
                stage = self.stage()
                self.optimizer_step(stats)
                self._emit({"event": "step", "step": self.step, "loss": stats.loss, "ce": stats.ce,
                            "aux": stats.aux, "lr": stats.lr, "grad_norm": stats.grad_norm, "stage": stage,
                            "tokens": self.tokens_seen, "wall_time": round(self.wall_time(), 3)})
                bar.update(1)
                bar.set_postfix_str(f"loss {stats.loss:.3f} aux {stats.aux:.3g} lr {stats.lr:.2e} | {stage}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    try:
                        self.checkpoint()
                    except FloatingPointError as e:
                        self.rollback(str(e))
        finally:
            bar.close()
            self.model.train(was_training)


# ---- public entry point --------------------------------------------------------------------
def _as_ln_free(model) -> LNFreeTransformer:
    if isinstance(model, LNFreeTransformer):
        return model
    if isinstance(model, HookedTransformer):
        return LNFreeTransformer.from_hooked(model)
    raise TypeError(f"model must be a HookedTransformer or LNFreeTransformer, got {type(model).__name__}")


def _resolve_settings(model, schedule, steps, lr, min_lr, warmup, aux_lambda, batch_size, seq_len, data):
    """(Schedule, dict of hyper-parameters) from a preset name, a Schedule, or None (scaled Small)."""
    n_layers = model.cfg.n_layers
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
    elif schedule is None:
        sched = Schedule.scaled(n_layers, 300 if steps is None else steps)
    else:
        raise TypeError(f"schedule must be None, a preset name {sorted(PRESETS)} or a Schedule, "
                        f"got {type(schedule).__name__}")
    if sched.n_layers != n_layers:
        raise ValueError(f"the schedule is for {sched.n_layers} layers; the model has {n_layers}")
    base = preset or PRESETS["gpt2-small"]
    if seq_len is None:
        if isinstance(data, TokenData):
            width = data.seq_len
        else:
            width = getattr(data, "shape", (0, 0))[-1] if getattr(data, "ndim", 0) == 2 else model.cfg.n_ctx
        seq_len = min(int(width), model.cfg.n_ctx, 1024 if preset is None else preset.seq_len)
    hp = {
        "lr": base.lr if lr is None else lr,
        "min_lr": base.min_lr if min_lr is None else min_lr,
        "aux_lambda": base.aux_lambda if aux_lambda is None else aux_lambda,
        "warmup": (base.warmup if preset is not None and sched is preset.schedule
                   else max(1, round(sched.steps * 25 / 300))) if warmup is None else warmup,
        "batch_size": (preset.batch_size if preset is not None else 32) if batch_size is None else batch_size,
        "seq_len": seq_len,
    }
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    return sched, hp


def _resolve_device(model, device, dist: _Dist) -> torch.device:
    if device is None:
        if dist.active and torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank)
        return next(model.parameters()).device
    return torch.device(device)


def _eval_tokens(eval_data, model, seq_len: int, tokenizer, eot, bos=None) -> Optional[torch.Tensor]:
    if eval_data is None:
        return None
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
    schedule: Union[None, str, Schedule] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    lr: Optional[float] = None,
    min_lr: Optional[float] = None,
    warmup: Optional[int] = None,
    aux_lambda: Optional[float] = None,
    vanilla: bool = False,
    out_dir: Union[None, str, os.PathLike] = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    eval_data=None,
    progress: bool = True,
    device: Union[None, str, torch.device] = None,
    seed: int = 0,
    bf16: bool = False,
    eot_token_id: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    momentum: float = 0.9,
    max_rollbacks: int = 3,
    keep_checkpoints: int = 2,
    callback: Optional[Callable[[dict], Any]] = None,
) -> LNFreeTransformer:
    """Fine-tune LayerNorm away (the paper's procedure); returns the LN-free model.

    Args:
        model: HookedTransformer or LNFreeTransformer with LayerNorm. Trained IN PLACE (no copy, so large
            models fit; a HookedTransformer's parameters are shared with the returned model): pass a
            copy to keep the original.
        data: training tokens or text (see `lnfree.removal.data.load_tokens`): a [n, seq] / 1-D token
            tensor or array, .npy / .txt / .jsonl paths, a directory, or a HF dataset name.
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
        out_dir: where checkpoints, ``log.jsonl``, ``summary.json`` and the final model (``final/``
            via `save_pretrained`, and ``final_tl/`` as TransformerLens weights + config) go.
        checkpoint_every: steps between checkpoints (a checkpoint is also written at step 0 and at the end).
        resume: continue the run in `out_dir` from its latest checkpoint (starts afresh if none).
        eval_data: held-out tokens (same forms as `data`; 2-D arrays keep their width): CE with a
            bootstrap CI is measured before and after and written to the summary.
        device: where to train (default: the model's device; cuda:LOCAL_RANK under torchrun with GPUs).
        seed: data order seed.
        bf16: autocast forward passes to bfloat16 (weights and optimizer stay float32).
        eot_token_id: end-of-text id excluded from the aux loss's sigma_hat (default: tokenizer's eos).
        bos_token_id: if set, token streams and text are cut into ``[bos] + (seq_len - 1)`` rows (for a
            model pretrained with a BOS at position 0); default: plain chunks, no BOS, as in the paper.
        momentum: sigma EMA momentum per micro-batch.
        max_rollbacks: non-finite / spiking steps are rolled back to the last checkpoint with the LR
            halved; after this many the run stops with an error.
        callback: called (on rank 0) with a dict for every step and event (freeze, checkpoint, rollback).

    Under ``torchrun --nproc_per_node N`` each process runs this same call: the model is wrapped in
    DistributedDataParallel, each rank takes its share of every global batch, sigma statistics are
    all-reduced so all ranks freeze the same sigma, and only rank 0 writes files (out_dir must be on
    a filesystem every rank can read, for rollbacks and resume).

    The summary dict is also attached to the returned model as ``model.removal_summary``.

    Example:
        >>> ln_free = remove_layernorm(model, "train_tokens.npy", steps=300, batch_size=16, seq_len=256,
        ...                            eval_data="heldout.npy", out_dir="runs/removal")  # doctest: +SKIP
        >>> ln_free.is_ln_free                                                            # doctest: +SKIP
        True
    """
    model = _as_ln_free(model)
    if model.is_ln_free:
        raise ValueError("the model has no LayerNorm left (every site removed): nothing to remove")
    dist = _init_distributed()
    try:
        dev = _resolve_device(model, device, dist)
        if next(model.parameters()).device != dev:
            model.to(dev, print_details=False)
        tokenizer = model.tokenizer
        eot = eot_token_id if eot_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        sched, hp = _resolve_settings(model, schedule, steps, lr, min_lr, warmup, aux_lambda, batch_size,
                                      seq_len, data)
        per_rank = hp["batch_size"] // dist.world
        mbs = per_rank if micro_batch_size is None else micro_batch_size
        if hp["batch_size"] % (mbs * dist.world):
            raise ValueError(f"batch_size ({hp['batch_size']}) must be a multiple of micro_batch_size ({mbs}) x "
                             f"processes ({dist.world})")
        cfg = RemovalConfig(steps=sched.steps, batch_size=hp["batch_size"], micro_batch_size=mbs,
                            seq_len=hp["seq_len"], lr=float(hp["lr"]), min_lr=float(hp["min_lr"]),
                            warmup=hp["warmup"], aux_lambda=float(hp["aux_lambda"]), vanilla=bool(vanilla),
                            seed=seed, bf16=bool(bf16), schedule=sched.to_dict(), eot_token_id=eot,
                            momentum=momentum, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                            max_rollbacks=max_rollbacks)
        needed = cfg.steps * cfg.batch_size * cfg.seq_len
        seqs = load_tokens(data, seq_len=cfg.seq_len, tokenizer=tokenizer, eot_token_id=eot,
                           max_tokens=int(needed * 1.05) + cfg.seq_len, bos_token_id=bos_token_id)
        tdata = TokenData(seqs, seed=seed)
        lo, hi = tdata.token_range()
        if lo < 0 or hi >= model.cfg.d_vocab:
            raise ValueError(f"data token ids span [{lo}, {hi}], outside the model's vocabulary [0, {model.cfg.d_vocab})")
        unscheduled = [s for s in model.ln_sites if model.ln_mode(s) == "live" and s not in sched.sites]
        if unscheduled:
            raise ValueError(f"live sites {unscheduled[:3]} are not in the schedule")
        out = None if out_dir is None else Path(out_dir)
        run = _Run(model, tdata, cfg, sched, out_dir=out, dist=dist, device=dev,
                   eval_tokens=_eval_tokens(eval_data, model, cfg.seq_len, tokenizer, eot, bos_token_id),
                   progress=progress, callback=callback)
        _start(run, out, resume, model)
        run.train()
        return _finish(run, out, model)
    finally:
        if dist.created:
            torch.distributed.destroy_process_group()


def _start(run: _Run, out: Optional[Path], resume: bool, model: LNFreeTransformer) -> None:
    from lnfree.evaluation import cross_entropy

    found = None if out is None else latest_checkpoint(out)
    if found is not None and not resume:
        raise ValueError(f"{out} already holds a removal run (checkpoint {found.name}); pass resume=True "
                         "(--resume) to continue it, or choose another out_dir")
    if resume and out is None:
        raise ValueError("resume=True needs out_dir (where the run's checkpoints are)")
    if found is not None:
        ck = read_checkpoint(found)
        run.check_resume(ck["state"])
        run.restore(ck)
        run._emit({"event": "resume", "step": run.step, "from": str(found)})
        return
    if out is not None and run.dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(str(out / "tokenizer"))
    if run.eval_tokens is not None and run.dist.rank == 0:
        run.ce_before = cross_entropy(model, run.eval_tokens, batch_size=run.cfg.micro_batch_size,
                                      progress=run.progress).mean
    run.checkpoint()  # step 0: something to roll back to before the first periodic checkpoint


def _finish(run: _Run, out: Optional[Path], model: LNFreeTransformer) -> LNFreeTransformer:
    from lnfree.evaluation import cross_entropy

    frozen_sigma = {s: model.ln_scale(s) for s in model.ln_sites if model.ln_mode(s) == "frozen"}
    if not run.cfg.vanilla:
        model.remove_ln()
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
        "ln_free": model.is_ln_free, "rollbacks": run.n_rollbacks, "lr_scale": run.lr_scale,
        "sigma": frozen_sigma, "schedule": run.schedule.to_dict(), "config": run.cfg.to_dict(),
    }
    if out is not None and run.dist.rank == 0:
        summary["final"] = _save_final(model, out)
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    run.dist.barrier()
    model.removal_summary = summary
    return model


def _save_final(model: LNFreeTransformer, out: Path) -> dict:
    """final_tl/ (TransformerLens weights + config, always) and final/ (HF format via lnfree.loading)."""
    from safetensors.torch import save_file

    saved = {}
    tl = out / "final_tl"
    tl.mkdir(parents=True, exist_ok=True)
    save_file(_weights(model), str(tl / "model.safetensors"), metadata={"format": "pt"})
    _atomic_write_text(tl / "config.json", json.dumps({"model": cfg_to_json(model.cfg),
                                                       "ln_modes": model.ln_modes()}, indent=1))
    saved["final_tl"] = str(tl)
    try:
        model.save_pretrained(str(out / "final"))
        saved["final"] = str(out / "final")
    except Exception as e:  # lnfree.loading may be missing or not support this model: keep final_tl
        warnings.warn(f"save_pretrained failed ({type(e).__name__}: {e}); the model is in {tl}")
        saved["final_error"] = f"{type(e).__name__}: {e}"
    return saved


def load_tl_dir(path: Union[str, os.PathLike], device: Optional[str] = None, tokenizer=None) -> LNFreeTransformer:
    """Load a TransformerLens weights dir: ``model.safetensors`` + ``config.json`` holding
    HookedTransformerConfig kwargs (top level or under "model"; the zoo's and ``final_tl/`` format).

    Example:
        >>> model = load_tl_dir("runs/zoo/pretrain/final")    # doctest: +SKIP
    """
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    kwargs = conf.get("model", conf)
    model = LNFreeTransformer(cfg_from_json(kwargs, device), tokenizer=tokenizer)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if ".ln" not in k and not k.startswith("ln_final")]
    if missing:
        raise ValueError(f"{path}/model.safetensors lacks weights {missing[:5]}")
    modes = set(conf.get("ln_modes", {}).values())
    if "frozen" in modes or len(modes) > 1:
        raise ValueError(f"{path} holds a partially removed model ({sorted(modes)}); use load_checkpoint instead")
    return model.eval()
