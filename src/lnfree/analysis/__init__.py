"""The analyses: each is one function returning a `lnfree._results.Result`.

    >>> from lnfree.analysis import direct_logit_attribution, DLAResult
    >>> res = direct_logit_attribution(model, tokens)          # doctest: +SKIP
    >>> isinstance(res, DLAResult)                              # doctest: +SKIP
    True

Modules: `dla` (direct logit attribution, exact direct effect), `patching` (activation patching,
AtP, AtP*), `confidence` (entropy neurons, ablation), `calibration`, `geometry` (first-token norm,
attention sinks). Names are imported lazily, so ``import lnfree.analysis`` stays cheap.
``lnfree.analysis.calibration`` is the module; the function is ``lnfree.calibration`` (or
``lnfree.analysis.calibration.calibration``).
"""

from __future__ import annotations

from lnfree._lazy import lazy_getattr

# name -> the module defining it (a test checks the table against the modules' public names)
_EXPORTS = {
    "direct_logit_attribution": "dla", "compare_dla": "dla", "DLAResult": "dla", "DLAComparison": "dla",
    "activation_patching": "patching", "attribution_patching": "patching", "patching_error": "patching",
    "compare_patching": "patching", "PatchingResult": "patching", "PatchingError": "patching",
    "PatchingComparison": "patching",
    "find_entropy_neurons": "confidence", "ablate_neurons": "confidence", "compare_confidence": "confidence",
    "confidence_analysis": "confidence", "EntropyNeurons": "confidence", "NeuronAblation": "confidence",
    "ConfidenceAnalysis": "confidence", "ConfidenceComparison": "confidence",
    "Calibration": "calibration",  # the function: lnfree.calibration (here `calibration` is its module)
    "first_token_norm": "geometry", "attention_sink_rate": "geometry", "ResidNorms": "geometry",
    "SinkRate": "geometry",
}
_SUBMODULES = ("dla", "patching", "confidence", "calibration", "geometry")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


__getattr__ = lazy_getattr(__name__, _EXPORTS, _SUBMODULES)


def __dir__():
    return __all__
