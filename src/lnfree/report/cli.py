"""``lnfree demo``, ``lnfree compare`` and ``lnfree reproduce``: the LN vs LN-free report as commands.

    lnfree demo [--out DIR] [--quick]
        the embedded family (tiny-ln vs tiny-lnfree, tiny-vanilla as the control), offline
    lnfree compare MODEL_A MODEL_B [--data FILE ...] [--out DIR] [--quick]
        the same report for any two models: zoo names, local directories, hub ids
    lnfree reproduce FIGURE [--models A B ...] [--data ...] [--out DIR]
        one of the paper's results (table1, dla, atp, entropy, first-token-norm, sink-rate); the
        defaults are the paper's models and data (hub), --models/--data run it on local ones
    lnfree report smollm2-135m [--quick | --full] [--resume] [--render] [--out docs/real_model.md]
        every headline analysis on the real model, as a markdown page + JSON (`lnfree.report.real_stages`)

The first three write one self-contained HTML file (plotly inlined, no network) and a JSON of every number,
and prints a summary table. See `lnfree.report.pipeline` for what each stage measures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from lnfree._errors import CLIError

#: The paper's results: the report stage that reproduces each, default models and data sets.
PAPER_DATA = ("Skylion007/openwebtext",)
FIGURES = {
    "table1": {"stage": "ce", "data": ("Skylion007/openwebtext", "NeelNanda/pile-10k"),
               "what": "held-out cross-entropy of the LN and LN-free models (Table 1)"},
    "dla": {"stage": "dla", "data": PAPER_DATA,
            "what": "DLA vs exact direct effect of attention heads: NMAE (%), LN vs LN-free"},
    "atp": {"stage": "atp", "data": (),
            "what": "attribution patching error vs activation patching on IOI, per layer"},
    "entropy": {"stage": "confidence", "data": PAPER_DATA,
                "what": "entropy-neuron ablation (total vs direct) and calibration"},
    "first-token-norm": {"stage": "first_token_norm", "data": PAPER_DATA,
                         "what": "residual-stream norm at position 0 relative to the other positions, per layer"},
    "sink-rate": {"stage": "sink_rate", "data": PAPER_DATA,
                  "what": "share of attention heads with >= 30% attention on position 0"},
}
DEFAULT_SEQ_LEN = 256
MAX_TEXT_TOKENS = 200_000  # enough rows for every stage; a large text file is not read to the end


def register(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="smaller data for every stage (a smoke run)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    common.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")

    p = subparsers.add_parser("demo", parents=[common], help="LN vs LN-free report on the embedded models (offline)",
                              description="The full report on the embedded family: tiny-ln vs tiny-lnfree, "
                                          "tiny-vanilla as the control, on both held-out sets.")
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.set_defaults(func=run_demo)

    p = subparsers.add_parser("compare", parents=[common], help="the LN vs LN-free report for any two models",
                              description="MODEL: a zoo name (tiny-ln, tiny-vanilla, tiny-lnfree), a local "
                                          "checkpoint directory, or a hub id (when the hub is reachable).")
    p.add_argument("model_a", metavar="MODEL_A", help="the baseline (e.g. the model with LayerNorm)")
    p.add_argument("model_b", metavar="MODEL_B", help="the model compared with it (e.g. its LN-free version)")
    _data_args(p)
    p.add_argument("--out", default="out/compare", help="output directory (default: out/compare)")
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser("reproduce", parents=[common], help="reproduce one of the paper's results",
                              description="FIGURE: " + "; ".join(f"{k}: {v['what']}" for k, v in FIGURES.items())
                              + ". Defaults: the models the paper's code ran each figure on (GPT-2 Small; Medium "
                              "for first-token-norm and sink-rate: lnfree.paper.reproduce.PAPER_MODELS, hub) and "
                              "its data sets (Hugging Face datasets); --models/--data run the same figure on local models "
                              "(directories or zoo names) and token files, offline.")
    p.add_argument("figure", metavar="FIGURE", choices=sorted(FIGURES), help=" | ".join(FIGURES))
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to compare, the first is the baseline (default: the paper's models for FIGURE)")
    _data_args(p)
    p.add_argument("--out", default=None, help="output directory (default: out/reproduce/FIGURE)")
    p.set_defaults(func=run_reproduce)
    _register_real(subparsers, common)


def _register_real(subparsers, common) -> None:
    p = subparsers.add_parser("report", parents=[common], help="every analysis on a real model: a markdown page",
                              description="Every headline analysis of lnfree on a real pretrained model (offline), "
                                          "written as OUT (markdown) and OUT with .json (every number); the default "
                                          "sizes took 830 s of one CPU core (docs/real_model.json).")
    p.add_argument("model", metavar="MODEL", choices=["smollm2-135m"], help="smollm2-135m")
    p.add_argument("--full", action="store_true", help="larger sizes (hours on a 2-core CPU)")
    p.add_argument("--out", default="docs/real_model.md", help="the page (default: docs/real_model.md)")
    p.add_argument("--resume", action="store_true",
                   help="load the stages an earlier run saved in OUT's _results directory (same model and sizes) "
                        "instead of recomputing them")
    p.add_argument("--render", action="store_true", help="rewrite the page from OUT's JSON (no computing)")
    p.add_argument("--render-partial", action="store_true",
                   help="write the page and JSON from the stages saved in OUT's _results directory (e.g. of an "
                        "interrupted run)")
    p.set_defaults(func=run_real)


def _data_args(p) -> None:
    p.add_argument("--data", nargs="+", default=None, metavar="DATA",
                   help=".npy token arrays ([n, pos] rows or a 1-D stream), text files (.txt, .md, .jsonl), or "
                        "Hugging Face dataset names; each is one data set (default: the zoo's held-out sets for "
                        "models with the zoo's tokenizer)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence cut from streams and text (default: min(n_ctx, {DEFAULT_SEQ_LEN}))")


# ---- loading -------------------------------------------------------------------------------
def load_any(spec: str, device=None):
    """A model argument of ``compare`` / ``reproduce`` / ``demo`` -> LNFreeTransformer, through the one
    resolver `lnfree.load` (zoo names, .gguf files, removal runs, TransformerLens and HF directories,
    hub ids). Failures become one-line CLIErrors naming the argument and what is accepted.

    Example:
        >>> model = load_any("tiny-lnfree")        # doctest: +SKIP
    """
    from lnfree._errors import CheckpointError
    from lnfree.io.hf import HubUnreachableError
    from lnfree.io.resolve import kinds_text, load

    if not isinstance(spec, str) or not spec:
        raise CLIError(f"a model must be a zoo name, a directory or a hub id, got {spec!r}")
    try:
        return load(spec, device=device)
    except (CheckpointError, HubUnreachableError, ValueError, TypeError) as e:
        text = _one_line(e)
        accepted = "" if "accepted:" in text else f"; accepted: {kinds_text()}"
        raise CLIError(f"cannot load model {spec!r}: {text}{accepted}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _seq_len(model, seq_len: Optional[int]) -> int:
    n = min(model.cfg.n_ctx, DEFAULT_SEQ_LEN) if seq_len is None else seq_len
    if n < 3 or n > model.cfg.n_ctx:
        raise CLIError(f"--seq-len must lie in [3, n_ctx={model.cfg.n_ctx}], got {n}")
    return n


def load_data(specs: Sequence[str], model, seq_len: Optional[int] = None) -> dict:
    """Each DATA argument -> one named token set [n, seq_len] for `model` (see ``--data``).

    Example:
        >>> data = load_data(["heldout.npy", "book.txt"], model)   # doctest: +SKIP
    """
    import numpy as np
    import torch

    from lnfree.removal.data import TEXT_EXT, chunk, chunk_with_bos, load_tokens

    n = _seq_len(model, seq_len)
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_token_id", None) if tok is not None and model.cfg.default_prepend_bos else None
    out = {}
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        name = path.stem if path.suffix else spec
        try:
            if path.suffix == ".npy" or (path.exists() and path.suffix not in TEXT_EXT + (".jsonl",)
                                         and _is_npy(path)):
                if not path.is_file():
                    raise CLIError(f"data file {spec} does not exist")
                arr = np.load(path, allow_pickle=False)
                if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
                    raise CLIError(f"{spec} must hold integer token ids as a 1-D stream or [n, pos] rows; got "
                                   f"dtype {arr.dtype}, shape {arr.shape}")
                if arr.ndim == 2 and arr.shape[1] <= model.cfg.n_ctx and seq_len is None:
                    rows = arr  # ready-made rows (e.g. the zoo's held-out sets): used as they are
                elif arr.ndim == 1 and bos is not None:
                    rows = chunk_with_bos(arr, n, bos)
                else:
                    rows = chunk(arr, n)
            elif path.exists():
                if path.is_dir():
                    raise CLIError(f"data {spec} is a directory; pass its files")
                if tok is None:
                    raise CLIError(f"{spec} is text, but the model has no tokenizer; pass .npy token ids")
                rows = load_tokens([path], seq_len=n, tokenizer=tok, bos_token_id=bos, max_tokens=MAX_TEXT_TOKENS)
            elif path.suffix or spec.startswith((".", "/", "~")):
                raise CLIError(f"data file {spec} does not exist")
            else:  # a Hugging Face dataset name
                rows = load_tokens(spec, seq_len=n, tokenizer=tok, bos_token_id=bos, max_tokens=MAX_TEXT_TOKENS,
                                   split="train")
        except CLIError:
            raise
        except (ValueError, OSError, UnicodeDecodeError, EOFError, ImportError) as e:
            raise CLIError(f"cannot read data {spec!r}: {_one_line(e)}") from None
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] < 1:
            raise CLIError(f"data {spec!r} gives no complete sequence of {n} tokens")
        if rows.max() >= model.cfg.d_vocab or rows.min() < 0:
            raise CLIError(f"data {spec!r} holds token ids outside [0, {model.cfg.d_vocab}) (max {int(rows.max())}): "
                           "it was tokenized for another vocabulary")
        out[_unique(name, out)] = torch.from_numpy(rows.astype(np.int64))
    return out


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def _unique(name: str, taken) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


def _zoo_data_for(model) -> Optional[dict]:
    """The zoo's held-out sets when `model` uses the zoo's tokenizer (and the zoo is installed)."""
    from lnfree import zoo

    try:
        zoo_tok = zoo.tokenizer()
    except (FileNotFoundError, ValueError):
        return None
    tok = getattr(model, "tokenizer", None)
    if tok is None or model.cfg.d_vocab != zoo.info()["config"]["d_vocab"] or tok.get_vocab() != zoo_tok.get_vocab():
        return None
    return {name: zoo.heldout(name) for name in zoo.info()["heldout"]}


def _names(specs: Sequence[str]) -> list[str]:
    names = []
    for s in specs:
        p = Path(os.path.expanduser(s))
        base = p.name if p.exists() else s
        names.append(_unique(base or s, names))
    return names


def _check_same_tokenizer(models: dict) -> None:
    from lnfree.report.pipeline import check_same_vocabulary

    try:
        check_same_vocabulary(models)
    except ValueError as e:
        raise CLIError(str(e)) from None


# ---- the commands --------------------------------------------------------------------------
def _setup(args) -> float:
    from lnfree.training.device import set_threads

    set_threads(args.threads)
    return time.perf_counter()


def _finish(rd, out: Path, stem: str, t0: float) -> int:
    from lnfree.report.pipeline import format_summary, write_report

    html_path, json_path = write_report(rd, out, stem=stem)
    print(format_summary(rd))
    for stage, note in rd.notes.items():
        print(f"note ({stage}): {note}")
    print(f"report: {html_path}\nnumbers: {json_path}\ntotal {time.perf_counter() - t0:.1f} s "
          f"(stages: {', '.join(f'{k} {v:.1f}s' for k, v in rd.timings.items())})")
    return 0


def run_demo(args) -> int:
    from lnfree import zoo
    from lnfree.report.pipeline import run_report

    t0 = _setup(args)
    order = ("tiny-ln", "tiny-lnfree", "tiny-vanilla")
    models = {name: load_any(name, device=args.device) for name in order}
    data = {name: zoo.heldout(name) for name in zoo.info()["heldout"]}
    rd = run_report(models, data, baseline="tiny-ln", quick=args.quick, progress=not args.no_progress,
                    title="lnfree demo: tiny-ln vs tiny-lnfree (tiny-vanilla: the fine-tuned LN control)")
    return _finish(rd, Path(args.out), "report", t0)


def run_compare(args) -> int:
    from lnfree.report.pipeline import run_report

    t0 = _setup(args)
    specs = [args.model_a, args.model_b]
    names = _names(specs)
    models = {}
    for name, spec in zip(names, specs):
        models[name] = load_any(spec, device=args.device)
    _check_same_tokenizer(models)
    data = _resolve_data(args.data, models[names[0]], args.seq_len, names)
    rd = run_report(models, data, baseline=names[0], quick=args.quick, progress=not args.no_progress,
                    title=f"lnfree compare: {names[0]} vs {names[1]}")
    return _finish(rd, Path(args.out), "report", t0)


def _resolve_data(specs, model, seq_len, names, default_specs=()) -> dict:
    if specs:
        return load_data(specs, model, seq_len)
    zoo_data = _zoo_data_for(model)
    if zoo_data is not None:
        return zoo_data
    if default_specs:
        return load_data(default_specs, model, seq_len)
    raise CLIError(f"--data is needed: {', '.join(names)} do not use the zoo's tokenizer, so its held-out sets "
                       "do not apply (pass .npy token arrays or text files)")


def run_reproduce(args) -> int:
    """The paper's numbers, computed as its code does: see `lnfree.paper.reproduce`."""
    from lnfree.paper.reproduce import run_reproduce as run

    return run(args, load=load_any, names=_names, load_data=load_data, zoo_data=_zoo_data_for)


