"""Make the norm-free SmolLM2-135M on a CPU: a long, resumable background run (issue 21).

The recipe (docs/normfree_smollm2.md): every one of the 91 norm sites is frozen at a *positional* scale
(position 0, the BOS attention sink, keeps its own sigma; every later position shares one), one site at a
time, cheapest first by its measured single-site cost, each freeze phased in over a few steps, while LoRA
adapters (rank 32 on every attention and MLP matrix; embeddings untouched, so they stay tied) are trained
to match the original model's next-token distribution (distillation, KL only). Rows are
``[<|endoftext|>] + 63`` tokens of the training text (as `lnfree.zoo.heldout` cuts them).

    nohup python scripts/normfree_smollm2_cpu.py --corpus PATH/TO/corpus/train --out runs/smollm2-normfree \
        > runs/smollm2-normfree.log 2>&1 &
    # the same command again resumes from the last good checkpoint (runs/smollm2-normfree/run/checkpoints)

Stage 1 writes ``site_costs.json`` (each site frozen alone with its positional scale, no training: CE
increase on calibration rows) once; stage 2 is `lnfree.removal.remove_layernorm` with ``resume="auto"``,
checkpointing every ``--checkpoint-every`` steps (a few minutes), with a progress bar and ``run/log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def first_token(tokenizer) -> int:
    """The token every row starts with: ``<|endoftext|>`` (SmolLM2's document separator, id 0) when the vocabulary
    has it, as `lnfree.zoo.heldout` cuts rows, else the tokenizer's BOS. SmolLM2's ``<|im_start|>`` (its BOS
    id 1) at position 0 leaves position 1 a second, token-dependent sink (86x the median RMS at layer 20)."""
    eot = tokenizer.get_vocab().get("<|endoftext|>")
    return eot if eot is not None else tokenizer.bos_token_id


def word_rows(stream, seq_len: int, start: int, is_word) -> "np.ndarray":
    """Rows ``[start] + (seq_len - 1)`` stream tokens, each cut so that its first text token begins a word.

    After ``<|endoftext|>``, SmolLM2 turns a newline or punctuation mark at position 1 into a second attention
    sink (its residual RMS 160x the median from layer 15 on), a token-dependent one that no fixed scale can
    hold; a word there leaves position 0 the only sink. Rows never overlap; the stream is read in order.
    """
    import numpy as np

    rows, i, n = [], 0, len(stream)
    while i + seq_len - 1 <= n:
        if not is_word[int(stream[i])]:
            i += 1
            continue
        rows.append(stream[i:i + seq_len - 1])
        i += seq_len - 1
    body = np.asarray(rows, dtype=np.int64).reshape(-1, seq_len - 1)
    return np.concatenate([np.full((body.shape[0], 1), start, dtype=np.int64), body], axis=1)


def word_starts(tokenizer) -> "np.ndarray":
    """[vocab] bool: the token's text begins with a letter, optionally after one space."""
    import re

    import numpy as np

    word = re.compile(r"^ ?[A-Za-z]")
    out = np.zeros(len(tokenizer.get_vocab()), dtype=bool)
    for tok, i in tokenizer.get_vocab().items():
        out[i] = bool(word.match(tokenizer.convert_tokens_to_string([tok])))
    return out


def sink_tokens(model, start: int, layers=(8, 16, 24), factor: float = 8.0, batch: int = 2048) -> "np.ndarray":
    """[vocab] bool: the tokens t for which position 1 of ``[start, t]`` is a second attention sink (its residual
    RMS at one of `layers` above `factor` x the median over t). Position 1's residual depends on tokens 0 and 1
    only (causal attention), so this is exact for every row that starts ``[start, t, ...]``."""
    import numpy as np
    import torch

    names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    rms = []
    with torch.no_grad():
        for lo in range(0, model.cfg.d_vocab, batch):
            t = torch.arange(lo, min(lo + batch, model.cfg.d_vocab))
            toks = torch.stack([torch.full_like(t, start), t], 1)
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1)
            rms.append(torch.stack([cache[n][:, 1].pow(2).mean(-1).sqrt() for n in names], 1))
    rms = torch.cat(rms)  # [vocab, layer]
    return (rms > factor * rms.median(0).values).any(1).numpy()


