"""Results save and load exactly (issue 20.4): ``result.save(path)`` / ``lnfree.load_result(path)``.

Every result type is built by running its analysis on the tiny zoo models (small sizes), saved, loaded
and compared field by field (tensors: dtype, shape and every element, NaN where NaN; floats ==; nested
results, Estimates, tuples). The list of types is read from the source (every ``@result`` class), so a
new result type without a round trip here fails `test_every_result_type_is_covered`.
"""

import ast
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lnfree
from lnfree.removal import site_costs
import lnfree.paper as P
from lnfree import zoo
from lnfree._codec import CodecError
from lnfree._results import FORMAT_VERSION, Result, load_result, result
from lnfree.report import real_stages
from lnfree.stats import Estimate

SRC = Path(__file__).resolve().parents[1] / "src" / "lnfree"
B = {"n_boot": 20}


def _result_classes_in_source() -> set[str]:
    """Every ``@result``-decorated class in src/lnfree, read with ast (no import needed to find them)."""
    out = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(isinstance(d, ast.Name) and d.id == "result"
                                                      for d in node.decorator_list):
                out.add(node.name)
    return out


@pytest.fixture(scope="module")
def built() -> dict[str, Result]:
    ln, free = zoo.load("tiny-ln"), zoo.load("tiny-lnfree")
    toks = zoo.heldout("persuasion")[:4, :24]
    mask = torch.ones_like(toks)
    mask[1, :5] = 0  # a left-padded row: NaN entries and a `valid` mask in the DLA result
    batch = lnfree.tasks.ioi(ln, 4)
    metric = batch.metric("logit_diff")
    s2 = (batch.clean != batch.corrupt).int().argmax(1)
    act = lnfree.activation_patching(ln, batch.clean, batch.corrupt, metric, site="z", **B)
    atp = lnfree.attribution_patching(ln, batch.clean, batch.corrupt, metric, site="z", method="atp*", **B)
    ents = lnfree.find_entropy_neurons(ln)
    prompts = P.ioi.IOIPrompts(clean=batch.clean[:2], corrupt=batch.corrupt[:2], io_ids=batch.answer[:2],
                               s_ids=batch.wrong[:2], prompts=batch.prompts[:2], answers=(("a", "b"),) * 2, seed=0)
    return {
        "DLAResult": lnfree.direct_logit_attribution(ln, toks, attention_mask=mask, pos="all", **B),
        "DLAComparison": lnfree.compare_dla(ln, free, toks, components="layers", **B),
        "IOIBatch": batch,
        "PatchingResult": act,
        "PatchingError": lnfree.patching_error(atp, act, **B),
        "PatchingComparison": lnfree.compare_patching(ln, free, batch.clean, batch.corrupt, metric, **B),
        "EntropyNeurons": ents,
        "NeuronAblation": lnfree.ablate_neurons(ln, toks, ents.neurons(2), cumulative=True, **B),
        "Calibration": lnfree.calibration(ln, toks, **B),
        "ConfidenceAnalysis": lnfree.confidence_analysis(ln, toks, **B),
        "ConfidenceComparison": lnfree.compare_confidence(ln, free, toks, **B),
        "ResidNorms": lnfree.first_token_norm(ln, toks, **B),
        "SinkRate": lnfree.attention_sink_rate(ln, toks, **B),
        "CEResult": lnfree.cross_entropy(ln, toks, attention_mask=mask, **B),
        "CEComparison": lnfree.compare_cross_entropy(ln, free, toks, **B),
        "PaperCE": P.table1_ce(ln, toks, batch_size=2, **B),
        "PaperDLA": P.paper_dla(ln, toks[:, :12], **B),
        "PaperEntropyAblation": P.entropy_neuron_ablation(ln, toks[:2, :12], neurons=ents.neuron[:2].tolist(), **B),
        "PaperNorms": P.first_token_norm(ln, toks[:2, :12], **B),
        "IOIAtPError": P.ioi_atp_error(ln, prompts.clean, prompts.corrupt, prompts.io_ids, prompts.s_ids,
                                       s2_pos=s2[:2], **B),
        "IOIAtPComparison": P.compare_ioi_atp({"ln": ln, "free": free}, prompts, s2_pos=s2[:2], **B),
        "SiteCosts": site_costs(ln, toks[:2, :12], calib=toks[2:, :12], sites=ln.ln_sites[:3], **B),
        "RealStageResult": real_stages.RealStageResult(
            stage="dla", title="DLA", sizes=real_stages.QUICK.to_dict(), data={"cfi": [2, 32]}, seconds=0.5,
            numbers={"nmae": {"value": 1.5, "low": 1.0, "high": 2.0, "n": 2}, "rows": [2, 16], "mode": "live",
                     "per_layer": [{"layer": 0, "nmae": float("nan")}], "frozen_ce": None, "finite": True},
            model_id="tiny-ln", model_name=ln.cfg.model_name, labels=("nmae", "rows")),
    }


