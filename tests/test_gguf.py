"""GGUF loading: tiny random Llama files written here with gguf.GGUFWriter, checked against
transformers' own GGUF loading (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`)."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from conftest import spread_hf_norms
from lnfree import gguf_file
from lnfree.loading import CheckpointError, load_model

T = GGMLQuantizationType
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ s", "e r", "o n", "Ġ o", "a t"]


def _tokens() -> list[str]:
    from lnfree.tokenizer import bytes_to_unicode

    base = [bytes_to_unicode()[b] for b in range(256)]
    return base + ["".join(m.split()) for m in MERGES] + ["<|endoftext|>"]


def hf_llama(d_model=64, n_layers=2, n_heads=4, n_kv=2, d_mlp=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(_tokens())
    cfg = LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv, intermediate_size=d_mlp, vocab_size=vocab, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=vocab - 1,
                      eos_token_id=vocab - 1)
    return spread_hf_norms(LlamaForCausalLM(cfg).eval())  # norm weights away from 1: a wrong mapping shows


def hf_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    vocab = len(_tokens())
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return spread_hf_norms(Qwen2ForCausalLM(cfg).eval(), bias=0.3)  # norm weights and q/k/v biases moved


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` (rows of each head interleaved for its rotary)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, qtype=T.F32, *, arch="llama", quantize_names=("attn_", "ffn_", "output.", "token_embd"),
               raw_types=None, add_bos=False):
    """Write `model` (a transformers LlamaForCausalLM) as llama.cpp does: names, Q/K permutation, metadata."""
    c = model.config
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    tokens = _tokens()
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(add_bos)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, t in model.state_dict().items():
        if hf_name in names:
            name = names[hf_name]
        else:
            parts = hf_name.split(".")
            name = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):  # llama.cpp permutes llama's Q/K only
            a = llamacpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = llamacpp_permute(a, c.num_key_value_heads)
        kind = (raw_types or {}).get(name, qtype if a.ndim == 2 and any(k in name for k in quantize_names) else T.F32)
        if kind == T.F32:
            w.add_tensor(name, a)
        elif kind == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif callable(kind):
            data, raw = kind(a)
            w.add_tensor(name, data, raw_dtype=raw)
        else:
            w.add_tensor(name, quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LNFREE_CACHE_DIR", str(tmp_path / "cache"))


TOKENS = torch.tensor([[256, 72, 101, 265, 32, 116], [1, 2, 3, 4, 5, 266]])


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.Q8_0, T.Q4_1, T.Q4_0])
def test_logits_equal_transformers_gguf(tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf_llama(), qtype)
    model = load_model(path, device="cpu")
    ref = transformers_gguf(path)
    with torch.no_grad():
        assert rel_err(model(TOKENS), ref(TOKENS).logits) < 1e-4
    assert set(model.ln_modes().values()) == {"live"}
    assert model.cfg.n_key_value_heads == 2 and model.cfg.normalization_type == "RMS"


@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0])
def test_qwen2_file(tmp_path, qtype):
    hf = hf_qwen2()
    path = write_gguf(tmp_path / f"qwen2-{qtype.name}.gguf", hf, qtype, arch="qwen2")
    model = load_model(path, device="cpu")
    assert model.cfg.original_architecture == "Qwen2ForCausalLM"
    with torch.no_grad():
        got = model(TOKENS)
        assert rel_err(got, transformers_gguf(path)(TOKENS).logits) < 1e-4
        if qtype == T.F32:
            assert rel_err(got, hf(TOKENS).logits) < 1e-4


def test_f32_file_equals_source_model(tmp_path):
    """Independent of transformers' GGUF reader: an F32 file must give the source model's logits."""
    hf = hf_llama(seed=3)
    model = load_model(write_gguf(tmp_path / "tiny.gguf", hf), device="cpu")
    with torch.no_grad():
        assert rel_err(model(TOKENS), hf(TOKENS).logits) < 1e-4


def _k_quant(kind):
    """Random but valid K-quant blocks (gguf cannot quantise K types): scales set to small finite fp16."""
    block, size = GGML_QUANT_SIZES[kind]

    def make(a):
        rows, cols = a.shape
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        half = np.array([0.01], np.float16).view(np.uint8)
        if kind == T.Q6_K:  # ql[128] qh[64] scales[16] d(f16)
            data[..., 208:210] = half
        elif kind == T.Q4_K:  # d(f16) dmin(f16) scales[12] qs[128]
            data[..., 0:2] = half
            data[..., 2:4] = half
        return data.reshape(rows, -1), kind

    return make


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q6_K])
def test_k_quants_equal_transformers(tmp_path, kind):
    hf = hf_llama(d_model=256, n_layers=1, n_heads=4, n_kv=2, d_mlp=512)
    raw = {f"blk.0.{n}.weight": _k_quant(kind) for n in ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_down")}
    path = write_gguf(tmp_path / f"k-{kind.name}.gguf", hf, T.F32, raw_types=raw)
    model = load_model(path, device="cpu")
    with torch.no_grad():
        assert rel_err(model(TOKENS), transformers_gguf(path)(TOKENS).logits) < 1e-4


def test_tokenizer_from_file(tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "tiny.gguf", hf_llama())
    model = load_model(path, device="cpu")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = " the cat sat on the mat"
    assert model.to_tokens(text, prepend_bos=False)[0].tolist() == ref(text)["input_ids"]
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text
    assert model.cfg.default_prepend_bos is False  # the file says add_bos_token = False
    assert model.to_tokens(text, prepend_bos=True)[0, 0].item() == len(_tokens()) - 1


def test_cache_reused_and_keyed_by_content(tmp_path, monkeypatch):
    from lnfree.io import gguf as formats

    path = write_gguf(tmp_path / "tiny.gguf", hf_llama())
    first = load_model(path, device="cpu")
    calls = []
    real = formats._convert_gguf
    monkeypatch.setattr(formats, "_convert_gguf", lambda p: calls.append(p) or real(p))
    second = load_model(path, device="cpu")
    assert calls == []  # read from the cache
    with torch.no_grad():
        assert torch.equal(first(TOKENS), second(TOKENS))
    write_gguf(path, hf_llama(seed=5))  # same name, other content: converted again
    load_model(path, device="cpu")
    assert len(calls) == 1
    cached = next((tmp_path / "cache" / "gguf").iterdir()) / "model.safetensors"
    assert cached.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for n_heads, d_head in [(1, 8), (4, 16), (3, 64)]:
        w = rng.standard_normal((n_heads * d_head, 5)).astype(np.float32)
        assert np.array_equal(gguf_file.unpermute_qk(llamacpp_permute(w, n_heads), n_heads), w)
        assert not np.array_equal(llamacpp_permute(w, n_heads), w)


# ---- bad inputs ------------------------------------------------------------------------------
def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'falcon' is not supported.*llama, qwen2"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_gguf(tmp_path, damage):
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) * 2 // 3], "garbage": b"GGUF" + b"\x07" * 500,
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"(corrupt or truncated|is truncated)"):
        load_model(path, device="cpu")


def test_unsupported_tensor_type(tmp_path):
    block, size = GGML_QUANT_SIZES[T.Q8_K]
    if T.Q8_K.name in gguf_file.supported_types():
        pytest.fail("the installed gguf dequantises Q8_K: pick another unsupported type for this test")

    def q8k(a):
        return np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8), T.Q8_K

    hf = hf_llama(d_model=256, n_layers=1, d_mlp=512)
    path = write_gguf(tmp_path / "q8k.gguf", hf, raw_types={"blk.0.ffn_up.weight": q8k})
    with pytest.raises(ValueError, match=r"type Q8_K.*supported types:.*Q4_1.*Q8_0"):
        load_model(path, device="cpu")


def test_gguf_errors_are_checkpoint_errors(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError):
        load_model(path, device="cpu")
