"""``lnfree remove-ln``: the removal fine-tune (or its vanilla control) as a command.

    lnfree remove-ln MODEL --data train_tokens.npy --out runs/rm [--preset gpt2-small] [--steps N]
                     [--site-order order.json [--site-start S] [--site-gap G]]
                     [--vanilla] [--resume] [--batch-size 16] [--micro-batch-size 8] [--seq-len 256]
                     [--eval-data heldout.npy] ...

MODEL is anything `lnfree.load` resolves: a zoo name (``tiny-ln``, ``smollm2-135m``), a ``.gguf``
file, a Hugging Face hub id or local HF directory, a TransformerLens weights directory
(``model.safetensors`` + ``config.json``, e.g. a run's ``final_tl/``), or a directory written by
this trainer (a run dir or one ``checkpoints/step_*`` dir). Multi-GPU:
``torchrun --nproc_per_node 8 -m lnfree.cli remove-ln ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "remove-ln", help="fine-tune LayerNorm away (the paper's procedure), or the vanilla control",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="hub id, HF dir, TransformerLens weights dir, or a run/checkpoint dir")
    p.add_argument("--data", nargs="+", required=True,
                   help=".npy token arrays, .txt/.jsonl text files, a directory, or a HF dataset name")
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, summary.json, final/")
    p.add_argument("--preset", default=None, help="gpt2-small | gpt2-medium | gpt2-large | gpt2-xl "
                   "(default: Small's schedule scaled to the model and --steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the preset's, else 300)")
    p.add_argument("--site-order", default=None, metavar="FILE",
                   help="JSON file: a list of every site in removal order, or a dict site -> cost (frozen cheapest "
                        "first, null = last), e.g. docs/smollm2_site_order.json; sites are frozen one at a time "
                        "(Schedule.from_order; needs --steps; not with --preset)")
    p.add_argument("--site-start", type=int, default=None, help="with --site-order: step of the first site "
                   "(default round(steps * 20/300), at least 1)")
    p.add_argument("--freeze-ramp", type=int, default=0, metavar="R",
                   help="phase each freeze in over R steps (per-token scale live^(1-a) sigma^a, a rising to 1; "
                        "docs/removal.md); default 0: at once")
    p.add_argument("--site-gap", type=int, default=1, help="with --site-order: steps between consecutive sites (default 1)")
    p.add_argument("--positional-sigma", type=int, default=0, metavar="K",
                   help="freeze each site at a positional scale: positions 0..K-1 keep their own sigma (every row must "
                        "start with the same token: --bos-id); such sites end frozen, not folded (docs/removal.md)")
    p.add_argument("--sites", nargs="+", default=None, metavar="SITE",
                   help="remove only these sites (e.g. blocks.14.ln1.v): they are frozen on the schedule and folded; "
                        "every other site stays live (default: every site)")
    p.add_argument("--vanilla", action="store_true", help="control run: keep LN, no aux loss")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (all processes)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward pass per process")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per training sequence (default: the data's row width, capped at the model's context "
                        "and 1024, or the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's, else GPT-2 Small's)")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate of the cosine decay (default: the "
                   "preset's, else GPT-2 Small's)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: the preset's, else "
                   "round(steps * 25/300))")
    p.add_argument("--aux-lambda", type=float, default=None, help="weight of the auxiliary loss on the residual "
                   "norm entering the final norm (default: the preset's, else GPT-2 Small's)")
    p.add_argument("--eval-data", default=None, help="held-out tokens/text for CE before and after")
    p.add_argument("--eval-seqs", type=int, default=64,
                   help="without --eval-data: hold out this many sequences of --data for evaluation (0: none)")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="steps between verified checkpoints in --out (also at step 0, at the end and on Ctrl-C)")
    p.add_argument("--max-rollbacks", type=int, default=3, help="a diverging step rolls back to the last good "
                   "checkpoint with the LR halved; after this many the run stops (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of LoRA's initialisation")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where lnfree.load puts the model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bos-id", type=int, default=None,
                   help="prepend this token to every row cut from a token stream or text (for models "
                        "pretrained with a BOS, e.g. the zoo's: its end-of-text id); default: no BOS, as in the paper")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json file or HF tokenizer dir (for text data)")
    v = p.add_argument_group("variants (docs/removal.md)")
    v.add_argument("--lora-rank", type=int, default=None,
                   help="train rank-R LoRA adapters on the attention and MLP weights of a frozen backbone; "
                        "merged at the end (default: full fine-tune)")
    v.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (default alpha = rank)")
    v.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="loss = (1 - W) CE + W KL(original || model) (+ aux); 1 = pure distillation (default 0)")
    v.add_argument("--distill-temperature", type=float, default=1.0,
                   help="softmax temperature of the distillation KL (default 1)")
    v.add_argument("--recipe", choices=["paper"], default=None,
                   help="with --preset: the paper's code's run of that size (docs/removal.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _load_tokenizer(path: str):
    from lnfree.io.tokenizers import load_saved_tokenizer

    return load_saved_tokenizer(path, name="--tokenizer")


def load_model_arg(spec: str, tokenizer_path=None, device=None):
    """Resolve MODEL with `lnfree.load` (zoo names, .gguf, run/checkpoint dirs, TL and HF dirs, hub ids)."""
    from lnfree.io.resolve import load

    model = load(spec, device=device)
    if tokenizer_path:
        model.set_tokenizer(_load_tokenizer(tokenizer_path))
    return model


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings_from_args(args):
    """The run's `RemovalSettings` from the flags (validated: an error names the flag)."""
    from lnfree.removal.config import RemovalSettings

    try:
        return RemovalSettings(
            schedule=args.preset, steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
            seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, aux_lambda=args.aux_lambda,
            vanilla=args.vanilla, checkpoint_every=args.checkpoint_every, seed=args.seed, bf16=args.bf16,
            max_rollbacks=args.max_rollbacks, bos_token_id=args.bos_id, lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha, distill=args.distill, distill_temperature=args.distill_temperature,
            recipe=args.recipe, freeze_ramp=args.freeze_ramp, positional_sigma=args.positional_sigma,
            sites=args.sites)
    except (ValueError, TypeError) as e:
        raise type(e)(in_flags(str(e))) from None


