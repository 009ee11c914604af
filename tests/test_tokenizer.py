"""GPT-2 tokenizer built offline from the shipped ranks, checked against tiktoken's own BPE."""

import inspect
import json
import random

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from lnfree import tokenizer as T
from lnfree.tokenizer import ENDOFTEXT, gpt2_tokenizer, ranks_to_vocab_and_merges


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def enc():
    # Independent reference: tiktoken parses the asset itself and runs its own BPE with its own
    # GPT-2 regex (r50k_pat_str); nothing here goes through lnfree's conversion.
    path = T.resources.files("lnfree").joinpath("assets/gpt2.tiktoken")
    ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256})


def _varied_strings(n: int = 300) -> list[str]:
    rng = random.Random(0)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r\u00a0\u3000",
        "'\"!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`", "éüñçßøåæœ", "αβγδЖжщ漢字かなカナ한국어", "😀🎉👍🏽🇫🇷",
        "\u200b\u0301\ufeff",
    ]
    words = ["Hello", " world", "don't", "I'll", " we've", "they're", "'s", "def f(x):\n    return x**2\n",
             "  ", "\n\n\n", "    ", "12345678901234", " 3.14159", " 1,000,000", "   trailing   "]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.35:
                parts.append(rng.choice(words))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    # real prose and code: long natural words exercise deep merge chains
    for module in (json, inspect, random):
        src = inspect.getsource(module)
        out += [src[i : i + 1500] for i in range(0, min(len(src), 30000), 1500)]
    return out


def test_known_ids(tok):
    # ids published in transformers' GPT-2 tokenizer docs
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Hello world")["input_ids"] == [18435, 995]


def test_special_tokens(tok):
    assert len(tok) == 50257
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(tok, name) == 50256, name
    assert tok("a<|endoftext|>b")["input_ids"] == [64, 50256, 65]
    with_bos = gpt2_tokenizer(add_bos_token=True)
    assert with_bos("Hello world")["input_ids"] == [50256, 15496, 995]
    assert tok("Hello world")["input_ids"] == [15496, 995]  # separate objects, separate settings


def test_agrees_with_tiktoken(tok, enc):
    strings = _varied_strings()
    assert len(strings) >= 300
    multi = 0
    for s in strings:
        expected = enc.encode(s, allowed_special="all")
        got = tok(s)["input_ids"]
        assert got == expected, repr(s)
        multi += sum(len(enc.decode_single_token_bytes(t)) > 3 for t in expected)
    assert multi > 1000  # the comparison really exercised long merged tokens


def test_decode_round_trip(tok):
    for s in _varied_strings(100):
        assert tok.decode(tok(s)["input_ids"]) == s


def test_conversion_small_example():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b" ": 6}
    vocab, merges = ranks_to_vocab_and_merges(ranks)
    assert vocab["Ġ"] == 6  # byte 0x20 maps to 'Ġ' in GPT-2's byte-to-unicode table
    # 'abc': BPE with ranks < 5 merges 'ab' (rank 3) before 'bc' (rank 4), leaving ('ab', 'c')
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c")]
    with pytest.raises(ValueError, match="not a BPE"):
        ranks_to_vocab_and_merges({b"a": 0, b"abc": 1, b"b": 2, b"c": 3})


def test_gpt2_merge_table():
    vocab, merges = T._vocab_and_merges()
    assert len(vocab) == 50256 and len(merges) == 50000  # GPT-2's published merges.txt has 50000
    assert merges[0] == ("Ġ", "t")  # the first line of GPT-2's merges.txt
    assert all(vocab[left + right] == 256 + i for i, (left, right) in enumerate(merges))


def test_byte_table_is_a_bijection():
    table = T.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256


def test_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LNFREE_CACHE_DIR", str(tmp_path))
    T._vocab_and_merges.cache_clear()
    try:
        built = T._vocab_and_merges()
        files = list(tmp_path.glob("gpt2_bpe_*.json"))
        assert len(files) == 1
        T._vocab_and_merges.cache_clear()
        assert T._vocab_and_merges() == built  # read back from disk, identical
        assert json.loads(files[0].read_text())["asset_sha256"] == T.ASSET_SHA256
        files[0].write_text("{ truncated")  # a damaged cache is ignored (then rebuilt as above)
        assert T._read_cache() is None
        files[0].write_text(json.dumps({"asset_sha256": T.ASSET_SHA256, "vocab": {"a": 0}, "merges": []}))
        assert T._read_cache() is None
    finally:
        T._vocab_and_merges.cache_clear()


def test_transformer_lens_accepts_it_offline(monkeypatch):
    """TransformerLens re-loads a tokenizer without add_bos_token by name; that must stay offline."""
    import socket

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=50257, act_fn="gelu_new")
    model = HookedTransformer(cfg, tokenizer=gpt2_tokenizer())
    assert model.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert model.to_string(model.to_tokens("Hello world", prepend_bos=False)[0]) == "Hello world"