def _rows(model, files, seq_len: int, n_tokens: int, skip=None):
    """About `n_tokens` of training rows, an equal share from each file (one book alone is too narrow a sample
    of text: a twin trained on Emma's first 90k tokens blew up on a third of Persuasion's rows)."""
    import numpy as np

    from lnfree.removal import load_tokens

    ok = word_starts(model.tokenizer) if skip is None else ~skip
    share = n_tokens // len(files) + seq_len
    parts = []
    for f in files:
        stream = load_tokens([f], seq_len=1024, tokenizer=model.tokenizer, max_tokens=int(share * 1.1) + 1024)
        parts.append(word_rows(stream.reshape(-1), seq_len, first_token(model.tokenizer), ok)[: share // seq_len + 1])
    return np.concatenate(parts)


def site_costs(model, calib, measure) -> dict:
    """Each site frozen alone at its positional scale (estimated on `calib`): CE increase on `measure`
    (`lnfree.removal.site_costs` with ``positional=1``), as the JSON the run reads."""
    import torch

    from lnfree.removal import site_costs as measure_costs

    res = measure_costs(model, torch.as_tensor(measure.astype("int64")), calib=torch.as_tensor(calib.astype("int64")),
                        positional=1, n_boot=1, progress=True)
    return {"base_ce": float(res.live.mean), "costs": res.costs()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="directory of training .txt files")
    ap.add_argument("--heldout", default=None, help="a held-out .txt file for the run's before/after CE")
    ap.add_argument("--out", default="runs/smollm2-normfree")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=360)
    ap.add_argument("--site-start", type=int, default=5)
    ap.add_argument("--site-gap", type=int, default=3)
    ap.add_argument("--freeze-ramp", type=int, default=3)
    ap.add_argument("--skip-nonfinite", type=int, default=0,
                    help="non-finite steps skipped (no update) before rolling back (resume-free)")
    ap.add_argument("--order", choices=("cheapest", "costliest"), default="cheapest",
                    help="site order by the measured single-site cost (site_costs.json)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--distill", type=float, default=1.0)
    ap.add_argument("--aux-lambda", type=float, default=0.0)
    ap.add_argument("--site-aux", type=float, default=0.0, help="weight of the per-site scale loss on live sites")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--max-rollbacks", type=int, default=3,
                    help="rollbacks before the run gives up (resume-free: raise it to resume a stopped run)")
    ap.add_argument("--vanilla", action="store_true", help="the control: identical, but no site frozen")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import lnfree
    from lnfree.removal import RemovalSettings, Schedule, order_by_cost, remove_layernorm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in Path(args.corpus).glob("*.txt"))
    if not files:
        raise SystemExit(f"--corpus {args.corpus}: no .txt files there")
    t0 = time.time()
    model = lnfree.load("smollm2-135m", device="cpu")
    print(f"loaded in {time.time() - t0:.0f} s", flush=True)
    need = args.steps * args.batch_size * args.seq_len
    sinks_file = out / "sink_tokens.json"
    if not sinks_file.exists():
        sinks = sink_tokens(model, first_token(model.tokenizer))
        sinks_file.write_text(json.dumps({"start": first_token(model.tokenizer), "layers": [8, 16, 24], "factor": 8.0,
                                          "tokens": [int(i) for i in sinks.nonzero()[0]]}))
    import numpy as np

    skip = np.zeros(model.cfg.d_vocab, dtype=bool)
    skip[json.loads(sinks_file.read_text())["tokens"]] = True
    print(f"{int(skip.sum())} tokens make position 1 a second sink: rows never start with them", flush=True)
    rows = _rows(model, files, args.seq_len, int(need * 1.05) + args.seq_len, skip)
    costs_file = out / "site_costs.json"
    if not costs_file.exists():
        # calibration rows from the far end of the stream: the run's first batches are not reused here
        calib = _rows(model, files, args.seq_len, 10**7, skip)[-16:]
        result = site_costs(model, calib[:8], calib[8:])
        costs_file.write_text(json.dumps(result, indent=1))
        model.unfreeze_ln()
    costs = json.loads(costs_file.read_text())["costs"]
    order = order_by_cost(costs)
    if args.order == "costliest":  # the hardest sites while most norms are live and the LR is high
        order = order[::-1]
    schedule = Schedule.from_order(model.cfg.n_layers, args.steps, order, start=args.site_start, gap=args.site_gap)
    held = None
    if args.heldout:
        held = _rows(model, [args.heldout], args.seq_len, 8 * args.seq_len + args.seq_len)[:8]
    settings = RemovalSettings(
        schedule=schedule, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        min_lr=args.min_lr, warmup=args.warmup, aux_lambda=args.aux_lambda, lora_rank=args.lora_rank,
        distill=args.distill, freeze_ramp=args.freeze_ramp, positional_sigma=0 if args.vanilla else 1,
        vanilla=args.vanilla, bos_token_id=first_token(model.tokenizer), site_aux=args.site_aux,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=2, max_rollbacks=args.max_rollbacks,
        skip_nonfinite=args.skip_nonfinite)
    remove_layernorm(model, rows, settings=settings, out_dir=out / "run", resume="auto", eval_data=held)
    print("done", json.dumps({k: v for k, v in model.removal_summary.items() if k in
                              ("steps", "wall_time_s", "ce_before", "ce_after", "rollbacks", "norm_free")}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
