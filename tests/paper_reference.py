"""An independent transcription of the paper's computations (github.com/submarat/removing-layer-norm).

Plain transformers / TransformerLens / torch / numpy, following the paper's code step by step; no
lnfree analysis code. File:line references are to the paper's repository (main, 583a9e6; the
per-layer AtP error from branch attribution_vs_activation_patching). Tests compare lnfree.paper
against these functions.
"""

from __future__ import annotations

import copy
import random

import einops
import numpy as np
import torch
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import GPT2LMHeadModel


# ---- models (mech_interp/load_models.py) ---------------------------------------------------
def _tl_cfg(hf_cfg, dtype=torch.float32) -> HookedTransformerConfig:
    """What HookedTransformer.from_pretrained('gpt2', hf_model=...) builds, for any GPT-2 shape."""
    return HookedTransformerConfig(
        n_layers=hf_cfg.n_layer, d_model=hf_cfg.n_embd, n_heads=hf_cfg.n_head, d_head=hf_cfg.n_embd // hf_cfg.n_head,
        d_mlp=4 * hf_cfg.n_embd, n_ctx=hf_cfg.n_positions, d_vocab=hf_cfg.vocab_size, act_fn="gelu_new",
        eps=1e-5, normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True, device="cpu", dtype=dtype,
    )


def load_paper_model(hf_dir, *, no_ln: bool, processing: bool = True, dtype=torch.float32) -> HookedTransformer:
    """StandardModelLoader / NoLNModelLoader (load_models.py:87-171) with ModelFactory's defaults
    (fold_ln, center_unembed, center_writing_weights; from_pretrained's fold_value_biases)."""
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).to(dtype)
    if no_ln:  # load_models.py:139-145
        for block in hf.transformer.h:
            block.ln_1.weight.data = block.ln_1.weight.data / 1e6
            block.ln_2.weight.data = block.ln_2.weight.data / 1e6
        hf.transformer.ln_f.weight.data = hf.transformer.ln_f.weight.data / 1e6
    cfg = _tl_cfg(hf.config, dtype)
    model = HookedTransformer(cfg)
    sd = convert_gpt2_weights(hf, cfg)
    model.load_and_process_state_dict(sd, fold_ln=processing, center_writing_weights=processing,
                                      center_unembed=processing, fold_value_biases=processing)
    if no_ln:  # load_models.py:148-166
        for b in model.blocks:
            b.ln1 = torch.nn.Identity()
            b.ln2 = torch.nn.Identity()
        model.ln_final = torch.nn.Identity()
        model.cfg.normalization_type = None
    return model.eval()


# ---- DLA NMAE (attention_head_attribution/run_analysis.py:104-233, 358-408) ---------------
def _apply_layer_norm(x):
    eps = 1e-5
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


@torch.no_grad()
def dla_and_de(model, tokens, *, no_ln: bool, batch_size: int = 5):
    model.cfg.use_attn_result = True
    all_dla, all_de = [], []
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i:i + batch_size]
        _, cache = model.run_with_cache(batch)
        target = batch[:, -1]
        W = model.W_U[:, target].T
        b = model.b_U[target]
        final = cache["resid_post", -1][:, -1, :]
        scaled_final = final if no_ln else cache.apply_ln_to_stack(final, layer=-1, pos_slice=-1)
        logits = einops.reduce(scaled_final * W, "batch d_model -> batch", "sum") + b
        per_head = cache.stack_head_results(layer=-1, pos_slice=-1)
        scaled_heads = per_head if no_ln else cache.apply_ln_to_stack(per_head, layer=-1, pos_slice=-1)
        dla = einops.einsum(scaled_heads, W, "head batch d_model, batch d_model -> head batch")
        ablated = final - per_head
        scaled_ablated = ablated if no_ln else _apply_layer_norm(ablated)
        logits_without = einops.einsum(scaled_ablated, W, "head batch d_model, batch d_model -> head batch") + b
        all_dla.append(dla)
        all_de.append(logits - logits_without)
    model.cfg.use_attn_result = False
    return torch.cat(all_dla, 1), torch.cat(all_de, 1)


