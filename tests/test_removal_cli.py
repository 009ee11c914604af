"""`lnfree remove-ln` as a command-line user expects it (issue 23.4): Ctrl-C checkpoints and says how to
resume, every flag has help, repeated data warns, flag errors speak in flags, `lnfree --version`."""

import argparse
import json
import os
import shlex
import signal
import warnings

import pytest
import torch

import lnfree
from conftest import REMOVAL_RUN, make_model, removal_data, removal_tl_dir
from lnfree.cli import build_parser, main
from lnfree.removal import latest_checkpoint, remove_layernorm
from lnfree.removal import trainer as trainer_mod
from lnfree.training.interrupt import TrainingInterrupted

RUN = REMOVAL_RUN


def _data(n=48, seed=5):
    return removal_data(n, seed).numpy()


def _sigint_at(step):
    def callback(record):
        if record.get("event") == "step" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: delivered to this (main) thread
    return callback


def test_sigint_checkpoints_the_finished_step_and_resumes_bit_identically(tmp_path):
    data = _data()
    with pytest.raises(TrainingInterrupted) as e:
        remove_layernorm(make_model(), data, **RUN, out_dir=tmp_path / "a", callback=_sigint_at(5))
    assert e.value.step == 5 and e.value.checkpoint.endswith("step_000005")  # not step 4: nothing lost
    assert latest_checkpoint(tmp_path / "a").name == "step_000005"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = remove_layernorm(make_model(), data, **RUN, out_dir=tmp_path / "a", resume=True)
    straight = remove_layernorm(make_model(), data, **RUN, out_dir=tmp_path / "b")
    a, b = resumed.state_dict(), straight.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_sigint_on_a_checkpoint_step_writes_nothing_new(tmp_path):
    with pytest.raises(TrainingInterrupted) as e:
        remove_layernorm(make_model(), _data(), **RUN, out_dir=tmp_path, callback=_sigint_at(4))
    assert e.value.step == 4 and latest_checkpoint(tmp_path).name == "step_000004"
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "checkpoint"] == [0, 4]


@pytest.fixture
def tl_dir(tmp_path):
    return removal_tl_dir(tmp_path)


def _args(tl_dir, out, *extra):
    return ["remove-ln", str(tl_dir), "--data", str(tl_dir.parent / "train.npy"), "--out", str(out), "--steps", "12",
            "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "16", "--eval-seqs", "8",
            "--checkpoint-every", "6", "--no-progress", *extra]


def test_cli_ctrl_c_prints_the_resume_command_which_finishes_the_run(tl_dir, tmp_path, capsys, monkeypatch):
    real = trainer_mod._Run.optimizer_step

    def step_then_ctrl_c(self, stats):
        real(self, stats)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer_mod._Run, "optimizer_step", step_then_ctrl_c)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_args(tl_dir, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 3; last checkpoint" in err and "step_000003" in err
    command = err.split("resume with: ")[1].strip()
    assert command.startswith("lnfree remove-ln ") and command.endswith(" --resume")
    monkeypatch.setattr(trainer_mod._Run, "optimizer_step", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(shlex.split(command)[1:]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_every_remove_ln_flag_has_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["remove-ln"]
    missing = [a.option_strings or a.dest for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert missing == []


def test_eval_seqs_larger_than_the_data_names_the_flag(tl_dir, tmp_path, capsys):
    args = _args(tl_dir, tmp_path / "x")
    args[args.index("--eval-seqs") + 1] = "64"  # 64 rows of 16 tokens: nothing left to train on
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--eval-seqs 64: --data gives only 64 sequences of 16 tokens" in err and "n_eval" not in err


def test_errors_speak_flags_not_python_arguments(tl_dir, tmp_path, capsys):
    assert main(_args(tl_dir, tmp_path / "x", "--preset", "gpt2-small")) == 2
    err = capsys.readouterr().err
    assert "--preset gpt2-small is for 12-layer models" in err and "drop --preset" in err
    assert "schedule=None" not in err and "Schedule" not in err
    args = _args(tl_dir, tmp_path / "y")
    args[args.index("--seq-len") + 1] = "32"  # the test model's context is 16
    assert main(args) == 2
    assert "--seq-len 32 exceeds the model's context" in capsys.readouterr().err


def test_sites_flag_removes_only_those_and_a_typo_names_the_nearest_site(tl_dir, tmp_path, capsys):
    assert main(_args(tl_dir, tmp_path / "x", "--sites", "blocks.0.ln_2")) == 2
    assert "'blocks.0.ln_2' is not a norm site of this model; did you mean 'blocks.0.ln2'?" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_args(tl_dir, tmp_path / "y", "--sites", "blocks.0.ln2", "ln_final")) == 0
    modes = lnfree.load(str(tmp_path / "y")).ln_modes()
    assert {s for s, m in modes.items() if m != "live"} == {"blocks.0.ln2", "ln_final"}
    assert {m for s, m in modes.items() if s in ("blocks.0.ln2", "ln_final")} == {"removed"}


def test_data_repeated_for_many_epochs_warns():
    with pytest.warns(UserWarning, match=r"reads its 8 training sequences 6 times over \(12 steps x batch 4\)"):
        remove_layernorm(make_model(), _data(8), **dict(RUN, checkpoint_every=100))
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remove_layernorm(model, _data(48), **dict(RUN, checkpoint_every=100))
    assert not [w for w in caught if "times over" in str(w.message)]  # 48 rows read once: no warning


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lnfree {lnfree.__version__}"
