"""Fast tests for lnfree.zoo.train (tokenizer, tiny pretraining, checkpoint resume)."""

import math

import numpy as np
import pytest
import torch

from lnfree.zoo import train as zt

TEXT = """It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife. However little known the feelings or
views of such a man may be on his first entering a neighbourhood, this truth is so
well fixed in the minds of the surrounding families, that he is considered the
rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield
Park is let at last?" Mr. Bennet replied that he had not. "But it is," returned she;
"for Mrs. Long has just been here, and she told me all about it."

Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy
disposition, seemed to unite some of the best blessings of existence; and had lived
nearly twenty-one years in the world with very little to distress or vex her.
When Mary and John went to the store, John gave a drink to Mary. Then Anne and
Henry went to the garden, and Henry gave a book to Anne.

In the beginning God created the heavens and the earth. The earth was formless and
empty. Darkness was on the surface of the deep and God's Spirit was hovering over
the surface of the waters. God said, "Let there be light," and there was light.
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    f = d / "sample.txt"
    f.write_text(TEXT * 3)
    path = zt.train_tokenizer([f], vocab_size=400, out_path=d, boost_words=("John", "Mary"),
                              boost_count=200)
    return zt.load_tokenizer(path), f


def tiny_config(d_vocab, **kw):
    model = zt.base_model_kwargs(d_vocab, n_layers=1, d_model=32, n_heads=2, d_head=16,
                                 d_mlp=64, n_ctx=32)
    base = dict(batch_size=4, seq_len=32, warmup_steps=2, max_steps=20, lr=3e-3, min_lr=3e-4,
                ckpt_every=3, log_every=5, eval_every=0, model=model, threads=1)
    base.update(kw)
    return zt.TrainConfig(**base)


def test_tokenizer_roundtrip_and_names(tok):
    t, _ = tok
    assert t.bos_token == t.eos_token == t.pad_token == zt.EOT
    assert zt.eot_id(t) == 0 and len(t) == 400
    s = "Emma went to the store."
    assert t.decode(t.encode(s)) == s
    assert set(zt.single_token_names(t, ["John", "Mary"])) == {"John", "Mary"}


def test_tokenizer_with_transformer_lens(tok):
    t, _ = tok
    assert t.encode(" John") == [t.convert_tokens_to_ids("ĠJohn")]  # no BOS from encode
    model = zt.build_model(tiny_config(len(t)).model, seed=0, tokenizer=t)
    toks = model.to_tokens("When Mary and John went")
    assert toks[0, 0].item() == 0 and toks.shape[1] == 1 + len(t.encode("When Mary and John went"))
    assert model.to_str_tokens(" Mary") == [zt.EOT, " Mary"]


def test_tokenize_files_and_heldout(tok):
    t, f = tok
    ids = zt.tokenize_files([f, f], t)
    assert ids.dtype == np.uint16 and ids[0] == 0 and ids[-1] == 0
    assert (ids == 0).sum() == 3
    rows = zt.heldout_sequences(f, t, n_seq=5, seq_len=32)
    assert rows.shape == (5, 32) and (rows[:, 0] == 0).all() and rows.dtype == np.uint16


def test_lr_schedule():
    tc = zt.TrainConfig(warmup_steps=10, max_steps=100)
    assert zt.lr_at(9, tc) == pytest.approx(tc.lr)
    assert zt.lr_at(100, tc) == pytest.approx(tc.min_lr)
    assert zt.lr_at(50, tc) < zt.lr_at(20, tc)


def test_loss_decreases_on_repeated_batch(tok):
    t, f = tok
    torch.manual_seed(0)
    tc = tiny_config(len(t))
    model = zt.build_model(tc.model, seed=0)
    opt = zt.make_optimizer(model, tc)
    ids = zt.tokenize_files([f], t)
    batch = zt.sample_batch(ids, tc, torch.Generator().manual_seed(0), 0)
    losses = []
    for step in range(20):
        for g in opt.param_groups:
            g["lr"] = zt.lr_at(step, tc)
        loss = model(batch, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0


def test_resume_matches_uninterrupted(tok, tmp_path):
    t, f = tok
    ids = zt.tokenize_files([f], t)
    tc = tiny_config(len(t), max_steps=7)
    full, h_full = zt.pretrain(ids, tc, tmp_path / "full", progress=False)
    assert len(h_full) == 7 and all(math.isfinite(x) for x in h_full)
    # interrupted: stop after 4 steps by a tiny max_steps run sharing the schedule
    # (simulate a crash: keep only the step-3 checkpoint, then resume to 7).
    part_dir = tmp_path / "part"
    zt.pretrain(ids, tc, part_dir, progress=False)  # writes ckpt at 3, 6, 7
    import shutil
    ck = part_dir / "checkpoints"
    for p in ck.glob("step_*"):
        if p.name != "step_000006":
            shutil.rmtree(p)
    (ck / "latest").write_text("step_000006\n")
    shutil.rmtree(part_dir / "final")
    resumed, h_res = zt.pretrain(ids, tc, part_dir, resume=True, progress=False)
    assert len(h_res) == 1 and h_res[0] == pytest.approx(h_full[-1], abs=0)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    loaded = zt.load_run(part_dir)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_resume_from_time_budget_stop(tok, tmp_path):
    """A run stopped early (max_minutes) and resumed equals an uninterrupted one."""
    t, f = tok
    ids = zt.tokenize_files([f], t)
    tc = tiny_config(len(t), max_steps=6)
    full, _ = zt.pretrain(ids, tc, tmp_path / "full", progress=False)
    tc_short = tiny_config(len(t), max_steps=6, max_minutes=1e-9)  # stops before step 1
    _, h0 = zt.pretrain(ids, tc_short, tmp_path / "run", progress=False)
    assert h0 == []
    resumed, h = zt.pretrain(ids, tc, tmp_path / "run", resume=True, progress=False)
    assert len(h) == 6
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_config_embeds_the_shared_optimiser_config():
    from lnfree.training import OptimConfig, lr_at

    tc = zt.TrainConfig(warmup_steps=10, max_steps=100, lr=2e-3, min_lr=1e-4, weight_decay=0.1)
    assert isinstance(tc.optim, OptimConfig)
    assert (tc.optim.steps, tc.optim.lr, tc.optim.min_lr, tc.optim.warmup, tc.optim.horizon) == (100, 2e-3, 1e-4, 10, 100)
    assert [zt.lr_at(s, tc) for s in (0, 50, 100)] == [lr_at(s, tc.optim) for s in (0, 50, 100)]
    with pytest.raises(ValueError, match="min_lr"):
        zt.TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        zt.TrainConfig(batch_size=0)
    with pytest.raises(Exception):  # frozen: a changed max_steps cannot leave `optim` stale
        tc.max_steps = 5


def test_old_run_dir_layout_still_resumes(tok, tmp_path):
    """A run dir written before lnfree.training (ckpt/latest.json + state.pt) resumes bit-identically."""
    import json
    import shutil

    t, f = tok
    ids = zt.tokenize_files([f], t)
    tc = tiny_config(len(t), max_steps=7)
    full, h_full = zt.pretrain(ids, tc, tmp_path / "full", progress=False)
    old = tmp_path / "old"
    zt.pretrain(ids, tc, old, progress=False)  # checkpoints at 3, 6, 7: keep 6, in the old layout
    new_ck = old / "checkpoints" / "step_000006"
    (old / "ckpt").mkdir()
    legacy = old / "ckpt" / "step_000006"
    shutil.copytree(new_ck, legacy)
    tensors = torch.load(legacy / "optimizer.pt", weights_only=True)
    state = json.loads((legacy / "state.json").read_text())
    torch.save({"step": 6, "optimizer": tensors["optimizer"], "torch_rng": tensors["torch_rng"],
                "data_rng": tensors["data_rng"], "elapsed_s": state["elapsed_s"], "extra_json": "{}"}, legacy / "state.pt")
    for name in ("optimizer.pt", "state.json"):
        (legacy / name).unlink()
    (old / "ckpt" / "latest.json").write_text(json.dumps({"step": 6, "dir": "step_000006"}))
    shutil.rmtree(old / "checkpoints")
    shutil.rmtree(old / "final")
    assert zt.latest_checkpoint(old) == legacy
    resumed, h = zt.pretrain(ids, tc, old, resume=True, progress=False)
    assert h == pytest.approx(h_full[-1:], abs=0)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_resumed_log_reads_as_one_run_and_files_respect_umask(tok, tmp_path):
    import json
    import os
    import shutil
    import stat

    t, f = tok
    ids = zt.tokenize_files([f], t)
    tc = tiny_config(len(t), max_steps=7, log_every=1)
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        zt.pretrain(ids, tc, run, progress=False)  # checkpoints at 3, 6, 7; log lines for steps 1..7
        ck = run / "checkpoints"
        for p in ck.glob("step_*"):
            if p.name != "step_000006":
                shutil.rmtree(p)
        (ck / "latest").write_text("step_000006\n")  # as if killed after step 7's log line, before its checkpoint
        shutil.rmtree(run / "final")
        zt.pretrain(ids, tc, run, resume=True, progress=False)
    finally:
        os.umask(old)
    steps = [r["step"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 8))  # step 7 once, not twice
    modes = {stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert modes == {0o644}
