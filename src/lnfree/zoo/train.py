"""Train a small GPT-2-style base model (with LayerNorm) on CPU, from scratch: the zoo's pretraining.

A library (the commands are ``lnfree zoo tokenizer | heldout | bench | pretrain``, in `lnfree.zoo.cli`):
tokenizer training and loading, tokenizing text, held-out rows, the base model, and `pretrain`, a
resumable loop. Optimiser, LR schedule, checkpoint directories and the run log are the ones the
removal fine-tune uses (`lnfree.training`).

Loading the result::

    from lnfree.zoo.train import load_run, load_tokenizer
    model = load_run("runs/zoo/pretrain")             # final/ or the latest checkpoint
    tok = load_tokenizer("runs/zoo/tokenizer.json")

Run directory (``OUT``)::

    OUT/checkpoints/step_000100/{model.safetensors,state.json,optimizer.pt,config.json}
    OUT/checkpoints/latest        name of the newest checkpoint (lnfree.training.checkpoints)
    OUT/final/{model.safetensors,config.json}   (written when training ends)
    OUT/train_log.jsonl           one JSON record per log line (rewound on resume)

Run directories of earlier versions (``OUT/ckpt/latest.json``, ``state.pt``) are still read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from lnfree.io.tl_dir import latest_run_checkpoint as latest_checkpoint  # noqa: F401  (pretrain resumes from it)
from lnfree.io.tokenizers import EOT, load_tokenizer  # noqa: F401  (the zoo's tokenizer.json reader)
from lnfree.training import files as _files
from lnfree.training import optim as _optim
from lnfree.training.checkpoints import CheckpointDir
from lnfree.training.log import JsonlLog
CHECKPOINT_FORMAT = "lnfree-zoo-pretrain-checkpoint"
COMMON_NAMES = (
    "John Mary Elizabeth Anne Emma James Henry William Charles George Thomas "
    "Robert Edward Richard Jane Catherine Sarah Margaret Frank Harriet Robert "
    "David Peter Paul Michael Susan Lucy Alice Sophia Fanny Maria Julia Edmund "
    "Frederick Harry Jack Tom Sam Ben Kate Lydia Kitty Marianne Elinor Mark Luke "
    "Matthew Joseph Daniel Samuel Isaac Jacob Moses Abraham Martha Rachel Ruth"
).split()
COMMON_NAMES = tuple(dict.fromkeys(COMMON_NAMES))


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def train_tokenizer(text_files: Sequence[str | os.PathLike], vocab_size: int = 4096,
                    out_path: str | os.PathLike = "tokenizer.json",
                    boost_words: Sequence[str] = COMMON_NAMES, boost_count: int = 3000) -> str:
    """Train a GPT-2-like byte-level BPE tokenizer and save it as ``tokenizer.json``.

    ``<|endoftext|>`` is the only special token (id 0). ``out_path`` may be a
    directory (``tokenizer.json`` is written inside) or a file path.
    ``boost_words`` (default: common first names) are added ``boost_count`` times,
    as ``" " + word``, to the *tokenizer* training text only, so that with a small
    vocabulary they still become single tokens with a leading space (useful for
    IOI-style name tasks). Pass ``boost_words=()`` for a plain corpus tokenizer.

    >>> p = train_tokenizer(["book.txt"], 4096, "runs/zoo")   # doctest: +SKIP
    >>> load_tokenizer(p).encode(" John")                       # doctest: +SKIP
    [1234]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    def lines():
        for f in text_files:
            with open(f, encoding="utf-8") as fh:
                yield from fh
        for w in dict.fromkeys(boost_words):
            for _ in range(max(1, boost_count // 100)):
                yield (" " + w) * 100 + "\n"

    tok.train_from_iterator(lines(), trainer)
    out = Path(out_path)
    if out.is_dir() or out.suffix != ".json":
        out.mkdir(parents=True, exist_ok=True)
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return str(out)


def _raw(tokenizer):
    """Return the underlying ``tokenizers.Tokenizer`` (fast path, no special tokens)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def single_token_names(tokenizer, names: Iterable[str] = COMMON_NAMES) -> list[str]:
    """Names ``n`` such that ``" " + n`` is one token.

    >>> single_token_names(tok, ["John", "Zebedee"])   # doctest: +SKIP
    ['John']
    """
    raw = _raw(tokenizer)
    out = []
    for n in dict.fromkeys(names):
        if len(raw.encode(" " + n, add_special_tokens=False).ids) == 1:
            out.append(n)
    return out


def _chunks(text: str, size: int = 1 << 20) -> list[str]:
    """Split ``text`` into ~``size``-char pieces at paragraph boundaries (keeps all chars)."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def encode_text(text: str, tokenizer) -> np.ndarray:
    """Encode a (possibly very long) text into a 1-D uint16 array of token ids."""
    raw = _raw(tokenizer)
    encs = raw.encode_batch(_chunks(text), add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in encs]
    return np.concatenate(ids) if ids else np.zeros(0, np.uint16)


def eot_id(tokenizer) -> int:
    """Id of ``<|endoftext|>``."""
    return int(_raw(tokenizer).token_to_id(EOT))


def tokenize_files(files: Sequence[str | os.PathLike], tokenizer) -> np.ndarray:
    """Tokenize files into one uint16 stream; each file is a document, joined by EOT.

    >>> ids = tokenize_files(["a.txt", "b.txt"], tok)   # doctest: +SKIP
    >>> ids.dtype, ids[0] == eot_id(tok)                # doctest: +SKIP
    (dtype('uint16'), True)
    """
    eot = np.asarray([eot_id(tokenizer)], dtype=np.uint16)
    parts = []
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        parts += [eot, encode_text(text, tokenizer)]
    parts.append(eot)
    return np.concatenate(parts)


def heldout_sequences(file: str | os.PathLike, tokenizer, n_seq: int = 100,
                      seq_len: int = 256) -> np.ndarray:
    """Consecutive rows ``[EOT] + (seq_len-1) tokens`` from a text file, shape [n, seq_len].

    >>> heldout_sequences("persuasion.txt", tok, 100).shape   # doctest: +SKIP
    (100, 256)
    """
    from lnfree.removal.data import chunk_with_bos

    ids = encode_text(Path(file).read_text(encoding="utf-8"), tokenizer)
    return chunk_with_bos(ids, seq_len, eot_id(tokenizer))[:n_seq].astype(np.uint16)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def base_model_kwargs(d_vocab: int = 4096, **overrides) -> dict:
    """Keyword arguments for ``HookedTransformerConfig`` of the zoo base model (GPT-2 style).

    >>> base_model_kwargs(4096, n_layers=1)["n_layers"]
    1
    """
    kw = dict(
        n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=768, n_ctx=256,
        d_vocab=d_vocab, act_fn="gelu_new", normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        tokenizer_prepends_bos=True, default_prepend_bos=True,
    )
    kw.update(overrides)
    return kw


def build_model(model_kwargs: dict, seed: int = 0, tokenizer=None):
    """Build a freshly GPT-2-initialised ``HookedTransformer`` on CPU (float32).

    >>> m = build_model(base_model_kwargs(4096, n_layers=1, d_model=32, n_heads=2,
    ...                 d_head=16, d_mlp=64), seed=0)   # doctest: +SKIP
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**model_kwargs, seed=seed, init_weights=True, device="cpu")
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a pretraining run (all JSON-serialisable; frozen: use dataclasses.replace).

    The optimiser settings are validated on construction into ``optim`` (an
    `lnfree.training.OptimConfig`, the one the removal fine-tune embeds too); the flat fields stay
    the names stored in run directories' config.json.
    """

    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    max_steps: int = 2000
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None
    ckpt_every: int = 100
    log_every: int = 10
    eval_every: int = 250
    eval_seqs: int = 64
    keep_ckpts: int = 2
    threads: int = 2  # torch CPU threads (torch.set_num_threads)
    time_schedule: bool = False  # cosine progress = max(step fraction, wall-time fraction)
    bf16_autocast: bool = False  # CPU mixed precision (fp32 master weights); ~2x faster with AMX
    model: dict = field(default_factory=base_model_kwargs)
    optim: _optim.OptimConfig = field(init=False, compare=False)

    def __post_init__(self):
        # the cosine ends at max_steps (not max_steps - 1): the zoo's schedule since its first run
        object.__setattr__(self, "optim", _optim.OptimConfig(
            steps=self.max_steps, lr=self.lr, min_lr=self.min_lr, warmup=self.warmup_steps,
            weight_decay=self.weight_decay, betas=tuple(self.betas), grad_clip=self.grad_clip,
            horizon=self.max_steps))
        for name in ("batch_size", "seq_len", "ckpt_every", "log_every", "keep_ckpts", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'seq_len' else 1}, got {v!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be None or > 0, got {self.max_minutes!r}")


def lr_at(step: int, tc: TrainConfig, time_frac: float = 0.0) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``max_steps`` (`lnfree.training.lr_at`).

    ``time_frac`` (elapsed / wall-clock budget, used when ``tc.time_schedule``) can
    only move the cosine *forward*, so the schedule completes by the deadline even
    when the CPU is slower than planned.

    >>> tc = TrainConfig(warmup_steps=10, max_steps=100)
    >>> lr_at(0, tc) < lr_at(9, tc) == tc.lr, abs(lr_at(100, tc) - tc.min_lr) < 1e-12
    (True, True)
    """
    return _optim.lr_at(step, tc.optim, time_frac)


def make_optimizer(model, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2) only, not on biases / LayerNorm (`lnfree.training`)."""
    return _optim.make_optimizer(model, tc.optim)


def sample_batch(tokens: np.ndarray, tc: TrainConfig, gen: torch.Generator,
                 bos: int) -> torch.Tensor:
    """``batch_size`` rows of ``[BOS] + (seq_len-1)`` tokens from random offsets."""
    body = tc.seq_len - 1
    offs = torch.randint(0, len(tokens) - body, (tc.batch_size,), generator=gen).numpy()
    rows = np.stack([tokens[o:o + body] for o in offs]).astype(np.int64)
    out = torch.empty((tc.batch_size, tc.seq_len), dtype=torch.long)
    out[:, 0] = bos
    out[:, 1:] = torch.from_numpy(rows)
    return out


@torch.no_grad()
def evaluate(model, seqs: np.ndarray | torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over rows of ``seqs`` [n, seq_len]."""
    seqs = torch.as_tensor(np.asarray(seqs, dtype=np.int64))
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        b = seqs[i:i + batch_size]
        loss = model(b, return_type="loss", loss_per_token=True)
        tot += float(loss.sum())
        n += loss.numel()
    model.train()
    return tot / max(1, n)


# --- checkpoints -----------------------------------------------------------

def _config_json(tc: TrainConfig, **extra) -> dict:
    train = {k: v for k, v in asdict(tc).items() if k not in ("model", "optim")}
    return {"train": train, "model": tc.model, **extra}


def save_checkpoint(out: Path, model, opt, gen: torch.Generator, tc: TrainConfig,
                    step: int, extra: dict | None = None) -> Path:
    """Write ``out/checkpoints/step_XXXXXX`` (atomically) and mark it as the latest."""
    ck = CheckpointDir(out, keep=tc.keep_ckpts)
    state = {"format": CHECKPOINT_FORMAT, "step": step,
             "elapsed_s": float((extra or {}).get("elapsed_total_s", 0.0)), "extra": extra or {}}
    tensors = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state()}
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path = ck.write(step, weights=weights, state=state, tensors=tensors,
                    json_files={"config.json": _config_json(tc)})
    ck.mark_good(path)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """{'weights', 'optimizer', 'torch_rng', 'data_rng', 'step', 'elapsed_s'} of a checkpoint (either layout)."""
    from safetensors.torch import load_file

    p = Path(path)
    weights = load_file(str(p / "model.safetensors"))
    if (p / "state.pt").exists():  # the layout before lnfree.training
        st = torch.load(p / "state.pt", weights_only=True)
        return {"weights": weights, "optimizer": st["optimizer"], "torch_rng": st["torch_rng"],
                "data_rng": st["data_rng"], "step": int(st["step"]), "elapsed_s": float(st.get("elapsed_s", 0.0))}
    ck = CheckpointDir.read(p)
    t, state = ck["tensors"], ck["state"]
    return {"weights": weights, "optimizer": t["optimizer"], "torch_rng": t["torch_rng"], "data_rng": t["data_rng"],
            "step": int(state["step"]), "elapsed_s": float(state.get("elapsed_s", 0.0))}


def load_run(path: str | os.PathLike, tokenizer=None):
    """Load a pretrained zoo model (a `pretrain` run dir or one of its checkpoints) on the CPU, through the resolver.

    ``path``: a run dir (uses ``final/`` if present, else the latest checkpoint) or a dir holding
    ``model.safetensors`` + ``config.json``: what ``lnfree.load(path)`` reads, with `tokenizer` attached.

    >>> model = load_run("runs/zoo/pretrain", load_tokenizer("runs/zoo/tokenizer.json"))  # doctest: +SKIP
    """
    from lnfree.io.resolve import load_tl_dir
    from lnfree.io.tl_dir import run_weights_dir, tl_config

    p = Path(path)
    target = p if tl_config(p) is not None else run_weights_dir(p)
    if target is None:
        raise FileNotFoundError(f"no checkpoint under {path}")
    return load_tl_dir(target, device="cpu", tokenizer=tokenizer)


def load_model(path: str | os.PathLike, tokenizer=None):
    """Deprecated alias of `load_run` (the name collided with `lnfree.load_model`)."""
    warnings.warn("lnfree.zoo.train.load_model is deprecated: use load_run (lnfree.load_model loads HF models)",
                  DeprecationWarning, stacklevel=2)
    return load_run(path, tokenizer)


# --- loop ------------------------------------------------------------------

def _log(out: Path | None, rec: dict) -> None:
    JsonlLog(None if out is None else out / "train_log.jsonl", echo=True).write(rec)


def pretrain(tokens: np.ndarray, tc: TrainConfig, out: str | os.PathLike | None,
             resume: bool = False, eval_sets: dict | None = None, bos: int = 0,
             progress: bool = True) -> tuple:
    """Train from scratch (or resume) and return ``(model, history)``.

    ``history`` is a list of per-step losses for steps run in this call. Ends when
    ``tc.max_steps`` are done or ``tc.max_minutes`` of wall clock have elapsed;
    always writes a final checkpoint and ``out/final`` (if ``out`` is given).

    >>> model, hist = pretrain(ids, TrainConfig(max_steps=3), "runs/tmp")   # doctest: +SKIP
    """
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    model = build_model(tc.model, seed=tc.seed)
    model.train()
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    step, prior = 0, 0.0
    if resume and out is not None and (ck := latest_checkpoint(out)) is not None:
        st = read_checkpoint(ck)
        model.load_state_dict(st["weights"], strict=False)
        opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["torch_rng"])
        gen.set_state(st["data_rng"])
        step, prior = st["step"], st["elapsed_s"]
        dropped = JsonlLog(out / "train_log.jsonl").rewind(step)  # the log reads as one run
        _log(out, {"event": "resume", "step": step, "ckpt": str(ck), "dropped_log_records": dropped})
    eval_sets = eval_sets or {}
    t0 = time.time()
    budget = 60 * tc.max_minutes if tc.max_minutes else None  # total, across resumes
    deadline = t0 + budget - prior if budget else None
    torch.set_num_threads(tc.threads)

    def elapsed() -> float:
        return prior + time.time() - t0

    history, tok_count, t_last = [], 0, time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, file=sys.stderr, mininterval=5)
    stop_reason = "max_steps"
    while step < tc.max_steps:
        if deadline is not None and time.time() >= deadline:
            stop_reason = "max_minutes"
            break
        tf = elapsed() / budget if (budget and tc.time_schedule) else 0.0
        lr = lr_at(step, tc, tf)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sample_batch(tokens, tc, gen, bos)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16_autocast):
            loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        lv = float(loss.detach())
        history.append(lv)
        tok_count += batch.numel()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % tc.log_every == 0 or step == tc.max_steps:
            now = time.time()
            _log(out, {"step": step, "loss": round(lv, 4), "lr": lr, "gnorm": round(float(gnorm), 3),
                       "tok_per_s": round(tok_count / max(1e-9, now - t_last), 1),
                       "threads": tc.threads, "elapsed_s": round(elapsed(), 1)})
            tok_count, t_last = 0, now
        if eval_sets and tc.eval_every and step % tc.eval_every == 0:
            name, seqs = next(iter(eval_sets.items()))
            _log(out, {"step": step, f"val_{name}": round(evaluate(model, seqs[:16]), 4)})
        if out is not None and step % tc.ckpt_every == 0:
            save_checkpoint(out, model, opt, gen, tc, step, extra={"elapsed_total_s": elapsed()})
    if bar is not None:
        bar.close()
    res = {"event": "end", "step": step, "reason": stop_reason, "elapsed_s": round(time.time() - t0, 1),
           "elapsed_total_s": elapsed()}
    for name, seqs in eval_sets.items():
        res[f"eval_{name}"] = round(evaluate(model, seqs[: tc.eval_seqs]), 4)
    _log(out, res)
    if out is not None:
        last = latest_checkpoint(out)
        if last is None or last.name != f"step_{step:06d}":  # (a periodic one may hold this very step)
            save_checkpoint(out, model, opt, gen, tc, step, extra=res)
        fin = out / "final.tmp"
        shutil.rmtree(fin, ignore_errors=True)
        fin.mkdir()
        _files.save_safetensors({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                                fin / "model.safetensors")
        (fin / "config.json").write_text(json.dumps(_config_json(tc, result=res), indent=1))
        shutil.rmtree(out / "final", ignore_errors=True)
        os.replace(fin, out / "final")
    return model, history
