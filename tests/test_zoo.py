"""Tests for lnfree.zoo: the shipped family (packaged data) and the export / card / train pipeline.

The first group uses the exported family in src/lnfree/zoo/data (or $LNFREE_ZOO_DATA): it FAILS, by
design, when that data is missing. The second group exports tiny random models into tmp_path.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model

from lnfree import zoo
from lnfree.zoo import train as zt
from lnfree.zoo.family import (
    ExportResult,
    export_family,
    render_model_card,
    token_byte_lengths,
    train_family,
    write_model_card,
)

REPO = Path(__file__).resolve().parents[1]
CHECK_ROWS = (0, -1)  # rows of each held-out set whose CE is recomputed live (the full set is too slow here)


def brute_ce(model, rows: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token CE, computed directly from the logits (independent of lnfree.evaluation)."""
    with torch.no_grad():
        logits = model(rows).double()
    logp = logits[:, :-1].log_softmax(-1)
    return -logp.gather(-1, rows[:, 1:, None])[..., 0].mean(-1)


# ---- the packaged family ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def family():
    try:
        d = zoo.data_dir()
    except FileNotFoundError as e:
        pytest.fail(f"the zoo's data is missing: {e}", pytrace=False)
    t = {}
    models = {}
    for name in zoo.names():
        t0 = time.perf_counter()
        models[name] = zoo.load(name, device="cpu")
        t[name] = time.perf_counter() - t0
    return d, zoo.info(), models, t


