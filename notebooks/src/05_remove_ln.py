# %% [markdown]
# # 5. Removing LayerNorm from your own model
#
# The paper removes LN by fine-tuning: every few steps one more LN site is *frozen* (its per-token scale
# replaced by a running average of that scale, measured during training), in the order ln2, ln1 (query/key),
# ln1 (value) per layer, then `ln_final`; an auxiliary loss keeps the residual norm steady. At the end
# every site is removed, folded into the weights. `lnfree.removal.remove_layernorm` does this for any
# TransformerLens model with LayerNorm; `lnfree remove-ln` is the same as a command.
#
# Here we run it for a few steps on `tiny-ln`, only to show the mechanics: a real run uses a few hundred
# steps on the pretraining distribution (that is how `tiny-lnfree` was made). The pretraining text is not
# shipped, so the stand-in training data are the model's own samples; the held-out sets stay held out, for
# the evaluation. (Data read many times over overfits: `remove_layernorm` warns past 3 epochs.)

# %%
import torch

from lnfree import zoo
from lnfree.evaluation import cross_entropy
from lnfree.removal import Schedule, remove_layernorm

torch.manual_seed(0)
model = zoo.load("tiny-ln", device="cpu")
start = torch.zeros(96, 1, dtype=torch.long)  # <|endoftext|> (id 0) starts every row, as in pretraining
train = model.generate(start, max_new_tokens=63, stop_at_eos=False, verbose=False)  # [96, 64]: its own text
print(repr(model.tokenizer.decode(train[0, 1:40])))
evaluate = zoo.heldout("persuasion")[:16, :64]

schedule = Schedule.scaled(model.cfg.n_layers, steps=24)
print("removal steps:", {s: schedule.removal_step(s) for s in ("blocks.0.ln2", "blocks.3.ln1.v", "ln_final")})

# %%
before = cross_entropy(model, evaluate, n_boot=200)
events = []
ln_free = remove_layernorm(model, train, steps=24, batch_size=8, seq_len=64, eval_data=evaluate,
                           progress=False, callback=events.append)
after = cross_entropy(ln_free, evaluate, n_boot=200)
print("every site removed:", ln_free.is_ln_free)
print(f"CE before {before.mean}, after {after.mean} nats/token")

# %% [markdown]
# The callback saw one event per step and one per site frozen:

# %%
freezes = [e for e in events if e.get("event") == "freeze"]
print(len(events), "events,", len(freezes), "freeze events")
for e in freezes[:3]:
    print("step", e["step"], "froze", {site: round(sigma, 3) for site, sigma in e["sigma"].items()})

# %%
import plotly.graph_objects as go

steps = [e for e in events if e.get("event") == "step"]
fig = go.Figure(go.Scatter(x=[e["step"] for e in steps], y=[e["ce"] for e in steps], mode="lines+markers"))
for e in freezes:
    fig.add_vline(x=e["step"], line=dict(color="lightgray", dash="dot"))
fig.update_layout(title="Training cross-entropy; dotted lines: a site frozen", xaxis_title="step",
                  yaxis_title="cross-entropy (nats/token)", template="plotly_white")
fig

# %% [markdown]
# The result is an ordinary `LNFreeTransformer` with every site removed: save it in the Hugging Face
# GPT-2 format (the released LN-free layout) with `ln_free.save_pretrained(path)`, load it back with
# `lnfree.load_model(path)`, and analyse it like `tiny-lnfree` in the other tutorials.
#
# From the command line, with a preset for GPT-2 Small (the paper's schedule and hyperparameters):
#
# ```bash
# lnfree remove-ln ./gpt2 --data train_tokens.npy --out runs/gpt2-lnfree --preset gpt2-small
# lnfree remove-ln ./gpt2 --data train_tokens.npy --out runs/gpt2-vanilla --preset gpt2-small --vanilla
# ```
