"""``lnfree zoo``: reproduce, export and inspect the shipped model family.

    lnfree zoo train --text FILES... --out DIR [--minutes 80] [--max-steps 5000] [--ft-steps 300] [--seed 0]
                     [--heldout NAME=FILE ...] [--export-dir DIR] [--card docs/zoo.md] ...
    lnfree zoo export --run DIR --to DIR [--card docs/zoo.md] [--eval-rows N]
    lnfree zoo card --json src/lnfree/zoo/data/zoo.json --out docs/zoo.md
    lnfree zoo info [--data-dir DIR]

``train`` runs tokenizer -> pretraining -> LN-free and vanilla fine-tunes -> export, skipping stages
whose outputs exist (rerun the same command to resume); ``DIR/family.json`` records what ran.
"""

from __future__ import annotations

import argparse
import json
import shlex


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
    t.add_argument("--heldout", nargs="+", default=None, metavar="NAME=FILE",
                   help="held-out texts (default: persuasion=.../austen_persuasion.txt cfi=.../cfi_en.txt)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--ft-batch-size", type=int, default=32)
    t.add_argument("--ft-micro-batch-size", type=int, default=None)
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 autocast (fp32 weights) for pretraining and fine-tunes")
    t.add_argument("--export-dir", default=None, help="where to export (default OUT/export; the package: "
                   "src/lnfree/zoo/data)")
    t.add_argument("--card", default=None, help="write the model card here (e.g. docs/zoo.md)")
    t.add_argument("--eval-rows", type=int, default=None, help="held-out rows evaluated at export (default all)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="export a finished run's models (fp16 + zoo.json + tokenizer + held-out)")
    e.add_argument("--run", required=True, help="run directory of `lnfree zoo train`")
    e.add_argument("--to", required=True, help="destination, e.g. src/lnfree/zoo/data")
    e.add_argument("--card", default=None, help="write the model card here (e.g. docs/zoo.md)")
    e.add_argument("--eval-rows", type=int, default=None, help="held-out rows evaluated (default all)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_export)

    c = sub.add_parser("card", help="render the model card from an export's zoo.json")
    c.add_argument("--json", default=None, help="zoo.json (default: the packaged one)")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_card)

    i = sub.add_parser("info", help="summary of an exported family (default: the packaged one)")
    i.add_argument("--data-dir", default=None)
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=_info)


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
        args.text, args.out, minutes=args.minutes, max_steps=args.max_steps, ft_steps=args.ft_steps,
        seed=args.seed, heldout_files=_heldout_arg(args.heldout), vocab_size=args.vocab_size,
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
