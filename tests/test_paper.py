"""lnfree.paper against an independent transcription of the paper's code (tests/paper_reference.py)."""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import paper_reference as ref
from conftest import save_released_ln_free, spread_hf_norms
import lnfree.paper as P
from lnfree.loading import load_model
from lnfree.stats import bootstrap

VOCAB = 50257  # GPT-2's, so the IOI prompts tokenize with its tokenizer


def rel_close(a, b, rel=1e-4, abs_=0.0):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.abs(a - b) <= rel * np.abs(b) + abs_), (a, b, np.max(np.abs(a - b)))


def _hf(seed):
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64))
    return spread_hf_norms(hf, bias=0.05, embed=5.0).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (11, 20), generator=g)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, data):
    """An LN GPT-2 and a released-format LN-free GPT-2 (LN weight * 1e6 / sigma, eps = 1e12)."""
    root = tmp_path_factory.mktemp("paper")
    _hf(0).save_pretrained(root / "ln")
    save_released_ln_free(_hf(1), data, root / "lnfree")
    return {"ln": root / "ln", "lnfree": root / "lnfree"}


@pytest.fixture(scope="module")
def models(dirs):
    return {k: load_model(v, device="cpu") for k, v in dirs.items()}


@pytest.fixture(scope="module")
def models64(dirs):
    """float64 copies: DE is a difference of logits, and float32 cancellation would hide a 1e-4 comparison."""
    return {k: load_model(v, device="cpu", dtype=torch.float64) for k, v in dirs.items()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, dict(model.ln_modes()), model.cfg.normalization_type


def _unchanged(model, before):
    sd, modes, norm = before
    after = model.state_dict()
    assert set(after) == set(sd) and all(torch.equal(after[k], sd[k]) for k in sd)
    assert model.ln_modes() == modes and model.cfg.normalization_type == norm


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_dla_nmae_matches_paper(models64, dirs, data, kind):
    model = models64[kind]
    before = _state(model)
    res = P.paper_dla(model, data, n_boot=200, seed=5)
    _unchanged(model, before)
    paper = ref.load_paper_model(dirs[kind], no_ln=kind == "lnfree", dtype=torch.float64)
    dla, de = ref.dla_and_de(paper, data, no_ln=kind == "lnfree")
    scale = float(de.abs().mean())
    rel_close(res.dla, dla, rel=1e-4, abs_=1e-5 * scale)
    rel_close(res.direct_effect, de, rel=1e-4, abs_=1e-5 * scale)
    low, high = ref.nmae_bootstrap(dla.double(), de.double(), 200, 5)
    if kind == "ln":
        rel_close(res.nmae.value, ref.global_nmae(dla, de))
        rel_close([res.nmae.low, res.nmae.high], [low, high], rel=1e-3)
        assert res.nmae.value > 1  # DLA is a poor linearisation of a random LN model
    else:  # DLA is exact without LN: both are float noise
        assert res.nmae.value < 1e-3 and ref.global_nmae(dla, de) < 1e-3
    assert float(P.dla_nmae(model, data, n_boot=20)) == pytest.approx(res.nmae.value)


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_sink_rate_matches_paper(models, dirs, data, kind):
    model = models[kind]
    before = _state(model)
    hf = GPT2LMHeadModel.from_pretrained(dirs[kind], attn_implementation="eager").eval()  # the paper runs HF models (eps 1e12 for LN-free)
    est = P.sink_rate(model, data)
    mean, lo, hi = ref.sink_rates(hf, data)
    rel_close([est.value, est.low, est.high], [mean, lo, hi])
    assert 0 < est.value < 1
    # The paper's layer-3 quirk: one layer's count divided by every layer's heads.
    est1 = P.sink_rate(model, data, layers=[1])
    rel_close(est1.value, ref.sink_rates(hf, data, layer=1)[0])
    per = P.sink_rate_per_sample(model, data)
    brute = []
    with torch.no_grad():
        att = hf(input_ids=data, output_attentions=True).attentions
    brute = torch.stack([(a[..., 0] > 0.3).float().mean(dim=(1, 2)) for a in att], 1).mean(1)
    rel_close(per, brute)
    _unchanged(model, before)


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_first_token_norm_matches_paper(models, dirs, data, kind):
    model = models[kind]
    before = _state(model)
    res = P.first_token_norm(model, data)
    _unchanged(model, before)
    paper = ref.load_paper_model(dirs[kind], no_ln=kind == "lnfree")
    want = ref.residual_norms(paper, data, no_ln=kind == "lnfree")
    assert res.labels == tuple(want)
    got = np.stack([res.first_mean, res.first_std, res.rest_mean, res.rest_std], 1)
    rel_close(got, np.array([want[n] for n in res.labels]), abs_=1e-6)  # pos 0 embeddings: std of equal values
    frame = res.to_frame()
    assert set(frame.position) == {"first", "rest"} and len(frame) == 2 * len(res.labels)
    wide = res.table()
    assert list(wide.columns) == ["site", "first", "first_std", "rest", "rest_std"]
    rel_close(wide[["first", "first_std", "rest", "rest_std"]].to_numpy(), got)
    assert res.final_first().value == pytest.approx(float(res.first_mean[-1]), rel=1e-6)
    # the other tokens' CI resamples sequences (their 19 tokens together), not 11 x 19 independent tokens:
    # with equal lengths it is the bootstrap of the per-sequence means with the same draws
    rest, per_seq = res.final_rest(), res.rest[:, -1].double().reshape(11, 19).mean(1)
    same = bootstrap(per_seq, n_boot=res.n_boot, seed=res.seed)
    assert rest.n == 11 and (rest.value, rest.low, rest.high) == pytest.approx((same.value, same.low, same.high))


# ---- IOI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_tok():
    from lnfree.tokenizer import gpt2_tokenizer
    return gpt2_tokenizer()


def test_ioi_prompts_match_paper(gpt2_tok):
    for seed in (0, 7):
        p = P.ioi_prompts(gpt2_tok, n=16, seed=seed)
        prompts, answers = ref.get_bisymmetric_prompts_and_answers(total_N=4, seed=seed)
        assert list(p.prompts) == prompts and list(p.answers) == answers
        clean, corrupt, ans = ref.ioi_tokens(gpt2_tok, prompts, answers)
        assert torch.equal(p.clean, clean) and torch.equal(p.corrupt, corrupt)
        assert torch.equal(p.io_ids, ans[:, 0]) and torch.equal(p.s_ids, ans[:, 1])
        # BABA, ABBA, ABBA, BABA; pairs differ only at S2 (position 11 with BOS), and swap the answers
        first_io = [pr.split(" ")[1].rstrip(",") != a[0].strip() for pr, a in zip(p.prompts, p.answers)]
        assert first_io[:4] == [True, False, False, True]
        diff = (p.clean != p.corrupt).nonzero()
        assert diff[:, 0].tolist() == list(range(16)) and set(diff[:, 1].tolist()) == {11}
        assert torch.equal(p.io_ids[0::2], p.s_ids[1::2])
    assert P.ioi_prompts(gpt2_tok, n=8, seed=3).prompts == P.ioi_prompts(gpt2_tok, n=16, seed=3).prompts[:8]
    with pytest.raises(ValueError, match="multiple of 4"):
        P.ioi_prompts(gpt2_tok, n=6)


@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_ioi_atp_error_matches_paper(models64, dirs, gpt2_tok, kind):
    model = models64[kind]  # float64: the effect is 1/75 of the logit difference, float32 noise would be 1e-4
    before = _state(model)
    p = P.ioi_prompts(gpt2_tok, n=4, seed=1)
    res = P.ioi_atp_error(model, p.clean, p.corrupt, p.io_ids, p.s_ids, n_boot=50)
    _unchanged(model, before)
    paper = ref.load_paper_model(dirs[kind], no_ln=kind == "lnfree", dtype=torch.float64)
    ans = torch.stack([p.io_ids, p.s_ids], 1)
    act = ref.act_patch_resid_pre(paper, p.clean, p.corrupt, ans)
    attr = ref.attr_patch_resid_pre(paper, p.clean, p.corrupt, ans)
    want = ref.per_layer_error(act, attr)
    rel_close(res.norm_factor, act[0, 11])
    # see below: lnfree stores patched metrics in float32, ~5e-6 per normalised entry, summed over positions
    rel_close(res.error, want, abs_=5e-6 * p.clean.shape[1])
    # lnfree's patching API stores patched metrics in float32: ~1e-8 absolute on the logit difference,
    # ~5e-6 after dividing by this random model's small effect (1/75 of the logit difference)
    rel_close(res.act, (act / act[0, 11]).permute(2, 0, 1), abs_=2e-5)
    rel_close(res.attr, (attr / act[0, 11]).permute(2, 0, 1), abs_=2e-5)
    assert res.mean_over_layers == pytest.approx(float(want.mean()), rel=1e-4, abs=1e-4)
    assert res.sd_over_layers == pytest.approx(float(want.std()), rel=1e-4, abs=1e-4)
    # patching the whole clean resid_pre at S2 before layer 0 restores the clean run
    assert torch.allclose(res.act[:, 0, 11], torch.ones(4, dtype=res.act.dtype))
    assert (res.error > 0).all()


# ---- entropy neurons ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_entropy_neuron_ablation_matches_paper(models64, dirs, data, kind):
    model = models64[kind]
    before = _state(model)
    neurons = (3, 101)
    data = data[:4]
    res = P.entropy_neuron_ablation(model, data, neurons=neurons, n_boot=50)
    _unchanged(model, before)
    paper = ref.load_paper_model(dirs[kind], no_ln=kind == "lnfree", dtype=torch.float64)
    want = ref.entropy_ablation(paper, data, neurons, no_ln=kind == "lnfree")
    for i, n in enumerate(neurons):
        for metric in ("loss", "entropy"):
            got = getattr(res, f"{metric}_effect")[i].numpy()
            exp = want[n][f"{metric}_effect"]
            # lnfree.ablate_neurons rounds its per-token values to float32: 1 ulp of a CE near 10 nats is
            # 9.5e-7, far below the effects of real entropy neurons (1e-2) but not of this random model's
            rel_close(got, exp, abs_=4e-6)
            s = res.summary(n, metric)
            rel_close([s.value, s.low, s.high], ref.median_iqr(exp), abs_=4e-6)
    assert res.to_frame().shape[0] == 2 * len(neurons)
    f = res.stolfo_fraction(neurons[0], "entropy")
    if kind == "lnfree":  # no final LN: the direct effect is all of it
        assert f.value == pytest.approx(0.0, abs=1e-9)
        assert torch.allclose(res.loss_direct, res.loss_total)
    else:  # Stolfo et al.'s direct effect: the ablated residual read through the clean token's final LN scale
        direct = ref.frozen_scale_direct_effect(paper, data, neurons[0])
        rel_close(res.loss_direct[0], direct["loss"], abs_=4e-6)
        rel_close(res.entropy_direct[0], direct["entropy"], abs_=4e-6)
        t = res.entropy_total[0].abs()
        assert f.value == pytest.approx(1 - float(res.entropy_direct[0].abs().mean() / t.mean()))
        # CI over the 4 sequences: equal lengths, so the same draws of per-sequence means give it exactly
        seq = res.token_sequence.numpy()
        means = [np.bincount(seq, x.numpy()) / np.bincount(seq) for x in (res.entropy_direct[0].abs(), t)]
        same = bootstrap(means[0], lambda a, b: 1 - a.mean() / b.mean(), paired=means[1], n_boot=res.n_boot)
        assert f.n == 4 and (f.low, f.high) == pytest.approx((same.low, same.high))
        assert "no reliable CI: n=4 < 5" in str(f)  # not 76 tokens' confident bracket
        assert not torch.allclose(res.loss_direct, res.loss_total) and len(res.lnfree_fraction) == 2


def test_entropy_default_neurons():
    from lnfree.paper.entropy import paper_neurons

    class Cfg:  # GPT-2 Small / Medium shapes pick the paper's neurons
        pass
    for shape, want in (((12, 768, 3072, 50257), (584, 2123, 2870)), ((24, 1024, 4096, 50257), (1083, 1108, 3144))):
        m = type("M", (), {"cfg": Cfg()})()
        m.cfg.n_layers, m.cfg.d_model, m.cfg.d_mlp, m.cfg.d_vocab = shape
        assert paper_neurons(m) == want


# ---- Table 1 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ln", "lnfree"])
def test_table1_ce_matches_paper(models, dirs, kind):
    g = torch.Generator().manual_seed(9)
    stream = torch.randint(0, VOCAB, (11 * 24 + 5,), generator=g).tolist()
    chunks = ref.chunk_stream(stream, 24, 10000)
    tokens = P.pack_documents([stream], block_size=24)
    assert torch.equal(tokens, torch.stack(chunks))
    res = P.table1_ce(models[kind], tokens, batch_size=4, n_boot=50)
    hf = GPT2LMHeadModel.from_pretrained(dirs[kind]).eval()
    rel_close(res.ce.value, ref.evaluate_model_on_pile(hf, chunks, batch_size=4))
    assert (res.n_sequences, res.n_dropped) == (8, 3)
    eot = P.pack_documents([[1, 2, 3], [4]], eot_id=0, block_size=3)
    assert eot.tolist() == [[1, 2, 3], [0, 4, 0]]


# ---- lnfree reproduce, offline ---------------------------------------------------------------
@pytest.mark.parametrize("figure", ["table1", "dla", "atp", "entropy", "first-token-norm", "sink-rate"])
def test_reproduce_offline(dirs, data, tmp_path, capsys, figure):
    import json

    from lnfree.cli import main
    from lnfree.paper.reproduce import STAGE

    np.save(tmp_path / "rows.npy", data[:8].numpy())
    argv = ["reproduce", figure, "--models", str(dirs["ln"]), str(dirs["lnfree"]), "--quick", "--no-progress",
            "--out", str(tmp_path / "out")]
    if figure != "atp":
        argv += ["--data", str(tmp_path / "rows.npy")]
    assert main(argv) == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "out" / f"{figure}.json").read_text())
    nums = out["results"][STAGE[figure]]
    names = list(out["models"])
    assert len(names) == 2 and (tmp_path / "out" / f"{figure}.html").stat().st_size > 10_000
    ln = load_model(dirs["ln"], device="cpu")
    rows = data[:8]
    if figure == "dla":
        q = rows[:6]
        assert nums[names[0]]["nmae_percent"]["value"] == pytest.approx(P.dla_nmae(ln, q).value, rel=1e-6)
        assert nums[names[1]]["nmae_percent"]["value"] < 1e-3
    elif figure == "sink-rate":
        assert nums[names[0]]["sink_rate"]["value"] == pytest.approx(P.sink_rate(ln, rows).value, rel=1e-6)
    elif figure == "table1":
        assert nums["rows"][names[0]]["ce"]["value"] == pytest.approx(P.table1_ce(ln, rows).ce.value, rel=1e-6)
    elif figure == "atp":
        p = P.ioi_prompts(ln.tokenizer, n=4)
        want = P.ioi_atp_error(ln, p.clean, p.corrupt, p.io_ids, p.s_ids).error.tolist()
        assert nums["per_layer_error"][names[0]] == pytest.approx(want, rel=1e-5)
        table = {row["model"]: row for row in nums["table"]}  # compare_ioi_atp: mean and sd over layers per model
        for name in names:
            errs = np.array(nums["per_layer_error"][name])
            assert table[name]["mean_over_layers"] == pytest.approx(errs.mean(), rel=1e-6)
            assert table[name]["sd_over_layers"] == pytest.approx(errs.std(ddof=1), rel=1e-6)
    elif figure == "entropy":
        assert len(nums["neurons"]) == 3 and len(nums[names[0]]["table"]) == 6
    else:
        frame = nums[names[0]]["frame"]
        assert len(frame) == 2 * len(P.geometry.norm_sites(ln))