def check_args(args):
    """Validate every flag before anything is loaded; returns the `RemovalSettings` they spell."""
    from lnfree.training.device import resolve_device

    settings = settings_from_args(args)
    for name, low in (("eval_seqs", 0), ("threads", 1), ("site_start", 1), ("site_gap", 0)):
        v = getattr(args, name)
        if v is not None and (isinstance(v, bool) or v < low):
            raise ValueError(f"{_flag(name)} must be an integer >= {low}, got {v}")
    resolve_device(args.device, argument="--device")
    if args.site_order is not None:
        if args.preset is not None:
            raise ValueError("--site-order and --preset both set the schedule; give one")
        if args.steps is None:
            raise ValueError("--site-order needs --steps (the run's length)")
        if not Path(args.site_order).is_file():
            raise ValueError(f"--site-order {args.site_order}: no such file")
    if args.resume:
        out = Path(args.out)
        from lnfree.training.checkpoints import CheckpointDir

        if not out.is_dir() or CheckpointDir(out).latest() is None:
            what = "does not exist" if not out.exists() else "holds no removal checkpoint (no checkpoints/latest)"
            raise ValueError(f"nothing to resume: --out {out} {what}; check the path, or drop --resume to start")
    return settings


def schedule_from_order_file(path, n_layers: int, steps: int, start=None, gap: int = 1):
    """`Schedule.from_order` from a JSON file: a list of sites in removal order, or a dict site -> cost
    (cheapest first, `order_by_cost`). `start` defaults to Small's relative start, ``round(steps * 20/300)``."""
    import json

    from lnfree.removal.schedule import Schedule, order_by_cost, small_start

    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--site-order {path}: not a readable JSON file ({e})") from None
    if isinstance(spec, dict):
        order = order_by_cost(spec)
    elif isinstance(spec, list):
        order = spec
    else:
        raise ValueError(f"--site-order {path}: expected a JSON list of sites or a dict site -> cost, "
                         f"got {type(spec).__name__}")
    start = small_start(steps) if start is None else start
    return Schedule.from_order(n_layers, steps, order, start=start, gap=gap, name=f"order:{Path(path).name}")


