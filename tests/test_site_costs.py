"""`lnfree.removal.site_costs` and ``lnfree site-costs`` (issue 20.5): the CE cost of freezing each norm site
alone, checked against a brute-force loop (a copy of the model per site, frozen with `freeze_ln`, CE by hand in
float64), padding, the model left as it was, non-finite sites, and the file ``remove-ln --site-order`` reads."""

import copy
import json
import math

import pytest
import torch

import lnfree
from conftest import make_llama
from lnfree.removal import order_by_cost, site_costs


def _rows(n, length, seed):
    return torch.randint(0, 61, (n, length), generator=torch.Generator().manual_seed(seed))


def _nll(model, row: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods of one unpadded row, float64, written out by hand."""
    with torch.no_grad():
        logits = model(row[None])[0, :-1].double()
    return torch.logsumexp(logits, -1) - logits[torch.arange(len(row) - 1), row[1:]]


def _brute_force(model, rows, calib, site) -> float:
    """Freeze `site` alone on a copy of the model; the token-weighted CE change over the rows, each run alone."""
    scales = model.estimate_ln_scales(calib, store=False)
    frozen = copy.deepcopy(model).freeze_ln(site, scales=scales[site])
    delta = sum(float((_nll(frozen, r) - _nll(model, r)).sum()) for r in rows)
    return delta / sum(len(r) - 1 for r in rows)


def test_costs_match_a_brute_force_loop_on_a_llama_like_model():
    model = make_llama()
    tokens, calib = _rows(4, 12, 1), _rows(6, 12, 2)
    before = (model.ln_modes(), model.ln_state())
    res = site_costs(model, tokens, calib=calib, n_boot=50, progress=False)
    assert res.labels == tuple(model.ln_sites) and bool(res.finite.all())
    for site, est in zip(res.labels, res.cost):
        assert est.value == pytest.approx(_brute_force(model, list(tokens), calib, site), abs=1e-5), site
        assert est.low <= est.value <= est.high and est.n == 4
    assert max(abs(e.value) for e in res.cost) > 1e-3  # freezing changes something: the check has teeth
    assert (model.ln_modes(), model.ln_state()) == before  # the model is left as it was
    assert res.costs() == {s: e.value for s, e in zip(res.labels, res.cost)}
    assert res.order() == sorted(res.labels, key=lambda s: res.costs()[s])
    assert res.max_cost().value == max(res.costs().values())
    top = res.top(2)
    assert list(top["site"]) == res.order()[::-1][:2] and list(top.columns) == list(res.to_frame().columns)
    assert res.plot().layout.yaxis.title.text.startswith("CE frozen - live")
    assert repr(res).startswith("SiteCosts(") and "max_cost=" in repr(res) and "<table" in res._repr_html_()


def test_padded_rows_cost_what_they_cost_alone():
    model = make_llama(seed=1)
    calib = _rows(4, 12, 3)
    rows = [_rows(1, 12, 4)[0], _rows(1, 7, 5)[0]]
    tokens = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    tokens[0], mask[0] = rows[0], 1
    tokens[1, 5:], mask[1, 5:] = rows[1], 1  # left-padded
    sites = ["blocks.1.ln1.v", "ln_final"]
    res = site_costs(model, tokens, attention_mask=mask, calib=calib, sites=sites, n_boot=20, progress=False)
    assert res.labels == tuple(sites)
    for site, est in zip(sites, res.cost):
        assert est.value == pytest.approx(_brute_force(model, rows, calib, site), abs=1e-5)
    with pytest.raises(ValueError, match="tokens are padded.*pass calib="):
        site_costs(model, tokens, attention_mask=mask, progress=False)


def test_a_site_that_overflows_has_no_cost_and_sorts_last(monkeypatch):
    model = make_llama()
    tokens = _rows(3, 10, 6)
    estimate = model.estimate_ln_scales

    def tiny_scale_for_ln2_of_block_0(*args, **kwargs):  # x / 1e-38 overflows float32
        return {**estimate(*args, **kwargs), "blocks.0.ln2": 1e-38}

    monkeypatch.setattr(model, "estimate_ln_scales", tiny_scale_for_ln2_of_block_0)
    res = site_costs(model, tokens, n_boot=20, progress=False)
    i = res.labels.index("blocks.0.ln2")
    assert not bool(res.finite[i]) and bool(res.finite.sum() == len(res.labels) - 1)
    assert res.costs()["blocks.0.ln2"] is None and math.isnan(res.cost[i].value)
    assert res.order()[-1] == "blocks.0.ln2" and res.top(1)["site"].item() == "blocks.0.ln2"
    assert math.isfinite(res.max_cost().value)


def test_bad_sites_are_refused_by_name():
    model = make_llama()
    tokens = _rows(2, 8, 7)
    with pytest.raises(ValueError, match="unknown sites \\['blocks.9.ln2'\\]"):
        site_costs(model, tokens, sites=["blocks.9.ln2"], progress=False)
    model.estimate_ln_scales(tokens)
    model.freeze_ln("ln_final")
    with pytest.raises(ValueError, match="not live.*frozen"):
        site_costs(model, tokens, sites=["ln_final"], progress=False)
    assert "ln_final" not in site_costs(model, tokens, n_boot=10, progress=False).labels  # default: live sites only


def test_cli_writes_the_file_remove_ln_site_order_reads(tmp_path, capsys):
    import numpy as np

    from lnfree import zoo
    from lnfree.cli import main
    from lnfree.removal.cli import schedule_from_order_file

    model = zoo.load("tiny-ln")
    np.save(tmp_path / "rows.npy", zoo.heldout("persuasion")[:6, :16].numpy())
    out = tmp_path / "costs.json"
    args = ["site-costs", "tiny-ln", "--data", str(tmp_path / "rows.npy"), "--rows", "2", "--calib-rows", "4",
            "--n-boot", "20", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    costs = json.loads(out.read_text())
    rows = zoo.heldout("persuasion")[:6, :16]
    lib = site_costs(model, rows[:2], calib=rows[2:], n_boot=20, progress=False).costs()
    assert costs == pytest.approx(lib, abs=1e-12) and list(costs) == model.ln_sites
    assert "live CE" in capsys.readouterr().out
    sched = schedule_from_order_file(str(out), model.cfg.n_layers, steps=len(costs) + 2, start=1, gap=1)
    assert sched.sites == order_by_cost(costs)
    assert main(args[:-2] + ["--rows", "5", "--out", str(tmp_path / "x.json")]) == 2  # 5 + 4 rows > 6
    assert "need 9" in capsys.readouterr().err


def test_positional_costs_equal_a_brute_force_positional_freeze():
    """positional=1 freezes each site at its positional scale: the same CE as freezing it by hand at that scale."""
    m = make_llama()
    g = torch.Generator().manual_seed(5)
    rows = torch.randint(1, m.cfg.d_vocab, (8, 10), generator=g)
    rows[:, 0] = 0
    res = site_costs(m, rows[:4], calib=rows[4:], positional=1, n_boot=20, progress=False)
    scales = m.estimate_ln_scales(rows[4:], positional=1, store=False)
    base = float(lnfree.cross_entropy(m, rows[:4], n_boot=20).mean)
    for site in m.ln_sites[:4]:
        assert isinstance(res.scales[site], tuple) and len(res.scales[site]) == 2
        with m.ln_frozen(site, scales=scales[site]):
            expected = float(lnfree.cross_entropy(m, rows[:4], n_boot=20).mean) - base
        assert res.costs()[site] == pytest.approx(expected, abs=1e-9)
