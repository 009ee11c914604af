"""Loading a checkpoint never executes pickled code.

A pickle can run any callable while it is read. Every loader in lnfree that reads pickle-based
files (``pytorch_model.bin`` in `lnfree.loading`, removal checkpoints' ``optimizer.pt``, zoo
pretraining's ``state.pt``) must use ``torch.load(..., weights_only=True)``, which only rebuilds
tensors and plain containers and refuses anything else.

Each malicious file here carries a payload that creates a marker file when unpickled. The tests
first prove the payload is live (an unrestricted ``pickle.load`` / ``torch.load(weights_only=False)``
of the same file creates the marker), then check that lnfree refuses the file and the marker never
appears. A source scan checks the rule statically for every module, including those not exercised
here: every ``torch.load`` passes ``weights_only=True`` literally, no ``pickle``/``dill``/``joblib``
loader is called, and no ``np.load`` allows pickles.
"""

from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import lnfree
from lnfree.loading import CheckpointError, load_model

SRC = Path(lnfree.__file__).parent


class _Payload:
    """Unpickling this calls exec(...), which creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _gpt2_state_and_config(path: Path) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                    bos_token_id=None, eos_token_id=None))
    hf.config.save_pretrained(path)
    return dict(hf.state_dict())


def _malicious_torch_file(file: Path, marker: Path, state: dict, legacy: bool = False) -> None:
    state = dict(state)
    state["lm_head.extra"] = _Payload(marker)
    torch.save(state, file, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    # the payload is live: an unrestricted load runs it
    torch.load(file, weights_only=False)
    assert marker.exists(), "the payload did not run: the test would prove nothing"
    marker.unlink()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_load_model_refuses_malicious_pytorch_bin(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    state = _gpt2_state_and_config(tmp_path)
    _malicious_torch_file(tmp_path / "pytorch_model.bin", marker, state, legacy)
    with pytest.raises(CheckpointError, match=r"refused to load .*pytorch_model.bin.*can run arbitrary code"):
        load_model(tmp_path, device="cpu", tokenizer=False)
    assert not marker.exists()


def test_load_model_refuses_malicious_shard(tmp_path):
    """A sharded checkpoint whose second shard is malicious: refused, nothing executed."""
    marker = tmp_path / "PWNED"
    state = _gpt2_state_and_config(tmp_path)
    keys = sorted(state)
    half = len(keys) // 2
    torch.save({k: state[k] for k in keys[:half]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    _malicious_torch_file(tmp_path / "pytorch_model-00002-of-00002.bin", marker, {k: state[k] for k in keys[half:]})
    weight_map = {k: f"pytorch_model-0000{1 + (i >= half)}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(tmp_path, device="cpu", tokenizer=False)
    assert not marker.exists()


def test_load_model_refuses_raw_pickle(tmp_path):
    """Not even a torch file: a bare pickle stream named pytorch_model.bin."""
    marker = tmp_path / "PWNED"
    _gpt2_state_and_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError):
        load_model(tmp_path, device="cpu", tokenizer=False)
    assert not marker.exists()


def test_benign_pytorch_bin_still_loads(tmp_path):
    """The guard is not a blanket refusal: a plain tensor state dict loads (control)."""
    state = _gpt2_state_and_config(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_model(tmp_path, device="cpu", tokenizer=False)
    assert torch.equal(model.W_E.detach(), state["transformer.wte.weight"])


# ---- removal checkpoints ------------------------------------------------------------------------------
def _removal_checkpoint(path: Path, optimizer_state) -> Path:
    from safetensors.torch import save_file

    from lnfree.removal.trainer import CHECKPOINT_FORMAT

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    torch.save(optimizer_state, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "step": 1}))
    return path


def test_removal_checkpoint_refuses_malicious_optimizer_state(tmp_path):
    from lnfree.removal import read_checkpoint

    marker = tmp_path / "PWNED"
    ck = _removal_checkpoint(tmp_path / "step_000001", {"state": {}, "param_groups": [{"lr": 1.0}]})
    _malicious_torch_file(ck / "optimizer.pt", marker, {"state": {}, "param_groups": [{"lr": 1.0}]})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_checkpoint(ck)
    assert not marker.exists()


def test_removal_checkpoint_reads_real_optimizer_state(tmp_path):
    """weights_only=True still reads the trainer's own AdamW state (so resumes keep working)."""
    from lnfree.removal import read_checkpoint

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.sum().backward()
    opt.step()
    ck = _removal_checkpoint(tmp_path / "step_000001", opt.state_dict())
    got = read_checkpoint(ck)["optimizer"]
    assert torch.equal(got["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert got["param_groups"][0]["lr"] == pytest.approx(1e-3)


# ---- static scan of the whole package ------------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


UNSAFE_LOADERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
                  "dill.loads", "joblib.load", "pandas.read_pickle", "pd.read_pickle", "torch.jit.load",
                  "shelve.open", "marshal.load", "marshal.loads"}


def test_every_loader_in_the_package_is_safe():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 15
    torch_loads, problems = [], []
    for file in files:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        where = lambda node: f"{file.relative_to(SRC.parent)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):  # `from pickle import load` etc. would hide a loader from the call scan
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "joblib", "torch", "marshal"):
                names = {a.name for a in node.names}
                if names & {"load", "loads", "Unpickler"}:
                    problems.append(f"{where(node)}: imports a loader from {node.module}: {sorted(names)}")
        for call in _calls(tree):
            name = _dotted(call.func)
            if name in UNSAFE_LOADERS:
                problems.append(f"{where(call)}: {name}(...) can run pickled code")
            if name == "torch.load":
                torch_loads.append(where(call))
                flag = _keyword(call, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where(call)}: torch.load without a literal weights_only=True")
            if name in ("np.load", "numpy.load"):
                flag = _keyword(call, "allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where(call)}: {name} with allow_pickle={ast.unparse(flag)}")
    assert not problems, "\n".join(problems)
    # the scan sees the loaders we know of (so it cannot pass by missing everything)
    assert any("io/hf.py" in w for w in torch_loads), torch_loads
    assert any("training/checkpoints.py" in w for w in torch_loads), torch_loads  # the shared checkpoint reader


def test_scan_catches_unsafe_code():
    """The scanner itself: an unsafe snippet is flagged (guards against a scan that never fires)."""
    bad = ast.parse("import torch, pickle\ntorch.load(f)\ntorch.load(f, weights_only=flag)\npickle.loads(b)\n")
    flagged = [c for c in _calls(bad) if _dotted(c.func) == "torch.load"
               and not (isinstance(_keyword(c, "weights_only"), ast.Constant) and _keyword(c, "weights_only").value)]
    assert len(flagged) == 2
    assert any(_dotted(c.func) in UNSAFE_LOADERS for c in _calls(bad))


def test_saved_checkpoints_contain_no_pickle(tmp_path):
    """What lnfree writes for models is safetensors + JSON: loadable without any unpickling."""
    from safetensors.torch import save_file

    from lnfree.loading import save_pretrained

    state = _gpt2_state_and_config(tmp_path / "src")
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
              str(tmp_path / "src" / "model.safetensors"))
    model = load_model(tmp_path / "src", device="cpu", tokenizer=False)
    save_pretrained(model, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pickle"))], names
    assert not zipfile.is_zipfile(tmp_path / "out" / "model.safetensors")
