"""site_aux: the norm-input scale loss (lnfree.removal.loss.site_scale_loss), checked against a brute-force loop,
its wiring into the trainer's loss (every norm's input, frozen ones included; value and composition), and that
its gradient works."""

import copy
import math

import pytest
import torch

from conftest import REMOVAL_RUN, make_llama, removal_data
from lnfree.removal import remove_layernorm
from lnfree.removal.loss import site_scale_loss


def _brute(scales, tokens, eot=None):
    """Per site: mean over typical tokens (position > 0, not eot) of log(s / mean s)^2, then mean over sites."""
    per_site = []
    for s in scales:
        vals = [float(s[b, p].reshape(-1)[0]) for b in range(tokens.shape[0]) for p in range(tokens.shape[1])
                if p > 0 and (eot is None or int(tokens[b, p]) != eot)]
        mean = sum(vals) / len(vals)
        per_site.append(sum(math.log(v / mean) ** 2 for v in vals) / len(vals))
    return sum(per_site) / len(per_site)


def test_site_scale_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (3, 7), generator=g)
    scales = [torch.rand(3, 7, 1, generator=g, dtype=torch.float64) * 4 + 0.1 for _ in range(4)]
    scales[1][0, 3] = 40.0  # an outlier
    for eot in (None, 2):
        assert float(site_scale_loss(scales, tokens, eot_token_id=eot)) == pytest.approx(_brute(scales, tokens, eot),
                                                                                          rel=1e-6)
    assert float(site_scale_loss([], tokens)) == 0.0
    flat = torch.ones(3, 7, 1)
    assert float(site_scale_loss([flat * 3], tokens)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="expected \\[batch, pos"):
        site_scale_loss([torch.ones(3, 6, 1)], tokens)


def _norm_inputs(model):
    """The residual hooks the norms read (sequential blocks): ln1, ln2 of each block, then ln_final."""
    n = model.cfg.n_layers
    return [f"blocks.{i}.hook_resid_{k}" for i in range(n) for k in ("pre", "mid")] + [f"blocks.{n - 1}.hook_resid_post"]


def _rms_scales(cache, names, eps):
    return [(cache[n].double().pow(2).mean(-1, keepdim=True) + eps).sqrt() for n in names]


def test_trainer_adds_the_weighted_loss_of_every_norm_input():
    """Step 1: logged site_aux == the loop on the untrained copy's norm inputs (RMS by hand) of the very
    micro-batches trained on, a frozen site's input included, and loss == CE + w * site_aux (vanilla: no
    distillation, no paper aux)."""
    w = 0.7
    model = make_llama()
    model.estimate_ln_scales(removal_data(8, seed=3))
    model.freeze_ln(["blocks.0.ln2"])  # frozen: its input still counts
    ref = copy.deepcopy(model)
    seen, records = [], []

    def grab(module, inputs, output):
        if torch.is_grad_enabled():
            seen.append(inputs[0].detach().clone())

    model.embed.register_forward_hook(grab)
    run = {**REMOVAL_RUN, "schedule": None, "steps": 2, "warmup": 0}
    remove_layernorm(model, removal_data(), vanilla=True, site_aux=w, aux_lambda=0.0, callback=records.append, **run)
    step = next(r for r in records if r["event"] == "step")
    seen = seen[:2]  # step 1: two micro-batches of 2 rows
    names = _norm_inputs(ref)
    assert model.ln_mode("blocks.0.ln2") == "frozen"
    expect = []
    for toks in seen:
        _, cache = ref.run_with_cache(toks, names_filter=lambda n: n in names)
        expect.append(_brute(_rms_scales(cache, names, ref.cfg.eps), toks,
                             eot=ref.tokenizer.eos_token_id if ref.tokenizer is not None else None))
    assert step["site_aux"] == pytest.approx(sum(expect) / 2, rel=1e-4)
    assert step["loss"] == pytest.approx(step["ce"] + w * step["site_aux"], rel=1e-6)


def test_site_aux_gradient_pulls_outliers_in():
    """Ten vanilla steps with a large weight leave a lower site loss on fresh rows than the same run without it."""
    held = removal_data(8, seed=11)

    def site_loss_after(w):
        torch.manual_seed(0)
        model = make_llama()
        run = {**REMOVAL_RUN, "schedule": None, "steps": 10, "warmup": 1}
        remove_layernorm(model, removal_data(), vanilla=True, site_aux=w, aux_lambda=0.0, **run)
        names = _norm_inputs(model)
        with torch.no_grad():
            _, cache = model.run_with_cache(held, names_filter=lambda n: n in names)
        return float(site_scale_loss(_rms_scales(cache, names, model.cfg.eps), held))

    plain, pulled = site_loss_after(0.0), site_loss_after(20.0)
    assert pulled < 0.7 * plain, (plain, pulled)


def test_site_aux_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="site_aux must be"):
        remove_layernorm(make_llama(), removal_data(), site_aux=-1.0, **REMOVAL_RUN)


def _nan_on_forwards(model, which):
    """Make the grad-enabled forwards numbered in `which` (1-based) produce NaN logits."""
    calls = [0]

    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in which:
                return output * float("nan")
        return output

    model.unembed.register_forward_hook(hook)


def test_skip_nonfinite_drops_the_step_and_keeps_the_lr():
    """A NaN step within the budget is skipped: a 'skip' event, no rollback, the LR scale kept, the run completes
    its steps with finite weights; one more NaN than the budget is rolled back as before."""
    events = []
    model = make_llama()
    _nan_on_forwards(model, {7})  # step 4's first micro-batch (two micro-batches a step)
    run = {**REMOVAL_RUN, "schedule": None, "steps": 8}
    out = remove_layernorm(model, removal_data(), vanilla=True, skip_nonfinite=1, callback=events.append, **run)
    kinds = [e["event"] for e in events]
    assert kinds.count("skip") == 1 and "rollback" not in kinds
    skip = next(e for e in events if e["event"] == "skip")
    assert skip["step"] == 3 and "non-finite" in skip["reason"]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(1, 9))  # the skipped step is done again on the next batch
    assert out.removal_summary["skips"] == 1 and out.removal_summary["lr_scale"] == 1.0
    assert all(bool(torch.isfinite(p).all()) for p in out.parameters())

    events.clear()
    model = make_llama()
    _nan_on_forwards(model, {7, 9})
    remove_layernorm(model, removal_data(), vanilla=True, skip_nonfinite=1, callback=events.append, **run)
    kinds = [e["event"] for e in events]
    assert kinds.count("skip") == 1 and kinds.count("rollback") == 1