def assert_same(a, b, path="result"):
    """Field-by-field equality: same types, tensors equal element by element (NaN == NaN), floats ==."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        assert bool(same.all()), f"{path}: values differ"
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{path}: {a} vs {b}"
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_every_result_type_is_covered(built):
    """A new @result class fails here until it has a round trip below (and so, save support)."""
    in_source = _result_classes_in_source() - {"Toy"}  # the docstring example of lnfree._results
    assert in_source == set(built), f"not covered: {sorted(in_source - set(built))}; stale: {sorted(set(built) - in_source)}"
    for name, res in built.items():
        assert type(res).__name__ == name and isinstance(res, Result)
    seen, todo = set(), [Result]  # and every Result subclass imported so far (however it was declared)
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("lnfree."):
                seen.add(sub.__name__)
    assert seen <= set(built), f"Result subclasses without a round trip: {sorted(seen - set(built))}"


@pytest.mark.parametrize("name", sorted(_result_classes_in_source() - {"Toy"}))
def test_round_trip_is_exact(built, name, tmp_path):
    res = built[name]
    out = res.save(tmp_path / name)
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "tensors.safetensors"]  # no pickle anywhere
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # not safetensors' 0600
    header = json.loads((out / "result.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert header["version"] == FORMAT_VERSION and header["type"].endswith("." + name)
    back = lnfree.load_result(out)
    assert back is not res
    assert_same(res, back)
    assert repr(back) == repr(res)  # headline methods recomputed from the loaded fields agree too
    assert type(res).load(out).__class__ is type(res)


def test_assert_same_catches_differences(built):
    """The comparison above can fail: a changed element, a NaN vs a number, an int vs a float."""
    dla = built["DLAResult"]
    changed = dla.dla.clone()
    changed[~changed.isnan()] += 1e-7
    with pytest.raises(AssertionError, match="values differ"):
        assert_same(dla, dataclasses.replace(dla, dla=changed))
    with pytest.raises(AssertionError, match="n_boot"):
        assert_same(dla, dataclasses.replace(dla, n_boot=float(dla.n_boot)))
    assert bool(dla.dla.isnan().any()) and dla.valid is not None  # NaNs and a mask are in the round trip


def test_loading_another_type_or_version_is_refused(built, tmp_path):
    ce = built["CEResult"].save(tmp_path / "ce")
    with pytest.raises(ValueError, match="holds a CEResult, not a DLAResult"):
        lnfree.DLAResult.load(ce)
    header = json.loads((ce / "result.json").read_text())
    (ce / "result.json").write_text(json.dumps({**header, "version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1}.*reads 'lnfree.result' version {FORMAT_VERSION}"):
        load_result(ce)
    fields = dict(header["result"]["fields"])
    fields.pop("seed")
    fields["n_nan"] = 0
    (ce / "result.json").write_text(json.dumps({**header, "result": {**header["result"], "fields": fields}}))
    with pytest.raises(ValueError, match=r"other fields.*missing: \['seed'\].*unknown: \['n_nan'\]"):
        load_result(ce)
    (ce / "result.json").write_text(json.dumps({**header, "type": "os.system"}))
    with pytest.raises(ValueError, match="not an lnfree class"):
        load_result(ce)
    with pytest.raises(FileNotFoundError, match="no saved result"):
        load_result(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        built["CEResult"].save(tmp_path / "file")


@result
class _Holder(Result):
    value: object
    labels: tuple = ()


def test_unsupported_fields_are_named(tmp_path):
    import pandas as pd

    with pytest.raises(CodecError, match=r"_Holder\.value\[1\]: cannot save a pandas.*DataFrame"):
        _Holder(value=(1, pd.DataFrame())).save(tmp_path / "x")
    with pytest.raises(ValueError, match="not an lnfree class"):  # a class outside lnfree is never imported
        load_result(_Holder(value=1).save(tmp_path / "y"))


def test_codec_is_generic_over_dataclass_fields(tmp_path, monkeypatch):
    """A field added to Estimate (or any result) round-trips with no change to the codec."""
    import lnfree.stats

    wider = dataclasses.make_dataclass("WiderEstimate", [("n_nan", int, 0), ("clusters", object, None)],
                                       bases=(Estimate,), frozen=True)
    wider.__module__ = "lnfree.stats"
    monkeypatch.setattr(lnfree.stats, "WiderEstimate", wider, raising=False)
    value = {"e": wider(1.0, float("nan"), float("inf"), 3, 0.9, n_nan=2, clusters=(1, 2)), 4: [np.float64(0.5)],
             "t": torch.tensor([True, False]), "h": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}
    res = _Holder(value=value)
    res.save(tmp_path / "w")
    monkeypatch.setattr(_Holder, "__module__", "lnfree._results")  # loadable only as an lnfree class
    monkeypatch.setattr(lnfree._results, "_Holder", _Holder, raising=False)
    res.save(tmp_path / "w")
    back = load_result(tmp_path / "w")
    e = back.value["e"]
    assert type(e) is wider and (e.n_nan, e.clusters, e.n, e.level, e.value) == (2, (1, 2), 3, 0.9, 1.0)
    assert math.isnan(e.low) and e.high == math.inf
    assert back.value[4] == [0.5] and list(back.value) == ["e", 4, "t", "h"]
    assert_same(res.value["t"], back.value["t"])
    assert back.value["h"].dtype == torch.bfloat16 and torch.equal(back.value["h"], value["h"])
