"""The zoo family's recipe (``tiny-ln``, ``tiny-vanilla``, ``tiny-lnfree``): train it, then export it.

- `train_family`: text files -> tokenizer -> pretraining -> LN-removal fine-tune and vanilla
  fine-tune -> export, each stage skipped when its output exists (so a crashed run resumes), with
  a JSON record (``OUT/family.json``) of the command, seed, steps, tokens and wall times.
- `export_run`: export the models of a finished run directory (via `lnfree.zoo.export.export_family`;
  the model card is `lnfree.zoo.card`; both names are re-exported here).

Run directory layout (``OUT``; the pieces are also ``lnfree zoo tokenizer | heldout | pretrain``)::

    OUT/tokenizer.json  OUT/train_tokens.npy  OUT/heldout_<stem>.npy
    OUT/pretrain/{checkpoints/, final/, train_log.jsonl}    (lnfree.zoo.train.pretrain; older runs: ckpt/)
    OUT/ft_lnfree/{checkpoints/, final_tl/, summary.json}   (lnfree.removal.remove_layernorm)
    OUT/ft_vanilla/...                                      (the same with vanilla=True)
    OUT/family.json                                         this module's record
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from lnfree.zoo import MANIFEST
from lnfree.zoo.card import render_model_card, write_model_card  # noqa: F401  (re-exported)
from lnfree.zoo.export import (  # noqa: F401  (re-exported: the historical import path)
    CE_TOL, MAX_BYTES, ExportResult, _NAME_RE, _now, _write_json, export_family, token_byte_lengths,
)

PathArg = Union[str, os.PathLike]


def _load_base(run: Path, tokenizer):
    from lnfree.io.resolve import load_tl_dir

    return load_tl_dir(run / "pretrain" / "final", device="cpu", tokenizer=tokenizer)


def _load_ft(ft_dir: Path, base_cfg, tokenizer):
    """The fine-tuned model of a finished removal run (``final_tl/``), on the base (LN) config."""
    from lnfree.io.parts import Parts, read_safetensors
    from lnfree.io.resolve import build

    tl = ft_dir / "final_tl"
    modes = json.loads((tl / "config.json").read_text())["ln_modes"]
    state = {s: {"mode": m, "scale": 1.0 if m == "removed" else None} for s, m in modes.items()}
    weights = read_safetensors(tl / "model.safetensors", fix=f"rerun the fine-tune in {ft_dir}")
    return build(Parts(base_cfg, weights, tokenizer, ln_state=state, source=str(tl)), device="cpu")


def _ft_rows(tokens: np.ndarray, seq_len: int, bos: int) -> np.ndarray:
    """Non-overlapping ``[BOS] + (seq_len-1)`` rows of the training stream, as in pretraining."""
    from lnfree.removal.data import chunk_with_bos

    return chunk_with_bos(np.asarray(tokens), seq_len, bos).astype(np.uint16)


def _heldout_files(run: Path, heldout_files: Mapping) -> dict:
    return {name: run / f"heldout_{Path(f).stem}.npy" for name, f in heldout_files.items()}


class _Record:
    """``OUT/family.json``: the command of every invocation and what each stage did."""

    def __init__(self, path: Path, command: Optional[str], settings: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"format": "lnfree-zoo-run", "stages": {}}
        self.data.setdefault("invocations", []).append({"command": command, "started": _now(), "settings": settings,
                                                       "torch": torch.__version__})
        self.data["settings"] = settings
        self.save()

    def stage(self, name: str) -> Optional[dict]:
        return self.data["stages"].get(name)

    def set(self, name: str, entry: dict) -> None:
        self.data["stages"][name] = entry
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, self.data)


def train_family(
    text_files: Sequence[PathArg],
    out_dir: PathArg,
    *,
    minutes: float = 80.0,
    max_steps: int = 5000,
    ft_steps: int = 300,
    seed: int = 0,
    heldout_files: Optional[Mapping[str, PathArg]] = None,
    vocab_size: int = 4096,
    n_heldout: int = 100,
    ft_batch_size: int = 32,
    ft_micro_batch_size: Optional[int] = None,
    ft_eval_rows: int = 32,
    precision: str = "bf16",
    export_dir: Optional[PathArg] = None,
    model_card: Optional[PathArg] = None,
    n_eval: Optional[int] = None,
    model_overrides: Optional[Mapping] = None,
    train_overrides: Optional[Mapping] = None,
    command: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Reproduce the zoo family from text files; returns the run record (also in ``OUT/family.json``).

    Stages (each skipped when its output exists, so rerunning the same call resumes):
    1. tokenizer: byte-level BPE of `vocab_size` on `text_files` + the tokenized stream
       (`lnfree.zoo.train.train_tokenizer`, `tokenize_files`);
    2. held-out: ``[n_heldout, n_ctx]`` rows per `heldout_files` entry (name -> text file);
    3. pretraining: `lnfree.zoo.train.pretrain` for `minutes` / `max_steps` (resumes from checkpoints);
    4. LN-free and vanilla fine-tunes: `lnfree.removal.remove_layernorm` on the pretraining data,
       `ft_steps` steps of `ft_batch_size` ``[BOS] + 255``-token rows, the same seed (resumes);
    5. export: `export_run` to `export_dir` (default ``OUT/export``) and the model card to `model_card`.

    `model_overrides` / `train_overrides` change the architecture / `TrainConfig` (small smoke runs).

    Example:
        >>> record = train_family(glob.glob("corpus/train/*.txt"), "runs/zoo", minutes=80,
        ...                       heldout_files={"persuasion": "corpus/heldout/austen_persuasion.txt"},
        ...                       ft_steps=300, seed=0, export_dir="src/lnfree/zoo/data")   # doctest: +SKIP
    """
    files = [Path(f) for f in text_files]
    if not files:
        raise ValueError("text_files is empty: give the training text files")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"text files not found: {missing[:3]}")
    if heldout_files is None:
        raise ValueError("heldout_files is required: a dict name -> held-out text file (the command line "
                         "`lnfree zoo train` defaults to the shared corpus's Persuasion and cfi_en texts)")
    heldout_files = dict(heldout_files)
    for name in heldout_files:
        if not _NAME_RE.match(name):
            raise ValueError(f"held-out name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    for arg, v in (("ft_steps", ft_steps), ("max_steps", max_steps), ("vocab_size", vocab_size),
                   ("n_heldout", n_heldout), ("ft_batch_size", ft_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(export_dir) if export_dir is not None else out / "export"
    settings = {"text_files": [str(f) for f in files], "minutes": minutes, "max_steps": max_steps,
                "ft_steps": ft_steps, "seed": seed, "heldout_files": {k: str(v) for k, v in heldout_files.items()},
                "vocab_size": vocab_size, "n_heldout": n_heldout, "ft_batch_size": ft_batch_size,
                "ft_micro_batch_size": ft_micro_batch_size, "ft_eval_rows": ft_eval_rows, "precision": precision,
                "export_dir": str(export_dir), "model_card": None if model_card is None else str(model_card),
                "n_eval": n_eval, "model_overrides": dict(model_overrides or {}),
                "train_overrides": dict(train_overrides or {})}
    rec = _Record(out / "family.json", command, settings)
    tok = _stage_tokenizer(rec, out, files, vocab_size, command)
    model_kw = _zt().base_model_kwargs(len(tok), **dict(model_overrides or {}))
    held = _stage_heldout(rec, out, tok, heldout_files, n_heldout, model_kw["n_ctx"])
    tc = _zt().TrainConfig(seed=seed, max_steps=max_steps, max_minutes=float(minutes), seq_len=model_kw["n_ctx"],
                           bf16_autocast=precision == "bf16", time_schedule=True, model=model_kw)
    _stage_pretrain(rec, out, tok, held, dataclasses.replace(tc, **dict(train_overrides or {})), command, progress)
    for name, vanilla in (("ft_lnfree", False), ("ft_vanilla", True)):
        _stage_finetune(rec, out, name, tok, held, vanilla=vanilla, steps=ft_steps, seed=seed, command=command,
                        batch_size=ft_batch_size, micro_batch_size=ft_micro_batch_size, eval_rows=ft_eval_rows,
                        bf16=precision == "bf16", progress=progress)
    done = rec.stage("export")
    if (export_dir / MANIFEST).exists() and done and done.get("status") == "ran":
        return rec.data
    t0 = time.time()
    res = export_run(out, export_dir, model_card=model_card, n_eval=n_eval, progress=progress)
    rec.set("export", {"status": "ran", "command": command, "dir": str(export_dir), "size_bytes": res.size_bytes,
                       "checks": res.checks, "wall_s": round(time.time() - t0, 1), "finished": _now()})
    return rec.data


def _zt():
    from lnfree.zoo import train

    return train


def _stage_tokenizer(rec: _Record, out: Path, files: list, vocab_size: int, command):
    """Stage 1: ``OUT/tokenizer.json`` and ``OUT/train_tokens.npy`` (each file one document); the tokenizer."""
    zt = _zt()
    tok_path, tokens_path = out / "tokenizer.json", out / "train_tokens.npy"
    if tok_path.exists() and tokens_path.exists():
        if rec.stage("tokenizer") is None:
            rec.set("tokenizer", {"status": "found", "files": [str(tok_path), str(tokens_path)]})
        return zt.load_tokenizer(tok_path)
    t0 = time.time()
    zt.train_tokenizer(files, vocab_size, tok_path)
    tok = zt.load_tokenizer(tok_path)
    ids = zt.tokenize_files(files, tok)
    np.save(tokens_path, ids)
    rec.set("tokenizer", {"status": "ran", "command": command, "vocab": len(tok), "train_tokens": int(len(ids)),
                          "text_bytes": sum(f.stat().st_size for f in files), "wall_s": round(time.time() - t0, 1),
                          "finished": _now()})
    return tok


def _stage_heldout(rec: _Record, out: Path, tok, heldout_files: Mapping, n_rows: int, n_ctx: int) -> dict:
    """Stage 2: ``OUT/heldout_<stem>.npy`` ``[n_rows, n_ctx]`` per held-out text; returns name -> array."""
    paths = _heldout_files(out, heldout_files)
    made = {}
    for name, f in heldout_files.items():
        if not paths[name].exists():
            arr = _zt().heldout_sequences(f, tok, n_rows, n_ctx)
            np.save(paths[name], arr)
            made[name] = list(arr.shape)
    if made or rec.stage("heldout") is None:
        rec.set("heldout", {"status": "ran" if made else "found", "files": {k: str(v) for k, v in paths.items()},
                            "sources": {k: str(v) for k, v in heldout_files.items()}, "made": made})
    return {name: np.load(p) for name, p in paths.items()}


def _stage_pretrain(rec: _Record, out: Path, tok, held: dict, tc, command, progress: bool) -> None:
    """Stage 3: ``OUT/pretrain/final`` by `lnfree.zoo.train.pretrain` (resuming from its checkpoints)."""
    zt = _zt()
    final = out / "pretrain" / "final"
    if not final.exists():
        _refuse_if_active(out / "pretrain")
        t0 = time.time()
        resume = zt.latest_checkpoint(out / "pretrain") is not None
        rec.set("pretrain", {"status": "running", "command": command, "started": _now(), "resumed": resume,
                             "config": dataclasses.asdict(tc)})
        evals = {name: arr[: tc.eval_seqs] for name, arr in held.items()}
        zt.pretrain(np.load(out / "train_tokens.npy"), tc, out / "pretrain", resume=resume, eval_sets=evals,
                    bos=zt.eot_id(tok), progress=progress)
        rec.set("pretrain", {**rec.stage("pretrain"), "status": "ran", "finished": _now(),
                             "wall_s_this_call": round(time.time() - t0, 1)})
    conf = json.loads((final / "config.json").read_text())
    _check_found("pretrain", final, {"seed": (conf["train"]["seed"], tc.seed),
                                     "d_vocab": (conf["model"]["d_vocab"], len(tok))})
    if rec.stage("pretrain") is None:
        rec.set("pretrain", {"status": "found", "dir": str(final)})


def _stage_finetune(rec: _Record, out: Path, name: str, tok, held: dict, *, vanilla: bool, steps: int, seed: int,
                    command, batch_size: int, micro_batch_size, eval_rows: int, bf16: bool, progress: bool) -> None:
    """Stage 4: ``OUT/{name}`` by `lnfree.removal.remove_layernorm` on ``[BOS] + 255``-token training rows."""
    ft_dir = out / name
    if not (ft_dir / "summary.json").exists():
        from lnfree.removal import remove_layernorm

        base = _load_base(out, tok)
        rows = _ft_rows(np.load(out / "train_tokens.npy", mmap_mode="r"), base.cfg.n_ctx, _zt().eot_id(tok))
        evals = next(iter(held.values()))[:eval_rows] if eval_rows else None
        rec.set(name, {"status": "running", "command": command, "started": _now()})
        t0 = time.time()
        remove_layernorm(base, rows, steps=steps, vanilla=vanilla, out_dir=ft_dir, resume="auto", batch_size=batch_size,
                         micro_batch_size=micro_batch_size, eval_data=evals, seed=seed, bf16=bf16, progress=progress)
        rec.set(name, {**rec.stage(name), "status": "ran", "finished": _now(),
                       "wall_s_this_call": round(time.time() - t0, 1)})
    summary = json.loads((ft_dir / "summary.json").read_text())
    _check_found(name, ft_dir, {"seed": (summary["config"]["seed"], seed), "steps": (summary["steps"], steps),
                                "vanilla": (summary["vanilla"], vanilla)})
    if rec.stage(name) is None:
        rec.set(name, {"status": "found", "dir": str(ft_dir)})


def _refuse_if_active(pretrain_dir: Path, quiet_s: float = 180.0) -> None:
    """Refuse to resume a pretraining that another process is still writing (its log moved recently)."""
    log = pretrain_dir / "train_log.jsonl"
    if log.exists():
        age = time.time() - log.stat().st_mtime
        if age < quiet_s:
            raise ValueError(f"{pretrain_dir} looks active (its train_log.jsonl was written {age:.0f} s ago) and has no "
                             f"final/ yet: wait for that run to finish, or for {quiet_s:.0f} s of silence if it died")


def _check_found(stage: str, path: Path, pairs: Mapping[str, tuple]) -> None:
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}={a!r} (asked for {b!r})" for k, (a, b) in bad.items())
        raise ValueError(f"{path} holds a {stage} stage made with {detail}: pass another out_dir or matching settings")


def _pretrain_provenance(run: Path, record: Mapping) -> dict:
    final = run / "pretrain" / "final"
    conf = json.loads((final / "config.json").read_text())
    tc, res = conf["train"], conf.get("result", {})
    steps = int(res.get("step", 0))
    start = None
    log = run / "pretrain" / "train_log.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "start" and "time" in rec:
                start = rec["time"]
    cmd = (f"lnfree zoo pretrain --data {run} --out {run / 'pretrain'} --max-minutes {tc['max_minutes']} "
           f"--max-steps {tc['max_steps']} --seed {tc['seed']} --precision {'bf16' if tc['bf16_autocast'] else 'fp32'}")
    stage = record.get("stages", {}).get("pretrain", {})
    ran_here = stage.get("status") == "ran" and stage.get("command")
    return {"steps": steps, "tokens_seen": steps * tc["batch_size"] * tc["seq_len"], "seed": tc["seed"],
            "wall_time_s": res.get("elapsed_total_s"), "command": stage["command"] if ran_here else cmd,
            "command_source": None if ran_here else "equivalent command, reconstructed from pretrain/final/config.json",
            "equivalent_command": cmd,
            "date": _dt.datetime.fromtimestamp((final / "model.safetensors").stat().st_mtime,
                                               _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "started": start, "stop_reason": res.get("reason"),
            "train_eval_ce": {k[5:]: v for k, v in res.items() if k.startswith("eval_")},
            "train_config": {k: tc[k] for k in ("batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "max_steps",
                                                "max_minutes", "weight_decay", "bf16_autocast") if k in tc}}


def _ft_provenance(run: Path, name: str, base: dict, record: dict) -> dict:
    ft = run / name
    s = json.loads((ft / "summary.json").read_text())
    cfg = s["config"]
    stage = record.get("stages", {}).get(name, {})
    ran_here = stage.get("status") == "ran" and stage.get("command")
    cmd = stage["command"] if ran_here else (
        f"lnfree remove-ln {run / 'pretrain' / 'final'} --data <[BOS]+255-token rows of {run / 'train_tokens.npy'}> "
        f"--out {ft} --steps {cfg['steps']} --batch-size {cfg['batch_size']} --seed {cfg['seed']}"
        + (" --vanilla" if cfg["vanilla"] else "") + (" --bf16" if cfg["bf16"] else ""))
    return {"base": "tiny-ln", "steps": s["steps"], "ft_tokens": s["tokens"],
            "command_source": None if ran_here else "equivalent command, reconstructed from summary.json",
            "tokens_seen": base["tokens_seen"] + s["tokens"], "base_steps": base["steps"],
            "base_wall_time_s": base["wall_time_s"], "seed": cfg["seed"], "wall_time_s": s["wall_time_s"],
            "command": cmd, "date": _dt.datetime.fromtimestamp((ft / "summary.json").stat().st_mtime,
                                                                _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "removal": {k: cfg[k] for k in ("steps", "batch_size", "seq_len", "lr", "min_lr", "warmup", "aux_lambda",
                                            "vanilla", "bf16") if k in cfg},
            "sigma": s.get("sigma"), "ce_before": s.get("ce_before"), "ce_after": s.get("ce_after"),
            "rollbacks": s.get("rollbacks")}


def export_run(run_dir: PathArg, export_dir: PathArg, *, model_card: Optional[PathArg] = None,
               n_eval: Optional[int] = None, progress: bool = True, **kwargs) -> ExportResult:
    """Export the family of a finished `train_family` run (or a run dir with the same layout).

    Example:
        >>> res = export_run("runs/zoo", "src/lnfree/zoo/data", model_card="docs/zoo.md")   # doctest: +SKIP
    """
    from lnfree.zoo.train import load_tokenizer

    run = Path(run_dir)
    needed = [run / "tokenizer.json", run / "pretrain" / "final" / "config.json",
              run / "ft_lnfree" / "summary.json", run / "ft_vanilla" / "summary.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{run} is not a finished zoo run: missing {missing} (run `lnfree zoo train` first)")
    record = json.loads((run / "family.json").read_text()) if (run / "family.json").exists() else {}
    known = {"austen_persuasion": "persuasion", "cfi_en": "cfi"}  # the names the shipped family uses
    stems = [p.stem[len("heldout_"):] for p in sorted(run.glob("heldout_*.npy"))]
    held_src = record.get("settings", {}).get("heldout_files") or {known.get(s, s): s for s in stems}
    held_paths = _heldout_files(run, held_src)
    absent = [str(p) for p in held_paths.values() if not p.exists()]
    if absent:
        raise FileNotFoundError(f"held-out token files missing: {absent}")
    tok = load_tokenizer(run / "tokenizer.json")
    base = _load_base(run, tok)
    models = {"tiny-ln": base,
              "tiny-vanilla": _load_ft(run / "ft_vanilla", base.cfg, tok),
              "tiny-lnfree": _load_ft(run / "ft_lnfree", base.cfg, tok)}
    if not models["tiny-lnfree"].is_ln_free:
        raise ValueError(f"{run / 'ft_lnfree'} does not hold an LN-free model")
    if models["tiny-vanilla"].is_ln_free or any(m != "live" for m in models["tiny-vanilla"].ln_modes().values()):
        raise ValueError(f"{run / 'ft_vanilla'} does not hold a model with every LN site live")
    pre = _pretrain_provenance(run, record)
    meta = {"models": {"tiny-ln": pre,
                       "tiny-vanilla": _ft_provenance(run, "ft_vanilla", pre, record),
                       "tiny-lnfree": _ft_provenance(run, "ft_lnfree", pre, record)},
            "run_dir": str(run),
            "commands": list(dict.fromkeys(i["command"] for i in record.get("invocations", []) if i.get("command"))),
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} (CPU)"}
    heldout = {name: {"tokens": np.load(p), "source": str(held_src[name])} for name, p in held_paths.items()}
    return export_family(models, run / "tokenizer.json", heldout, meta, export_dir, model_card=model_card,
                         n_eval=n_eval, progress=progress, **kwargs)
