"""Loading HF GPT-2 checkpoints offline, the released LN-free format, save_pretrained, bad inputs.

Every numerical check compares against transformers' own GPT2LMHeadModel run on the same files.
"""

import json
import os
import pickletools
import shlex
import socket
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lnfree.io.hf as L
from conftest import save_released_ln_free, spread_hf_norms
from lnfree.loading import CheckpointError, HubUnreachableError, load_model, save_pretrained
from lnfree.model import LNFreeTransformer

VOCAB = 100


def make_hf(seed=0, vocab=VOCAB, **kw) -> GPT2LMHeadModel:
    """Tiny random GPT-2 with non-trivial LN weights/biases and residual norms well above 1."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=32,
                     bos_token_id=None, eos_token_id=None, **kw)
    return spread_hf_norms(GPT2LMHeadModel(cfg), bias=0.05, embed=20.0).eval()


def hf_logits(path_or_model, tokens):
    hf = GPT2LMHeadModel.from_pretrained(str(path_or_model)) if not isinstance(path_or_model, torch.nn.Module) \
        else path_or_model
    with torch.no_grad():
        return hf.eval()(tokens).logits


def load(path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("tokenizer", False)
    return load_model(path, **kw)


def close(a, b, rel=1e-4):
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ckpt(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", hf


# ---- loading a local directory ---------------------------------------------------------------
def test_local_dir_matches_transformers(ckpt, tokens, no_network):
    path, hf = ckpt
    model = load(path)  # defaults: no processing, so no center_unembed either
    assert isinstance(model, LNFreeTransformer)
    assert set(model.ln_modes().values()) == {"live"}
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.d_vocab, model.cfg.n_ctx) == (
        2, 32, 4, VOCAB, 32)
    expected = hf_logits(hf, tokens)
    with torch.no_grad():
        got = model(tokens)
    close(got, expected)
    assert float(expected.std(-1).mean()) > 1.0  # logits are far from trivial
    # LN really matters in this checkpoint: neutralizing ln_f's weights changes the logits
    with torch.no_grad():
        model.ln_final.w.fill_(1.0)
        assert not torch.allclose(model(tokens), expected, atol=1e-2)


def test_live_mode_equals_hooked_transformer(ckpt, tokens):
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    path, hf = ckpt
    model = load(path)
    # TransformerLens's own path, with the real HF module as converter input
    ht = HookedTransformer(model.cfg)
    sd = convert_gpt2_weights(hf, ht.cfg)
    sd["unembed.b_U"] = torch.zeros(VOCAB)
    ht.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    with torch.no_grad():
        assert torch.equal(ht(tokens), model(tokens))


def test_processing_flags(ckpt, tokens):
    path, hf = ckpt
    expected = hf_logits(hf, tokens)
    folded = load(path, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    assert not folded.blocks[0].ln1.has_params and folded.cfg.normalization_type == "LNPre"
    assert set(folded.ln_modes().values()) == {"live"}
    with torch.no_grad():
        close(folded(tokens), expected)
        centered = load(path, center_unembed=True)(tokens)
    assert not torch.allclose(centered, expected, atol=1e-3)  # center_unembed shifts the logits...
    close(centered.log_softmax(-1), expected.log_softmax(-1))  # ...but not the log-probs


def test_dtype_float64(ckpt, tokens):
    path, hf = ckpt
    model = load(path, dtype=torch.float64)
    assert model.W_E.dtype == torch.float64
    with torch.no_grad():
        close(model(tokens), hf_logits(hf.double(), tokens), rel=1e-9)


def test_pytorch_bin_checkpoint(tmp_path, tokens, no_network):
    hf = make_hf(seed=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        close(load(tmp_path)(tokens), hf_logits(hf, tokens))


def test_sharded_safetensors(tmp_path, tokens, no_network):
    hf = make_hf(seed=6)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    with torch.no_grad():
        close(load(tmp_path)(tokens), hf_logits(hf, tokens))


def test_untied_lm_head(tmp_path, tokens):
    hf = make_hf(seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight))
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        close(load(tmp_path)(tokens), hf_logits(tmp_path, tokens))


# ---- the released LN-free format -------------------------------------------------------------


def make_released_ln_free(path, tokens, seed=4):
    """A checkpoint as the paper's authors release them: LN weight * 1e6 / sigma, eps = 1e12."""
    hf = make_hf(seed=seed)
    return hf, save_released_ln_free(hf, tokens, path)


