"""Schedule.from_order / order_by_cost (explicit site orders, e.g. one site per step cheapest first), checked
against brute force, and used by the trainer and the CLI."""

import json
import math
import random
from fractions import Fraction

import pytest
import torch

from conftest import make_model
from lnfree.removal import Schedule, order_by_cost, remove_layernorm
from lnfree.removal.schedule import ordered_sites


def _brute_steps(order, start, gaps):
    """Removal step of each site by walking the order and adding each gap."""
    out, step = {}, start
    for k, site in enumerate(order):
        if k:
            step += gaps[k - 1]
        out[site] = step
    return out


def _round_half_up(q: Fraction) -> int:
    return math.floor(q + Fraction(1, 2))


@pytest.mark.parametrize("n_layers", [1, 2, 5])
def test_from_order_matches_brute_force(n_layers):
    rng = random.Random(n_layers)
    for trial in range(20):
        order = ordered_sites(n_layers)
        rng.shuffle(order)
        start = rng.randint(1, 5)
        gaps = [rng.randint(0, 3) for _ in range(len(order) - 1)]
        expected = _brute_steps(order, start, gaps)
        steps = max(expected.values()) + rng.randint(1, 4)
        s = Schedule.from_order(n_layers, steps, order, start=start, gap=gaps)
        assert s.sites == order  # the listed (removal) order is the order given
        assert {x: s.removal_step(x) for x in order} == expected
        for step in range(steps):  # queries agree with the per-site steps
            assert s.frozen_sites(step) == [x for x in order if expected[x] <= step]
            assert s.sites_removed_at(step) == [x for x in order if expected[x] == step]
        # one int gap == that gap repeated
        g = rng.randint(0, 2)
        same = Schedule.from_order(n_layers, start + g * len(order) + 1, order, start=start, gap=g)
        assert same.removal_steps == Schedule.from_order(n_layers, start + g * len(order) + 1, order, start=start,
                                                         gap=[g] * (len(order) - 1)).removal_steps


def test_from_order_end_spreads_evenly():
    for n_layers, start, end in ((1, 1, 7), (2, 3, 40), (30, 20, 300), (30, 5, 60)):
        order = ordered_sites(n_layers)[::-1]
        s = Schedule.from_order(n_layers, end + 1, order, start=start, end=end)
        n = len(order)
        for k, site in enumerate(order):  # exact rational arithmetic, rounded half up
            assert s.removal_step(site) == start + _round_half_up(Fraction(k * (end - start), n - 1))
        assert s.removal_step(order[0]) == start and s.removal_step(order[-1]) == end


def test_from_order_default_is_one_site_per_step_and_round_trips():
    order = ordered_sites(2)[::-1]
    s = Schedule.from_order(2, 20, order, start=3)
    assert [s.removal_step(x) for x in order] == list(range(3, 3 + len(order)))
    back = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.sites == order
    assert s.describe(4) == "ln2 0/2, ln1-qk 0/2, ln1-v 1/2, ln_final 1/1"


def test_from_order_validation():
    order = ordered_sites(2)
    with pytest.raises(ValueError, match="missing"):
        Schedule.from_order(2, 20, order[:-1])
    with pytest.raises(ValueError, match="repeated"):
        Schedule.from_order(2, 20, order[:-1] + order[:1])
    with pytest.raises(ValueError, match="unexpected"):
        Schedule.from_order(2, 20, order[:-1] + ["blocks.5.ln2"])
    with pytest.raises(ValueError, match="one per site after the first"):
        Schedule.from_order(2, 20, order, gap=[1, 2])
    with pytest.raises(ValueError, match="gap must be >= 0"):
        Schedule.from_order(2, 20, order, gap=[1] * 3 + [-1] + [1] * 2)
    with pytest.raises(ValueError, match="not both"):
        Schedule.from_order(2, 20, order, gap=1, end=10)
    with pytest.raises(ValueError, match="outside the run"):
        Schedule.from_order(2, 7, order, start=1, gap=1)  # 7th site at step 7 of a 7-step run
    with pytest.raises(ValueError, match="start must be >= 1"):
        Schedule.from_order(2, 20, order, start=0)
    with pytest.raises(TypeError, match="sequence of site names"):
        Schedule.from_order(2, 20, "blocks.0.ln2")
    with pytest.raises(ValueError, match="gap must be an int"):
        Schedule.from_order(2, 20, order, gap=True)
    with pytest.raises(ValueError, match="non-decreasing"):  # a hand-built schedule listing steps out of order
        Schedule(1, 10, (("ln_final", 5), ("blocks.0.ln2", 2), ("blocks.0.ln1.qk", 6), ("blocks.0.ln1.v", 7)))


