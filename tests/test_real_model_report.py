"""``lnfree report smollm2-135m`` (`lnfree.report.real_stages`, `lnfree.report.real_page`): the committed
docs/real_model.md is exactly what `render` writes from docs/real_model.json (no hand edits, no stale page),
every section is computed, every headline number carries a CI; the stages run on a tiny model, each stage's
result saves and loads exactly, ``--resume`` loads exactly the stages whose sizes are unchanged (recomputing
nothing on a second run), and the command writes page == render(JSON). The numbers
themselves are computed by the library functions tested elsewhere."""

import dataclasses
import json
from pathlib import Path

import pytest

from lnfree.report import real_stages as rs
from lnfree.report.real_page import _finding_entropy, command_for, render

REPO = Path(__file__).resolve().parents[1]


def test_committed_page_is_rendered_from_the_committed_numbers():
    numbers = json.loads((REPO / "docs" / "real_model.json").read_text())
    assert set(rs.REAL_STAGES) <= set(numbers), f"stages missing: {set(rs.REAL_STAGES) - set(numbers)}"
    page = (REPO / "docs" / "real_model.md").read_text()
    assert page == render(numbers), "rerun `lnfree report smollm2-135m --render`"
    assert "Partial run" not in page and "not computed" not in page
    assert "```bash\nlnfree report smollm2-135m\n```" in page  # the committed sizes are the default preset


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
    assert command_for(rs.DEFAULT.to_dict()) == "lnfree report smollm2-135m"
    assert command_for(rs.QUICK.to_dict()).endswith(" --quick") and command_for(rs.FULL.to_dict()).endswith(" --full")
    assert "custom" in command_for(rs.RealSizes(n_boot=7).to_dict())
    every_size = {f.name for f in dataclasses.fields(rs.RealSizes)}
    assert set().union(*(s.sizes for s in rs.REAL_STAGES.values())) == every_size  # every size is read by a stage


def test_massive_activation_neurons_are_flagged_and_kept_out_of_the_verdict():
    import torch

    act = torch.full((2, 8, 3), 0.5)
    act[:, 0, 1] = 400.0  # neuron 1: huge on the first token only (an attention-sink writer)
    assert rs.massive(act[..., 1])["massive"] and rs.massive(act[..., 1])["first_token_ratio"] == 800.0
    act[1, 5, 0] = 3.0  # a large activation elsewhere: not massive however small the rest
    assert rs.massive(act[..., 0])["first_token_ratio"] == 0.5 / 3.0
    assert not rs.massive(act[..., 0])["massive"]
    e = lambda v, lo, hi: {"value": v, "low": lo, "high": hi, "n": 8}  # noqa: E731
    big = {"neuron": "L28N1", "dH_total_%": e(47, 30, 70), "dH_direct_%": e(56, 52, 64),
           "ln_mediated_fraction": e(-0.2, -0.8, 0.1), **rs.massive(act[..., 1])}
    small = {"neuron": "L29N0", "dH_total_%": e(-0.3, -0.35, -0.2), "dH_direct_%": e(-0.06, -0.1, -0.02),
             "ln_mediated_fraction": e(0.8, 0.6, 0.9), **rs.massive(act[..., 0])}
    text = _finding_entropy({"candidates": [big, small], "rows": [4, 32]})
    assert "L28N1 is a massive-activation neuron" in text
    assert "in line with GPT-2" in text and "for one neuron" in text and "L29N0, acts mostly through the final norm" in text
    assert "matches GPT-2" not in text  # one neuron on 4 x 32 tokens is no match (issue 22.6)


# ---- the stages on a tiny model --------------------------------------------------------------------------
TINY = rs.RealSizes(ce_rows=2, calib_rows=2, seq_len=16, dla_rows=2, dla_len=8, conf_rows=2, conf_len=8,
                    geom_rows=2, ioi_prompts=2, layers=(3,), per_layer=1, n_boot=20)


@pytest.fixture(scope="module")
def tiny():
    from lnfree import zoo

    model = zoo.load("tiny-ln")
    return model, {b: zoo.heldout(b, model=model, seq_len=TINY.seq_len) for b in rs.BOOKS}


def test_stages_run_on_a_tiny_model_and_leave_it_as_it_was(tiny):
    model, books = tiny
    state = model.ln_state()
    numbers = rs.run_real_report(model, books, TINY, name="tiny-ln", progress=False)
    assert model.ln_state() == state  # the frozen-norm CE freezes for the call only
    assert numbers["sizes"] == TINY.to_dict() and numbers["data"] == {b: list(t.shape) for b, t in books.items()}
    ce = numbers["ce"]["persuasion"]
    assert ce["rows"] == [2, 16] and ce["frozen_gap"]["value"] == pytest.approx(
        ce["frozen_ce"]["value"] - ce["ce"]["value"], abs=1e-9)  # equal rows: the paired gap = difference of means
    assert numbers["dla"]["rows"] == [2, 8] and len(numbers["dla"]["per_layer"]) == model.cfg.n_layers
    assert [c["neuron"][:2] for c in numbers["entropy_neurons"]["candidates"]] == ["L3"]
    assert numbers["patching"]["n_prompts"] == 2 and numbers["geometry"]["rows"] == [2, 16]
    page = render(json.loads(json.dumps(numbers)))
    assert "not computed" not in page and "# custom sizes" in page


