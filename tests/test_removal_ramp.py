"""freeze_ramp: a freeze phased in over R steps (per-token scale live^(1-a) sigma^a), checked against a
hand-written norm and the step-by-step formula; resume and the fail-safe still hold."""

import warnings

import pytest
import torch

from conftest import REMOVAL_RUN, make_model, removal_data
from lnfree.layernorm import RemovableLayerNorm
from lnfree.removal import DivergedError, Schedule, remove_layernorm
from lnfree.removal.schedule import ordered_sites

SCHED = Schedule.from_gaps(2, 12, 2, 1, 1, 1)  # ln2 2,3; qk 4,5; v 6,7; ln_final 8
RUN = {**REMOVAL_RUN, "schedule": SCHED}
_data = removal_data


@pytest.mark.parametrize("kind", ["LN", "RMS"])
def test_blend_is_the_geometric_mean_of_live_and_sigma(kind):
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10, act_fn="gelu")
    torch.manual_seed(0)
    ln = RemovableLayerNorm(cfg, kind=kind)
    with torch.no_grad():
        ln.w.copy_(1 + 0.3 * torch.randn(8))
        if kind == "LN":
            ln.b.copy_(0.1 * torch.randn(8))
    x = 3 * torch.randn(2, 3, 8, dtype=torch.float64).float()
    sigma = 2.5
    xc = x - x.mean(-1, keepdim=True) if kind == "LN" else x
    live = (xc.double().pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
    ln.set_mode("main", "frozen", sigma=sigma)
    frozen = ln(x)
    for a in (0.0, 0.25, 0.5, 0.9):
        ln.set_blend("main", a)
        scale = live ** (1 - a) * sigma ** a  # by hand, float64
        expect = xc.double() / scale * ln.w.double() + (ln.b.double() if kind == "LN" else 0)
        assert torch.allclose(ln(x).double(), expect, rtol=1e-5, atol=1e-6)
    ln.set_blend("main", 1.0)
    assert torch.equal(ln(x), frozen)  # a = 1 is the plain frozen path, bit for bit
    with pytest.raises(ValueError, match=r"blend must be a number in \[0, 1\]"):
        ln.set_blend("main", 1.5)


def test_trainer_ramps_each_site_by_the_formula():
    ramp = 2
    model = make_model()
    seen = []

    def record(e):
        if e["event"] == "step":  # step k done: the blends used were those of step k - 1
            blends = {}
            for site in ordered_sites(2):
                module, path = model._site(site)
                if model.ln_mode(site) == "frozen":
                    blends[site] = module.blend[path]
            seen.append((e["step"] - 1, blends))

    out = remove_layernorm(model, _data(), freeze_ramp=ramp, callback=record, **RUN)
    for step, blends in seen:
        expect = {s: min(1.0, (step - SCHED.removal_step(s) + 1) / (ramp + 1))
                  for s in ordered_sites(2) if SCHED.removal_step(s) <= step}
        assert blends == pytest.approx(expect, abs=0), step
    assert any(0 < a < 1 for _, b in seen for a in b.values())  # the ramp was really used
    assert out.is_ln_free and torch.isfinite(out(_data(2))).all()
    assert out.removal_summary["config"]["freeze_ramp"] == ramp


def test_ramp_zero_is_the_old_behaviour_and_too_long_a_ramp_is_refused():
    a = remove_layernorm(make_model(), _data(), **RUN)
    b = remove_layernorm(make_model(), _data(), freeze_ramp=0, **RUN)
    tokens = _data(2, seed=9)
    assert torch.equal(a(tokens), b(tokens))
    with pytest.raises(ValueError, match="freeze_ramp=4: the last site"):
        remove_layernorm(make_model(), _data(), freeze_ramp=4, **RUN)  # ln_final at 8 + 4 > 11
    with pytest.raises(ValueError, match="freeze_ramp must be an integer >= 0"):
        remove_layernorm(make_model(), _data(), freeze_ramp=-1, **RUN)


class _Stop(Exception):
    pass


def test_ramp_resume_equals_uninterrupted(tmp_path):
    full = remove_layernorm(make_model(), _data(), freeze_ramp=3, out_dir=tmp_path / "a", **RUN)

    def stop(e):
        if e["event"] == "step" and e["step"] == 6:
            raise _Stop

    with pytest.raises(_Stop):
        remove_layernorm(make_model(), _data(), freeze_ramp=3, out_dir=tmp_path / "b", callback=stop, **RUN)
    resumed = remove_layernorm(make_model(), _data(), freeze_ramp=3, out_dir=tmp_path / "b", resume=True, **RUN)
    tokens = _data(2, seed=9)
    assert torch.equal(full(tokens), resumed(tokens))


def test_fail_safe_still_stops_a_diverging_ramped_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DivergedError, match="gave up"):
            remove_layernorm(make_model(), _data(), freeze_ramp=2, **{**RUN, "lr": 100.0, "min_lr": 1.0})


def test_a_site_still_being_phased_in_cannot_be_folded():
    model = make_model()
    model.freeze_ln(["blocks.0.ln2"], scales=2.0)
    module, path = model._site("blocks.0.ln2")
    module.set_blend(path, 0.5)
    with pytest.raises(ValueError, match=r"cannot remove blocks.0.ln2: .*phased in \(blend 0.5 < 1"):
        model.remove_ln(["blocks.0.ln2"])
    assert model.ln_mode("blocks.0.ln2") == "frozen"  # nothing folded
    module.set_blend(path, 1.0)
    tokens = _data(2)
    before = model(tokens)
    model.remove_ln(["blocks.0.ln2"])
    assert torch.allclose(model(tokens), before, rtol=1e-4, atol=1e-5)
