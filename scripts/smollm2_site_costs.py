"""What freezing each SmolLM2-135M norm site costs, alone and cumulatively, without fine-tuning.

For every one of the 91 sites: freeze only that site at its average scale sigma (the mean per-token RMS of
its input on calibration rows of the same kind of data, as the removal trainer's EMA measures it: every
token counted) and measure, on held-out rows, the cross-entropy change, whether the logits stay finite, and
which tokens carry the cost. The per-token ratio ``rms / sigma`` of the site's input (read from the live
forward: with one site frozen, its input is the live model's) says which tokens a frozen site scales wrongly.
For the costly sites a counterfactual pins the mechanism: the same frozen site, but the tokens whose RMS
exceeds ``--massive`` x sigma keep their own RMS (a hook on ``hook_scale``); if the cost disappears, those
tokens are the cause. Finally the sites are frozen cumulatively, cheapest first (each sigma measured in the
current partly-frozen state), to see how far one can go without training.

Two kinds of rows: ``heldout`` (the shipped Persuasion text, ``[<|endoftext|>] + 63`` tokens per row, as
`lnfree.zoo.heldout` cuts it) and ``train`` (plain 64-token chunks of the shared corpus's training texts, no
BOS: what `remove_layernorm` feeds SmolLM2).

    PYTHONPATH=src python scripts/smollm2_site_costs.py --out docs/smollm2_site_costs.json
    # writes docs/smollm2_site_order.json too: site -> cost, for `lnfree remove-ln --site-order`

The single-site cost alone, for any model, is the library's: `lnfree.removal.site_costs(model, tokens,
calib=...)` and ``lnfree site-costs MODEL --out costs.json`` (the file `--site-order` reads). This script
is the record of the SmolLM2 diagnosis built around it (per-token ratios, counterfactuals, the cumulative
freeze, the blend ramp, the maximum over two kinds of rows), which produced the committed JSON files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CORPUS = Path(os.environ.get("LNFREE_CORPUS", "corpus"))
TRAIN_FILES = ("austen_emma.txt", "mhcc.txt", "tdavid.txt", "web_bible.txt")


def train_rows(model, n_per_file: int, seq_len: int, skip: int) -> torch.Tensor:
    """Plain chunks (no BOS) from the middle of four training texts; `skip` rows in, per file."""
    rows = []
    for name in TRAIN_FILES:
        text = (CORPUS / "train" / name).read_text(encoding="utf-8", errors="replace")
        mid = len(text) // 2
        ids = model.tokenizer(text[mid: mid + 40 * seq_len * (n_per_file + skip)])["input_ids"]
        ids = ids[8:]  # start mid-word-free, away from the cut
        rows += [ids[(skip + i) * seq_len: (skip + i + 1) * seq_len] for i in range(n_per_file)]
    return torch.tensor(rows, dtype=torch.long)


def token_ce(logits, tokens) -> torch.Tensor:
    """[batch, pos-1] next-token CE in float64 (inf/nan where the logits are not finite)."""
    lp = F.log_softmax(logits[:, :-1].double(), -1)
    return -lp.gather(-1, tokens[:, 1:, None])[..., 0]


@torch.no_grad()
def live_pass(model, tokens):
    names = [model.site_hook(s, "scale") for s in model.ln_sites]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names or n.endswith("hook_resid_pre"))
    scales = {s: cache[model.site_hook(s, "scale")][..., 0].double() for s in model.ln_sites}
    resid = torch.stack([cache[f"blocks.{i}.hook_resid_pre"] for i in range(model.cfg.n_layers)])
    return token_ce(logits, tokens), scales, resid


def per_token_summary(model, tokens, ce_live, ce, ratio, k: int = 5) -> dict:
    delta = ce - ce_live
    finite = torch.isfinite(delta)
    d = torch.where(finite, delta, torch.full_like(delta, float("inf")))
    top = torch.topk(d.flatten(), k).indices
    out = []
    for i in top.tolist():
        r, p = divmod(i, d.shape[1])
        out.append({"row": r, "pos": p, "token": model.tokenizer.decode([int(tokens[r, p])]),
                    "delta": float(delta[r, p]), "ratio_here": float(ratio[r, p])})
    return out


def site_costs(model, tokens, calib, massive: float, costly: float, log, only=None) -> dict:
    ce_live, scales, resid = live_pass(model, tokens)
    sigma = model.estimate_ln_scales(calib, store=False)
    sigma_x0 = model.estimate_ln_scales(calib, store=False, exclude_position_0=True)
    rms = resid.double().pow(2).mean(-1).sqrt()  # [layer, batch, pos]
    res = {"ce_live": float(ce_live.mean()), "rows": list(tokens.shape), "calib_rows": list(calib.shape),
           "resid_rms_pos0_over_rest": [float(rms[i, :, 0].mean() / rms[i, :, 1:].mean()) for i in range(len(rms))],
           "resid_rms_max_over_median": [float(rms[i].max() / rms[i].median()) for i in range(len(rms))],
           "sites": {}}
    for n, site in enumerate(model.ln_sites):
        if only and site not in only:
            continue
        ratio = scales[site] / sigma[site]  # [batch, pos]: how far each token's own RMS is from sigma
        with model.ln_frozen(site, scales=sigma[site]):
            logits = model(tokens)
        ce = token_ce(logits, tokens)
        finite = bool(torch.isfinite(ce).all())
        delta = (ce - ce_live)
        e = {"sigma": sigma[site], "sigma_excl_pos0": sigma_x0[site], "finite": finite,
             "finite_share": float(torch.isfinite(logits).all(-1).double().mean()),
             "max_abs_logit": float(logits.abs().nan_to_num(float("inf")).max()),
             "cost": float(delta.mean()) if finite else None,
             "cost_pos0": float(delta[:, 0].mean()) if finite else None,
             "cost_rest": float(delta[:, 1:].mean()) if finite else None,
             "ratio_max": float(ratio.max()), "ratio_pos0": float(ratio[:, 0].mean()),
             "ratio_rest_median": float(ratio[:, 1:].median()), "ratio_min": float(ratio.min()),
             "n_massive": int((ratio > massive).sum()),
             "top_tokens": per_token_summary(model, tokens, ce_live, ce, ratio[:, :-1])}
        if not finite or e["cost"] > costly:
            e["counterfactual"] = counterfactual(model, tokens, site, sigma[site], scales[site], ce_live, massive)
        res["sites"][site] = e
        log(f"{n + 1}/{len(model.ln_sites)} {site}: cost {e['cost']}, finite {finite}, ratio max {e['ratio_max']:.1f} "
            f"pos0 {e['ratio_pos0']:.1f}")
    return res


@torch.no_grad()
def counterfactual(model, tokens, site, sigma, live_scale, ce_live, massive) -> dict:
    """The frozen site's cost when some tokens keep their own (live) RMS: those above `massive` x sigma,
    or position 0 only."""
    out = {}
    hook = model.site_hook(site, "scale")
    for name, keep in (("massive_tokens_live", live_scale > massive * sigma),
                       ("pos0_live", torch.zeros_like(live_scale, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True))):
        def fix(scale, hook=None, keep=keep):
            s = scale.clone()
            s[keep] = live_scale[keep].to(s.dtype)[..., None] if s.ndim == 3 else live_scale[keep].to(s.dtype)
            return s

        with model.ln_frozen(site, scales=sigma):
            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, fix)])
        ce = token_ce(logits, tokens)
        fin = bool(torch.isfinite(ce).all())
        out[name] = {"tokens_kept": int(keep.sum()), "finite": fin, "cost": float((ce - ce_live).mean()) if fin else None}
    return out


@torch.no_grad()
def cumulative(model, tokens, calib, order, log) -> list:
    """Freeze `order` one site at a time (never unfrozen), each at its sigma measured in the current state."""
    ce_live = token_ce(model(tokens), tokens)
    out = []
    for n, site in enumerate(order):
        sigma = model.estimate_ln_scales(calib, store=False)[site]
        if not math.isfinite(sigma):  # the partly frozen model already overflows on the calibration rows
            out.append({"k": n + 1, "site": site, "sigma": None, "finite": False, "cost": None,
                        "note": "its input RMS overflowed on the calibration rows: stopped"})
            break
        model.freeze_ln(site, scales=sigma)
        logits = model(tokens)
        ce = token_ce(logits, tokens)
        fin = bool(torch.isfinite(ce).all())
        out.append({"k": n + 1, "site": site, "sigma": sigma, "finite": fin,
                    "cost": float((ce - ce_live).mean()) if fin else None,
                    "max_abs_logit": float(logits.abs().nan_to_num(float("inf")).max())})
        log(f"cumulative {n + 1}: +{site}: cost {out[-1]['cost']}")
        if not fin and sum(not r["finite"] for r in out[-3:]) == 3:
            break  # three non-finite in a row: the rest stays non-finite (sites are never unfrozen)
    model.unfreeze_ln()
    return out


@torch.no_grad()
def ramp_costs(model, tokens, calib, sites, alphas) -> dict:
    """The cost of one frozen site phased in to blend a (scale live^(1-a) sigma^a; freeze_ramp), no training."""
    ce_live = token_ce(model(tokens), tokens)
    sigma = model.estimate_ln_scales(calib, store=False)
    out = {}
    for site in sites:
        module, path = model._site(site)
        row = []
        for a in alphas:
            with model.ln_frozen(site, scales=sigma[site]):
                module.set_blend(path, a)
                ce = token_ce(model(tokens), tokens)
                module.set_blend(path, 1.0)
            fin = bool(torch.isfinite(ce).all())
            row.append({"a": a, "finite": fin, "cost": float((ce - ce_live).mean()) if fin else None})
        out[site] = row
    return out


def site_order(result: dict) -> dict:
    """Site -> cost for `--site-order` (lnfree remove-ln, Schedule.from_order via order_by_cost): the largest
    single-site cost over the kinds of rows measured (None where any kind went non-finite)."""
    kinds = list(result["kinds"].values())
    out = {}
    for site in kinds[0]["sites"]:
        costs = [k["sites"][site]["cost"] for k in kinds]
        out[site] = None if any(c is None for c in costs) else round(max(costs), 4)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--calib-rows", type=int, default=16)
    p.add_argument("--massive", type=float, default=4.0, help="a token is 'massive' at a site when its RMS > this x sigma")
    p.add_argument("--costly", type=float, default=0.05, help="run the counterfactual when the cost exceeds this (nats)")
    p.add_argument("--kinds", nargs="+", default=["heldout", "train"])
    p.add_argument("--cumulative-kind", default="heldout", help="'' for none")
    p.add_argument("--sites", nargs="*", default=None, help="only these sites (default: all 91)")
    p.add_argument("--order-out", default="docs/smollm2_site_order.json",
                   help="where to write site -> cost (the --site-order file of lnfree remove-ln)")
    p.add_argument("--order-only", action="store_true", help="only rewrite --order-out from an existing --out")
    p.add_argument("--ramp-only", nargs="*", default=None, metavar="SITE",
                   help="only add the blend (freeze_ramp) costs of these sites to an existing --out")
    a = p.parse_args(argv)
    if a.order_only:
        Path(a.order_out).write_text(json.dumps(site_order(json.loads(Path(a.out).read_text())), indent=1) + "\n")
        return
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    import lnfree
    from lnfree import zoo

    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    model = lnfree.load("smollm2-135m", device="cpu")
    model.eval()
    if a.ramp_only is not None:
        done = json.loads(Path(a.out).read_text())
        h = zoo.heldout("persuasion", model=model, seq_len=a.seq_len)
        alphas = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        done["ramp"] = {"kind": "heldout", "alphas": alphas,
                        "sites": ramp_costs(model, h[: a.rows], h[a.rows: a.rows + a.calib_rows], a.ramp_only, alphas)}
        Path(a.out).write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")
        log("ramp done")
        return
    out = {"model": "smollm2-135m (GGUF Q4_1, fp32)", "settings": vars(a), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{os.cpu_count()} shared CPU cores, {torch.get_num_threads()} torch thread(s)", "kinds": {}}
    data = {}
    if "heldout" in a.kinds or a.cumulative_kind == "heldout":
        h = zoo.heldout("persuasion", model=model, seq_len=a.seq_len)
        data["heldout"] = (h[: a.rows], h[a.rows: a.rows + a.calib_rows])
    if "train" in a.kinds or a.cumulative_kind == "train":
        per = max(1, a.rows // len(TRAIN_FILES))
        data["train"] = (train_rows(model, per, a.seq_len, 0),
                         train_rows(model, max(1, a.calib_rows // len(TRAIN_FILES)), a.seq_len, per))
    path = Path(a.out)

    def save():
        path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")

    for kind in a.kinds:
        tokens, calib = data[kind]
        log(f"{kind}: eval {tuple(tokens.shape)}, calib {tuple(calib.shape)}")
        out["kinds"][kind] = site_costs(model, tokens, calib, a.massive, a.costly, log, a.sites)
        out["kinds"][kind]["first_tokens"] = [model.tokenizer.decode([int(t)]) for t in tokens[:, 0]]
        save()
    if not a.sites:
        Path(a.order_out).write_text(json.dumps(site_order(out), indent=1) + "\n", encoding="utf-8")
    if a.cumulative_kind:
        sites = out["kinds"][a.cumulative_kind]["sites"]
        order = sorted(sites, key=lambda s: (not sites[s]["finite"], sites[s]["cost"] or 0.0))
        tokens, calib = data[a.cumulative_kind]
        out["cumulative"] = {"kind": a.cumulative_kind, "order": "cheapest first (single-site cost)",
                             "calib_rows": a.calib_rows // 2,
                             "steps": cumulative(model, tokens, calib[: a.calib_rows // 2], order, log)}
        save()
    out["total_s"] = round(time.time() - t0, 1)
    save()
    log("done")


if __name__ == "__main__":
    main()