def test_released_ln_free_format(tmp_path, tokens, no_network):
    orig = make_hf(seed=4)
    _, stds = make_released_ln_free(tmp_path / "lnfree", tokens)
    model = load(tmp_path / "lnfree")
    assert model.is_ln_free and model.cfg.normalization_type is None
    assert set(model.ln_modes().values()) == {"removed"}
    expected = hf_logits(tmp_path / "lnfree", tokens)  # transformers on the same files (eps=1e12 trick)
    with torch.no_grad():
        got = model(tokens)
    close(got, expected)
    # second, independent check: the original LN model with each LN frozen at its sigma
    orig.save_pretrained(tmp_path / "orig")
    frozen = load(tmp_path / "orig")
    sites = {}
    for i in range(2):
        sites.update({f"blocks.{i}.ln1.qk": stds[f"transformer.h.{i}.ln_1"],
                      f"blocks.{i}.ln1.v": stds[f"transformer.h.{i}.ln_1"],
                      f"blocks.{i}.ln2": stds[f"transformer.h.{i}.ln_2"]})
    sites["ln_final"] = stds["transformer.ln_f"]
    with torch.no_grad(), frozen.ln_frozen(scales=sites):
        close(got, frozen(tokens))
    # and it is not just the LN model: live LN gives different logits
    assert not torch.allclose(got, hf_logits(orig, tokens), atol=1e-3)
    # saving it again gives files that transformers runs the same way
    save_pretrained(model, tmp_path / "resaved")
    close(hf_logits(tmp_path / "resaved", tokens), expected)


def test_ln_free_residual_decomposition_sums_to_logits(tmp_path, tokens):
    make_released_ln_free(tmp_path, tokens)
    model = load(tmp_path)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        stack, labels = cache.decompose_resid(apply_ln=True, return_labels=True)
        assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * model.cfg.n_layers
        per_component = stack @ model.W_U  # [component, batch, pos, vocab]
        close(per_component.sum(0) + model.b_U, logits, rel=1e-5)
    assert float(per_component.abs().amax(dim=(1, 2, 3)).min()) > 0  # every component contributes


# ---- save_pretrained ---------------------------------------------------------------------------
def test_save_round_trip_ln_model(ckpt, tmp_path, tokens):
    path, hf = ckpt
    model = load(path)
    model.save_pretrained(tmp_path / "saved")  # LNFreeTransformer.save_pretrained delegates here
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["layer_norm_epsilon"] == pytest.approx(1e-5)
    expected = hf_logits(hf, tokens)
    assert torch.equal(hf_logits(tmp_path / "saved", tokens), expected)  # same weights, same code
    back = LNFreeTransformer.from_pretrained(str(tmp_path / "saved"), device="cpu", tokenizer=False)
    assert back.ln_modes() == model.ln_modes()
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_save_round_trip_processed_model(ckpt, tmp_path, tokens):
    path, hf = ckpt
    model = load(path, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    assert float(model.b_U.detach().abs().max()) > 1e-3  # fold_ln moved ln_f's bias into b_U, which GPT-2 lacks
    save_pretrained(model, tmp_path / "saved")
    close(hf_logits(tmp_path / "saved", tokens), hf_logits(hf, tokens), rel=1e-5)


def test_save_round_trip_ln_free_model(ckpt, tmp_path, tokens):
    path, hf = ckpt
    model = load(path)
    model.estimate_ln_scales(tokens)
    model.remove_ln()
    assert float(model.b_U.detach().abs().max()) > 1e-3  # nonzero unembedding bias must survive the trip
    with torch.no_grad():
        expected = model(tokens)
    save_pretrained(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["layer_norm_epsilon"] == 1e12 and config["tie_word_embeddings"] is False
    close(hf_logits(tmp_path / "saved", tokens), expected, rel=1e-5)  # the released tools read it
    back = load(tmp_path / "saved")
    assert back.is_ln_free and back.ln_modes() == model.ln_modes()
    with torch.no_grad():
        close(back(tokens), expected, rel=1e-5)


def test_gpt2_vocab_checkpoint_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    make_hf(seed=5, vocab=50257).save_pretrained(tmp_path / "a")
    model = load_model(tmp_path / "a", device="cpu")  # no tokenizer files: GPT-2's offline tokenizer
    assert model.tokenizer is not None and model.cfg.tokenizer_prepends_bos
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert model.to_string(torch.tensor([15496, 995])) == "Hello world"
    save_pretrained(model, tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.json").is_file()
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]  # saving left it unchanged
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "b"), local_files_only=True)
    assert plain("Hello world")["input_ids"] == [15496, 995]  # saved like the hub's GPT-2 (no auto BOS)
    back = load_model(tmp_path / "b", device="cpu")
    assert back.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]


