"""The removal recipe as the paper's code runs it (issue 15): presets' numbers, the HF cosine schedule,
shared ln1 sigma, ln1's triple EMA update, EOT labels masked, decay on norm weights."""

import math

import numpy as np
import pytest
import torch

from conftest import REMOVAL_RUN, REMOVAL_SCHED, make_model, removal_data
from lnfree.removal import PAPER_RECIPES, PRESETS, load_checkpoint, remove_layernorm
from lnfree.removal.data import TokenData
from lnfree.training import OptimConfig, lr_at, make_optimizer

SCHED = REMOVAL_SCHED
RUN = {**REMOVAL_RUN, "lr": 1e-30, "min_lr": 1e-30, "checkpoint_every": 100}  # no learning: the recipe's own numbers
_data = removal_data


def test_paper_recipes_transcribe_its_configs():
    # config.py: base_batch_size 32 / 22 / 28 / 18, gradient_accumulation_steps = int(512 // base),
    # momentum 0.9 (Large, XL: 0.9 ** (base / 32)), max_steps 300 / 500 / 1200 / 1200
    expected = {"gpt2-small": (32, 512, 0.9, 300), "gpt2-medium": (22, 506, 0.9, 500),
                "gpt2-large": (28, 504, 0.9 ** (28 / 32), 1200), "gpt2-xl": (18, 504, 0.9 ** (18 / 32), 1200)}
    released = {"gpt2-small": 300, "gpt2-medium": 500, "gpt2-large": 600, "gpt2-xl": 800}
    for name, (micro, batch, m, horizon) in expected.items():
        r = PAPER_RECIPES[name]
        assert (r["micro_batch_size"], r["batch_size"], r["horizon"]) == (micro, batch, horizon)
        assert r["momentum"] == pytest.approx(m, rel=1e-12)
        assert PRESETS[name].steps == released[name] <= r["horizon"]
        assert r["share_ln1_sigma"] and r["mask_eot_labels"] and r["no_decay"] == "bias" and r["vanilla_aux"]
        assert r["ln1_momentum_power"] == 3 and r["weight_decay"] == 0.01
        # HF GPT-2 in train mode: GPT2Config's resid/embd/attn_pdrop 0.1; lm_head tied to wte
        assert r["dropout"] == 0.1 and r["tie_embeddings"] == "auto"


@pytest.mark.parametrize("warmup,lr,min_lr,max_steps,run_steps", [(25, 6e-4, 3e-4, 300, 300), (15, 3e-4, 4e-5, 1200, 600)])
def test_lr_matches_hf_cosine_with_min_lr(warmup, lr, min_lr, max_steps, run_steps):
    """Against transformers' own scheduler (the paper's lr_scheduler_type='cosine_with_min_lr')."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, max_steps, min_lr=min_lr)
    hf = []
    for _ in range(run_steps):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cfg = OptimConfig(steps=run_steps, lr=lr, min_lr=min_lr, warmup=warmup, horizon=max_steps, warmup_from_zero=True)
    ours = [lr_at(s, cfg) for s in range(run_steps)]
    np.testing.assert_allclose(ours, hf, rtol=1e-10, atol=1e-15)
    if run_steps < max_steps:  # the released Large checkpoint stops mid-decay
        assert ours[-1] > min_lr * 2


def test_bias_rule_decays_norm_weights_not_biases():
    model = make_model()
    opt = make_optimizer(model, OptimConfig(steps=2, lr=1e-3, weight_decay=0.01, no_decay="bias"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert "blocks.0.ln1.w" in decayed and "ln_final.w" in decayed and "embed.W_E" in decayed
    assert {"blocks.0.ln1.b", "blocks.0.attn.b_Q", "blocks.0.mlp.b_in", "unembed.b_U"} <= plain
    assert all(n.split(".")[-1].startswith("b") for n in plain)
    default = make_optimizer(model, OptimConfig(steps=2, lr=1e-3, weight_decay=0.01))
    assert "blocks.0.ln1.w" not in {names[id(p)] for p in default.param_groups[0]["params"]}


def test_ln1_triple_update_and_shared_sigma_match_brute_force():
    """ln1's EMA moves by momentum ** 3 per micro-batch; a frozen ln1 q/k path follows its live v path."""
    model, ref = make_model(), make_model()
    events, data = [], _data()
    recipe = {"ln1_momentum_power": 3, "share_ln1_sigma": True}
    out = remove_layernorm(model, data, **RUN, recipe=recipe, callback=events.append)
    assert out.is_ln_free
    freezes = {e["step"]: e["sigma"] for e in events if e["event"] == "freeze"}
    order, ema, scale = TokenData(data.numpy(), seed=0), {}, {}
    for step in range(SCHED.steps):
        for site in SCHED.sites_removed_at(step):
            assert freezes[step][site] == pytest.approx(ema[site], rel=1e-6), (step, site)
            scale[site] = ema[site]
        for site, v in list(scale.items()):  # shared: a frozen q/k path takes its v path's EMA up to v's removal
            if site.endswith("ln1.qk"):
                v_site = site[:-2] + "v"
                scale[site] = scale[v_site] if v_site in scale else ema[v_site]
        ref.freeze_ln(list(scale), scales=scale) if scale else None
        for j in range(2):
            toks = order.batch(4 * step + 2 * j, 2)
            _, cache = ref.run_with_cache(toks, names_filter=lambda n: "hook_scale" in n)
            for site in SCHED.live_sites(step):
                v = float(cache[ref.site_hook(site)].double().mean())
                m = 0.9 ** 3 if ".ln1." in site else 0.9
                ema[site] = v if site not in ema else m * ema[site] + (1 - m) * v
    # at the end each ln1's q/k and v paths hold one sigma: v's, frozen when v was removed
    for i in range(2):
        assert scale[f"blocks.{i}.ln1.qk"] == scale[f"blocks.{i}.ln1.v"]
        assert scale[f"blocks.{i}.ln1.qk"] != pytest.approx(freezes[SCHED.removal_step(f"blocks.{i}.ln1.qk")]
                                                            [f"blocks.{i}.ln1.qk"], rel=1e-9)


