"""The public surface: result types and analysis functions import from `lnfree` and `lnfree.analysis`,
and `lnfree.report` / `lnfree.analysis` behave like ordinary packages (issue 12).

The lists are discovered from the modules (every `Result` subclass; every public function whose
return annotation is one), so a new analysis that is not exported fails here.
"""

import importlib
import inspect

import pytest

import lnfree
from lnfree._results import Result

MODULES = ["lnfree.analysis.dla", "lnfree.analysis.patching_core", "lnfree.analysis.patching_metrics",
           "lnfree.analysis.act_patching", "lnfree.analysis.atp", "lnfree.analysis.confidence",
           "lnfree.analysis.calibration", "lnfree.analysis.geometry", "lnfree.evaluation"]


def _defined(module, pred):
    return {n: o for n, o in vars(module).items()
            if not n.startswith("_") and pred(o) and getattr(o, "__module__", None) == module.__name__}


def _result_types():
    out = {}
    for name in MODULES:
        out.update(_defined(importlib.import_module(name), lambda o: inspect.isclass(o) and issubclass(o, Result)))
    return out


def _analysis_functions():
    names = set(_result_types())
    out = {}
    for name in MODULES:
        if name.endswith("patching_core"):  # internal helpers (make_result) of the patching modules
            continue
        funcs = _defined(importlib.import_module(name), inspect.isfunction)
        out.update({n: f for n, f in funcs.items() if str(inspect.signature(f).return_annotation) in names})
    return out


def test_discovery_finds_the_known_names():
    assert {"DLAResult", "PatchingResult", "PatchingError", "EntropyNeurons", "NeuronAblation", "Calibration",
            "CEResult", "ResidNorms", "SinkRate", "DLAComparison", "PatchingComparison",
            "ConfidenceComparison", "CEComparison"} <= set(_result_types())
    assert {"direct_logit_attribution", "activation_patching", "attribution_patching", "patching_error",
            "find_entropy_neurons", "ablate_neurons", "calibration", "first_token_norm", "attention_sink_rate",
            "cross_entropy", "compare_dla", "compare_patching", "compare_confidence"} <= set(_analysis_functions())


@pytest.mark.parametrize("kind", ["result types", "analysis functions"])
def test_exported_from_lnfree(kind):
    found = _result_types() if kind == "result types" else _analysis_functions()
    missing = [n for n, obj in found.items() if getattr(lnfree, n, None) is not obj]
    assert not missing, f"{kind} not exported from lnfree: {missing}"
    assert set(found) <= set(dir(lnfree))


def test_analysis_package_exports_every_analysis():
    import lnfree.analysis as analysis
    from lnfree.analysis import DLAResult, direct_logit_attribution  # noqa: F401  (as a user writes it)

    here = {**_result_types(), **_analysis_functions()}
    # `calibration` names the submodule there (the function is lnfree.calibration)
    here = {n: o for n, o in here.items() if o.__module__.startswith("lnfree.analysis") and n != "calibration"}
    missing = [n for n, obj in here.items() if getattr(analysis, n, None) is not obj]
    assert not missing, f"not exported from lnfree.analysis: {missing}"
    for name in analysis.__all__:
        assert getattr(analysis, name) is not None
    assert analysis.patching.activation_patching is lnfree.activation_patching
    assert analysis.calibration.calibration is lnfree.calibration
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        analysis.nope  # noqa: B018


def test_every_lazy_package_routes_and_refuses_through_one_getattr():
    """The five lazy packages share lnfree._lazy.lazy_getattr: tables name modules from the top or relative."""
    from lnfree._lazy import lazy_getattr
    from lnfree.removal.trainer import remove_layernorm
    from lnfree.stats import bootstrap

    get = lazy_getattr("lnfree.removal", {"remove_layernorm": "trainer", "bootstrap": "lnfree.stats"}, ("costs",))
    assert get("remove_layernorm") is remove_layernorm and get("bootstrap") is bootstrap
    assert get("costs") is importlib.import_module("lnfree.removal.costs")
    with pytest.raises(AttributeError, match=r"^module 'lnfree.removal' has no attribute 'sigma'$"):
        get("sigma")  # a submodule not listed is not routed
    for pkg in ("lnfree", "lnfree.analysis", "lnfree.removal", "lnfree.report", "lnfree.zoo"):
        mod = importlib.import_module(pkg)
        assert mod.__getattr__.__qualname__ == "lazy_getattr.<locals>.__getattr__", pkg
        with pytest.raises(AttributeError, match=rf"^module '{pkg}' has no attribute 'nope'$"):
            mod.nope  # noqa: B018


def test_lnfree_exports_resolve():
    for name in lnfree.__all__:
        assert getattr(lnfree, name) is not None, name
    assert lnfree.load is importlib.import_module("lnfree.io.resolve").load