def test_reproduce_needs_hub_or_local_inputs(dirs, monkeypatch, capsys):
    from lnfree.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = main(["reproduce", "dla"])  # the paper's models need the hub: fail fast, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "gpt2" in err[0]
    # each figure defaults to the models the paper's code ran it on: Medium for the norms and the sink rate
    for figure, first in (("first-token-norm", "'gpt2-medium'"), ("sink-rate", "'schaeff/gpt-2medium_vanilla500'"),
                          ("entropy", "'gpt2'")):
        rc = main(["reproduce", figure])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and first in err[0], err
    # local models without --data (not the zoo's tokenizer): the paper's data sets need the hub
    rc = main(["reproduce", "sink-rate", "--models", str(dirs["ln"]), str(dirs["lnfree"]), "--quick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--data" in err[0], err


def test_docstring_examples_run():
    import doctest
    import importlib

    for mod in ("dla", "geometry", "ioi", "table1", "entropy", "stats", "_process"):
        m = importlib.import_module(f"lnfree.paper.{mod}")
        failed, _ = doctest.testmod(m, optionflags=doctest.ELLIPSIS)
        assert failed == 0, mod


def test_bad_inputs(models, data, gpt2_tok):
    ln = models["ln"]
    frozen = copy.deepcopy(ln)
    frozen.estimate_ln_scales(data)
    frozen.freeze_ln(["ln_final"])
    with pytest.raises(ValueError, match="remove_ln"):
        P.dla_nmae(frozen, data)
    with pytest.raises(TypeError, match="model"):
        P.sink_rate("gpt2", data)
    with pytest.raises(ValueError, match="ci must be one of"):
        P.sink_rate(ln, data, ci="wald")
    with pytest.raises(ValueError, match="threshold"):
        P.sink_rate(ln, data, threshold=1.5)
    with pytest.raises(ValueError, match="neurons"):
        P.entropy_neuron_ablation(ln, data, neurons=[10**6])
    with pytest.raises(ValueError, match="incomplete batches"):
        P.table1_ce(ln, data[:3])
    with pytest.raises(ValueError, match="at least 2 positions"):
        P.first_token_norm(ln, data[:, :1])
    p = P.ioi_prompts(gpt2_tok, n=4)
    with pytest.raises(ValueError, match="same shape"):
        P.ioi_atp_error(ln, p.clean, p.corrupt[:, :-1], p.io_ids, p.s_ids)
    with pytest.raises(ValueError, match="io_ids"):
        P.ioi_atp_error(ln, p.clean, p.corrupt, p.io_ids[:2], p.s_ids)
    with pytest.raises(ValueError, match="exactly one position"):
        P.ioi_atp_error(ln, p.clean, p.clean, p.io_ids, p.s_ids)
    with pytest.raises(ValueError, match="token ids"):
        P.dla_nmae(ln, torch.full((2, 4), VOCAB))