def global_nmae(dla, de):
    return (dla - de).abs().mean().item() / (de.abs().mean().item() + 1e-10) * 100


def nmae_bootstrap(dla, de, n_boot, seed):
    """run_analysis.py:385-408 with numpy's global draws replaced by a seeded Generator (same call order)."""
    rng = np.random.default_rng(seed)
    dla, de = torch.as_tensor(dla), torch.as_tensor(de)
    H, N = dla.shape
    boots = []
    for _ in range(n_boot):
        hi = rng.integers(0, H, H)
        si = rng.integers(0, N, N)
        boots.append(global_nmae(dla[hi][:, si], de[hi][:, si]))
    return np.percentile(boots, [2.5, 97.5])


# ---- sink rate (utils.py:65-102, sink_rate.py:144-211) ---------------------------------------
def calculate_sink_rate(hf_model, attentions, eps=0.3):
    config = hf_model.config
    T = attentions[0].shape[2]
    H, L, B = config.n_head, config.n_layer, attentions[0].shape[0]
    rate = torch.zeros((B,))
    for attn in attentions:
        y = attn[:, :, :, 0] > eps
        y = y.sum(dim=(1, 2)).float()
        rate += y / T
    return rate.mean() / (L * H)


@torch.no_grad()
def sink_rates(hf_model, tokens, batch_size=8, layer=None):
    rates = []
    for i in range(0, len(tokens), batch_size):
        out = hf_model(input_ids=tokens[i:i + batch_size], output_attentions=True)
        att = out.attentions if layer is None else [out.attentions[layer]]
        rates.append(calculate_sink_rate(hf_model, att).item())
    rates = np.array(rates)
    return rates.mean(), np.percentile(rates, 2.5), np.percentile(rates, 97.5)


# ---- residual norms (residual_stream/residual_norms.py:75-95, 227-279, 340-366) -------------
@torch.no_grad()
def residual_norms(model, tokens, *, no_ln: bool):
    names = ["hook_embed", "hook_pos_embed"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_resid_post"]
    names.append("ln_final.hook_normalized")
    store = {n: [] for n in names}
    for i in range(len(tokens)):
        acts = {}

        def capture(act, hook):
            acts[hook.name] = act.detach().cpu()
            return act

        model.run_with_hooks(tokens[i:i + 1], fwd_hooks=[(n, capture) for n in names if n in model.hook_dict])
        if no_ln:
            acts["ln_final.hook_normalized"] = acts[f"blocks.{len(model.blocks) - 1}.hook_resid_post"].clone()
        for n, a in acts.items():
            store[n].append(torch.norm(a, p=2, dim=-1))
    out = {}
    for n in names:
        v = torch.cat(store[n], 0)
        first, rest = v[:, 0], v[:, 1:].reshape(-1)
        out[n] = (first.mean().item(), first.std().item(), rest.mean().item(), rest.std().item())
    return out


# ---- IOI prompts (attribution_patching/ioi_dataset.py, ioi_utils.py) -------------------------
NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony",
    "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas",
    "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle",
    "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin",
    "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean", "Erin",
    "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler", "Scott",
    "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan",
    "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa",
    "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
)
PLACES = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)
OBJECTS = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)
BABA_TEMPLATE_0 = "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"


