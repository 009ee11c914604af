"""scripts/real_model_report.py: the committed docs/real_model.md is exactly what the script renders from
docs/real_model.json (no hand edits, no stale page), every section is computed, and every headline number
carries a CI. The numbers themselves are computed by the library functions tested elsewhere."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("real_model_report", REPO / "scripts" / "real_model_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_committed_page_is_rendered_from_the_committed_numbers():
    rm = _script()
    numbers = json.loads((REPO / "docs" / "real_model.json").read_text())
    assert set(rm.STAGE_SIZES) <= set(numbers), f"stages missing: {set(rm.STAGE_SIZES) - set(numbers)}"
    command = "PYTHONPATH=src python scripts/real_model_report.py" + rm._flag(numbers["sizes"])
    page = (REPO / "docs" / "real_model.md").read_text()
    assert page == rm.render(numbers, command), "rerun `python scripts/real_model_report.py --render`"
    assert "Partial run" not in page and "not computed" not in page


def test_every_headline_number_has_a_ci():
    numbers = json.loads((REPO / "docs" / "real_model.json").read_text())
    heads = [numbers["dla"]["nmae"], numbers["geometry"]["max_ratio"], numbers["geometry"]["sink_rate"]]
    heads += [numbers["ce"][b]["ce"] for b in ("persuasion", "cfi")]
    for site in ("resid_pre_by_pos", "z"):
        for method in ("atp", "atp*"):
            heads += [numbers["patching"][site][method][k] for k in ("pearson", "spearman", "recall")]
    for r in numbers["entropy_neurons"]["candidates"]:
        heads += [r["dH_total_%"], r["dH_direct_%"], r["ln_mediated_fraction"]]
    for e in heads:
        assert set(e) == {"value", "low", "high", "n"} and e["low"] <= e["value"] <= e["high"] and e["n"] >= 2, e


def test_size_presets_map_back_to_their_flags():
    rm = _script()
    as_dict = lambda s: s.__dict__ | {"layers": list(s.layers)}  # noqa: E731
    assert rm._flag(as_dict(rm.Sizes())) == ""
    assert rm._flag(as_dict(rm.QUICK)) == " --quick" and rm._flag(as_dict(rm.FULL)) == " --full"
    assert "custom" in rm._flag(as_dict(rm.Sizes(n_boot=7)))
    assert set().union(*rm.STAGE_SIZES.values()) == set(rm.Sizes().__dict__)  # every size is read by a stage


def test_massive_activation_neurons_are_flagged_and_kept_out_of_the_verdict():
    import torch

    rm = _script()
    act = torch.full((2, 8, 3), 0.5)
    act[:, 0, 1] = 400.0  # neuron 1: huge on the first token only (an attention-sink writer)
    assert rm._massive(act[..., 1])["massive"] and rm._massive(act[..., 1])["first_token_ratio"] == 800.0
    act[1, 5, 0] = 3.0  # a large activation elsewhere: not massive however small the rest
    assert rm._massive(act[..., 0])["first_token_ratio"] == 0.5 / 3.0
    assert not rm._massive(act[..., 0])["massive"]
    e = lambda v, lo, hi: {"value": v, "low": lo, "high": hi, "n": 8}  # noqa: E731
    big = {"neuron": "L28N1", "dH_total_%": e(47, 30, 70), "dH_direct_%": e(56, 52, 64),
           "ln_mediated_fraction": e(-0.2, -0.8, 0.1), **rm._massive(act[..., 1])}
    small = {"neuron": "L29N0", "dH_total_%": e(-0.3, -0.35, -0.2), "dH_direct_%": e(-0.06, -0.1, -0.02),
             "ln_mediated_fraction": e(0.8, 0.6, 0.9), **rm._massive(act[..., 0])}
    text = rm._finding_entropy({"candidates": [big, small], "rows": [4, 32]})
    assert "L28N1 is a massive-activation neuron" in text
    assert "matches GPT-2" in text and "L29N0, acts mostly through the final norm" in text
