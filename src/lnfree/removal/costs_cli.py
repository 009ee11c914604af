"""``lnfree site-costs``: what freezing each norm site alone costs, written as ``remove-ln --site-order``'s file.

    lnfree site-costs MODEL [--data FILE] [--rows 4] [--calib-rows 16] [--seq-len L] --out costs.json
    lnfree remove-ln MODEL --data ... --steps N --site-order costs.json     # cheapest site first

The first --rows rows of the data are scored, the next --calib-rows rows calibrate each site's scale
(`lnfree.removal.site_costs`). Default data: the zoo's held-out "persuasion" text re-tokenized with the
model's tokenizer. The output is a JSON dict site -> CE cost (nats/token; null where the logits went
non-finite).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lnfree._errors import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "site-costs", help="the CE cost of freezing each norm site alone (the order for remove-ln --site-order)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="anything lnfree.load resolves (zoo name, .gguf, directory, hub id)")
    p.add_argument("--data", default=None, metavar="DATA",
                   help=".npy token rows or stream, a text file, or a HF dataset name (default: the zoo's held-out "
                        "persuasion text, re-tokenized for the model)")
    p.add_argument("--out", required=True, help="JSON file: site -> cost, for lnfree remove-ln --site-order")
    p.add_argument("--rows", type=int, default=4, help="rows scored (default 4)")
    p.add_argument("--calib-rows", type=int, default=16, help="the next rows, on which scales are estimated (default 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: the zoo's held-out text in rows of 64; --data as `lnfree "
                        "compare` reads it: a 2-D .npy's rows as they are, text in min(n_ctx, 256)-token rows)")
    p.add_argument("--sites", nargs="+", default=None, metavar="SITE", help="only these sites (default: every live site)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each cost's CI")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _rows(args, model):
    """[rows + calib_rows, seq_len] token rows from --data (or the zoo's held-out text)."""
    from lnfree.report.cli import load_data

    for flag in ("rows", "calib_rows"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.data is not None:
        rows = next(iter(load_data([args.data], model, args.seq_len).values()))
    else:
        from lnfree import zoo

        if getattr(model, "tokenizer", None) is None:
            raise CLIError("the model has no tokenizer, so the zoo's held-out text cannot be used: pass --data")
        rows = zoo.heldout("persuasion", model=model, seq_len=args.seq_len or 64)
    need = args.rows + args.calib_rows
    if rows.shape[0] < need:
        raise CLIError(f"the data gives {rows.shape[0]} rows of {rows.shape[1]} tokens; --rows {args.rows} + "
                       f"--calib-rows {args.calib_rows} need {need}")
    return rows[: args.rows], rows[args.rows: need]


def run(args) -> int:
    from lnfree.removal.costs import site_costs
    from lnfree.report.cli import load_any
    from lnfree.training.device import set_threads

    set_threads(args.threads)
    model = load_any(args.model, device=args.device)
    tokens, calib = _rows(args, model)
    res = site_costs(model, tokens, calib=calib, sites=args.sites, batch_size=args.batch_size, n_boot=args.n_boot,
                     progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res.costs(), indent=1) + "\n", encoding="utf-8")
    print(res.top(10).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{res}\nlive CE {res.live.mean} nats/token on {tuple(tokens.shape)}; costs: {out}")
    return 0