def gen_prompt_uniform(templates, names, nouns_dict, N, symmetric):
    """ioi_dataset.py:280-335 (prefixes=None, abc=False), drawing from the global `random`."""
    rd = random
    nb_gen, ioi_prompts = 0, []
    while nb_gen < N:
        temp = rd.choice(templates)
        temp_id = templates.index(temp)
        name_1 = name_2 = name_3 = ""
        while len(set([name_1, name_2, name_3])) < 3:
            name_1 = rd.choice(names)
            name_2 = rd.choice(names)
            name_3 = rd.choice(names)
        nouns, ioi_prompt = {}, {}
        for k in nouns_dict:
            nouns[k] = rd.choice(nouns_dict[k])
            ioi_prompt[k] = nouns[k]
        prompt = temp
        for k in nouns_dict:
            prompt = prompt.replace(k, nouns[k])
        prompt1 = prompt.replace("[A]", name_1).replace("[B]", name_2)
        ioi_prompt.update({"text": prompt1, "IO": name_1, "S": name_2, "TEMPLATE_IDX": temp_id})
        ioi_prompts.append(ioi_prompt)
        nb_gen += 1
        if symmetric and nb_gen < N:
            prompt2 = prompt.replace("[A]", name_2).replace("[B]", name_1)
            ioi_prompts.append({"text": prompt2, "IO": name_2, "S": name_1, "TEMPLATE_IDX": temp_id})
            nb_gen += 1
    return ioi_prompts


def flip_io_s1(prompts):
    """gen_flipped_prompts(..., flip=("IO", "S1")), ioi_dataset.py:338-393, 466-475."""
    out = []
    for prompt in prompts:
        t = prompt["text"].split(" ")
        prompt = prompt.copy()
        io_index, s1_index = t.index(prompt["IO"]), t.index(prompt["S"])
        io, s1 = t[io_index], t[s1_index]
        t[io_index], t[s1_index] = s1, io
        prompt["text"] = " ".join(t)
        out.append(prompt)
    return out


def reorder_list(items, n, order):
    result = []
    for i in range(0, len(items), n):
        group = items[i:i + n]
        result.extend([group[j] for j in order] if len(group) == n else group)
    return result


def get_bisymmetric_prompts_and_answers(total_N, seed):
    """ioi_utils.py:17-30 after random.seed(seed)."""
    random.seed(seed)
    d1 = gen_prompt_uniform([BABA_TEMPLATE_0], list(NAMES), {"[PLACE]": list(PLACES), "[OBJECT]": list(OBJECTS)},
                            N=total_N * 2, symmetric=True)
    d2 = flip_io_s1(d1)
    c = [item for pair in zip(d1, d2) for item in pair]
    prompts = [m["text"].rsplit(" ", 1)[0] for m in c]
    answers = [(" " + m["IO"], " " + m["S"]) for m in c]
    return reorder_list(prompts, 4, [0, 3, 1, 2]), reorder_list(answers, 4, [0, 3, 1, 2])


def ioi_tokens(tokenizer, prompts, answers):
    """attr_vs_act_patching_(per_prompt).py:138-148 (model.to_tokens prepends BOS)."""
    clean = torch.tensor([tokenizer(tokenizer.bos_token + p)["input_ids"] for p in prompts])
    corrupted = clean[[(i + 1 if i % 2 == 0 else i - 1) for i in range(len(clean))]]
    ans = torch.tensor([[tokenizer(a[j])["input_ids"][0] for j in range(2)] for a in answers])
    return clean, corrupted, ans


# ---- attribution vs activation patching (attr_vs_act_patching_(per_prompt).py) ---------------
def get_logit_diff(logits, answer_token_indices, mean=True):
    if len(logits.shape) == 2:
        logits = logits.unsqueeze(0)
    logits = logits[:, -1, :]
    correct = logits.gather(1, answer_token_indices[:, 0].unsqueeze(1))
    incorrect = logits.gather(1, answer_token_indices[:, 1].unsqueeze(1))
    return (correct - incorrect).mean() if mean else (correct - incorrect).squeeze(-1)


