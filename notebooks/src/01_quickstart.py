# %% [markdown]
# # 1. Quickstart: load, freeze, remove LayerNorm, compare
#
# lnfree's model class, `LNFreeTransformer`, is a TransformerLens `HookedTransformer` in which every
# LayerNorm (LN) is a *site* that can be **live** (ordinary LN), **frozen** (its per-token scale replaced
# by a fixed number: the paper's "fake LN") or **removed** (that fixed scale folded into the weights, the
# LN module gone). This tutorial uses the small models shipped with the package, so it runs offline:
#
# - `tiny-ln`: a 4-layer GPT-2-style model pretrained with LayerNorm;
# - `tiny-lnfree`: `tiny-ln` fine-tuned with the paper's LN-removal procedure (every LN removed);
# - `tiny-vanilla`: the control, `tiny-ln` fine-tuned the same way with LN kept.

# %%
import torch

import lnfree
from lnfree import zoo

torch.manual_seed(0)
model = zoo.load("tiny-ln", device="cpu")
tokens = zoo.heldout("persuasion")[:8, :64]  # [batch, pos] token ids of held-out text
print(model.cfg.n_layers, "layers,", model.cfg.d_model, "d_model,", model.cfg.d_vocab, "tokens in the vocabulary")
print(model.ln_sites[:4], "...", model.ln_sites[-1])
print(repr(model.tokenizer.decode(zoo.heldout("persuasion")[10, 1:40])))

# %% [markdown]
# ## Freeze: a fixed scale per site
#
# `estimate_ln_scales` measures, for every site, the mean over tokens of the per-token standard
# deviation that LN divides by. `ln_frozen()` replaces each per-token scale by that average, and puts
# everything back when the block ends. Tokens whose scale is far from the average change most: above
# all position 0, whose residual stream looks nothing like the others'.

# %%
scales = model.estimate_ln_scales(tokens)
print({site: round(s, 3) for site, s in list(scales.items())[:4]})

with torch.no_grad():
    live = model(tokens)
    with model.ln_frozen():
        print("modes inside the block:", set(model.ln_modes().values()))
        frozen = model(tokens)
print("modes after it:", set(model.ln_modes().values()))
change = (live - frozen).abs()
print(f"logit change from freezing every LN: mean {change.mean():.3f}, at position 0 {change[:, 0].mean():.3f}")

# %% [markdown]
# ## Remove: fold the fixed scales into the weights
#
# Removing a frozen site is exact: centering, the LN weight and bias, and 1/scale are folded into the
# weights that read the site (W_Q, W_K, W_V, W_in, W_U). The logits equal the frozen model's. Removal is
# permanent, so we do it on a fresh copy.

# %%
folded = zoo.load("tiny-ln", device="cpu")
folded.estimate_ln_scales(tokens)
folded.remove_ln()
with torch.no_grad():
    removed = folded(tokens)
print("LN-free:", folded.is_ln_free, "| max |removed - frozen|:", float((removed - frozen).abs().max()))

# %% [markdown]
# Freezing without fine-tuning costs loss. The paper fine-tunes while freezing sites one by one, so the
# model learns to do without LN; `tiny-lnfree` is the result. Compare the held-out cross-entropy (with a
# bootstrap confidence interval over sequences) of all four models:

# %%
from lnfree.evaluation import cross_entropy

heldout = zoo.heldout("persuasion")[:16, :128]
for name, m in [("tiny-ln", model), ("tiny-ln, LN removed without fine-tuning", folded),
                ("tiny-lnfree (fine-tuned)", zoo.load("tiny-lnfree", device="cpu")),
                ("tiny-vanilla (control)", zoo.load("tiny-vanilla", device="cpu"))]:
    print(f"{name:40s} CE {cross_entropy(m, heldout, n_boot=200).mean} nats/token")

# %% [markdown]
# ## Compare the logits of the LN and the LN-free model
#
# The two models were trained from the same start, so they should agree on most predictions.

# %%
ln_free = zoo.load("tiny-lnfree", device="cpu")
with torch.no_grad():
    a, b = model(heldout), ln_free(heldout)
agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
print(f"top-1 agreement {agree:.1%}, mean KL(LN || LN-free) {kl.mean():.3f} nats")

# %% [markdown]
# Every analysis returns a result with a short repr, `to_frame()` and `plot()`. The two models' held-out
# cross-entropy and their paired difference (the same sequences), as a figure:

# %%
gap = lnfree.compare_cross_entropy(model, ln_free, heldout, n_boot=200)
gap.plot()