def test_shared_sigma_state_in_checkpoints(tmp_path):
    remove_layernorm(make_model(), _data(), **dict(RUN, checkpoint_every=4), recipe={"share_ln1_sigma": True},
                     out_dir=tmp_path)
    _, state = load_checkpoint(tmp_path)
    for i in range(2):
        assert state["site_scales"][f"blocks.{i}.ln1.qk"] == state["site_scales"][f"blocks.{i}.ln1.v"]


def test_eot_labels_masked_in_the_ce():
    data = _data()
    data[:, 5] = 0  # end-of-text id 0 in every row
    events = []
    remove_layernorm(make_model(), data, **RUN, vanilla=True, eot_token_id=0, recipe={"mask_eot_labels": True},
                     callback=events.append)
    first = next(e for e in events if e["event"] == "step")
    ref, batch = make_model(), TokenData(data.numpy(), seed=0)
    ces = []
    for j in range(2):
        toks = batch.batch(2 * j, 2)
        with torch.no_grad():
            logp = ref(toks).log_softmax(-1)[:, :-1].double()
        labels = toks[:, 1:]
        nll = -logp.gather(-1, labels[..., None])[..., 0]
        ces.append(float(nll[labels != 0].mean()))
    assert first["ce"] == pytest.approx(sum(ces) / 2, rel=1e-5)


def test_recipe_paper_resolves_the_presets_settings(tmp_path):
    from conftest import make_cfg

    from lnfree.model import LNFreeTransformer

    class Stop(Exception):
        pass

    def stop(record):
        if record["event"] == "checkpoint":
            raise Stop

    torch.manual_seed(0)
    model = LNFreeTransformer(make_cfg(n_layers=12, d_model=8, n_heads=2))
    with pytest.raises(Stop):
        remove_layernorm(model, torch.randint(0, 61, (600, 16)), schedule="gpt2-small", recipe="paper",
                         out_dir=tmp_path, progress=False, callback=stop)
    from lnfree.removal import latest_checkpoint, read_checkpoint

    cfg = read_checkpoint(latest_checkpoint(tmp_path))["state"]["config"]
    assert (cfg["batch_size"], cfg["micro_batch_size"], cfg["seq_len"]) == (512, 32, 16)
    assert cfg["optim"]["horizon"] == 300 and cfg["optim"]["warmup_from_zero"] and cfg["optim"]["no_decay"] == "bias"
    assert cfg["share_ln1_sigma"] and cfg["mask_eot_labels"] and cfg["ln1_momentum_power"] == 3
    assert cfg["dropout"] == 0.1 and cfg["tie_embeddings"] is False  # a random W_U: this config does not tie
    with pytest.raises(ValueError, match="needs a preset"):
        remove_layernorm(make_model(), _data(), steps=12, recipe="paper", progress=False)
    with pytest.raises(ValueError, match="unknown"):
        remove_layernorm(make_model(), _data(), steps=12, recipe={"bogus": 1}, progress=False)
    assert math.isfinite(PAPER_RECIPES["gpt2-xl"]["momentum"])