def get_cache_fwd_and_bwd(model, tokens, metric):
    """attribution_patching_utils.py:5-24."""
    not_qkv_input = lambda name: "_input" not in name  # noqa: E731
    model.reset_hooks()
    cache, grad_cache = {}, {}

    def fwd(act, hook):
        cache[hook.name] = act.detach()

    def bwd(act, hook):
        grad_cache[hook.name] = act.detach()

    model.add_hook(not_qkv_input, fwd, "fwd")
    model.add_hook(not_qkv_input, bwd, "bwd")
    value = metric(model(tokens))
    value.backward(retain_graph=False)
    model.reset_hooks()
    return value.item(), ActivationCache(cache, model), ActivationCache(grad_cache, model)


def patching_setup(model):
    """attr_vs_act_patching_(per_prompt).py:131-134 ("not sure why this is needed")."""
    model.set_use_attn_result(True)
    model.set_use_attn_in(True)
    model.set_use_hook_mlp_in(True)
    return model


def attr_patch_resid_pre(model, clean_tokens, corrupted_tokens, answer_token_indices):
    """process_batch_for_attr_patching_resid_pre: [layer, pos, batch]."""
    patching_setup(model)
    out = []
    for c, k, a in zip(clean_tokens, corrupted_tokens, answer_token_indices):
        metric = lambda logits, a=a: get_logit_diff(logits, a.unsqueeze(0), mean=True)  # noqa: E731
        _, clean_cache, _ = get_cache_fwd_and_bwd(model, c, metric)
        _, corr_cache, corr_grad = get_cache_fwd_and_bwd(model, k, metric)
        names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
        attr = torch.stack([corr_grad[n] * (clean_cache[n] - corr_cache[n]) for n in names])  # layer batch pos d
        out.append(einops.reduce(attr, "layer batch pos d_model -> batch layer pos", "sum"))
    return torch.cat(out, 0).permute(1, 2, 0)


@torch.no_grad()
def act_patch_resid_pre(model, clean_tokens, corrupted_tokens, answer_token_indices):
    """process_batch_for_act_patching_resid_pre with custom_patching.get_act_patch_resid_pre: [layer, pos, batch]."""
    patching_setup(model)
    _, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_ld = get_logit_diff(model(corrupted_tokens), answer_token_indices, mean=False)
    L, P = model.cfg.n_layers, clean_tokens.shape[1]
    out = torch.zeros(L, P, clean_tokens.shape[0], dtype=model.cfg.dtype)
    for layer in range(L):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(P):
            def setter(act, hook, pos=pos):
                act[:, pos, ...] = clean_cache[name][:, pos, ...]
                return act
            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, setter)])
            out[layer, pos] = get_logit_diff(logits, answer_token_indices, mean=False)
    return out - corrupted_ld.reshape(1, 1, -1)


def per_layer_error(act, attr):
    """final_patching_analysis_new_version.py:115-128 (normalise by [0, 11]) and 491-497 (option 1)."""
    norm = act[0, 11]
    norm_diff = torch.abs(act / norm - attr / norm)
    return norm_diff.sum(dim=1).mean(dim=-1)


# ---- entropy neurons (entropy_neurons/ablate_all_models.py:24-318, 455-500) --------------------
def calculate_entropy(logits):
    probs = torch.nn.functional.softmax(logits, dim=-1)
    return -torch.sum(probs * torch.log(probs + 1e-10), dim=-1)


