# %% [markdown]
# # 3. Attribution patching vs activation patching
#
# **Activation patching** runs a corrupted prompt with one component's activation taken from the clean
# prompt and measures how much of the clean behaviour returns: the ground truth, one forward pass per
# component. **Attribution patching** (AtP) estimates all of them at once from one backward pass:
# (a_clean - a_corrupt) . dMetric/da. LayerNorm is one of the non-linearities that the linear estimate
# misses; the paper finds AtP only slightly more accurate without it.
#
# The task is indirect object identification (IOI): "Then, Mary and John went to the store. John gave a
# ring to" -> " Mary". The corrupted prompt swaps the names, and the metric is the logit difference
# logit(IO) - logit(S) at the last position.

# %%
import torch

import lnfree
from lnfree import zoo
from lnfree.tasks import ioi, make_metric

ln_model, ln_free, vanilla = (zoo.load(n, device="cpu") for n in ("tiny-ln", "tiny-lnfree", "tiny-vanilla"))
batch = ioi(ln_model.tokenizer, n_prompts=16, seed=0)
print(batch.prompts[0], "->", batch.io_names[0])
print(batch.corrupt_prompts[0], "->", batch.s_names[0])
metric = make_metric(batch, "logit_diff")
with torch.no_grad():
    print(f"mean logit diff: clean {metric(ln_model(batch.clean)).mean():.3f}, "
          f"corrupted {metric(ln_model(batch.corrupt)).mean():.3f}")

# %% [markdown]
# A 4-layer model trained on a few novels is no IOI expert: its clean and corrupted logit differences are
# close and may even have the wrong sign (GPT-2 Small's clean logit difference is several nats). The comparison below is about the
# *method*, which only needs the two runs to differ; run the same cells on `lnfree.load_model("gpt2")`
# for the real circuit.
#
# Patch every head's output (`site="z"`), all positions at once (`by_pos=False`):

# %%
act = lnfree.activation_patching(ln_model, batch.clean, batch.corrupt, metric, site="z", by_pos=False)
atp = lnfree.attribution_patching(ln_model, batch.clean, batch.corrupt, metric, site="z", by_pos=False)
err = lnfree.patching_error(atp, act, n_boot=200)
print("scores [layer, head]:", tuple(act.scores.shape))
print("per-layer error sum|AtP - act|:", [round(x, 4) for x in err.per_layer.tolist()])
print("correlation with activation patching:", err.pearson)
act.top(5)

# %% [markdown]
# ## LN vs LN-free
#
# The paper compares the two fine-tuned models (the vanilla control keeps LN): `compare_patching` runs
# both sweeps on both models and reports each model's per-layer error and their difference
# ("improvement": positive where AtP is more accurate without LN). Each model gets its own normalised
# logit difference (0 = its corrupted run, 1 = its clean run), so the errors are on the same scale.

# %%
metrics = (make_metric(batch, "normalized_logit_diff", vanilla), make_metric(batch, "normalized_logit_diff", ln_free))
cmp = lnfree.compare_patching(vanilla, ln_free, batch.clean, batch.corrupt, metrics,
                              names=("tiny-vanilla", "tiny-lnfree"), n_boot=200)
print(cmp.table())
print({k: v for k, v in cmp.summary().items() if k != "improvement_ci"})
cmp.plot()

# %% [markdown]
# AtP* (Kramár et al. 2024) adds the QK fix and GradDrop: `method="atp*"`.

# %%
star = lnfree.attribution_patching(ln_model, batch.clean, batch.corrupt, metric, site="z", by_pos=False,
                                   method="atp*")
print("AtP* (magnitudes) vs |activation patching|:", lnfree.patching_error(star, act, n_boot=200).pearson)
