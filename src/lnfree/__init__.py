"""lnfree: mechanistic interpretability of transformers with and without LayerNorm.

The public API, imported lazily so that `import lnfree` stays fast:

>>> import lnfree
>>> model = lnfree.zoo.load("tiny-ln")                       # doctest: +SKIP
>>> res = lnfree.direct_logit_attribution(model, tokens)     # doctest: +SKIP
"""

from __future__ import annotations

import warnings

from lnfree import _hooks
from lnfree._lazy import lazy_getattr

# TransformerLens 3.9 deprecates HookedTransformer in favour of 4.x's TransformerBridge; this
# package is built on HookedTransformer on purpose (see README), so the warning is noise here.
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
# TransformerLens and transformers import tqdm.auto, which in Jupyter without ipywidgets warns "IProgress not
# found" and then falls back to the plain text bar, which works; lnfree's own bars pick that bar directly.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"

_EXPORTS = {
    "LNFreeTransformer": "lnfree.model",
    "RemovableLayerNorm": "lnfree.layernorm",
    "bootstrap": "lnfree.stats",
    "Estimate": "lnfree.stats",
    "Result": "lnfree._results",
    "load_result": "lnfree._results",
    "TokenBatch": "lnfree._checks",
    "tokenize": "lnfree._checks",
    "load": "lnfree.io.resolve",
    "load_model": "lnfree.io.resolve",
    "save_pretrained": "lnfree.io.save",
    "save_derived": "lnfree.io.save",
    "CheckpointError": "lnfree._errors",
    "HubUnreachableError": "lnfree.io.hf",
    "gpt2_tokenizer": "lnfree.tokenizer",
    "Tokens": "lnfree.tokenizer",
    "direct_logit_attribution": "lnfree.analysis.dla",
    "compare_dla": "lnfree.analysis.dla",
    "DLAResult": "lnfree.analysis.dla",
    "DLAComparison": "lnfree.analysis.dla",
    "activation_patching": "lnfree.analysis.patching",
    "attribution_patching": "lnfree.analysis.patching",
    "patching_error": "lnfree.analysis.patching",
    "compare_patching": "lnfree.analysis.patching",
    "PatchingResult": "lnfree.analysis.patching",
    "PatchingError": "lnfree.analysis.patching",
    "PatchingComparison": "lnfree.analysis.patching",
    "IOIBatch": "lnfree.tasks",
    "find_entropy_neurons": "lnfree.analysis.confidence",
    "ablate_neurons": "lnfree.analysis.confidence",
    "calibration": "lnfree.analysis.calibration",
    "Calibration": "lnfree.analysis.calibration",
    "compare_confidence": "lnfree.analysis.confidence",
    "EntropyNeurons": "lnfree.analysis.confidence",
    "NeuronAblation": "lnfree.analysis.confidence",
    "ConfidenceAnalysis": "lnfree.analysis.confidence",
    "ConfidenceComparison": "lnfree.analysis.confidence",
    "first_token_norm": "lnfree.analysis.geometry",
    "attention_sink_rate": "lnfree.analysis.geometry",
    "ResidNorms": "lnfree.analysis.geometry",
    "SinkRate": "lnfree.analysis.geometry",
    "confidence_analysis": "lnfree.analysis.confidence",
    "compare_cross_entropy": "lnfree.evaluation",
    "CEResult": "lnfree.evaluation",
    "CEComparison": "lnfree.evaluation",
    "remove_layernorm": "lnfree.removal",
    "RemovalSettings": "lnfree.removal",
    "cross_entropy": "lnfree.evaluation",
    "compare_cross_entropy": "lnfree.evaluation",
    "CEResult": "lnfree.evaluation",
    "CEComparison": "lnfree.evaluation",
    "DLAResult": "lnfree.analysis.dla",
    "DLAComparison": "lnfree.analysis.dla",
    "ResidNorms": "lnfree.analysis.geometry",
    "SinkRate": "lnfree.analysis.geometry",
}
_SUBMODULES = {"zoo", "tasks", "analysis", "removal", "stats", "model", "io", "loading", "evaluation", "report",
               "paper"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


# The model class's from_pretrained / save_pretrained are implemented above the model layer (they build and
# read models); the package root wires them in, since it runs before any submodule (see lnfree._hooks).
def _from_pretrained(name_or_path, **kwargs):
    from lnfree.io.resolve import load

    return load(name_or_path, **kwargs)


def _save_pretrained(model, path, **kwargs) -> str:
    from lnfree.io.save import save_pretrained

    return save_pretrained(model, path, **kwargs)


_hooks.register("from_pretrained", _from_pretrained)
_hooks.register("save_pretrained", _save_pretrained)


__getattr__ = lazy_getattr(__name__, _EXPORTS, _SUBMODULES)


def __dir__():
    return __all__