@torch.no_grad()
def entropy_ablation(model, tokens, neuron_indices, *, no_ln: bool):
    """AblationAnalyzer: extract_activations, run_simulation, run_ablation (one neuron at a time)."""
    L = model.cfg.n_layers
    names = [f"blocks.{L - 1}.hook_resid_pre", f"blocks.{L - 1}.hook_attn_out", f"blocks.{L - 1}.mlp.hook_post"]
    targets, resid, attn, mid = [], [], [], []
    for i in range(len(tokens)):  # DataLoader(batch_size=1)
        batch = tokens[i:i + 1]
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
        targets.append(batch[:, 1:].reshape(-1))
        resid.append(cache[names[0]][:, :-1].reshape(-1, model.cfg.d_model))
        attn.append(cache[names[1]][:, :-1].reshape(-1, model.cfg.d_model))
        mid.append(cache[names[2]][:, :-1].reshape(-1, model.cfg.d_mlp))
    targets, resid, attn, mid = (torch.cat(x) for x in (targets, resid, attn, mid))
    W_out, b_out, unembed = model.blocks[-1].mlp.W_out, model.blocks[-1].mlp.b_out, model.unembed

    def readout(mlp_mid):
        x = resid + attn + einops.einsum(W_out, mlp_mid, "dmlp dmodel, seq dmlp -> seq dmodel") + b_out
        if not no_ln:
            mean = x.mean(dim=-1, keepdim=True)
            var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
            x = (x - mean) / (var + 1e-12).sqrt()
        logits = unembed(x)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none"), calculate_entropy(logits)

    sim_loss, sim_entropy = readout(mid)
    mean_act = mid.mean(dim=0, keepdim=True)
    results = {}
    for idx in neuron_indices:
        ablated = mid.clone()
        ablated[:, idx] = mean_act[:, idx]
        loss, ent = readout(ablated)
        results[idx] = {"loss_effect": (sim_loss - loss).abs().numpy(), "entropy_effect": (sim_entropy - ent).abs().numpy()}
    return results


def median_iqr(x):
    return np.median(x), np.percentile(x, 25), np.percentile(x, 75)


# ---- Table 1 (pile_eval.py:113-205, transformers path) -----------------------------------------
@torch.no_grad()
def evaluate_model_on_pile(hf_model, processed_examples, batch_size=8):
    batches = []
    for i in range(0, len(processed_examples), batch_size):
        chunks = processed_examples[i:min(i + batch_size, len(processed_examples))]
        if len(chunks) < batch_size:
            continue
        batches.append(torch.stack(chunks))
    total_loss, total_tokens = 0.0, 0
    for ids in batches:
        out = hf_model(input_ids=ids, labels=ids)
        total_loss += out.loss.item() * ids.numel()
        total_tokens += ids.numel()
    return total_loss / total_tokens


def chunk_stream(all_tokens, block_size, num_samples):
    """pile_eval.py:74-83 (before its unseeded shuffle)."""
    n_chunks = min(num_samples, len(all_tokens) // block_size)
    return [torch.tensor(all_tokens[i * block_size:(i + 1) * block_size]) for i in range(n_chunks)
            if len(all_tokens[i * block_size:(i + 1) * block_size]) == block_size]


@torch.no_grad()
def frozen_scale_direct_effect(model, tokens, idx):
    """Not in the paper's code: Stolfo et al.'s direct effect (final LN scale held at the clean value),
    with the paper's 1e-12 LN and entropy, per token; signed changes ablated - clean."""
    L = model.cfg.n_layers
    names = [f"blocks.{L - 1}.hook_resid_pre", f"blocks.{L - 1}.hook_attn_out", f"blocks.{L - 1}.mlp.hook_post"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    resid, attn, mid = (cache[n][:, :-1] for n in names)
    targets = tokens[:, 1:]
    W_out, b_out = model.blocks[-1].mlp.W_out, model.blocks[-1].mlp.b_out
    x = resid + attn + mid @ W_out + b_out
    xc = x - x.mean(-1, keepdim=True)
    scale = (xc.pow(2).mean(-1, keepdim=True) + 1e-12).sqrt()
    abl = mid.clone()
    abl[..., idx] = mid.reshape(-1, mid.shape[-1]).mean(0)[idx]
    xa = resid + attn + abl @ W_out + b_out
    xa = xa - xa.mean(-1, keepdim=True)
    out = {}
    for key, z in (("clean", xc / scale), ("direct", xa / scale)):
        logits = model.unembed(z)
        out[key] = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").flatten(),
                    calculate_entropy(logits).flatten())
    return {"loss": (out["direct"][0] - out["clean"][0]).numpy(), "entropy": (out["direct"][1] - out["clean"][1]).numpy()}
