"""The model I/O layer (lnfree.io): save_pretrained in every mode, derived directories, the one resolver's policy."""

import copy
import json

import pytest
import torch

import lnfree
from conftest import make_model
from lnfree import zoo
from lnfree._errors import CheckpointError
from lnfree.io import resolve
from lnfree.io import zoo as io_zoo
from lnfree.io.save import save_derived, save_pretrained
from lnfree.removal.lora import apply_lora, merge_lora
from test_tl_compat import ARCHS, _arch_model

TOKENS = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(3))


def _in_mode(arch: str, mode: str):
    model = _arch_model(arch)
    model.estimate_ln_scales(TOKENS)
    if mode == "frozen":
        model.freeze_ln()
    elif mode == "removed":
        model.remove_ln()
    elif mode == "mixed":  # removed, frozen and live sites in one model
        model.remove_ln(["blocks.0.ln2", "ln_final"]).freeze_ln(["blocks.1.ln1.qk", "blocks.0.ln1.v"], scales=2.5)
    return model


def _same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert json.dumps(a.ln_state()) == json.dumps(b.ln_state())
    with torch.no_grad():
        assert torch.equal(a(TOKENS), b(TOKENS))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["live", "frozen", "removed", "mixed"])
def test_save_pretrained_reads_back_bit_identically(arch, mode, tmp_path):
    model = _in_mode(arch, mode)
    assert save_pretrained(model, tmp_path / "m", format="lnfree") == "lnfree"
    back = lnfree.load(tmp_path / "m", device="cpu")
    _same_model(model, back)
    assert back.ln_modes() == model.ln_modes() and back.cfg.model_name == "m"  # the directory's name


@pytest.mark.parametrize("arch", ["llama", "neox-split"])
def test_default_save_of_a_norm_free_modern_model(arch, tmp_path):
    """Today: 'cannot be written as HF GPT-2'. Now: an lnfree directory, read back exactly."""
    model = _in_mode(arch, "removed")
    assert model.save_pretrained(tmp_path / "m") == "lnfree"
    _same_model(model, lnfree.load(tmp_path / "m", device="cpu"))


def test_tiny_lnfree_saves_and_its_tokenizer_comes_back(tmp_path):
    """Today: 'never had a LayerNorm there'. tiny-lnfree's readers are not centered, so HF cannot hold it."""
    model = zoo.load("tiny-lnfree", device="cpu")
    with pytest.raises(ValueError, match="not centered.*format='lnfree'"):
        model.save_pretrained(tmp_path / "hf", format="hf")
    assert model.save_pretrained(tmp_path / "m") == "lnfree"
    back = lnfree.load(tmp_path / "m", device="cpu")
    text = "Captain Wentworth and Anne"
    assert torch.equal(back.to_tokens(text), model.to_tokens(text))
    assert back.to_string(back.to_tokens(text)[0, 1:]) == text
    _same_model(model, back)


def test_save_gpt2_shaped_model_still_writes_hf(tmp_path):
    from transformers import GPT2LMHeadModel

    model = make_model()
    assert save_pretrained(model, tmp_path / "m") == "hf"
    with torch.no_grad():
        hf = GPT2LMHeadModel.from_pretrained(tmp_path / "m")(TOKENS).logits
        assert torch.allclose(hf, model(TOKENS), atol=1e-4)


def test_live_llama_shaped_model_writes_hf_llama(tmp_path):
    from transformers import LlamaForCausalLM

    model = _arch_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].lstrip("_").startswith("b_"):
                p.zero_()  # Llama has no biases
    assert save_pretrained(model, tmp_path / "m") == "hf"
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    back = lnfree.load(tmp_path / "m", device="cpu", tokenizer=False)
    with torch.no_grad():
        ref = model(TOKENS)
        assert (hf(TOKENS).logits - ref).abs().max() < 1e-4 * ref.abs().max()
        assert (back(TOKENS) - ref).abs().max() < 1e-4 * ref.abs().max()
    model.freeze_ln("ln_final", scales=2.0)  # RMSNorm in HF has no fixed-scale form
    with pytest.raises(ValueError, match="nor a live Llama's.*'modes'.*format='lnfree'"):
        save_pretrained(model, tmp_path / "x", format="hf")


