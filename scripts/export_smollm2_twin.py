"""Export the norm-free SmolLM2 twin from its removal run as the package's derived model (issue 21.4).

    python scripts/export_smollm2_twin.py --run runs/smollm2-normfree/run \
        --out src/lnfree/zoo/data/smollm2-135m-normfree

Reads the run's last checkpoint (its LoRA factors, unmerged, and every site's positional frozen scale), writes
a derived directory against the GGUF base (`lnfree.io.derived`: the LoRA pairs in float32 plus the LN state,
~40 MB), then checks that `lnfree.load` of that directory gives the logits of the checkpoint's merged model.
Refuses a run that has not finished (a checkpoint before the last step) or a model with a live site.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the removal run directory (holds checkpoints/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--allow-unfinished", action="store_true", help="export a checkpoint before the last step (live sites allowed: a test of the pipeline, not a twin)")
    args = ap.parse_args(argv)

    import torch

    import lnfree
    from lnfree.io.checkpoint import latest_checkpoint, read_checkpoint, read_checkpoint_parts
    from lnfree.io.derived import write_derived
    from lnfree.io.resolve import build, read_parts
    from lnfree.removal.checkpoint import restore_sites
    from lnfree.removal.lora import apply_lora

    path = latest_checkpoint(Path(args.run))
    ck = read_checkpoint(path)
    state, config = ck["state"], ck["state"]["config"]
    steps = config["optim"]["steps"]
    if state["step"] < steps and not args.allow_unfinished:
        raise SystemExit(f"{path} is at step {state['step']} of {steps}: the run has not finished "
                         "(resume it, or pass --allow-unfinished)")
    model = lnfree.load(args.base)
    apply_lora(model, config["lora_rank"], alpha=config.get("lora_alpha"), targets=config["lora_targets"],
               seed=config["seed"])
    model.load_state_dict(ck["weights"])
    restore_sites(model, state)
    first = {s: e.get("first_token") for s, e in (state.get("ln_state") or {}).items()}
    bos = model.tokenizer.bos_token_id
    for site in model.ln_sites:
        module, p = model._site(site)
        module.set_blend(p, 1.0)
        if model.is_positional(site):
            module.first_token[p] = first.get(site) if first.get(site) is not None else bos
    live = [s for s in model.ln_sites if model.ln_mode(s) == "live"]
    if live and not args.allow_unfinished:
        raise SystemExit(f"{len(live)} sites are still live ({live[:3]}...): not a norm-free model")
    info = write_derived(model, read_parts(args.base), Path(args.out), spec=args.base, lora=True)
    print(f"wrote {args.out}: {info['bytes'] / 2**20:.1f} MiB, {len(info['stored'])} tensors")

    # check: the shipped directory gives the checkpoint's own (merged) model
    reference = build(read_checkpoint_parts(path)[0])
    twin = lnfree.load(str(Path(args.out)))
    tokens = lnfree.zoo.heldout("persuasion", model=twin, seq_len=64)[:4]
    with torch.no_grad():
        diff = float((twin(tokens) - reference(tokens)).abs().max())
    print(json.dumps({"max_abs_logit_diff_vs_checkpoint": diff, "norm_free": twin.is_norm_free,
                      "modes": sorted(set(twin.ln_modes().values())), "step": state["step"]}))


if __name__ == "__main__":
    main()
