"""Result reprs in Jupyter (issue 23.6): floats to 4 significant digits, never cut mid-word."""

import re

from lnfree._results import Result, result
from lnfree.stats import Estimate


@result
class _Many(Result):
    score: Estimate
    labels: tuple
    model_name: str
    metric_clean: float = -3.6966655254364014
    note: str = "a setting whose text is much longer than the sixty characters a repr shows"
    knobs: tuple = (0.123456789, 2)
    alpha_setting: int = 1
    beta_setting: str = "beta"
    gamma_setting: str = "gamma"
    delta_setting: str = "delta"
    epsilon_setting: str = "epsilon"
    zeta_setting: str = "zeta"


def _many(**kw):
    return _Many(Estimate(1.23456789, 1.0, 2.0, 10), ("a",), "toy (LN)", **kw)


def test_floats_show_four_significant_digits():
    text = repr(_many())
    assert "metric_clean=-3.697" in text and "3.6966" not in text
    assert "knobs=(0.1235, 2)" in text and "score=1.235 [1, 2]" in text
    assert "-3.697" in _many()._repr_html_()


def test_a_long_repr_drops_whole_settings_never_cutting_a_word():
    r = _many()
    text = repr(r)
    assert len(text) <= 240 and text.endswith(", ...)")
    full = [f"{k}={v}" for k, v in {**r._provenance(), **r.headline(), **r.settings()}.items()]
    shown = [k for k in range(1, len(full)) if text == "_Many(" + ", ".join(full[:k] + ["..."]) + ")"]
    assert shown and shown[0] >= 6  # the first parts, each complete "name=value", then "..."
    # a long string setting is cut at a word boundary
    assert "note='a setting whose text is much longer than the sixty...'" in text
    assert not re.search(r"\w\.\.\.\)$", text)