# ---- derived directories --------------------------------------------------------------------------
@pytest.fixture
def base_dir(tmp_path):
    base = _arch_model("llama")
    save_pretrained(base, tmp_path / "base", format="lnfree")
    return tmp_path / "base"


def _fine_tuned(base_dir):
    """The base with LoRA adapters (nonzero), an edited embedding and frozen sites: what a removal run leaves."""
    model = lnfree.load(base_dir, device="cpu")
    apply_lora(model, 2, targets=("W_Q", "W_K", "W_in"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.W_E.add_(0.01 * torch.randn(model.W_E.shape, generator=g))
    model.estimate_ln_scales(TOKENS)
    return model.freeze_ln()


def test_derived_round_trip_with_lora_and_folding_at_load(base_dir, tmp_path):
    model = _fine_tuned(base_dir)
    fold = ["blocks.0.ln2", "blocks.1.ln1.qk", "blocks.1.ln1.v", "ln_final"]
    info = save_derived(model, str(base_dir), tmp_path / "twin", fold=fold)
    expected = merge_lora(copy.deepcopy(model)).remove_ln(fold)
    loaded = lnfree.load(tmp_path / "twin", device="cpu")
    _same_model(expected, loaded)
    assert loaded.ln_mode("ln_final") == "removed" and loaded.ln_mode("blocks.0.ln1.qk") == "frozen"
    # only what changed is stored: LoRA pairs and the embedding's delta, no dense attention or MLP weight
    assert "embed.W_E" in info["stored"] and "blocks.0.attn._W_K.lora_A" in info["stored"]
    assert not any(k.endswith((".W_Q", "._W_K", ".W_in", ".W_gate", ".W_U")) for k in info["stored"])


def test_derived_dense_deltas_and_low_precision_storage(base_dir, tmp_path):
    model = _fine_tuned(base_dir)
    save_derived(model, str(base_dir), tmp_path / "dense", lora=False)
    save_derived(model, str(base_dir), tmp_path / "half", dtype=torch.bfloat16)
    merged = merge_lora(copy.deepcopy(model))  # once: torch's parametrize shares the class between copies
    _same_model(merged, lnfree.load(tmp_path / "dense", device="cpu"))
    with torch.no_grad():
        ref, got = merged(TOKENS), lnfree.load(tmp_path / "half", device="cpu")(TOKENS)
    assert not torch.equal(got, ref) and (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_derived_model_registered_in_the_zoo(base_dir, tmp_path, monkeypatch):
    model = _fine_tuned(base_dir)
    save_derived(model, str(base_dir), tmp_path / "data" / "tiny-twin", fold="all")
    monkeypatch.setattr(io_zoo, "PACKAGE_DATA", tmp_path / "data")
    monkeypatch.setitem(io_zoo.DERIVED_MODELS, "tiny-twin", "tiny-twin")  # the one-line registration
    assert "tiny-twin" in zoo.all_names()
    loaded = zoo.load("tiny-twin", device="cpu")
    assert loaded.zoo_name == "tiny-twin" and loaded.cfg.model_name == "tiny-twin" and loaded.is_ln_free
    _same_model(merge_lora(copy.deepcopy(model)).remove_ln(), lnfree.load("tiny-twin", device="cpu"))


def test_derived_from_another_base_is_refused(base_dir, tmp_path):
    save_derived(_fine_tuned(base_dir), str(base_dir), tmp_path / "twin")
    other = tmp_path / "other"
    save_pretrained(make_model(), other, format="lnfree")
    conf = json.loads((tmp_path / "twin" / "derived.json").read_text())
    conf["base"] = str(other)
    (tmp_path / "twin" / "derived.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="has no weight .*derived from another base model"):
        lnfree.load(tmp_path / "twin", device="cpu")


# ---- the resolver ---------------------------------------------------------------------------------
def test_every_entry_point_is_the_one_resolver(monkeypatch):
    calls = []
    real = resolve.check_device
    monkeypatch.setattr(resolve, "check_device", lambda d: calls.append(d) or real(d))
    for load in (lnfree.load, lnfree.load_model, lnfree.LNFreeTransformer.from_pretrained, zoo.load):
        model = load("tiny-ln", device="cpu")
        assert model.zoo_name == "tiny-ln" and model.cfg.model_name == "tiny-ln"
    assert calls == ["cpu"] * 4  # the device is checked once per load


@pytest.mark.parametrize("load", [lnfree.load, lnfree.load_model, zoo.load])
def test_unknown_names_get_did_you_mean(load):
    with pytest.raises(ValueError, match="did you mean 'tiny-ln'"):
        load("tiny_ln")


@pytest.mark.parametrize("load", [lnfree.load, lnfree.load_model, zoo.load])
def test_meta_device_refused(load):
    with pytest.raises(ValueError, match="device='meta' holds no weights.*device='cpu'"):
        load("tiny-ln", device="meta")


def test_names_are_the_directory_or_file_name(tmp_path):
    save_pretrained(make_model(), tmp_path / "my-gpt2", format="hf")
    assert lnfree.load(str(tmp_path / "my-gpt2") + "/", device="cpu", tokenizer=False).cfg.model_name == "my-gpt2"
    save_pretrained(_in_mode("llama", "live"), tmp_path / "my-llama")
    assert lnfree.load(tmp_path / "my-llama", device="cpu").cfg.model_name == "my-llama"


def test_one_missing_key_rule(tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(make_model(), tmp_path / "m", format="lnfree")
    file = tmp_path / "m" / "model.safetensors"
    sd = load_file(file)
    del sd["blocks.1.attn.W_O"]
    save_file({**sd, "blocks.0.extra": torch.ones(2)}, file)
    with pytest.raises(CheckpointError, match=r"(?s)m/model.safetensors.*missing \['blocks.1.attn.W_O'\].*"
                                              r"unexpected \['blocks.0.extra'\]"):
        lnfree.load(tmp_path / "m", device="cpu")


def test_corrupt_removal_checkpoint_names_its_file_and_the_fix(tmp_path):
    from lnfree.io.checkpoint import CHECKPOINT_FORMAT
    from lnfree.io.tl_dir import cfg_to_json
    from lnfree.training.checkpoints import CheckpointDir

    model = make_model()
    model.estimate_ln_scales(TOKENS)
    model.freeze_ln("blocks.0.ln2")
    state = {"format": CHECKPOINT_FORMAT, "step": 4, "config": {}, "model_config": cfg_to_json(model.cfg),
             "site_modes": model.ln_modes(), "site_scales": {s: model.ln_scale(s) for s in model.ln_sites}}
    store = CheckpointDir(tmp_path / "run")
    path = store.write(4, weights=model.state_dict(), state=state, tensors={"optimizer": {}})
    store.mark_good(path)
    _same_model(model, lnfree.load(tmp_path / "run", device="cpu"))
    _same_model(model, lnfree.load_model(tmp_path / "run", device="cpu"))  # today: "not a hub id"
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"(?s)step_000004/model.safetensors.*corrupt.*earlier"):
        lnfree.load(tmp_path / "run", device="cpu")


def test_no_machine_paths_in_the_package():
    from pathlib import Path

    src = Path(lnfree.__file__).parent
    found = [str(p) for p in src.rglob("*.py") if "/work/" in p.read_text() or "shared/corpus" in p.read_text()]
    assert found == []


def test_zoo_train_needs_its_held_out_texts(capsys):
    from lnfree.cli import main

    with pytest.raises(SystemExit):
        main(["zoo", "train", "--text", "a.txt", "--out", "runs/x"])
    assert "--heldout" in capsys.readouterr().err