def run_real(args) -> int:
    """``lnfree report smollm2-135m``: `lnfree.report.real_stages.run_real_report`, then the page."""
    import json

    from lnfree.report.real_page import render
    from lnfree.report.real_stages import (
        BOOKS, DEFAULT, FULL, QUICK, finish_numbers, run_real_report, saved_numbers,
    )

    if args.quick and args.full:
        raise CLIError("--quick and --full are exclusive")
    t0 = _setup(args)
    out = Path(args.out)
    numbers_path, saved = out.with_suffix(".json"), out.with_name(out.stem + "_results")
    sizes = QUICK if args.quick else FULL if args.full else DEFAULT
    if args.render or args.render_partial:
        if args.render_partial:
            try:
                numbers = finish_numbers(saved_numbers(saved, sizes))
            except FileNotFoundError as e:
                raise CLIError(f"{e}: nothing to render (run without --render-partial first)") from None
            numbers_path.write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
        elif not numbers_path.is_file():
            raise CLIError(f"{numbers_path} does not exist: nothing to render (run without --render first)")
        else:
            numbers = json.loads(numbers_path.read_text())
        out.write_text(render(numbers), encoding="utf-8")
        print(f"wrote {out} from {saved if args.render_partial else numbers_path}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_any(args.model, device=args.device)
    from lnfree import zoo

    books = {b: zoo.heldout(b, model=model, seq_len=sizes.seq_len) for b in BOOKS}
    numbers = run_real_report(model, books, sizes, name=args.model, progress=not args.no_progress, saved=saved,
                              resume=args.resume)
    numbers_path.write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    out.write_text(render(numbers), encoding="utf-8")
    print(f"wrote {out}, {numbers_path} and the stage results in {saved} ({numbers['total_s']:.0f} s; "
          f"{time.perf_counter() - t0:.0f} s in all)")
    return 0
