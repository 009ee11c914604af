"""Training that fails safe (issue 13): divergence from step 1, nothing diverged kept as good, clear errors,
resume guards, argument checks by their CLI names, token lists, file modes, missing CUDA."""

import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch

from conftest import REMOVAL_RUN, REMOVAL_SCHED, make_model, removal_data, removal_tl_dir
from lnfree.removal import DivergedError, latest_checkpoint, read_checkpoint, remove_layernorm
from lnfree.training import CheckpointDir, DivergenceGuard, JsonlLog, sigma_problem

SCHED, RUN, _data = REMOVAL_SCHED, REMOVAL_RUN, removal_data


def _finite(weights):
    params = {n for n, _ in make_model().named_parameters()}  # buffers (IGNORE = -inf) aside
    return all(bool(torch.isfinite(v).all()) for k, v in weights.items() if k in params)


# ---- divergence ---------------------------------------------------------------------------------------
def test_guard_bounds_from_the_first_step():
    g = DivergenceGuard()
    assert g.check(5.28, ce=5.28) is None  # no reference yet: only non-finite values are refused
    assert "non-finite loss" in g.check(float("inf"))
    g.record(5.28, ce=5.28)
    assert "diverged" in g.check(2.6e12, ce=2.6e12)  # step 2 of `--lr 100`: caught with one step of history
    assert g.check(7.0, ce=7.0) is None  # a rise within 3x / +2 of the start is allowed
    assert "cross-entropy diverged" in g.check(6.0, ce=17.0)  # the CE alone
    assert "non-finite gradient norm" in g.check(5.0, ce=5.0, grad_norm=float("nan"))
    state = json.loads(json.dumps(g.state_dict()))
    h = DivergenceGuard()
    h.load_state_dict(state)
    assert h.initial == g.initial and list(h.history) == list(g.history)


def test_sigma_sane_range():
    assert sigma_problem("ln_final", 2.0, first=2.5) is None
    assert "sane range" in sigma_problem("ln_final", 3e8, first=2.5)
    assert "sane range" in sigma_problem("ln_final", 1e-4, first=2.5)
    assert "finite" in sigma_problem("ln_final", float("nan"), first=None)
    assert "> 0" in sigma_problem("ln_final", 0.0, first=None)


def test_lr_100_never_checkpoints_a_diverged_state(tmp_path):
    """`--lr 100`: every checkpoint after step 0 would hold diverged weights; none is written or marked good."""
    events = []
    with pytest.warns(UserWarning, match="rolled back"), pytest.raises(DivergedError) as err:
        remove_layernorm(make_model(), _data(), **dict(RUN, lr=100.0, min_lr=1.0, checkpoint_every=1),
                         out_dir=tmp_path, callback=events.append)
    msg = str(err.value)
    assert "\n" not in msg and "gave up" in msg
    assert msg.count(str(tmp_path / "checkpoints" / "step_000000")) == 1  # the last REALLY good checkpoint
    assert latest_checkpoint(tmp_path).name == "step_000000"
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_000000"]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [0]
    ck = read_checkpoint(latest_checkpoint(tmp_path))
    assert _finite(ck["weights"]) and ck["state"]["step"] == 0
    reasons = [e["reason"] for e in events if e["event"] == "rollback"]
    assert len(reasons) == 3 and all("diverged" in r or "non-finite" in r for r in reasons)  # max_rollbacks, then the error
    # no step after the first was ever accepted: step 1's weights fail the next batch's check
    assert max(e["step"] for e in events if e["event"] == "step") <= 1