def test_save_hf_refuses_frozen_and_mixed_and_auto_writes_lnfree(ckpt, tmp_path, tokens):
    path, _ = ckpt
    model = load(path)
    model.freeze_ln("blocks.0.ln2", scales=2.0)
    with pytest.raises(ValueError, match="no fixed-scale LayerNorm.*format='lnfree'"):
        save_pretrained(model, tmp_path / "x", format="hf")
    model.unfreeze_ln().remove_ln("ln_final", scales=3.0)
    with pytest.raises(ValueError, match="no partly removed model.*format='lnfree'"):
        save_pretrained(model, tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()
    assert save_pretrained(model, tmp_path / "x") == "lnfree"  # the default writes what HF cannot hold
    back = load(tmp_path / "x")
    assert back.ln_modes() == model.ln_modes() and torch.equal(back(tokens), model(tokens))


def test_save_hf_refuses_uncentered_ln_free(tmp_path):
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=VOCAB, n_ctx=8,
                                  act_fn="gelu_new", normalization_type=None)
    model = LNFreeTransformer(cfg)  # never had a LayerNorm: sites are removed, readers not centered
    assert model.is_ln_free
    with pytest.raises(ValueError, match="not centered.*format='lnfree'"):
        save_pretrained(model, tmp_path / "x", format="hf")
    assert save_pretrained(model, tmp_path / "y") == "lnfree"


# ---- bad inputs ----------------------------------------------------------------------------------
def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CheckpointError, match=r"(?s)'bert'.*not supported.*gpt2.*llama.*qwen2"):
        load(tmp_path)


