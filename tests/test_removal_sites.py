"""`RemovalSettings` (remove_layernorm's settings object; its fields are also keyword arguments) and
``sites=`` (remove only the named sites; the run ends with the others live)."""

import json

import pytest
import torch

from conftest import REMOVAL_RUN, make_model, removal_data
from lnfree.removal import RemovalSettings, load_checkpoint, remove_layernorm

SETTINGS = {k: v for k, v in REMOVAL_RUN.items() if k != "progress"}
SITES = ["blocks.0.ln2", "blocks.1.ln1.v"]


# ---- the settings object ------------------------------------------------------------------------------
def test_settings_object_and_keywords_train_the_same_model():
    by_kwargs = remove_layernorm(make_model(), removal_data(), **REMOVAL_RUN)
    by_settings = remove_layernorm(make_model(), removal_data(), settings=RemovalSettings(**SETTINGS), progress=False)
    a, b = by_kwargs.state_dict(), by_settings.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_kwargs.removal_summary["config"] == by_settings.removal_summary["config"]


def test_settings_are_validated_once_and_given_once():
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 2, got -5$"):
        RemovalSettings(steps=-5)
    with pytest.raises(ValueError, match=r"^diverge_factor must be > 0, got 0"):
        RemovalSettings(diverge_factor=0)
    with pytest.raises(TypeError, match="schedule must be None, a preset name"):
        RemovalSettings(schedule=3)
    s = RemovalSettings(**SETTINGS)
    with pytest.raises(TypeError, match=r"got settings= and the setting keyword\(s\) lr=: give each setting once"):
        remove_layernorm(make_model(), removal_data(), settings=s, lr=1e-3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'setps' \(did you mean 'steps'\?\)"):
        remove_layernorm(make_model(), removal_data(), setps=4)
    with pytest.raises(TypeError, match="settings must be a RemovalSettings, got dict"):
        remove_layernorm(make_model(), removal_data(), settings=SETTINGS)
    with pytest.raises(ValueError, match="^lr must be > 0"):
        s.replace(lr=-1.0)  # a copy is validated again
    assert s.replace(sites=SITES).sites == tuple(SITES)


def test_a_checkpoint_written_before_sites_existed_still_resumes(tmp_path):
    out = tmp_path / "run"
    first = remove_layernorm(make_model(), removal_data(), out_dir=out, **REMOVAL_RUN)
    for state in out.glob("checkpoints/step_*/state.json"):  # as an older lnfree wrote them: no "sites" key
        s = json.loads(state.read_text())
        del s["config"]["sites"]
        state.write_text(json.dumps(s))
    again = remove_layernorm(make_model(), removal_data(), settings=RemovalSettings(**SETTINGS), out_dir=out,
                             resume=True, progress=False)
    assert again.removal_summary["steps"] == first.removal_summary["steps"] == REMOVAL_RUN["schedule"].steps
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())


# ---- sites= ----------------------------------------------------------------------------------------------
def test_only_the_named_sites_are_frozen_and_folded(tmp_path):
    events = []
    model = make_model()
    out = remove_layernorm(model, removal_data(), sites=SITES, out_dir=tmp_path / "run", callback=events.append,
                           **REMOVAL_RUN)
    modes = out.ln_modes()
    assert {s for s, m in modes.items() if m == "removed"} == set(SITES)
    assert {s for s, m in modes.items() if m == "live"} == set(modes) - set(SITES)
    assert not out.is_ln_free and not out.removal_summary["ln_free"]
    frozen_sites = [s for e in events if e["event"] == "freeze" for s in e["sigma"]]
    assert sorted(frozen_sites) == sorted(SITES)  # each named site once, at its step; no other site
    sched = REMOVAL_RUN["schedule"]
    assert {e["step"] for e in events if e["event"] == "freeze"} == {sched.removal_step(s) for s in SITES}
    # the last checkpoint: the named sites frozen (not folded), the others live
    before, state = load_checkpoint(tmp_path / "run")
    assert state["step"] == sched.steps
    assert {s for s, m in before.ln_modes().items() if m != "live"} == set(SITES)
    # folding the named sites leaves the live sites' own weights as they were, and the logits
    tokens = removal_data(4, seed=11)
    with torch.no_grad():
        assert torch.allclose(out(tokens), before(tokens), atol=1e-4, rtol=1e-4)
    for site in set(modes) - set(SITES):
        module, path = out._site(site)
        ref, _ = before._site(site)
        assert torch.equal(module.w, ref.w) and (module.b is None or torch.equal(module.b, ref.b)), site
    # and a run of every site differs: the others really were left alone
    full = remove_layernorm(make_model(), removal_data(), **REMOVAL_RUN)
    assert full.is_ln_free