def test_sigma_leaving_its_range_is_rolled_back():
    """A residual blown up x1e4 before any site is frozen: LN hides it from the loss, the sigma check does not."""
    model = make_model()
    calls = [0]

    def hook(module, inputs, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 3:  # the first micro-batch of step 1 (all sites live)
                return output * 1e4

    model.blocks[0].register_forward_hook(hook)
    events = []
    with pytest.warns(UserWarning, match="sane range"):
        out = remove_layernorm(model, _data(), **dict(RUN, aux_lambda=0.0), callback=events.append)
    rb = [e for e in events if e["event"] == "rollback"]
    assert len(rb) == 1 and rb[0]["failed_step"] == 1 and "sane range" in rb[0]["reason"]
    freezes = [v for e in events if e["event"] == "freeze" for v in e["sigma"].values()]
    assert max(freezes) < 1e3 and out.is_ln_free


def test_cli_divergence_is_one_line_and_exit_2(tmp_path, capsys):
    from lnfree.cli import main

    src = removal_tl_dir(tmp_path)
    args = ["remove-ln", str(src), "--data", str(tmp_path / "train.npy"), "--out", str(tmp_path / "run"),
            "--steps", "12", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "16", "--eval-seqs", "0",
            "--lr", "100", "--min-lr", "1", "--checkpoint-every", "1", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and "step_000000" in err[0] and "gave up" in err[0]


# ---- resume guards and the log ------------------------------------------------------------------------
def test_resume_needs_something_to_resume(tmp_path, capsys):
    with pytest.raises(ValueError, match="nothing to resume: .* does not exist"):
        remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path / "typo", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to resume: .*holds no removal checkpoint"):
        remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path / "empty", resume=True)
    assert not (tmp_path / "typo").exists() and not any((tmp_path / "empty").iterdir())  # nothing started
    out = remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path / "auto", resume="auto")
    assert out.is_ln_free and latest_checkpoint(tmp_path / "auto").name == "step_000012"
    from lnfree.cli import main

    assert main(["remove-ln", str(removal_tl_dir(tmp_path)), "--data", str(tmp_path / "train.npy"), "--out",
                 str(tmp_path / "typo2"), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_log_rewind_keeps_one_run(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    for s in range(1, 7):
        log.write({"event": "step", "step": s})
        if s == 4:
            log.write({"event": "checkpoint", "step": 4})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # a line cut short by the kill
    assert log.rewind(4) == 2
    assert [(r["event"], r["step"]) for r in log.records()] == [("step", 1), ("step", 2), ("step", 3), ("step", 4),
                                                                ("checkpoint", 4)]
    plain = JsonlLog(tmp_path / "plain.jsonl")  # no checkpoint records (the zoo's pretraining log)
    for s in (10, 20, 30):
        plain.write({"step": s})
    plain.rewind(20)
    assert [r["step"] for r in plain.records()] == [10, 20]


# ---- arguments ------------------------------------------------------------------------------------------
def test_arguments_checked_first_by_their_names(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 2, got -5$"):
        remove_layernorm(make_model(), "no/such/file.npy", steps=-5)
    with pytest.raises(ValueError, match=r"^lr must be > 0, got -1"):
        remove_layernorm(make_model(), _data(), lr=-1)
    with pytest.raises(ValueError, match=r"^distill must lie in \[0, 1\]"):
        remove_layernorm(make_model(), _data(), distill=2.0)
    from lnfree.cli import main

    np.save(tmp_path / "train.npy", _data(64).numpy().reshape(-1))
    base = ["remove-ln", str(tmp_path / "not-loaded"), "--data", str(tmp_path / "train.npy"), "--out",
            str(tmp_path / "run")]
    for flags, expected in ((["--steps", "-5"], "--steps must be an integer >= 2, got -5"),
                            (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
                            (["--eval-seqs", "-1"], "--eval-seqs must be an integer >= 0, got -1"),
                            (["--lr", "nan"], "--lr must be a finite number, got nan"),
                            (["--lora-rank", "0"], "--lora-rank must be an integer >= 1, got 0"),
                            (["--device", "cuda"], "--device='cuda': no CUDA device is available")):
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert expected in err and "not-loaded" not in err, (flags, err)  # checked before the model is loaded


def test_token_lists_accepted_or_explained():
    out = remove_layernorm(make_model(), [[1, 2, 3]], steps=4, progress=False)
    assert out.is_ln_free and out.removal_summary["config"]["seq_len"] == 3
    out = remove_layernorm(make_model(), [list(range(1, 40))], steps=4, seq_len=8, batch_size=2, progress=False)
    assert out.is_ln_free
    with pytest.raises(TypeError, match="nested. list of token ids"):
        remove_layernorm(make_model(), [[0.5, 1.5]], steps=4, progress=False)
    with pytest.raises(ValueError, match="different lengths"):
        remove_layernorm(make_model(), [[1, 2, 3], [1, 2]], steps=4, progress=False)


def test_no_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.fail("this test is written for a machine without CUDA")  # never skip into green
    with pytest.raises(ValueError, match="no CUDA device is available.*device='cpu'"):
        remove_layernorm(make_model(), _data(), **RUN, device="cuda")


# ---- file modes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            remove_layernorm(make_model(), _data(), **dict(RUN, checkpoint_every=6), out_dir=tmp_path)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".pt")]
    assert len(weights) >= 5  # 2 checkpoints x (weights + optimizer), final_tl, final
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_checkpoint_dir_marks_only_what_it_is_told(tmp_path):
    ck = CheckpointDir(tmp_path, keep=2)
    a = ck.write(1, weights={"w": torch.ones(2)}, state={"step": 1}, tensors={"x": torch.zeros(1)})
    assert ck.latest() is None  # written, not yet good
    ck.mark_good(a)
    b = ck.write(2, weights={"w": torch.full((2,), float("nan"))}, state={"step": 2}, tensors={})
    ck.discard(b)
    assert ck.latest() == a and not b.exists()
    for s in (3, 4, 5):
        ck.mark_good(ck.write(s, weights={"w": torch.ones(2)}, state={"step": s}, tensors={}))
    assert sorted(p.name for p in ck.dir.glob("step_*")) == ["step_000004", "step_000005"]
    with pytest.raises(RuntimeError, match="refusing"):
        ck.discard(ck.latest())
    got = CheckpointDir.read(ck.latest())
    assert got["state"] == {"step": 5} and torch.equal(got["weights"]["w"], torch.ones(2))


def test_cli_remove_ln_takes_a_zoo_name(tmp_path):
    """`lnfree remove-ln tiny-ln` resolves the zoo name through lnfree.load (issue 12)."""
    from lnfree import zoo
    from lnfree.cli import main

    rows = zoo.heldout("persuasion")[:24, :32].numpy()
    np.save(tmp_path / "rows.npy", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["remove-ln", "tiny-ln", "--data", str(tmp_path / "rows.npy"), "--out", str(tmp_path / "run"),
                     "--steps", "3", "--batch-size", "2", "--eval-seqs", "0", "--device", "cpu", "--lora-rank", "2",
                     "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ln_free"] and summary["variant"] == "lora" and summary["steps"] == 3
