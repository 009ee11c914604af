# %% [markdown]
# # 4. Confidence (entropy) neurons
#
# Entropy neurons (Gurnee et al. 2024; Stolfo et al. 2024) sit in the last MLP layer. Their output
# weight is large but points into the (near) null space of the unembedding, so they move almost no
# logit directly. What they do change is the norm of the residual stream, hence the final LayerNorm's
# scale, hence the temperature of *every* logit: they regulate confidence through LayerNorm.
# Remove LayerNorm and that pathway is gone.

# %%
import lnfree
from lnfree import zoo

ln_model, ln_free = zoo.load("tiny-ln", device="cpu"), zoo.load("tiny-lnfree", device="cpu")
tokens = zoo.heldout("persuasion")[:16, :64]

neurons = lnfree.find_entropy_neurons(ln_model, n_top=3)  # last layer by default
neurons.top(5)

# %% [markdown]
# `score` = ||w_out|| / LogitVar (LogitVar: the variance over the vocabulary of the cosine between w_out
# and each unembedding column); `rho` = the share of w_out in the unembedding's bottom singular directions.
# Neurons are named with their layer (`L3N17`): `neurons.neurons(3)` gives the labels of the best three,
# `neurons.pairs(3)` the (layer, neuron) pairs; `ablate_neurons` accepts either, so nothing lands in the
# wrong layer.
#
# Mean-ablate the top three together. The **total** effect is the ordinary forward pass; the **direct**
# effect holds the final LN scale at its clean value. Their gap is what flows through LayerNorm.

# %%
abl = lnfree.ablate_neurons(ln_model, tokens, neurons.neurons(), cumulative=True)
last = len(abl.sets) - 1
print(abl.labels[last])
print("entropy change, total  (%):", abl.relative_change(last, "entropy", "total"))
print("entropy change, direct (%):", abl.relative_change(last, "entropy", "direct"))
print("fraction through the final LN:", abl.ln_mediated_fraction(last, "entropy"))

# %% [markdown]
# How large these effects are depends on the model. The paper's GPT-2 has strong entropy neurons whose
# effect goes mostly through the final LN. This 4-layer model's candidates are weak: ablating them moves
# the entropy by a fraction of a percent, and the "fraction through the final LN" can even be negative
# (the LN scale then counteracts the direct effect). Read the confidence intervals, not the point values.
#
# The same neurons in the LN-free model (fine-tuned from `tiny-ln`, so neuron indices correspond):
# without a final LN, total and direct effects are identical.

# %%
abl_free = lnfree.ablate_neurons(ln_free, tokens, neurons.neurons(), cumulative=True)
print("LN-free entropy change, total (%):", abl_free.relative_change(last, "entropy", "total"))
print("LN-free total == direct:", bool((abl_free.entropy_total == abl_free.entropy_direct).all()))

# %% [markdown]
# ## Calibration
#
# Mean next-token entropy and expected calibration error (ECE) of both models:

# %%
for name, m in (("tiny-ln", ln_model), ("tiny-lnfree", ln_free)):
    cal = lnfree.calibration(m, tokens)
    print(f"{name:12s} mean entropy {cal.mean_entropy} nats, ECE {cal.ece}")

# %% [markdown]
# `compare_confidence` bundles all of it for two models (`.a`, `.b`, `.to_frame()`, `.difference()` with
# paired CIs, `.plot()`):

# %%
cmp = lnfree.compare_confidence(ln_model, ln_free, tokens, neurons=neurons)  # names from the models
print(cmp.difference())
cmp.plot()
