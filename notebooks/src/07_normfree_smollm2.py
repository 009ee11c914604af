# %% [markdown]
# # 7. SmolLM2-135M beside its norm-free twin
#
# `smollm2-135m-normfree` is SmolLM2-135M with **every one of its 91 RMSNorm sites fixed**: each site's
# per-token scale is replaced by a constant, with its own value at position 0 (the attention sink, always the
# `<|endoftext|>` token here) and one value for every later position. That is a fixed linear map at each
# position, so nothing in the model normalises by its activations any more; fine-tuning (LoRA adapters,
# distilled from the original, on a 2-core CPU) absorbed the change. It ships in the package as a ~40 MB
# delta applied to the GGUF base at load (`docs/normfree_smollm2.md` has the recipe and the measurements on
# 64k held-out tokens). The sizes here are small so the notebook runs in about two minutes on one thread.

# %%
import torch

import lnfree
from lnfree import zoo

torch.set_num_threads(1)
original = lnfree.load("smollm2-135m", device="cpu")
twin = lnfree.load("smollm2-135m-normfree", device="cpu")
print(sorted(set(twin.ln_modes().values())), "norm-free:", twin.is_norm_free)
print("ln_final scale (position 0, later positions):", twin.ln_scale("ln_final"))

# %% [markdown]
# Rows start with `<|endoftext|>`, the first token the twin's position-0 scales were calibrated with
# (`zoo.heldout` cuts rows that way; a row starting with another token gets a warning).

# %%
tokens = zoo.heldout("persuasion", model=twin, seq_len=32)[:4]
ce = lnfree.compare_cross_entropy(twin, original, tokens, names=("norm-free", "original"), n_boot=200)
ce

# %% [markdown]
# ## DLA is exact without norms
#
# With the final norm live, DLA linearises it; in the twin the final scale is a constant per position, so
# DLA equals the direct effect (NMAE ~0).

# %%
small = tokens[:2, :24]
for name, model in (("original", original), ("norm-free", twin)):
    dla = lnfree.direct_logit_attribution(model, small, n_boot=100)
    print(f"{name}: DLA vs exact direct effect, NMAE over {len(dla.labels)} heads = {dla.nmae():.3g} %")

# %% [markdown]
# ## The entropy neuron L29N371
#
# In the original, most of L29N371's effect on the output entropy goes through the final norm's scale
# (total vs direct). In the twin the final scale is fixed: whatever the neuron does, it does directly.

# %%
for name, model in (("original", original), ("norm-free", twin)):
    abl = lnfree.ablate_neurons(model, tokens, ["L29N371"], n_boot=200)
    print(f"{name}: entropy change total {abl.relative_change(0, 'entropy', 'total'):.3g} %, "
          f"direct {abl.relative_change(0, 'entropy', 'direct'):.3g} %")

# %% [markdown]
# ## First-token norm and attention sinks
#
# The sink does not go away: the twin keeps position 0's large residual (its own scale handles it).

# %%
for name, model in (("original", original), ("norm-free", twin)):
    norms = lnfree.first_token_norm(model, tokens, n_boot=200)
    sinks = lnfree.attention_sink_rate(model, tokens, n_boot=200)
    print(f"{name}: first-token norm ratio (max over layers) {norms.max_ratio():.3g}, sink rate {sinks.rate:.3g}")