# The trainer's messages name its Python arguments; the command's user knows the flags.
_IN_FLAGS = [
    (r"^(steps|lr|warmup|distill|seed|sites|positional_sigma)\b()", None),  # a setting's own check names it first
    (r"use schedule=None \(Small's schedule scaled to the model\) or a Schedule",
     "drop --preset (Small's schedule is then scaled to the model and --steps), or give --site-order"),
    (r"needs a preset schedule \(schedule='gpt2-small', \.\.\.\)", "needs --preset (gpt2-small, ...)"),
    (r"recipe='paper'", "--recipe paper"),
    (r"\bpreset '([\w.-]+)'", r"--preset \1"),
    (r"pass resume=True \(--resume\)", "pass --resume"), (r"without resume \(--resume\)", "without --resume"),
    (r"\bresume=True\b", "--resume"), (r"\bout_dir\b", "--out"), (r"\beot_token_id=", "an end-of-text id"),
    (r"\b(seq_len|batch_size|micro_batch_size|freeze_ramp|min_lr|aux_lambda|lora_rank|lora_alpha|bos_token_id|"
     r"distill_temperature|checkpoint_every|max_rollbacks)\b(=?)", None),
    (r"\b(steps|lr|warmup|distill|seed)(=)", None),  # plain words elsewhere: only as name=value
]


def in_flags(message: str) -> str:
    """A trainer error in the command's words: ``seq_len=2048`` -> ``--seq-len 2048``, ``schedule=None`` -> no --preset.

    Example:
        >>> in_flags("batch_size (6) must be a multiple of micro_batch_size (4)")
        '--batch-size (6) must be a multiple of --micro-batch-size (4)'
    """
    import re

    for pattern, words in _IN_FLAGS:
        if words is None:
            message = re.sub(pattern, lambda m: ("--bos-id" if m[1] == "bos_token_id" else _flag(m[1]))
                             + (" " if m[2] else ""), message)
        else:
            message = re.sub(pattern, words, message)
    return message


def resume_command(args) -> str:
    """The command line that continues this run: the one given, with --resume."""
    import shlex

    argv = list(getattr(args, "argv", None) or [])
    if not argv:
        return f"lnfree remove-ln {shlex.quote(args.model)} ... --out {shlex.quote(str(args.out))} --resume"
    return shlex.join(["lnfree", *argv, *([] if "--resume" in argv else ["--resume"])])


def run(args) -> int:
    from lnfree.cli import CLIError
    from lnfree.removal.data import load_tokens, split_holdout
    from lnfree.removal.trainer import remove_layernorm
    from lnfree.training.device import set_threads
    from lnfree.training.guards import DivergedError
    from lnfree.training.interrupt import TrainingInterrupted

    settings = check_args(args)
    set_threads(args.threads)
    model = load_model_arg(args.model, args.tokenizer, args.device)
    if args.site_order is not None:
        settings = settings.replace(schedule=schedule_from_order_file(
            args.site_order, model.cfg.n_layers, args.steps, args.site_start, args.site_gap))
    data = args.data if len(args.data) > 1 else args.data[0]
    eval_data = args.eval_data
    if eval_data is None and args.eval_seqs > 0:
        seq_len = args.seq_len or min(model.cfg.n_ctx, 1024)
        seqs = load_tokens(data, seq_len=seq_len, tokenizer=model.tokenizer, bos_token_id=args.bos_id)
        if args.eval_seqs >= len(seqs):
            raise CLIError(f"--eval-seqs {args.eval_seqs}: --data gives only {len(seqs)} sequences of {seq_len} tokens; "
                           f"hold out fewer (at most {len(seqs) - 1}), give more data, or pass --eval-data")
        data, eval_data = split_holdout(seqs, args.eval_seqs)
        settings = settings.replace(seq_len=seq_len)
    try:
        model = remove_layernorm(model, data, settings=settings, out_dir=args.out, resume=args.resume,
                                 eval_data=eval_data, progress=not args.no_progress, device=args.device)
    except DivergedError as e:  # one line, no traceback; the message names the last good checkpoint
        raise CLIError(str(e)) from None
    except TrainingInterrupted as e:  # Ctrl-C: the trainer checkpointed the step it finished
        print(f"lnfree remove-ln: {e}\nresume with: {resume_command(args)}", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as e:
        raise CLIError(in_flags(str(e))) from None
    s = model.removal_summary
    if s.get("ce_before") and s.get("ce_after"):
        b, a = s["ce_before"], s["ce_after"]
        print(f"CE before {b['value']:.4f} [{b['low']:.4f}, {b['high']:.4f}]  after {a['value']:.4f} "
              f"[{a['low']:.4f}, {a['high']:.4f}] nats/token")
    print(f"{s['steps']} steps, {s['tokens']} tokens, {s['wall_time_s']:.1f} s; summary: {Path(args.out) / 'summary.json'}")
    return 0