def test_family_loads_offline_fast(family, monkeypatch):
    d, manifest, models, times = family
    assert sorted(manifest["models"]) == sorted(zoo.names()) == sorted(["tiny-ln", "tiny-vanilla", "tiny-lnfree"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    t0 = time.perf_counter()
    m = zoo.load("tiny-lnfree", device="cpu")
    assert time.perf_counter() - t0 < 5.0
    assert max(times.values()) < 5.0, times
    for name, model in models.items():
        assert all(p.dtype == torch.float32 for p in model.parameters()), name  # fp16 storage upcast
        assert model.cfg.n_layers == 4 and model.cfg.d_model == 256 and model.cfg.d_vocab == 4096
        assert model.cfg.n_ctx == 256 and model.cfg.n_heads == 8 and model.cfg.d_mlp == 768
    assert m.zoo_name == "tiny-lnfree"


def test_shipped_files_fp16_and_within_budget(family):
    from safetensors import safe_open

    d, manifest, models, _ = family
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 30_000_000
    for name, entry in manifest["models"].items():
        with safe_open(str(d / entry["file"]), "pt") as f:
            keys = set(f.keys())
            assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
        assert keys == set(dict(models[name].named_parameters()))  # TL state-dict keys, all parameters


def test_lnfree_has_every_site_removed(family):
    _, _, models, _ = family
    free = models["tiny-lnfree"]
    assert free.is_ln_free and set(free.ln_modes().values()) == {"removed"}
    assert free.cfg.normalization_type is None
    tokens = zoo.heldout("persuasion")[:1, :32]
    _, cache = free.run_with_cache(tokens, names_filter=lambda n: "resid" in n or "normalized" in n)
    # removed sites are identities: what each LN hands on is its input
    for i in range(free.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{i}.ln1.hook_normalized"], cache[f"blocks.{i}.hook_resid_pre"])
        torch.testing.assert_close(cache[f"blocks.{i}.ln2.hook_normalized"], cache[f"blocks.{i}.hook_resid_mid"])
    for name in ("tiny-ln", "tiny-vanilla"):
        assert set(models[name].ln_modes().values()) == {"live"}
        _, c = models[name].run_with_cache(tokens, names_filter="ln_final.hook_scale")
        assert c["ln_final.hook_scale"].std() > 1e-3  # a live, per-token scale


def test_lnfree_dla_sums_exactly_to_logits(family):
    _, _, models, _ = family
    free = models["tiny-lnfree"]
    tokens = zoo.heldout("cfi")[:1, :48]
    logits, cache = free.run_with_cache(tokens)
    # own decomposition of the final residual: embeddings, every head (z @ W_O), b_O, every MLP
    parts = [cache["hook_embed"], cache["hook_pos_embed"]]
    for i in range(free.cfg.n_layers):
        z = cache[f"blocks.{i}.attn.hook_z"]
        parts += list(torch.einsum("bphd,hdm->hbpm", z, free.blocks[i].attn.W_O).unbind(0))
        parts += [free.blocks[i].attn.b_O.expand_as(parts[0]), cache[f"blocks.{i}.hook_mlp_out"]]
    dla = torch.stack([p.double() @ free.W_U.double() for p in parts])  # [component, batch, pos, vocab]
    total = dla.sum(0) + free.b_U.double()
    rel = (total - logits.double()).abs().max() / logits.double().abs().max()
    assert rel < 1e-3
    assert len(parts) == 2 + free.cfg.n_layers * (free.cfg.n_heads + 2)


def test_family_shares_one_tokenizer(family):
    _, manifest, models, _ = family
    tok = zoo.tokenizer()
    text = " Anne Elliot said to Captain Wentworth, \"Persuasion!\""
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(tok) == manifest["tokenizer"]["vocab_size"] == 4096
    for name, m in models.items():
        assert m.tokenizer.get_vocab() == tok.get_vocab(), name
        assert m.to_tokens(text)[0].tolist() == [0] + ids, name  # BOS = <|endoftext|> = 0 prepended


def test_heldout_sets(family):
    d, manifest, _, _ = family
    tok = zoo.tokenizer()
    for name in ("persuasion", "cfi"):
        x = zoo.heldout(name)
        assert x.dtype == torch.int64 and x.shape == (100, 256) and (x[:, 0] == 0).all()
        # the stored byte count equals the length of the decoded text (rows are consecutive)
        text = tok.decode(x[:, 1:].reshape(-1).tolist())
        assert len(text.encode("utf-8")) == manifest["heldout"][name]["n_bytes"]
    with pytest.raises(ValueError, match="persuasion"):
        zoo.heldout("emma")


def test_heldout_ce_matches_model_card_numbers(family):
    d, manifest, models, _ = family
    for name, m in models.items():
        for h in ("persuasion", "cfi"):
            ev = manifest["models"][name]["eval"][h]
            per_seq = np.array(ev["per_sequence"])
            assert ev["rows"] == len(per_seq) == 100
            # the card's mean is the mean of the per-sequence values ...
            assert abs(per_seq.mean() - ev["ce"]["value"]) < 1e-5
            assert ev["ce"]["low"] < ev["ce"]["value"] < ev["ce"]["high"]
            # ... and those are what the loaded model gives now (recomputed live, brute force)
            idx = [i % len(per_seq) for i in CHECK_ROWS]
            live = brute_ce(m, zoo.heldout(h)[idx]).numpy()
            assert np.abs(live - per_seq[idx]).max() < 0.02, (name, h, live)
            bpb = ev["ce"]["value"] * ev["n_tokens"] / (math.log(2) * ev["n_bytes"])
            assert abs(bpb - ev["bpb"]["value"]) < 1e-9
    card = (REPO / "docs" / "zoo.md").read_text()
    if d.resolve() == zoo.PACKAGE_DATA:
        assert card == render_model_card(manifest), "docs/zoo.md is stale: run `lnfree zoo card --out docs/zoo.md`"
    for name in models:
        assert f"{manifest['models'][name]['eval']['persuasion']['ce']['value']:.4f}" in render_model_card(manifest)


def test_unknown_name_lists_valid_ones(family):
    with pytest.raises(ValueError, match="tiny-ln, tiny-vanilla, tiny-lnfree"):
        zoo.load("gpt2")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):  # the resolver's one check
        zoo.load("tiny-ln", dtype=torch.int8)


# ---- export on tiny random models --------------------------------------------------------------
TEXT = (Path(__file__).parent / "test_zoo_train.py").read_text()
PROV = {"steps": 1, "tokens_seen": 16, "seed": 0, "wall_time_s": 1.0, "command": "test", "date": "2026-01-01"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_zoo")
    (d / "text.txt").write_text(TEXT)
    tok_path = zt.train_tokenizer([d / "text.txt"], 300, d, boost_words=())
    tok = zt.load_tokenizer(tok_path)
    held = zt.heldout_sequences(d / "text.txt", tok, 6, 16)
    ln = make_model(d_vocab=300)
    vanilla = make_model(d_vocab=300)
    with torch.no_grad():
        vanilla.W_in.mul_(1.1)  # a different model
    free = make_model(d_vocab=300)
    free.estimate_ln_scales(torch.from_numpy(held.astype(np.int64)))
    free.remove_ln()
    models = {"tiny-ln": ln, "tiny-vanilla": vanilla, "tiny-lnfree": free}
    meta = {"models": {n: dict(PROV) for n in models}, "note": "test"}
    heldout = {"persuasion": held, "cfi": {"tokens": held[::-1].copy(), "source": "reversed.txt"}}
    return d, tok_path, tok, models, heldout, meta


def _export(tiny, out, **kw):
    d, tok_path, _, models, heldout, meta = tiny
    kw.setdefault("n_boot", 200)
    return export_family(models, tok_path, heldout, meta, out, progress=False, **kw)


def test_export_round_trip(tiny, tmp_path):
    d, tok_path, tok, models, heldout, _ = tiny
    res = _export(tiny, tmp_path / "zoo", model_card=tmp_path / "card.md")
    assert isinstance(res, ExportResult) and res.labels == list(models)
    manifest = zoo.info(tmp_path / "zoo")
    size = sum(f.stat().st_size for f in (tmp_path / "zoo").iterdir())
    assert res.size_bytes == manifest["size_bytes"] == size <= 30_000_000
    rows = torch.from_numpy(heldout["persuasion"].astype(np.int64))
    for name, original in models.items():
        m = zoo.load(name, device="cpu", data_dir=tmp_path / "zoo")
        assert m.ln_modes() == original.ln_modes() and m.is_ln_free == (name == "tiny-lnfree")
        # independent reference: the original's parameters rounded to fp16 and back
        ref = make_model(d_vocab=300)
        ref.load_state_dict({k: v.half().float() for k, v in original.state_dict().items()})
        ref.load_ln_state(original.ln_state())
        torch.testing.assert_close(m(rows), ref(rows), atol=1e-4, rtol=1e-4)
        # the stored evaluation is the loaded model's brute-force CE, with the right bits per byte
        ev = manifest["models"][name]["eval"]["persuasion"]
        ce = brute_ce(m, rows)
        assert abs(ev["ce"]["value"] - float(ce.mean())) < 1e-5
        n_bytes = len(tok.decode(rows[:, 1:].reshape(-1).tolist()).encode("utf-8"))
        assert ev["n_bytes"] == n_bytes
        assert abs(ev["bpb"]["value"] - float(ce.mean()) * rows[:, 1:].numel() / (math.log(2) * n_bytes)) < 1e-5
        c = res.checks[name]
        assert 0 < c["max_abs_logit_diff"] < 0.05 and abs(c["ce_diff"]) <= 0.01
    gap = manifest["gaps"]["persuasion"]["tiny-lnfree - tiny-vanilla"]["value"]
    ev = {n: manifest["models"][n]["eval"]["persuasion"]["ce"]["value"] for n in models}
    assert abs(gap - (ev["tiny-lnfree"] - ev["tiny-vanilla"])) < 1e-6  # per-sequence CE is float32
    assert zoo.heldout("cfi", data_dir=tmp_path / "zoo").tolist() == heldout["cfi"]["tokens"].tolist()
    card = (tmp_path / "card.md").read_text()
    assert card == render_model_card(manifest) and f"{ev['tiny-lnfree']:.4f}" in card
    assert "LN-free minus vanilla" in card
    assert set(res.to_frame().metric) == {"ce", "bpb"} and len(res.plot().data) == 3
    half = zoo.load("tiny-ln", device="cpu", dtype=torch.float16, data_dir=tmp_path / "zoo")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with pytest.warns(UserWarning, match="float16.*float32"):  # LN-free residuals overflow fp16: one policy
        assert zoo.load("tiny-lnfree", dtype=torch.float16, data_dir=tmp_path / "zoo").W_E.dtype == torch.float32
    # re-exporting replaces the files in place
    _export(tiny, tmp_path / "zoo", n_eval=2)
    assert zoo.info(tmp_path / "zoo")["models"]["tiny-ln"]["eval"]["cfi"]["rows"] == 2


def test_export_refuses_over_budget(tiny, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        _export(tiny, tmp_path / "zoo", max_bytes=100_000)
    assert not (tmp_path / "zoo").exists() and not list(tmp_path.iterdir())


def test_export_refuses_fp16_ce_change(tiny, tmp_path):
    # fp16 rounding moves CE by ~1e-5 here: a tolerance below that must refuse the export
    with pytest.raises(ValueError, match="fp16 storage changes CE"):
        _export(tiny, tmp_path / "zoo", ce_tol=1e-12)
    d, tok_path, _, models, heldout, meta = tiny
    big = make_model(d_vocab=300)
    with torch.no_grad():
        big.b_U[0] = 1e5  # beyond float16's range
    with pytest.raises(ValueError, match="float16"):
        export_family({"tiny-ln": big}, tok_path, heldout, meta, tmp_path / "zoo", progress=False)
    assert not (tmp_path / "zoo").exists()


def test_export_validates_inputs(tiny, tmp_path):
    d, tok_path, _, models, heldout, meta = tiny
    with pytest.raises(ValueError, match="architectures"):
        export_family({"tiny-ln": models["tiny-ln"], "tiny-vanilla": make_model(d_vocab=300, n_layers=1)},
                      tok_path, heldout, meta, tmp_path / "z", progress=False)
    with pytest.raises(ValueError, match="lacks"):
        export_family(models, tok_path, heldout, {"models": {n: {"steps": 1} for n in models}}, tmp_path / "z")
    with pytest.raises(ValueError, match="model name"):
        export_family({"Tiny LN": models["tiny-ln"]}, tok_path, heldout, meta, tmp_path / "z")
    with pytest.raises(ValueError, match="n_ctx"):
        export_family(models, tok_path, {"x": np.zeros((2, 17), np.int64)}, meta, tmp_path / "z")
    with pytest.raises(FileNotFoundError):
        zoo.load("tiny-ln", data_dir=tmp_path / "nothing")


def test_token_byte_lengths_match_decoding(tiny):
    _, tok_path, tok, _, _, _ = tiny
    lengths = token_byte_lengths(Path(tok_path).read_text())
    assert lengths[0] == 0  # <|endoftext|>
    ids = tok.encode(TEXT[:2000] + " naïve café")
    assert lengths[ids].sum() == len((TEXT[:2000] + " naïve café").encode("utf-8"))


def test_train_family_end_to_end_and_resume(tmp_path, monkeypatch):
    """Tokenizer -> pretraining -> LN-free and vanilla fine-tunes -> export, on a tiny model; then resume."""
    (tmp_path / "a.txt").write_text(TEXT[: len(TEXT) // 2])
    (tmp_path / "b.txt").write_text(TEXT[len(TEXT) // 2:])
    (tmp_path / "held.txt").write_text(TEXT[::-1])
    kw = dict(minutes=1.0, max_steps=3, ft_steps=3, seed=0, vocab_size=300, n_heldout=4,
              heldout_files={"persuasion": tmp_path / "held.txt", "cfi": tmp_path / "b.txt"},
              ft_batch_size=4, ft_eval_rows=2, precision="fp32", n_eval=None, progress=False,
              model_overrides=dict(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=16),
              train_overrides=dict(batch_size=4, warmup_steps=1, threads=1,
                                   ckpt_every=2, eval_seqs=2, log_every=1),
              export_dir=tmp_path / "export", model_card=tmp_path / "card.md", command="test-command")
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    record = train_family(files, tmp_path / "run", **kw)
    assert {k: v["status"] for k, v in record["stages"].items()} == {
        "tokenizer": "ran", "heldout": "ran", "pretrain": "ran", "ft_lnfree": "ran", "ft_vanilla": "ran",
        "export": "ran"}
    manifest = zoo.info(tmp_path / "export")
    prov = {n: manifest["models"][n]["provenance"] for n in zoo.NAMES}
    assert prov["tiny-ln"]["steps"] == 3 and prov["tiny-ln"]["tokens_seen"] == 3 * 4 * 16
    assert prov["tiny-lnfree"]["tokens_seen"] == 3 * 4 * 16 + 3 * 4 * 16 and prov["tiny-lnfree"]["steps"] == 3
    assert prov["tiny-lnfree"]["command"] == "test-command"
    free = zoo.load("tiny-lnfree", device="cpu", data_dir=tmp_path / "export")
    vanilla = zoo.load("tiny-vanilla", device="cpu", data_dir=tmp_path / "export")
    base = zoo.load("tiny-ln", device="cpu", data_dir=tmp_path / "export")
    assert free.is_ln_free and set(vanilla.ln_modes().values()) == {"live"}
    assert not torch.equal(vanilla.W_in, base.W_in)  # the vanilla control was fine-tuned
    assert (tmp_path / "card.md").read_text() == render_model_card(manifest)
    # second call: every stage found, nothing retrained, a second invocation recorded
    mtime = (tmp_path / "run" / "ft_lnfree" / "summary.json").stat().st_mtime_ns
    record = train_family(files, tmp_path / "run", **kw)
    assert len(record["invocations"]) == 2
    assert (tmp_path / "run" / "ft_lnfree" / "summary.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="seed"):
        train_family(files, tmp_path / "run", **{**kw, "seed": 1})


def test_cli_info_and_card(tiny, tmp_path, capsys):
    from lnfree.cli import main

    _export(tiny, tmp_path / "zoo", n_eval=2)
    assert main(["zoo", "info", "--data-dir", str(tmp_path / "zoo")]) == 0
    out = capsys.readouterr().out
    assert "tiny-lnfree" in out and "ln_free=True" in out
    assert main(["zoo", "card", "--json", str(tmp_path / "zoo" / "zoo.json"), "--out", str(tmp_path / "c.md")]) == 0
    assert (tmp_path / "c.md").read_text() == render_model_card(zoo.info(tmp_path / "zoo"))
    assert main(["zoo", "export", "--run", str(tmp_path / "missing"), "--to", str(tmp_path / "x")]) == 2
    assert write_model_card(tmp_path / "zoo" / "zoo.json", tmp_path / "d.md").exists()
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text())["format"] == "lnfree-zoo"
