"""``lnfree zoo``: reproduce, export and inspect the shipped model family.

    lnfree zoo train --text FILES... --heldout NAME=FILE... --out DIR [--minutes 80] [--max-steps 5000]
                     [--ft-steps 300] [--seed 0] [--export-dir DIR] [--card docs/zoo.md] ...
    lnfree zoo export --run DIR --to DIR [--card docs/zoo.md] [--eval-rows N]
    lnfree zoo card --json src/lnfree/zoo/data/zoo.json --out docs/zoo.md
    lnfree zoo info [--data-dir DIR]
    lnfree zoo tokenizer --text FILES... --out DIR        (the pretraining's pieces, one at a time)
    lnfree zoo heldout --tokenizer DIR/tokenizer.json --out DIR --text FILES...
    lnfree zoo bench --data DIR [--steps 8]
    lnfree zoo pretrain --data DIR --out DIR/pretrain [--max-minutes 80] [--max-steps 5000] [--resume]

Held-out texts are always given (the shipped family used Austen's *Persuasion* and an out-of-domain text:
``--heldout persuasion=CORPUS/heldout/austen_persuasion.txt cfi=CORPUS/heldout/cfi_en.txt``, CORPUS being
wherever your copy of the texts lies; docs/zoo_training.md).

``train`` runs tokenizer -> pretraining -> LN-free and vanilla fine-tunes -> export, skipping stages
whose outputs exist (rerun the same command to resume); ``DIR/family.json`` records what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path



def register(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="the shipped tiny model family: train, export, card, info",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])

    t = sub.add_parser("train", help="reproduce the family from text files (resumable)")
    t.add_argument("--text", nargs="+", required=True, help="training text files (one document each)")
    t.add_argument("--out", required=True, help="run directory (tokenizer, pretrain/, ft_*/, family.json)")
    t.add_argument("--minutes", type=float, default=80.0, help="pretraining wall-clock budget")
    t.add_argument("--max-steps", type=int, default=5000, help="pretraining steps (the budget usually ends it first)")
    t.add_argument("--ft-steps", type=int, default=300, help="steps of each fine-tune (LN-free and vanilla)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--heldout", nargs="+", required=True, metavar="NAME=FILE",
                   help="held-out texts, e.g. persuasion=CORPUS/heldout/austen_persuasion.txt "
                        "cfi=CORPUS/heldout/cfi_en.txt (the shipped family's)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--ft-batch-size", type=int, default=32)
    t.add_argument("--ft-micro-batch-size", type=int, default=None)
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 autocast (fp32 weights) for pretraining and fine-tunes")
    t.add_argument("--export-dir", default=None, help="where to export (default OUT/export; the package: "
                   "src/lnfree/zoo/data)")
    _export_options(t, eval_help="held-out rows evaluated at export (default all)")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="export a finished run's models (fp16 + zoo.json + tokenizer + held-out)")
    e.add_argument("--run", required=True, help="run directory of `lnfree zoo train`")
    e.add_argument("--to", required=True, help="destination, e.g. src/lnfree/zoo/data")
    _export_options(e, eval_help="held-out rows evaluated (default all)")
    e.set_defaults(func=_export)

    c = sub.add_parser("card", help="render the model card from an export's zoo.json")
    c.add_argument("--json", default=None, help="zoo.json (default: the packaged one)")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_card)

    i = sub.add_parser("info", help="summary of an exported family (default: the packaged one)")
    i.add_argument("--data-dir", default=None)
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=_info)
    _register_pretraining(sub)



def _export_options(p, *, eval_help: str) -> None:
    """The options `train` and `export` share (both end with an export)."""
    p.add_argument("--card", default=None, help="write the model card here (e.g. docs/zoo.md)")
    p.add_argument("--eval-rows", type=int, default=None, help=eval_help)
    p.add_argument("--no-progress", action="store_true")

def _register_pretraining(sub) -> None:
    s = sub.add_parser("tokenizer", help="train the BPE tokenizer (+ tokenize the training text)")
    s.add_argument("--text", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--no-tokenize", action="store_true", help="skip writing train_tokens.npy")
    s.set_defaults(func=_cmd_tokenizer)
    s = sub.add_parser("heldout", help="write heldout_<stem>.npy [n_seq, seq_len] token arrays")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--text", nargs="+", required=True, help="held-out text files (one token array each)")
    s.add_argument("--out", required=True)
    s.add_argument("--n-seq", type=int, default=100)
    s.add_argument("--seq-len", type=int, default=256)
    s.set_defaults(func=_cmd_heldout)
    for name in ("pretrain", "bench"):
        s = sub.add_parser(name, help="pretrain the base model" if name == "pretrain" else "measure tokens/s")
        s.add_argument("--data", required=True, help="dir with tokenizer.json and train_tokens.npy")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--max-steps", type=int, default=2000)
        s.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                       help="bf16 = autocast mixed precision on CPU (weights stay fp32)")
        s.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        s.add_argument("--step-schedule", action="store_true",
                       help="cosine over max_steps only (default: also advanced by wall-time "
                            "fraction of --max-minutes so it completes in the budget)")
        if name == "pretrain":
            s.add_argument("--out", required=True)
            s.add_argument("--max-minutes", type=float, default=None)
            s.add_argument("--warmup", type=int, default=200)
            s.add_argument("--resume", action="store_true")
            s.add_argument("--eval-text", nargs="*", default=[],
                           help="held-out text files evaluated at the end (default: none)")
            s.set_defaults(func=_cmd_pretrain)
        else:
            s.add_argument("--steps", type=int, default=8)
            s.set_defaults(func=_cmd_bench)


def _load_eval_sets(data: Path, tokenizer, files, n: int) -> dict:
    """Held-out sets: ``data/heldout_<stem>.npy`` if present, else tokenize the text."""
    import numpy as np

    from lnfree.zoo import train as zt

    sets = {}
    for f in files:
        npy = data / f"heldout_{Path(f).stem}.npy"
        if npy.exists():
            sets[Path(f).stem] = np.load(npy)[:n]
        elif Path(f).exists():
            sets[Path(f).stem] = zt.heldout_sequences(f, tokenizer, n)
    return sets


def _cmd_tokenizer(a) -> int:
    import numpy as np

    from lnfree.zoo import train as zt

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    path = zt.train_tokenizer(a.text, a.vocab_size, out / "tokenizer.json")
    tok = zt.load_tokenizer(path)
    names = zt.single_token_names(tok)
    print(json.dumps({"tokenizer": path, "vocab": len(tok), "eot_id": zt.eot_id(tok),
                      "single_token_names": len(names), "of": len(set(zt.COMMON_NAMES)),
                      "names": names, "seconds": round(time.time() - t0, 1)}))
    if not a.no_tokenize:
        ids = zt.tokenize_files(a.text, tok)
        np.save(out / "train_tokens.npy", ids)
        print(json.dumps({"train_tokens": len(ids), "bytes": sum(os.path.getsize(f) for f in a.text),
                          "seconds": round(time.time() - t0, 1)}))
    return 0


def _cmd_heldout(a) -> int:
    import numpy as np

    from lnfree.zoo import train as zt

    tok = zt.load_tokenizer(a.tokenizer)
    for f in a.text:
        arr = zt.heldout_sequences(f, tok, a.n_seq, a.seq_len)
        p = Path(a.out) / f"heldout_{Path(f).stem}.npy"
        np.save(p, arr)
        print(json.dumps({"file": str(p), "shape": list(arr.shape)}))
    return 0


def _train_config(a, d_vocab: int, **over):
    from lnfree.zoo import train as zt

    kw = dict(seed=a.seed, max_steps=a.max_steps, max_minutes=getattr(a, "max_minutes", None),
              batch_size=a.batch_size, warmup_steps=getattr(a, "warmup", 200), bf16_autocast=(a.precision == "bf16"),
              threads=a.threads,
              time_schedule=not a.step_schedule, model=zt.base_model_kwargs(d_vocab))
    kw.update(over)
    return zt.TrainConfig(**kw)


def _cmd_pretrain(a) -> int:
    import dataclasses

    import numpy as np

    from lnfree.zoo import train as zt

    data = Path(a.data)
    tok = zt.load_tokenizer(data / "tokenizer.json")
    tokens = np.load(data / "train_tokens.npy", mmap_mode="r")
    tc = _train_config(a, len(tok))
    evals = _load_eval_sets(data, tok, a.eval_text, tc.eval_seqs)
    config = {k: v for k, v in dataclasses.asdict(tc).items() if k != "optim"}
    zt._log(Path(a.out), {"event": "start", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "train_tokens": int(len(tokens)), "config": config})
    zt.pretrain(np.asarray(tokens), tc, a.out, resume=a.resume, eval_sets=evals, bos=zt.eot_id(tok))
    return 0


def _cmd_bench(a) -> int:
    import numpy as np

    from lnfree.zoo import train as zt

    data = Path(a.data)
    tok = zt.load_tokenizer(data / "tokenizer.json")
    tokens = np.load(data / "train_tokens.npy")
    tc = _train_config(a, len(tok), max_minutes=None, warmup_steps=200, max_steps=a.steps)
    t0 = time.time()
    _, hist = zt.pretrain(tokens, tc, None, bos=zt.eot_id(tok), progress=False)
    dt = time.time() - t0
    print(json.dumps({"steps": a.steps, "seconds": round(dt, 1),
                      "tok_per_s": round(a.steps * tc.batch_size * tc.seq_len / dt, 1),
                      "losses": [round(x, 3) for x in hist]}))
    return 0


def _heldout_arg(items):
    if items is None:
        return None
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--heldout takes NAME=FILE items, got {item!r}")
        out[name] = path
    return out


def _command(args) -> str:
    """The canonical command line of a `zoo train` call, every setting spelled out."""
    parts = ["lnfree", "zoo", "train", "--text", *args.text, "--out", args.out, "--minutes", str(args.minutes),
             "--max-steps", str(args.max_steps), "--ft-steps", str(args.ft_steps), "--seed", str(args.seed),
             "--vocab-size", str(args.vocab_size), "--ft-batch-size", str(args.ft_batch_size),
             "--precision", args.precision]
    for flag, v in (("--heldout", args.heldout), ("--ft-micro-batch-size", args.ft_micro_batch_size),
                    ("--export-dir", args.export_dir), ("--card", args.card), ("--eval-rows", args.eval_rows)):
        if v is not None:
            parts += [flag, *(v if isinstance(v, list) else [str(v)])]
    return shlex.join(parts)


def _train(args) -> int:
    from lnfree.zoo.family import train_family

    record = train_family(
        args.text, args.out, heldout_files=_heldout_arg(args.heldout), minutes=args.minutes,
        max_steps=args.max_steps, ft_steps=args.ft_steps,
        seed=args.seed, vocab_size=args.vocab_size,
        ft_batch_size=args.ft_batch_size, ft_micro_batch_size=args.ft_micro_batch_size,
        precision=args.precision, export_dir=args.export_dir, model_card=args.card, n_eval=args.eval_rows,
        command=_command(args), progress=not args.no_progress)
    for stage, entry in record["stages"].items():
        print(f"{stage}: {entry.get('status')}")
    print(f"record: {args.out}/family.json")
    return 0


def _export(args) -> int:
    from lnfree.zoo.family import export_run

    res = export_run(args.run, args.to, model_card=args.card, n_eval=args.eval_rows, progress=not args.no_progress)
    print(res)
    return 0


def _card(args) -> int:
    from lnfree import zoo
    from lnfree.zoo.family import write_model_card

    path = args.json or (zoo.data_dir() / zoo.MANIFEST)
    print(write_model_card(path, args.out))
    return 0


def _info(args) -> int:
    from lnfree import zoo

    m = zoo.info(args.data_dir)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"{zoo.data_dir(args.data_dir)}: exported {m['created']}, {m.get('size_bytes', 0) / 1e6:.2f} MB")
    for name, e in m["models"].items():
        ev = "  ".join(f"{h} CE {d['ce']['value']:.4f}" for h, d in e.get("eval", {}).items())
        print(f"  {name:14s} ln_free={e['is_ln_free']!s:5s} steps={e['provenance']['steps']} "
              f"tokens={e['provenance']['tokens_seen']:,}  {ev}")
    for h, s in m["heldout"].items():
        print(f"  heldout {h}: {s['shape'][0]} x {s['shape'][1]} tokens, {s['n_bytes']:,} bytes")
    return 0