# ---- HF GPT-2's train mode: dropout and tied embeddings (issue 22.4) ------------------------------
LEARN = dict(RUN, lr=1e-3, min_lr=1e-4, weight_decay=0.0)


def test_dropout_only_in_training_forwards():
    from lnfree.removal.hf_training import dropout, dropout_sites

    model = make_model().eval()
    t = _data(2)
    assert len(dropout_sites(model)) == 1 + 3 * model.cfg.n_layers
    seen = []
    torch.manual_seed(0)
    with dropout(model, 0.5):  # a hook registered after the dropout's sees the dropped pattern
        h = model.hook_dict["blocks.1.attn.hook_pattern"].register_forward_hook(lambda m, i, o: seen.append(o))
        a, b = model(t), model(t)
    h.remove()
    assert not torch.allclose(a, b)
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool)).expand_as(seen[0])  # the rest is 0 anyway
    assert abs(float((seen[0][causal] == 0).double().mean()) - 0.5) < 0.05
    kept = seen[0][causal & (seen[0] != 0)]
    assert torch.allclose(seen[0].sum(-1).mean(), torch.tensor(1.0), atol=0.1) and bool((kept > 0).all())
    assert torch.equal(model(t), model(t))  # hooks gone
    # in a run: the recipe key changes the training (same seed, data and order), not the returned model
    runs = {p: remove_layernorm(make_model(), _data(), **LEARN, vanilla=True, recipe={"dropout": p}) for p in (0.0, 0.3)}
    assert runs[0.3].removal_summary["config"]["dropout"] == 0.3
    assert not torch.allclose(runs[0.0].W_E, runs[0.3].W_E)
    assert torch.equal(runs[0.3](t), runs[0.3](t)) and not any(hp._forward_hooks for hp in runs[0.3].hook_dict.values())


def test_tied_embeddings_stay_tied_and_train_as_one_matrix(tmp_path):
    from lnfree.removal import latest_checkpoint, read_checkpoint

    def tied_model():
        m = make_model()
        m.unembed.W_U.data = m.embed.W_E.detach().T.clone()  # as a tying HF config loads it
        return m

    data = _data() % 40  # tokens 40..60 never appear: only the unembedding moves their W_E rows
    before = tied_model().W_E.detach().clone()
    out = remove_layernorm(tied_model(), data, **dict(LEARN, checkpoint_every=4), vanilla=True, out_dir=tmp_path,
                           recipe={"tie_embeddings": True})
    assert torch.equal(out.W_U, out.W_E.T) and out.removal_summary["config"]["tie_embeddings"] is True
    assert not torch.allclose(out.W_E[40:], before[40:])  # W_U's gradient reached W_E
    weights = read_checkpoint(latest_checkpoint(tmp_path))["weights"]
    assert "unembed.W_U" not in weights and "embed.W_E" in weights  # one matrix during training
    untied = remove_layernorm(tied_model(), data, **LEARN, vanilla=True, recipe={"tie_embeddings": False})
    assert torch.equal(untied.W_E[40:], before[40:]) and not torch.equal(untied.W_U, untied.W_E.T)
    # "auto" (the paper's recipe) ties only a model whose embeddings are tied; True refuses an untied one
    auto = remove_layernorm(make_model(), _data(), **LEARN, vanilla=True, recipe={"tie_embeddings": "auto"})
    assert auto.removal_summary["config"]["tie_embeddings"] is False
    with pytest.raises(ValueError, match="W_U is not W_E"):
        remove_layernorm(make_model(), _data(), **LEARN, vanilla=True, recipe={"tie_embeddings": True})
    # a removal run unties at the end so that ln_final folds into a W_U of its own
    free = remove_layernorm(tied_model(), data, **LEARN, recipe={"tie_embeddings": True})
    assert free.is_ln_free and "unembed.W_U" in dict(free.named_parameters())
