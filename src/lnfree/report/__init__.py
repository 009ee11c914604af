"""The LN vs LN-free report: every analysis on a set of models, as one self-contained HTML page + JSON.

    >>> from lnfree import report, zoo
    >>> models = {n: zoo.load(n) for n in ("tiny-ln", "tiny-lnfree")}                    # doctest: +SKIP
    >>> rd = report.build_report(models, {"persuasion": zoo.heldout("persuasion")},
    ...                          "out/mine", quick=True)                                 # doctest: +SKIP
    >>> rd.summary()                                                                    # doctest: +SKIP

Modules: `pipeline` (run_report, write_report, build_report, Sizes, ReportData), `stages` (the stage
registry: one `Stage` per section), `figures` (one figure function per stage), `html` (the page),
`saved` (every result object saved and loaded exactly, `Result.save` / `lnfree.load_result`), `cli`
(``lnfree demo``, ``compare``, ``reproduce``). Names are imported lazily.
"""

from __future__ import annotations

from lnfree._lazy import lazy_getattr

_EXPORTS = {
    "run_report": "lnfree.report.pipeline",
    "write_report": "lnfree.report.pipeline",
    "build_report": "lnfree.report.pipeline",
    "build_html": "lnfree.report.pipeline",
    "format_summary": "lnfree.report.pipeline",
    "ReportData": "lnfree.report.pipeline",
    "Sizes": "lnfree.report.pipeline",
    "FULL": "lnfree.report.pipeline",
    "QUICK": "lnfree.report.pipeline",
    "STAGES": "lnfree.report.stages",
    "Stage": "lnfree.report.stages",
    "Report": "lnfree.report.html",
    "save_results": "lnfree.report.saved",
    "load_results": "lnfree.report.saved",
}
_SUBMODULES = {"pipeline", "stages", "figures", "html", "cli", "saved"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


__getattr__ = lazy_getattr(__name__, _EXPORTS, _SUBMODULES)


def __dir__():
    return __all__
