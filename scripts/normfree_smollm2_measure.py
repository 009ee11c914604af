"""Measure SmolLM2-135M beside its norm-free twin (issue 21.5): writes the JSON behind docs/normfree_smollm2.md.

    python scripts/normfree_smollm2_measure.py --twin smollm2-135m-normfree --run runs/smollm2-normfree/run \
        --out docs/normfree_smollm2.json [--rows 1024 --cfi-rows 512 --threads 2]

Every number is on text no run trained on (the package's held-out Persuasion and cfi, rows of
``[<|endoftext|>] + 63`` tokens), cut two ways: "clean" (position 1 is never one of the 17 tokens that make it a
second sink, as the training rows) and "any" (`zoo.heldout`'s cut, anywhere). CIs resample sequences (prompts for the entropy-neuron ablation): the unit that varies
independently. Sections: held-out CE (paired per-sequence difference twin - original), DLA vs the exact
direct effect (NMAE over every head), the entropy neuron L29N371 (total vs direct entropy change), the
first-token norm ratio and the attention-sink rate, and the run's loss curve (from its log.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _est(e) -> dict:
    return {"value": float(e.value), "low": float(e.low), "high": float(e.high), "n": int(e.n)}


BOOKS = {"persuasion": "austen_persuasion.txt", "cfi": "cfi_en.txt"}


def heldout_rows(model, name: str, cut: str, text_dir=None, skip=None):
    """A held-out book as ``[<|endoftext|>] + 63``-token rows. cut "clean": no row's first text token is one of
    `skip` (the tokens that make position 1 a second sink), as the twin's training rows
    (`normfree_smollm2_cpu.word_rows`); "any": consecutive chunks, as `zoo.heldout` cuts them. `text_dir`: the
    full book (``BOOKS``) there; default the package's shorter copy."""
    import sys

    import torch

    from lnfree import zoo
    from lnfree.removal.data import chunk_with_bos

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from normfree_smollm2_cpu import first_token, word_rows

    text = (Path(text_dir) / BOOKS[name]).read_text() if text_dir else zoo.heldout_text(name)
    stream = torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"]).numpy()
    start = first_token(model.tokenizer)
    rows = word_rows(stream, 64, start, ~skip) if cut == "clean" else \
        chunk_with_bos(stream, 64, start)
    return torch.as_tensor(rows).long()


def measure(models: dict, rows: int, cfi_rows: int, small: int, text_dir=None, any_rows: int = 256,
            skip=None) -> dict:
    import lnfree
    from lnfree.evaluation import CEComparison

    first = next(iter(models.values()))
    out: dict = {"settings": {"rows": rows, "cfi_rows": cfi_rows, "any_rows": any_rows, "seq_len": 64,
                              "small_rows": small, "text_dir": str(text_dir)}}
    for name, n in (("persuasion", rows), ("cfi", cfi_rows)):
        for cut in ("clean", "any"):
            tokens = heldout_rows(first, name, cut, text_dir, skip)[:n if cut == "clean" else any_rows]
            ce = {k: lnfree.cross_entropy(m, tokens, batch_size=16) for k, m in models.items()}
            pair = lambda a, b: CEComparison(names=(a, b), a=ce[a], b=ce[b]).difference()  # noqa: E731
            key = f"ce_{name}_{cut}"
            out[key] = {"tokens": int(tokens.numel()), **{k: _est(c.mean) for k, c in ce.items()},
                        **{f"{k}_minus_original": _est(pair(k, "original")) for k in ce if k != "original"}}
            if "vanilla" in ce:  # paired per sequence
                out[key]["twin_minus_vanilla"] = _est(pair("twin", "vanilla"))
            print(key, out[key], flush=True)
    tokens = heldout_rows(first, "persuasion", "clean", text_dir, skip)[:small]
    for key, model in models.items():
        if key == "vanilla":
            continue
        t0 = time.time()
        dla = lnfree.direct_logit_attribution(model, tokens, components="heads")
        abl = lnfree.ablate_neurons(model, tokens, ["L29N371"])
        norms = lnfree.first_token_norm(model, tokens)
        sinks = lnfree.attention_sink_rate(model, tokens)
        out[key] = {
            "dla_nmae_heads_%": _est(dla.nmae()),
            "L29N371_entropy_change_total_%": _est(abl.relative_change(0, "entropy", "total")),
            "L29N371_entropy_change_direct_%": _est(abl.relative_change(0, "entropy", "direct")),
            "first_token_norm_max_ratio": _est(norms.max_ratio()),
            "sink_rate": _est(sinks.rate),
            "ln_modes": sorted(set(model.ln_modes().values())), "norm_free": model.is_norm_free,
            "seconds": round(time.time() - t0, 1),
        }
        print(key, out[key], flush=True)
    return out


def loss_curve(run: Path) -> dict:
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    steps = [s for s in steps if s.get("event") == "step"]
    freezes = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"freeze"' in line]
    return {"step": [s["step"] for s in steps], "kl": [s.get("kl") for s in steps], "ce": [s["ce"] for s in steps],
            "freeze_steps": [f["step"] for f in freezes]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--twin", default="smollm2-135m-normfree", help="the norm-free model (zoo name or directory)")
    ap.add_argument("--vanilla", default=None, help="the vanilla control (a removal run dir of --vanilla)")
    ap.add_argument("--run", default=None, help="the removal run directory (its log.jsonl gives the loss curve)")
    ap.add_argument("--out", default="docs/normfree_smollm2.json")
    ap.add_argument("--rows", type=int, default=1024, help="held-out Persuasion rows of 64 tokens for CE")
    ap.add_argument("--cfi-rows", type=int, default=512, help="held-out cfi rows of 64 tokens for CE")
    ap.add_argument("--sinks", default="runs/smollm2-normfree/sink_tokens.json", help="the run's sink-token list")
    ap.add_argument("--any-rows", type=int, default=256, help="rows of each book cut anywhere (zoo.heldout's cut)")
    ap.add_argument("--small-rows", type=int, default=32, help="rows for DLA, ablation, norms and sinks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-dir", default=None, help="a folder with the full held-out books (BOOKS); default: the "
                    "package's shorter copies (Persuasion: 21k tokens)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import lnfree

    import numpy as np

    sinks = json.loads(Path(args.sinks).read_text())
    skip = np.zeros(49152, dtype=bool)
    skip[sinks["tokens"]] = True
    models = {"original": lnfree.load("smollm2-135m"), "twin": lnfree.load(args.twin)}
    if args.vanilla:
        models["vanilla"] = lnfree.load(args.vanilla)
    result = {"twin": args.twin, "date": time.strftime("%Y-%m-%d"), **measure(models, args.rows, args.cfi_rows,
                                                                             args.small_rows, args.text_dir, args.any_rows,
                                                                             skip)}
    if args.run:
        result["loss_curve"] = loss_curve(Path(args.run))
        summary = Path(args.run) / "summary.json"
        if summary.exists():
            result["run_summary"] = {k: v for k, v in json.loads(summary.read_text()).items()
                                     if k in ("steps", "tokens", "wall_time_s", "rollbacks", "variant", "norm_free")}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