def _count_stage_runs(monkeypatch) -> list:
    ran = []
    for name, stage in list(rs.REAL_STAGES.items()):  # record which stages run again
        monkeypatch.setitem(rs.REAL_STAGES, name, dataclasses.replace(
            stage, run=lambda ctx, name=name, run=stage.run: ran.append(name) or run(ctx)))
    return ran


def test_resume_reuses_exactly_the_stages_whose_sizes_are_unchanged(tiny, tmp_path, monkeypatch):
    model, books = tiny
    saved = tmp_path / "real_model_results"
    first = rs.run_real_report(model, books, TINY, progress=False, saved=saved)
    ran = _count_stage_runs(monkeypatch)
    again = rs.run_real_report(model, books, TINY, progress=False, saved=saved, resume=True)
    assert ran == [] and all(again[k] == first[k] for k in rs.REAL_STAGES)
    rs.run_real_report(model, books, dataclasses.replace(TINY, ioi_prompts=3), progress=False, saved=saved,
                       resume=True)
    assert ran == ["patching"]  # only the stage that reads ioi_prompts
    rs.run_real_report(model, books, TINY, progress=False, saved=saved)  # no resume: every stage again
    assert ran == ["patching"] + list(rs.REAL_STAGES)


def test_stage_results_save_and_load_exactly(tiny, tmp_path):
    """Each stage's result is saved with `Result.save` and read back by `lnfree.load_result`, every field equal."""
    import lnfree

    model, books = tiny
    numbers = rs.run_real_report(model, books, TINY, progress=False, saved=tmp_path)
    for name in rs.REAL_STAGES:
        back = lnfree.load_result(tmp_path / name)
        assert isinstance(back, rs.RealStageResult) and back.stage == name and back.numbers == numbers[name]
        assert back.sizes == TINY.to_dict() and back.model_name == numbers["model_label"]
        assert json.dumps(back.numbers) == json.dumps(numbers[name])  # the same JSON, key order included
    dla = lnfree.load_result(tmp_path / "dla")
    assert dla.estimates()["nmae"].value == numbers["dla"]["nmae"]["value"]
    assert "nmae" in set(dla.to_frame()["key"]) and len(dla.plot().data) == 1


def test_the_command_writes_page_equal_to_render_of_its_json(tiny, tmp_path, monkeypatch):
    """`lnfree report` end to end (the real model swapped for tiny-ln and the quick sizes for TINY), --render."""
    from lnfree import zoo
    from lnfree.cli import main
    from lnfree.report import cli as report_cli

    monkeypatch.setattr(report_cli, "load_any", lambda spec, device=None: zoo.load("tiny-ln"))
    monkeypatch.setattr(rs, "QUICK", TINY)
    out = tmp_path / "page.md"
    assert main(["report", "smollm2-135m", "--quick", "--no-progress", "--out", str(out)]) == 0
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert out.read_text() == render(numbers) and numbers["sizes"] == TINY.to_dict()
    assert sorted(p.name for p in (tmp_path / "page_results").iterdir()) == sorted(rs.REAL_STAGES)
    out.write_text("stale")
    assert main(["report", "smollm2-135m", "--render", "--out", str(out)]) == 0
    assert out.read_text() == render(numbers)
    assert main(["report", "smollm2-135m", "--render-partial", "--out", str(tmp_path / "other.md")]) == 2  # none saved


def test_the_command_with_resume_recomputes_nothing(tiny, tmp_path, monkeypatch):
    """A second `lnfree report --resume` loads every stage's saved result: no stage runs, the same page and JSON."""
    from lnfree import zoo
    from lnfree.cli import main
    from lnfree.report import cli as report_cli

    monkeypatch.setattr(report_cli, "load_any", lambda spec, device=None: zoo.load("tiny-ln"))
    monkeypatch.setattr(rs, "QUICK", TINY)
    out = tmp_path / "page.md"
    argv = ["report", "smollm2-135m", "--quick", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    page, numbers = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    ran = _count_stage_runs(monkeypatch)
    out.unlink()
    assert main(argv + ["--resume"]) == 0
    assert ran == [] and out.read_text() == page
    again = json.loads(out.with_suffix(".json").read_text())
    assert {k: v for k, v in again.items() if k != "machine"} == {k: v for k, v in numbers.items() if k != "machine"}
    # an interrupted run: the page from the stages it saved, the others marked missing
    for name in ("patching", "geometry"):
        for f in (tmp_path / "page_results" / name).iterdir():
            f.unlink()
        (tmp_path / "page_results" / name).rmdir()
    assert main(["report", "smollm2-135m", "--quick", "--render-partial", "--out", str(out)]) == 0
    assert "Partial run: patching, geometry not computed yet" in out.read_text()
    assert main(argv + ["--resume"]) == 0
    final = json.loads(out.with_suffix(".json").read_text())
    assert ran == ["patching", "geometry"] and all(final[k] == numbers[k] for k in rs.REAL_STAGES)  # times differ