def test_unknown_or_impossible_sites_are_clear_errors():
    with pytest.raises(ValueError, match=r"'blocks\.0\.ln_2' is not a norm site of this model; did you mean "
                                         r"'blocks\.0\.ln2'\?"):
        remove_layernorm(make_model(), removal_data(), sites=["blocks.0.ln_2"], **REMOVAL_RUN)
    with pytest.raises(ValueError, match="vanilla=True removes none"):
        RemovalSettings(sites=SITES, vanilla=True)
    with pytest.raises(TypeError, match="sites must be a list of site names"):
        RemovalSettings(sites="blocks.0.ln2")
    with pytest.raises(ValueError, match=r"sites names \['blocks.0.ln2'\] more than once"):
        RemovalSettings(sites=["blocks.0.ln2", "blocks.0.ln2"])
    model = make_model()
    model.freeze_ln("blocks.0.ln2", scales=1.0)
    model.remove_ln(["blocks.0.ln2"])
    with pytest.raises(ValueError, match=r"sites \['blocks.0.ln2'\] are already removed"):
        remove_layernorm(model, removal_data(), sites=["blocks.0.ln2"], **REMOVAL_RUN)


def test_a_ramp_needs_to_end_only_for_the_named_sites():
    # ln_final is frozen at step 10 of 12: a 2-step ramp would end past the run, but only blocks.0.ln2 (step 2) runs
    with pytest.raises(ValueError, match="freeze_ramp=2: the last site, frozen at step 10"):
        remove_layernorm(make_model(), removal_data(), freeze_ramp=2, **REMOVAL_RUN)
    out = remove_layernorm(make_model(), removal_data(), freeze_ramp=2, sites=["blocks.0.ln2"], **REMOVAL_RUN)
    assert out.ln_mode("blocks.0.ln2") == "removed" and out.ln_mode("ln_final") == "live"


def test_absorb_site_script_runs_on_sites_and_its_fold_matches_the_frozen_model(tmp_path):
    """scripts/smollm2_absorb_site.py's run (`absorb`) on a tiny model: only the site is frozen, then folded by the
    trainer; the folded model computes what the run's last (frozen) checkpoint computes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "smollm2_absorb_site.py"
    spec = importlib.util.spec_from_file_location("smollm2_absorb_site", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    a = script.parse_args(["--out", "x", "--label", "t", "--site", "blocks.1.ln1.v", "--ramp", "2",
                           "--frozen-steps", "3", "--batch-size", "4", "--seq-len", "16", "--probe-every", "2"])
    books = {"persuasion": removal_data(6, seed=1), "cfi": removal_data(6, seed=2)}
    res = script.absorb(make_model(), removal_data(64), books, a, str(tmp_path))
    assert res["outcome"] == "finished" and [r["step"] for r in res["steps"]] == list(range(1, 7))
    assert res["blend_at_end"] == 1.0 and res["folded_vs_frozen_max_logit_diff"] < 1e-4
    frozen, folded = res["heldout"]["finetuned_site_frozen"], res["heldout"]["finetuned_site_folded"]
    for book in books:
        assert folded[book]["all"] == pytest.approx(frozen[book]["all"], abs=2e-4)
