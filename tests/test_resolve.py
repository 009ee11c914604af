"""`lnfree.load`: one resolver for every kind of model reference."""

import pytest
import torch

import lnfree
from conftest import REMOVAL_RUN, make_model, removal_data
from lnfree import zoo
from lnfree.loading import HubUnreachableError
from lnfree.model import LNFreeTransformer


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def removal_run(tmp_path_factory):
    """A finished 12-step removal run of the tiny test model (checkpoints/, final_tl/, final/, summary.json)."""
    from lnfree.removal import remove_layernorm

    out = tmp_path_factory.mktemp("run")
    return out, remove_layernorm(make_model(), removal_data(), **REMOVAL_RUN, out_dir=out)


def test_zoo_name(tokens):
    model = lnfree.load("tiny-lnfree", device="cpu")
    assert isinstance(model, LNFreeTransformer) and model.is_ln_free
    tk = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, tk), logits(zoo.load("tiny-lnfree", device="cpu"), tk))


def test_from_pretrained_takes_zoo_names():
    model = LNFreeTransformer.from_pretrained("tiny-ln", device="cpu")
    assert model.zoo_name == "tiny-ln" and model.ln_mode("ln_final") == "live"


def test_dtype(tmp_path):
    assert lnfree.load("tiny-ln", device="cpu", dtype=torch.float64).W_E.dtype == torch.float64


def test_removal_run_dir_final_and_checkpoint(removal_run, tokens):
    out, trained = removal_run
    model = lnfree.load(out, device="cpu")  # finished run: final_tl/
    assert model.is_ln_free
    assert torch.allclose(logits(model, tokens), logits(trained, tokens), atol=1e-5)
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    from lnfree.removal import load_checkpoint

    direct, _ = load_checkpoint(ckpt)
    via = lnfree.load(ckpt, device="cpu")
    assert via.ln_modes() == direct.ln_modes()
    assert torch.equal(logits(via, tokens), logits(direct, tokens))


def test_tl_weights_dir(removal_run, tokens):
    out, trained = removal_run
    model = lnfree.load(out / "final_tl", device="cpu")
    assert torch.allclose(logits(model, tokens), logits(trained, tokens), atol=1e-5)


def test_hf_dir(removal_run, tokens):
    out, trained = removal_run
    with pytest.warns(UserWarning, match="no tokenizer in .* is not GPT-2's"):  # the toy run's 61-token vocabulary
        model = lnfree.load(str(out / "final"), device="cpu")  # HF GPT-2 in the released LN-free format
    assert model.is_ln_free
    assert torch.allclose(logits(model, tokens), logits(trained, tokens), atol=1e-4)


def test_gguf_file(tmp_path, monkeypatch):
    from test_gguf import TOKENS, hf_llama, write_gguf

    monkeypatch.setenv("LNFREE_CACHE_DIR", str(tmp_path / "cache"))
    hf = hf_llama()
    model = lnfree.load(write_gguf(tmp_path / "m.gguf", hf), device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(TOKENS), hf(TOKENS).logits, atol=1e-4)


def test_hub_id_offline_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="hub is disabled"):
        lnfree.load("someone/some-model-that-is-not-cached")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("spec", ["./no/such/dir", "/tmp/definitely-missing.gguf", "not a model!"])
def test_unknown_spec_lists_kinds(spec):
    with pytest.raises(ValueError, match=r"(?s)accepted: a zoo name \(tiny-ln.*smollm2-135m\).*\.gguf.*removal run"
                                         r".*TransformerLens.*Hugging Face model directory.*hub id"):
        lnfree.load(spec)


def test_other_files_and_empty_dirs(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is a file but not a \.gguf; accepted: a zoo name"):
        lnfree.load(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no model lnfree can read.*accepted:"):
        lnfree.load(tmp_path / "empty")


def test_bad_arguments():
    with pytest.raises(TypeError, match="spec must be"):
        lnfree.load(3)
    with pytest.raises(TypeError, match="dtype must be"):
        lnfree.load("tiny-ln", dtype="float32")
    with pytest.raises(TypeError, match=r"\['fold_ln'\] apply to HF directories"):
        lnfree.load("tiny-ln", fold_ln=True)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for load in (lnfree.load, lnfree.load_model, zoo.load):
        with pytest.raises(ValueError, match=r"no CUDA device is available.*device='cpu'"):
            load("tiny-ln" if load is not lnfree.load_model else "gpt2", device="cuda")


def test_zoo_pretraining_run_and_checkpoint(tmp_path):
    import numpy as np

    from lnfree.zoo import train as zt

    model_kw = zt.base_model_kwargs(61, n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=16)
    tc = zt.TrainConfig(batch_size=4, seq_len=16, warmup_steps=1, max_steps=3, lr=3e-3, min_lr=3e-4, ckpt_every=2,
                        log_every=5, eval_every=0, model=model_kw, threads=1)
    ids = np.random.default_rng(0).integers(1, 61, 2000).astype(np.int64)
    trained, _ = zt.pretrain(ids, tc, tmp_path / "run", progress=False)
    tk = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    for spec in (tmp_path / "run", tmp_path / "run" / "final"):
        model = lnfree.load(spec, device="cpu")
        assert isinstance(model, LNFreeTransformer)
        assert torch.allclose(logits(model, tk), logits(trained, tk), atol=1e-5)
    step = zt.latest_checkpoint(tmp_path / "run")
    assert step is not None and isinstance(lnfree.load(step, device="cpu"), LNFreeTransformer)
