"""Figure fixes of issue 23.5: the ablation title, one shared colour scale for `reproduce dla`, the DLA title's CI."""

from types import SimpleNamespace

import numpy as np
import torch

import lnfree
from lnfree.paper.dla import paper_dla
from lnfree.paper.reproduce import _dla_figure
from lnfree.report.figures import confidence_figures


def _fake_confidence_report(neurons):
    est = {"value": 1.0, "low": 0.5, "high": 1.5}
    cal = SimpleNamespace(edges=torch.linspace(0, 1, 5), count=torch.tensor([1, 2, 0, 3]),
                          accuracy=torch.tensor([0.1, 0.4, 0.0, 0.9]), ece=SimpleNamespace(value=0.05))
    abl = {"relative_entropy_change_total_%": est, "relative_entropy_change_direct_%": est}
    return SimpleNamespace(models=["a", "b"], numbers={"confidence": {"layer": 3, "neurons": neurons,
                                                                       "a": {"ablation": abl}, "b": {"ablation": abl}}},
                           results={"confidence": {"a": {"calibration": cal}, "b": {"calibration": cal}}})


def test_ablation_title_names_each_neuron_once_and_panel_titles_are_short():
    (fig,) = confidence_figures(_fake_confidence_report(["L3N652", "L3N369"]))
    title = fig.layout.title.text
    assert "L3N652, L3N369" in title and "L3NL3N" not in title
    panels = [a.text for a in fig.layout.annotations]
    assert all(len(t) <= 40 for t in panels), panels  # a long one overflows the figure's left edge
    (old,) = confidence_figures(_fake_confidence_report([652, 369]))  # bare indices from an older report JSON
    assert "L3N652, L3N369" in old.layout.title.text


def test_reproduce_dla_panels_share_one_colour_scale_with_zero_white(model, ln_free_model, tokens):
    res = {"ln": paper_dla(model, tokens, n_boot=50), "free": paper_dla(ln_free_model, tokens, n_boot=50)}
    fig = _dla_figure(res)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}  # one scale for every panel
    ax = fig.layout.coloraxis
    top = max(float(r.per_head.max()) for r in res.values())
    assert ax.cmin == 0 and abs(ax.cmax - top) < 1e-9 and ax.colorscale[0][1].lower() in ("#ffffff", "white")
    free = np.asarray(fig.data[1].z)
    assert free.max() < 1e-3 * top  # the LN-free panel sits at the white end of the shared scale
    # a single result's own heatmap: an all-zero map is white too (zmin 0, zmax above 0)
    own = res["free"].plot().data[0]
    assert own.zmin == 0 and own.zmax > np.asarray(own.z).max() - 1e-12 and own.colorscale[0][1].lower() == "#ffffff"


def test_dla_plot_title_shows_the_reprs_ci(model, tokens):
    res = lnfree.direct_logit_attribution(model, tokens, n_boot=300, seed=1)
    shown = str(res.nmae())
    assert f"nmae={shown}" in repr(res) and str(res.nmae(n_boot=200)) != shown  # the old title's CI differed
    assert f"NMAE {shown}%" in res.plot().layout.title.text