def test_order_by_cost_matches_brute_force():
    rng = random.Random(0)
    sites = ordered_sites(4)
    for _ in range(30):
        costs = {}
        for s in sites:
            r = rng.random()
            costs[s] = None if r < 0.1 else (math.inf if r < 0.15 else (math.nan if r < 0.2 else round(rng.random(), 1)))
        got = order_by_cost(costs)
        finite = [s for s in sites if costs[s] is not None and math.isfinite(costs[s])]
        bad = [s for s in sites if s not in finite]
        # brute force: repeatedly take the cheapest remaining finite site (first in the dict on ties)
        expect, left = [], list(finite)
        while left:
            best = min(left, key=lambda s: costs[s])
            expect.append(best)
            left.remove(best)
        assert got == expect + bad
    with pytest.raises(TypeError, match="mapping"):
        order_by_cost(["blocks.0.ln2"])
    with pytest.raises(TypeError, match="number or None"):
        order_by_cost({"blocks.0.ln2": "cheap"})


def test_trainer_freezes_in_the_given_order():
    """A reversed order (ln_final first, one site per step from step 1) is what the run does."""
    torch.manual_seed(0)
    model = make_model()
    order = ordered_sites(2)[::-1]
    sched = Schedule.from_order(2, 12, order, start=1, gap=1)
    data = torch.randint(0, 61, (48, 16), generator=torch.Generator().manual_seed(5))
    events = []
    out = remove_layernorm(model, data, schedule=sched, batch_size=4, micro_batch_size=2, seq_len=16, lr=3e-3,
                           warmup=2, checkpoint_every=4, progress=False, callback=events.append)
    freezes = [(e["step"], list(e["sigma"])) for e in events if e["event"] == "freeze"]
    assert freezes == [(k + 1, [site]) for k, site in enumerate(order)]
    assert out.is_ln_free and torch.isfinite(out(data[:2])).all()


def test_cli_site_order_file(tmp_path, capsys):
    """`lnfree remove-ln --site-order costs.json`: a dict site -> cost is frozen cheapest first, one per step."""
    import numpy as np

    from lnfree import zoo
    from lnfree.cli import main

    model = zoo.load("tiny-ln")
    sites = model.ln_sites
    costs = {s: float(len(sites) - i) for i, s in enumerate(sites)}  # reversed: the last site is cheapest
    costs[sites[-1]] = None  # non-finite alone: frozen last
    (tmp_path / "costs.json").write_text(json.dumps(costs))
    np.save(tmp_path / "rows.npy", zoo.heldout("persuasion")[:24, :32].numpy())
    steps = len(sites) + 2
    args = ["remove-ln", "tiny-ln", "--data", str(tmp_path / "rows.npy"), "--out", str(tmp_path / "run"),
            "--steps", str(steps), "--batch-size", "2", "--eval-seqs", "0", "--device", "cpu", "--no-progress",
            "--site-order", str(tmp_path / "costs.json"), "--site-start", "1"]
    assert main(args) == 0
    sched = Schedule.from_dict(json.loads((tmp_path / "run" / "summary.json").read_text())["schedule"])
    assert sched.sites == sites[-2::-1] + [sites[-1]]
    assert [sched.removal_step(s) for s in sched.sites] == list(range(1, len(sites) + 1))
    # bad combinations are one-line errors (exit 2) naming the flag, before anything is trained
    fresh = ["--out", str(tmp_path / "r2")]
    for extra, message in ((["--site-gap", "-1"], "--site-gap must be an integer >= 0"),
                           (["--preset", "gpt2-small"], "--site-order and --preset"),
                           (["--site-order", str(tmp_path / "nope.json")], "no such file")):
        capsys.readouterr()
        assert main(args + fresh + extra) == 2
        assert message in capsys.readouterr().err
    capsys.readouterr()
    assert main([a for a in args if a not in ("--steps", str(steps))] + fresh) == 2
    assert "--site-order needs --steps" in capsys.readouterr().err