def test_supported_type_with_wrong_head(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(CheckpointError, match=r"LlamaForSequenceClassification.*LlamaForCausalLM"):
        load(tmp_path)


def test_supported_type_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                      "hidden_size": 16, "num_attention_heads": 2,
                                                      "num_hidden_layers": 1, "intermediate_size": 32,
                                                      "vocab_size": 11}))
    with pytest.raises(CheckpointError, match=r"cannot read the weights.*model.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(ckpt, damage):
    path, _ = ckpt
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(path)


def test_corrupt_config(ckpt):
    path, _ = ckpt
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="config.json"):
        load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="holds no model lnfree can read"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(make_hf().config.to_dict()))
    with pytest.raises(CheckpointError, match="no weights"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="is a file"):
        load(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load(str(tmp_path / "missing"))


def test_shape_mismatch(ckpt):
    path, _ = ckpt
    config = json.loads((path / "config.json").read_text())
    config["n_embd"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_malicious_pickle_is_refused(tmp_path):
    hf = make_hf()
    hf.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    state = dict(hf.state_dict())
    state["evil"] = _Evil(marker)
    torch.save(state, tmp_path / "pytorch_model.bin")
    # the file really carries the payload: its pickle references os.system
    import zipfile

    with zipfile.ZipFile(tmp_path / "pytorch_model.bin") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = [arg for op, arg, _ in pickletools.genops(pkl) if arg is not None and isinstance(arg, str)]
    assert "system" in ops or any("system" in a for a in ops)
    with pytest.raises(CheckpointError, match="refused"):
        load(tmp_path)
    assert not marker.exists()


def test_bad_arguments(ckpt):
    path, _ = ckpt
    with pytest.raises(TypeError, match="dtype"):
        load(path, dtype="float32")
    with pytest.raises(TypeError, match="tokenizer"):
        load(path, tokenizer="gpt2")
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(3)


# ---- hub ids ---------------------------------------------------------------------------------------
def test_hub_id_unreachable_fails_fast(monkeypatch):
    import urllib.request

    import huggingface_hub

    real_snapshot = huggingface_hub.snapshot_download

    def cache_only(repo_id, **kw):
        assert kw.get("local_files_only"), "tried to download despite a failed probe"
        return real_snapshot(repo_id, **kw)

    # The worst case: the hub's address accepts the connection and never answers (some sandboxes
    # do exactly that). The probe must give up on its own timeout.
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(60))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError) as info:
        load_model("gpt2", local_files_only=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    msg = str(info.value)
    assert "unreachable" in msg and 'lnfree.load("' in msg and "download openai-community/gpt2 --local-dir" in msg


def test_probe_hub_against_local_servers(monkeypatch):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(L, "_probe_url", lambda: f"http://127.0.0.1:{server.server_port}/api/models")
        assert L._probe_hub(timeout=2) is None  # any HTTP answer counts as reachable
    finally:
        server.shutdown()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setattr(L, "_probe_url", lambda: f"http://127.0.0.1:{port}/api/models")
    assert "no answer" in L._probe_hub(timeout=2)


def test_hub_id_offline_env_fails_fast(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        load_model("schaeff/gpt2-small_LNFree300")
    with pytest.raises(HubUnreachableError, match="local_files_only"):
        load_model("gpt2", local_files_only=True)
    assert time.perf_counter() - start < 10


def test_hub_id_uses_cache_then_download(ckpt, monkeypatch, tokens):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    path, hf = ckpt
    calls = []

    def cached(repo_id, **kw):  # the HF cache holds the snapshot
        calls.append((repo_id, kw))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    monkeypatch.setattr(L, "_probe_hub", lambda *a: pytest.fail("probed the network despite a cache hit"))
    model = load("schaeff/gpt2-small_LNFree300")
    assert calls[0][0] == "schaeff/gpt2-small_LNFree300" and calls[0][1]["local_files_only"] is True
    with torch.no_grad():
        close(model(tokens), hf_logits(hf, tokens))

    calls.clear()

    def download(repo_id, **kw):  # cache miss, hub reachable
        calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(L, "_probe_hub", lambda *a: None)
    load("gpt2")
    fetch = [kw for _, kw in calls if not kw.get("local_files_only")]
    assert calls[-1][0] == "openai-community/gpt2" and len(fetch) == 1
    assert {"config.json", "*.safetensors"} <= set(fetch[0]["allow_patterns"])


# ---- every architecture from a local directory ------------------------------------------------------
V = 97
SMALL = {
    "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    window_size=4, max_position_embeddings=32),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, rotary_pct=0.5),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=32,
                word_embed_proj_dim=32),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=32),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=32, sliding_window=None),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=32),
    "qwen3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=64, max_position_embeddings=32),
    "gemma": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                  intermediate_size=64, max_position_embeddings=32),
    "phi3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=64, max_position_embeddings=32, pad_token_id=0),
}


def tiny_hf(model_type: str, seed: int = 0):
    """A tiny random transformers causal LM with norm weights and biases away from their defaults."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=V, **SMALL[model_type])).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_every_architecture_matches_transformers(tmp_path, model_type):
    from lnfree import architectures

    assert model_type in architectures.SUPPORTED
    hf = tiny_hf(model_type)
    folder = tmp_path / f"tiny-{model_type}"  # 'llama'/'gemma' in the path must not confuse TransformerLens
    hf.save_pretrained(folder)
    model = load(folder)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4
    assert set(model.ln_modes().values()) == {"live"}
    assert model.cfg.original_architecture == architectures.SUPPORTED[model_type]


def test_architecture_processing_flags_keep_log_probs(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "m")
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    plain = load(tmp_path / "m")
    folded = load(tmp_path / "m", fold_ln=True, center_unembed=True)
    with torch.no_grad():
        a, b = plain(tokens).log_softmax(-1), folded(tokens).log_softmax(-1)
    assert torch.allclose(a, b, atol=1e-4)
    assert folded.cfg.normalization_type == "RMSPre"


def test_saved_weights_respect_umask(ckpt, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_pretrained(load(ckpt[0]), tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
