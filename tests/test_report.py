"""The report pipeline and its commands (`lnfree demo`, `compare`, `reproduce`).

Numbers in the report's JSON are checked against independent computations from the models' own
forward passes (CE, calibration, sink rate, first-token norm, one activation patch) and against the
library functions called directly. `lnfree demo` runs end to end on a tiny exported family (always)
and on the packaged zoo (slow; fails, like tests/test_zoo.py, when the zoo's data is missing).
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model

from lnfree import tasks, zoo
from lnfree.cli import main
from lnfree.report.pipeline import FULL, QUICK, ReportData, Sizes, run_report, write_report

REPO = Path(__file__).resolve().parents[1]
SMALL = Sizes(ce_seqs=6, ce_len=12, dla_seqs=6, dla_len=12, ioi_prompts=4, conf_seqs=6, conf_len=12,
              geom_seqs=6, geom_len=12, n_boot=100, batch_size=4)


# ---- independent references ------------------------------------------------------------------
def brute_ce(model, tokens):
    with torch.no_grad():
        logp = model(tokens).double().log_softmax(-1)
    return float(-logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].mean(-1).mean())


def brute_sink_rate(model, tokens, threshold=0.3):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    attn = torch.stack([cache["pattern", l][:, :, 1:, 0].double().mean((0, 2)) for l in range(model.cfg.n_layers)])
    return float((attn >= threshold).double().mean()), attn


def brute_first_token_ratio(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre") or n.endswith("resid_post"))
    L = model.cfg.n_layers
    acts = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)] + [cache[f"blocks.{L - 1}.hook_resid_post"]]
    norms = [a.double().norm(dim=-1) for a in acts]
    return [float(n[:, 0].mean() / n[:, 1:].mean(1).mean()) for n in norms]


def brute_calibration(model, tokens, n_bins=15):
    with torch.no_grad():
        logits = model(tokens)[:, :-1].double()
    p = logits.softmax(-1)
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean(-1).mean())
    conf, pred = p.max(-1)
    correct = (pred == tokens[:, 1:]).double()
    conf, correct = conf.flatten().numpy(), correct.flatten().numpy()
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        ece += abs(correct[sel].sum() - conf[sel].sum())
    return entropy, ece / conf.size


def brute_head_patch(model, batch, metric, layer, head):
    """Denoising patch of one head's z (all positions): mean metric patched - mean metric corrupted."""
    with torch.no_grad():
        _, clean = model.run_with_cache(batch.clean, names_filter=f"blocks.{layer}.attn.hook_z")
        src = clean[f"blocks.{layer}.attn.hook_z"]

        def patch(z, hook):
            z = z.clone()
            z[:, :, head] = src[:, :, head]
            return z

        patched = model.run_with_hooks(batch.corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
        return float(metric(patched).mean() - metric(model(batch.corrupt)).mean())


def fake_ioi(n, d_vocab, pos=10, seed=0):
    """An IOI-shaped batch of random tokens for models without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2], corrupt[:, 4] = clean[:, 4], clean[:, 2]
    ans, wrong = clean[:, 2].clone(), clean[:, 4].clone()
    s = tuple(str(i) for i in range(n))
    return tasks.IOIBatch(clean=clean, corrupt=corrupt, answer=ans, wrong=wrong, prompts=s, corrupt_prompts=s,
                          io_names=s, s_names=s, places=s, objects=s)


# ---- run_report on tiny random models ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_report():
    g = torch.Generator().manual_seed(1)
    data = {"a": torch.randint(0, 61, (6, 12), generator=g), "b": torch.randint(0, 61, (5, 12), generator=g)}
    ln = make_model()
    free = make_model()
    free.estimate_ln_scales(data["a"])
    free.remove_ln()
    other = make_model(seed=3)
    models = {"ln": ln, "free": free, "other": other}
    ioi = fake_ioi(4, 61)
    rd = run_report(models, data, baseline="ln", sizes=SMALL, progress=False, ioi=ioi)
    return rd, models, data, ioi


def test_report_numbers_match_independent_computations(tiny_report):
    rd, models, data, ioi = tiny_report
    n = rd.numbers
    assert rd.stages == ("ce", "dla", "atp", "confidence", "first_token_norm", "sink_rate") and not rd.notes.get("atp")
    for d, toks in data.items():
        for m, model in models.items():
            assert n["ce"][d][m]["ce"]["value"] == pytest.approx(brute_ce(model, toks[:6, :12]), abs=1e-5)
        gap = n["ce"][d]["other"]["gap_to_baseline"]
        assert gap["value"] == pytest.approx(brute_ce(models["other"], toks) - brute_ce(models["ln"], toks), abs=1e-5)
        assert gap["low"] <= gap["value"] <= gap["high"]
    toks = data["a"]
    for m, model in models.items():
        rate, attn = brute_sink_rate(model, toks)
        assert n["sink_rate"][m]["rate"] == pytest.approx(rate)
        assert np.allclose(n["sink_rate"][m]["attention_to_first"], attn.numpy(), atol=1e-6)
        ratios = [e["value"] for e in n["first_token_norm"][m]["ratio"]]
        assert np.allclose(ratios, brute_first_token_ratio(model, toks), rtol=1e-4)
        entropy, ece = brute_calibration(model, toks)
        cal = n["confidence"][m]["calibration"]
        assert cal["mean_entropy"]["value"] == pytest.approx(entropy, rel=1e-4)
        assert cal["ece"]["value"] == pytest.approx(ece, abs=1e-5)


def test_report_dla_exact_only_without_ln(tiny_report):
    from lnfree.analysis.dla import direct_logit_attribution

    rd, models, data, _ = tiny_report
    n = rd.numbers["dla"]
    assert n["free"]["nmae"]["value"] < 1e-4 and n["free"]["max_abs_error"] < 1e-4
    assert n["ln"]["nmae"]["value"] > 1.0  # live LN: DLA is only a linearisation
    direct = direct_logit_attribution(models["ln"], data["a"][:6, :12], components="heads").nmae(n_boot=100)
    assert n["ln"]["nmae"]["value"] == pytest.approx(direct.value)
    assert n["ln"]["nmae"]["low"] == pytest.approx(direct.low)
    assert [r["group"] for r in n["ln"]["per_layer"]] == ["0", "1"]


def test_report_patching_matches_brute_force_patch(tiny_report):
    rd, models, _, ioi = tiny_report
    n, res = rd.numbers["atp"], rd.results["atp"]
    assert n["metric"] in ("normalized_logit_diff", "logit_diff")
    kind = n["metric"]
    for m, model in models.items():
        metric = tasks.make_metric(ioi, kind, model if kind != "logit_diff" else None)
        act = res[m].act.scores
        assert act.shape == (2, 4)
        assert float(act[1, 2]) == pytest.approx(brute_head_patch(model, ioi, metric, 1, 2), abs=1e-4)
        # the paper's per-layer error: mean over prompts of each prompt's sum over the layer's heads
        err = (res[m].atp.per_prompt - res[m].act.per_prompt).abs().sum(-1).mean(0)
        assert np.allclose(n[m]["per_layer_error"], err.numpy(), atol=1e-6)
        imp = np.array(n["ln"]["per_layer_error"]) - np.array(n[m]["per_layer_error"])
        assert np.allclose(n[m]["improvement_vs_baseline"]["per_layer"], imp)


def test_report_entropy_neurons_have_no_ln_pathway_without_ln(tiny_report):
    rd, models, _, _ = tiny_report
    n = rd.numbers["confidence"]
    assert n["neurons_from"] == "ln" and len(n["neurons"]) == 3
    a = n["free"]["ablation"]
    assert a["entropy_change_total"]["value"] == pytest.approx(a["entropy_change_direct"]["value"])
    assert rd.results["confidence"]["free"]["ablation"].references() == n["neurons"]  # labels "L1N114": layer kept


def test_write_report_self_contained_html_and_json(tiny_report, tmp_path):
    rd = tiny_report[0]
    html_path, json_path = write_report(rd, tmp_path / "out")
    page = html_path.read_text()
    assert page.count('class="figure"') == 8  # ce 1, dla 2, atp 2, confidence 1, first token 1, sinks 1
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1  # plotly.js inlined once
    rest = page.replace(get_plotlyjs(), "")
    assert "src=" not in rest and "http" not in rest.replace("http://www.w3.org", "")  # nothing to fetch
    data = json.loads(json_path.read_text())
    assert data["models"] == ["ln", "free", "other"] and data["baseline"] == "ln"
    assert data["results"]["dla"]["free"]["nmae"]["value"] == rd.numbers["dla"]["free"]["nmae"]["value"]
    assert [r["model"] for r in data["summary"]] == ["ln", "free", "other"]
    assert set(data["timings_s"]) == set(rd.stages)


def test_write_report_saves_every_result_exactly(tiny_report, tmp_path):
    """write_report saves each result object (Result.save); load_results gives them back, every field equal."""
    from test_result_io import assert_same

    from lnfree.report.saved import load_results

    rd = tiny_report[0]
    write_report(rd, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["saved_results"] == "report_results"
    back = load_results(tmp_path / "out" / "report_results")
    assert list(back) == list(rd.results) == list(rd.stages)
    assert_same(rd.results, back)  # nested dicts of results: ce/a/ln, confidence/neurons, confidence/ln/ablation, ...
    assert back["confidence"]["free"]["ablation"].references() == rd.numbers["confidence"]["neurons"]
    write_report(rd, tmp_path / "out")  # a second write replaces the earlier save
    (tmp_path / "mine" / "report_results").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a saved set of report results"):
        write_report(rd, tmp_path / "mine")  # a directory lnfree did not write is never deleted
    write_report(rd, tmp_path / "lean", results=False)
    assert not (tmp_path / "lean" / "report_results").exists()


def test_run_report_stage_subset_and_skips():
    model, free = make_model(), make_model(seed=2)
    toks = torch.randint(0, 61, (4, 10))
    rd = run_report({"x": model, "y": free}, {"t": toks}, stages=["sink_rate", "atp"], sizes=SMALL, progress=False)
    assert set(rd.numbers) == {"sink_rate"} and "no tokenizer" in rd.notes["atp"]
    assert list(rd.summary().columns) == ["model", "LN", "sink rate"]


def test_run_report_models_of_different_depth():
    two, three = make_model(), make_model(seed=1, n_layers=3)
    toks = torch.randint(0, 61, (4, 10), generator=torch.Generator().manual_seed(0))
    rd = run_report({"two": two, "three": three}, {"t": toks}, stages=["atp", "confidence", "dla"], sizes=SMALL,
                    progress=False, ioi=fake_ioi(4, 61))
    assert rd.numbers["atp"]["three"]["improvement_vs_baseline"] is None
    assert len(rd.numbers["atp"]["three"]["per_layer_error"]) == 3
    c = rd.numbers["confidence"]
    assert c["two"]["neurons_from"] == "two" and c["three"]["neurons_from"] == "three"  # own layer-2 neurons
    assert rd.results["confidence"]["three"]["ablation"].layer == 2
    assert [r["group"] for r in rd.numbers["dla"]["three"]["per_layer"]] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(models={}), "non-empty dict"),
        (dict(data={"t": torch.rand(2, 5)}), "integer"),
        (dict(data={"t": torch.full((2, 5), 99)}), r"data\['t'\]"),
        (dict(baseline="nope"), "baseline"),
        (dict(stages=["dla", "bogus"]), "stages"),
        (dict(models={"x": make_model(), "y": make_model(d_vocab=50)}), "different vocabularies"),
    ],
)
def test_run_report_bad_input(kwargs, match):
    args = dict(models={"x": make_model(), "y": make_model(seed=1)}, data={"t": torch.randint(0, 61, (2, 5))})
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        run_report(args.pop("models"), args.pop("data"), progress=False, **args)


def test_different_tokenizers_are_refused():
    from lnfree.report.pipeline import check_same_vocabulary
    from lnfree.tokenizer import gpt2_tokenizer

    a, b = make_model(), make_model(seed=1)
    a.tokenizer, b.tokenizer = zoo.tokenizer(), gpt2_tokenizer()  # same d_vocab (61), different encodings
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_vocabulary({"a": a, "b": b})


def test_sizes_validate():
    assert QUICK.dla_seqs < FULL.dla_seqs
    with pytest.raises(ValueError, match="dla_seqs"):
        Sizes(dla_seqs=0)


# ---- the commands on a tiny exported family ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """A family exported like the real zoo: tokenizer trained with IOI words, 3 tiny models, 2 held-out sets."""
    from lnfree.zoo import train as zt
    from lnfree.zoo.family import export_family

    d = tmp_path_factory.mktemp("tiny_family")
    rng = random.Random(0)
    names, places, objects = list(tasks.NAMES[:8]), list(tasks.PLACES[:3]), list(tasks.OBJECTS[:3])
    lines = []
    for _ in range(300):
        a, b = rng.sample(names, 2)
        lines.append(tasks.TEMPLATE.format(A=a, B=b, PLACE=rng.choice(places), OBJECT=rng.choice(objects)) + f" {a}.")
    (d / "text.txt").write_text("\n".join(lines))
    tok_path = zt.train_tokenizer([d / "text.txt"], 320, d, boost_words=names + places + objects, boost_count=300)
    tok = zt.load_tokenizer(tok_path)
    held = zt.heldout_sequences(d / "text.txt", tok, 8, 32)
    kw = dict(d_vocab=320, n_ctx=32)
    ln, vanilla, free = make_model(**kw), make_model(seed=1, **kw), make_model(**kw)
    free.estimate_ln_scales(torch.from_numpy(held.astype(np.int64)))
    free.remove_ln()
    prov = {"steps": 1, "tokens_seen": 16, "seed": 0, "wall_time_s": 1.0, "command": "test", "date": "2026-01-01"}
    models = {"tiny-ln": ln, "tiny-vanilla": vanilla, "tiny-lnfree": free}
    export_family(models, tok_path, {"persuasion": held, "cfi": held[::-1].copy()},
                  {"models": {m: dict(prov) for m in models}}, d / "zoo", n_boot=100, progress=False)
    return d / "zoo"


def _run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_command_end_to_end(tiny_zoo, tmp_path, monkeypatch, capsys):
    from lnfree.analysis.dla import direct_logit_attribution
    from lnfree.analysis.geometry import attention_sink_rate
    from lnfree.evaluation import cross_entropy

    monkeypatch.setenv("LNFREE_ZOO_DATA", str(tiny_zoo))
    rc, out, err = _run(["demo", "--quick", "--no-progress", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "tiny-lnfree" in out and "report:" in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["models"] == ["tiny-ln", "tiny-lnfree", "tiny-vanilla"] and data["datasets"] == ["persuasion", "cfi"]
    assert data["notes"] == {}  # every stage ran: IOI prompts from the family's tokenizer
    r = data["results"]
    ln, free = zoo.load("tiny-ln"), zoo.load("tiny-lnfree")
    pers = zoo.heldout("persuasion")[: QUICK.ce_seqs, : QUICK.ce_len]
    assert r["ce"]["persuasion"]["tiny-ln"]["ce"]["value"] == pytest.approx(brute_ce(ln, pers), abs=1e-5)
    assert r["ce"]["persuasion"]["tiny-ln"]["ce"]["value"] == pytest.approx(cross_entropy(ln, pers).value, abs=1e-6)
    ev = zoo.info()["models"]["tiny-ln"]["eval"]["persuasion"]  # the export's own evaluation, same 8 rows
    assert ev["rows"] == pers.shape[0]
    assert r["ce"]["persuasion"]["tiny-ln"]["ce"]["value"] == pytest.approx(ev["ce"]["value"], abs=1e-5)
    assert r["ce"]["persuasion"]["tiny-ln"]["bits_per_byte"]["value"] == pytest.approx(ev["bpb"]["value"], rel=1e-5)
    assert r["dla"]["tiny-lnfree"]["nmae"]["value"] == pytest.approx(0.0, abs=1e-4)
    toks = zoo.heldout("persuasion")[: QUICK.dla_seqs, : QUICK.dla_len]
    assert r["dla"]["tiny-ln"]["nmae"]["value"] == pytest.approx(
        direct_logit_attribution(ln, toks).nmae(n_boot=QUICK.n_boot).value, rel=1e-5)
    g = zoo.heldout("persuasion")[: QUICK.geom_seqs, : QUICK.geom_len]
    assert r["sink_rate"]["tiny-lnfree"]["rate"] == attention_sink_rate(free, g, threshold=0.3).rate.value
    assert r["sink_rate"]["tiny-ln"]["rate"] == pytest.approx(brute_sink_rate(ln, g)[0])
    assert r["atp"]["n_prompts"] == QUICK.ioi_prompts and len(r["atp"]["tiny-ln"]["per_layer_error"]) == 2
    page = (tmp_path / "report.html").read_text()
    assert page.count('class="figure"') == 8


def test_compare_and_reproduce_with_local_data(tiny_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LNFREE_ZOO_DATA", str(tiny_zoo))
    rows = zoo.heldout("cfi")[:4].numpy().astype(np.uint16)
    np.save(tmp_path / "mine.npy", rows)
    rc, out, err = _run(["compare", "tiny-ln", "tiny-lnfree", "--data", str(tmp_path / "mine.npy"), "--quick",
                         "--no-progress", "--out", str(tmp_path / "cmp")], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert data["datasets"] == ["mine"] and data["models"] == ["tiny-ln", "tiny-lnfree"]
    ln = zoo.load("tiny-ln")
    assert data["results"]["ce"]["mine"]["tiny-ln"]["ce"]["value"] == pytest.approx(
        brute_ce(ln, torch.from_numpy(rows.astype(np.int64))), abs=1e-5)

    rc, out, err = _run(["reproduce", "sink-rate", "--models", "tiny-ln", "tiny-lnfree", "--no-progress",
                         "--out", str(tmp_path / "rep")], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "rep" / "sink-rate.json").read_text())
    assert list(data["results"]) == ["sink_rate"]
    assert (tmp_path / "rep" / "sink-rate.html").read_text().count('class="figure"') == 1


def _one_line_error(rc, err, *needles):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_commands_bad_input(tiny_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LNFREE_ZOO_DATA", str(tiny_zoo))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # unknown model: not a zoo name, not a directory, not on the (disabled) hub
    _one_line_error(*_run(["compare", "no-such-model-xyz", "tiny-ln"], capsys)[::2], "no-such-model-xyz", "tiny-ln")
    _one_line_error(*_run(["compare", "tiny-ln", str(tmp_path / "missing_dir")], capsys)[::2], "missing_dir")
    # unreadable data
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file at all")
    _one_line_error(*_run(["compare", "tiny-ln", "tiny-lnfree", "--data", str(tmp_path / "garbage.npy")],
                          capsys)[::2], "garbage.npy")
    np.save(tmp_path / "floats.npy", np.random.rand(3, 8))
    _one_line_error(*_run(["compare", "tiny-ln", "tiny-lnfree", "--data", str(tmp_path / "floats.npy")],
                          capsys)[::2], "floats.npy", "integer")
    np.save(tmp_path / "big.npy", np.full((3, 8), 5000))
    _one_line_error(*_run(["compare", "tiny-ln", "tiny-lnfree", "--data", str(tmp_path / "big.npy")],
                          capsys)[::2], "big.npy", "vocabulary")
    _one_line_error(*_run(["compare", "tiny-ln", "tiny-lnfree", "--data", str(tmp_path / "nope.npy")],
                          capsys)[::2], "nope.npy", "does not exist")
    # mismatched tokenizers: a GPT-2-vocabulary checkpoint vs the family's 320-token vocabulary
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).save_pretrained(tmp_path / "g")
    capsys.readouterr()  # transformers' own progress output while saving
    _one_line_error(*_run(["compare", "tiny-ln", str(tmp_path / "g")], capsys)[::2], "vocabular")
    # the paper's defaults need the hub: fail fast, one line
    _one_line_error(*_run(["reproduce", "dla"], capsys)[::2], "gpt2")
    with pytest.raises(SystemExit):
        main(["reproduce", "not-a-figure"])


def test_threads_flag_one_rule_for_every_command(tmp_path, capsys):
    """--threads < 1 is refused, before any model loads, by each command (lnfree.training.device.set_threads)."""
    before = torch.get_num_threads()
    for argv in (["demo", "--out", str(tmp_path / "d")], ["compare", "no-such-a", "no-such-b"],
                 ["reproduce", "dla"], ["site-costs", "no-such-model", "--out", str(tmp_path / "c.json")]):
        _one_line_error(*_run(argv + ["--threads", "0"], capsys)[::2], "--threads must be >= 1, got 0")
    assert torch.get_num_threads() == before
    from lnfree.training.device import set_threads

    set_threads(before + 1)
    try:
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_demo_on_the_packaged_zoo(tmp_path):
    """`lnfree demo --quick` as a user runs it (subprocess), on the shipped family."""
    try:
        zoo.data_dir()
    except FileNotFoundError as e:
        pytest.fail(f"the zoo's data is missing: {e}", pytrace=False)
    env = {k: v for k, v in os.environ.items() if k != "LNFREE_ZOO_DATA"}
    exe = Path(sys.executable).with_name("lnfree")
    proc = subprocess.run([str(exe), "demo", "--quick", "--no-progress", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    from lnfree.analysis.geometry import attention_sink_rate

    ln, free = zoo.load("tiny-ln"), zoo.load("tiny-lnfree")
    pers = zoo.heldout("persuasion")[: QUICK.ce_seqs, : QUICK.ce_len]
    r = data["results"]
    assert r["ce"]["persuasion"]["tiny-ln"]["ce"]["value"] == pytest.approx(brute_ce(ln, pers), abs=1e-5)
    assert r["dla"]["tiny-lnfree"]["nmae"]["value"] == pytest.approx(0.0, abs=1e-3)
    assert r["dla"]["tiny-ln"]["nmae"]["value"] > 1.0
    g = zoo.heldout("persuasion")[: QUICK.geom_seqs, : QUICK.geom_len]
    assert r["sink_rate"]["tiny-ln"]["rate"] == attention_sink_rate(ln, g).rate.value
    assert data["notes"] == {}


# ---- figures ---------------------------------------------------------------------------------
def _axes(fig) -> dict:
    layout = fig.to_plotly_json()["layout"]
    return {k: v for k, v in layout.items() if k.startswith(("xaxis", "yaxis"))}


def test_every_report_figure_titles_every_axis(tiny_report):
    from lnfree.report.stages import STAGES

    rd = tiny_report[0]
    n_figures = 0
    for name in rd.stages:
        for fig in STAGES[name].figures(rd):
            n_figures += 1
            axes = _axes(fig)
            assert {"xaxis", "yaxis"} <= set(axes), (name, sorted(axes))
            untitled = [k for k, ax in axes.items() if not (ax.get("title") or {}).get("text")]
            assert not untitled, f"{name}: axes without a title: {untitled}"
            assert fig.layout.title.text
    assert n_figures == 8


def test_ce_figure_axis_is_tight_around_the_cis(tiny_report):
    """The CE panel does not start at 0 (a 0.04-nat gap would be invisible) and holds every CI."""
    from lnfree.report.figures import ce_figures

    rd = tiny_report[0]
    (fig,) = ce_figures(rd)
    ests = [rd.numbers["ce"][d][m]["ce"] for d in rd.datasets for m in rd.models]
    lo, hi = fig.layout.yaxis.range
    assert lo > 0 and lo < min(e["low"] for e in ests) and hi > max(e["high"] for e in ests)
    assert hi - lo < 2 * (max(e["high"] for e in ests) - min(e["low"] for e in ests)) + 0.01
    gaps = [t for t in fig.data if t.xaxis == "x2"]  # the paired-gap panel: every non-baseline model
    assert sorted(t.name for t in gaps) == sorted(m for m in rd.models if m != rd.baseline)
    assert all(isinstance(t, type(fig.data[0])) and t.mode == "markers" for t in fig.data)  # no bars from 0


def test_sink_heatmap_has_integer_layer_and_head_ticks(tiny_report):
    from lnfree.report.figures import sink_figures

    (fig,) = sink_figures(tiny_report[0])
    for k, ax in _axes(fig).items():
        assert ax.get("dtick") == 1 and ax.get("tick0") == 0, k


def test_report_package_imports_as_a_user_expects(tiny_report, tmp_path):
    import lnfree
    from lnfree import report
    from lnfree.report import STAGES, ReportData, build_report, run_report  # noqa: F401

    assert lnfree.report is report and set(report.__all__) >= {"build_report", "run_report", "write_report"}
    assert list(STAGES) == ["ce", "dla", "atp", "confidence", "first_token_norm", "sink_rate"]
    _, models, data, ioi = tiny_report
    rd = report.build_report({"ln": models["ln"], "free": models["free"]}, data, tmp_path, stages=["sink_rate"],
                             sizes=SMALL, progress=False)
    assert isinstance(rd, ReportData) and (tmp_path / "report.html").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["results"]["sink_rate"]["free"]["rate"] == \
        rd.numbers["sink_rate"]["free"]["rate"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        report.nope  # noqa: B018
