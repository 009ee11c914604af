# %% [markdown]
# # 2. Direct logit attribution is exact without LayerNorm
#
# Direct logit attribution (DLA) asks how much each component (here: each attention head) writes
# directly into a logit: its output vector dotted with the unembedding direction of the target token.
# With a final LayerNorm in between that is only a linearisation: the LN divides the *whole* residual
# stream by its norm, so the head's true **direct effect** (DE: the logit change when its output is
# removed and `ln_final` recomputed) differs from its DLA. The error is summarised as
# NMAE = mean|DLA - DE| / mean|DE| (in %). Without LayerNorm, DLA *is* the direct effect.

# %%
import torch

import lnfree
from lnfree import zoo

ln_model, ln_free = zoo.load("tiny-ln", device="cpu"), zoo.load("tiny-lnfree", device="cpu")
tokens = zoo.heldout("persuasion")[:16, :64]

res_ln = lnfree.direct_logit_attribution(ln_model, tokens, components="heads")  # next-token targets
res_free = lnfree.direct_logit_attribution(ln_free, tokens, components="heads")
print("DLA shape [head, prompt, position]:", tuple(res_ln.dla.shape))
print("NMAE with LN:    ", res_ln.nmae(n_boot=200), "%")
print("NMAE without LN: ", res_free.nmae(n_boot=200), "%")

# %% [markdown]
# The per-layer breakdown, with bootstrap confidence intervals over sequences:

# %%
res_ln.nmae_frame("layer", n_boot=200)

# %% [markdown]
# ## Why: the final LN's scale
#
# DLA of an LN model uses each token's own `ln_final` scale. Freezing `ln_final` (a fixed scale for every
# token) makes it linear, so DLA becomes exact for the LN model too, at the price of changing the model.

# %%
ln_model.estimate_ln_scales(tokens)  # each site's mean scale on these tokens (stored on the model)
with ln_model.ln_frozen("ln_final"):
    res_frozen = lnfree.direct_logit_attribution(ln_model, tokens, components="heads")
print("NMAE with ln_final frozen:", res_frozen.nmae(n_boot=200), "%")

# %% [markdown]
# ## Components sum to the logit
#
# In an LN-free model the final residual stream is a sum of component outputs, so with `components="layers"`
# (embeddings, each attention and MLP output, and the biases) the DLAs add up to the logit exactly.

# %%
layers = lnfree.direct_logit_attribution(ln_free, tokens, components="layers")
print(layers.labels)
print("max |sum of DLAs - logit|:", float((layers.dla.sum(0) - layers.logit).abs().max()))

# %% [markdown]
# `compare_dla` runs both models on the same tokens; its `plot()` is a plotly figure (NMAE per layer and
# DLA-vs-DE scatter plots), and `to_frame()` a pandas table.

# %%
cmp = lnfree.compare_dla(ln_model, ln_free, tokens, names=("tiny-ln", "tiny-lnfree"), n_boot=200)
print(cmp.to_frame().query("group == 'overall'"))
cmp.plot(max_points=2000)
