"""IOI prompts (GPT-2 BPE, HF and `tokenizers` word-level tokenizers) and the IOI metrics."""

import base64

import pytest
import torch

from conftest import make_model
from lnfree import tasks
from lnfree.tasks import IOIBatch, answer_loss, answer_prob, ioi, logit_diff, make_metric

WORDS = ["<s>", "Then", ",", "and", "went", "to", "the", ".", "gave", "a", "store", "garden", "ring", "bone",
         "Mary", "John", "James", "Sarah", "Paul", "Anna"]


def word_level(words=WORDS):
    """A tiny whitespace/punctuation word-level tokenizer (the `tokenizers` library)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok


def hf_word_level(words=WORDS):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=word_level(words), bos_token="<s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """GPT-2's BPE straight from the shipped ranks (independent of lnfree.tokenizer)."""
    import importlib.resources

    import tiktoken

    ranks = {}
    for line in importlib.resources.files("lnfree").joinpath("assets/gpt2.tiktoken").read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-test", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def _check_batch(batch: IOIBatch, decode, n):
    assert batch.clean.shape == batch.corrupt.shape and batch.clean.shape[0] == n
    for i in range(n):
        io, s = batch.io_names[i], batch.s_names[i]
        assert batch.prompts[i] == f"Then, {s} and {io} went to the {batch.places[i]}. {s} gave a {batch.objects[i]} to"
        assert batch.corrupt_prompts[i] == batch.prompts[i].replace(io, "#").replace(s, io).replace("#", s)
        assert decode([int(batch.answer[i])]).strip() == io and decode([int(batch.wrong[i])]).strip() == s
        assert io != s
        # the corrupted prompt is the clean one with the IO and S tokens swapped
        swap = batch.clean[i].clone()
        swap[batch.clean[i] == batch.answer[i]] = batch.wrong[i]
        swap[batch.clean[i] == batch.wrong[i]] = batch.answer[i]
        assert torch.equal(swap, batch.corrupt[i])


def test_ioi_gpt2_bpe(tiktoken_gpt2):
    batch = ioi(tiktoken_gpt2, 12, seed=3)
    _check_batch(batch, tiktoken_gpt2.decode, 12)
    assert (batch.clean[:, 0] == 50256).all()  # BOS = <|endoftext|>, as TransformerLens prepends it
    assert tiktoken_gpt2.decode(batch.clean[0, 1:].tolist()) == batch.prompts[0]
    # GPT-2's ids for two names, from its published vocabulary
    assert tiktoken_gpt2.encode(" Mary") == [5335] and tiktoken_gpt2.encode(" John") == [1757]
    assert ioi(tiktoken_gpt2, 12, seed=3).prompts == batch.prompts  # deterministic
    assert ioi(tiktoken_gpt2, 12, seed=4).prompts != batch.prompts
    assert len(tasks.single_token_words(tiktoken_gpt2, tasks.NAMES)) >= 50


def test_ioi_lnfree_gpt2_tokenizer_matches_bpe(tiktoken_gpt2):
    from lnfree.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    a, b = ioi(tok, 6, seed=1), ioi(tiktoken_gpt2, 6, seed=1)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt) and torch.equal(a.answer, b.answer)


@pytest.mark.parametrize("make_tok", [word_level, hf_word_level])
def test_ioi_word_level(make_tok):
    tok = make_tok()
    batch = ioi(tok, 10, seed=0)
    vocab = {i: w for i, w in enumerate(WORDS)}
    _check_batch(batch, lambda ids: " ".join(vocab[i] for i in ids), 10)
    assert (batch.clean[:, 0] == 0).all() and batch.clean.shape[1] == 16  # <s> + 15 words/punctuation
    assert ioi(tok, 10, prepend_bos=False).clean.shape[1] == 15
    assert len(batch.to_frame()) == 10


def test_ioi_errors():
    few = [w for w in WORDS if w not in ("James", "Sarah", "Paul", "Anna")]  # Mary, John only
    with pytest.raises(ValueError, match="single tokens"):
        ioi(word_level(few), 4)
    with pytest.raises(ValueError, match="n_prompts"):
        ioi(word_level(), 0)
    with pytest.raises(TypeError, match="tokenizer"):
        ioi(object(), 4)
    with pytest.raises(ValueError, match="places and objects"):
        ioi(word_level([w for w in WORDS if w not in ("store", "garden")]), 4)
    with pytest.raises(ValueError, match="BOS"):
        ioi(word_level([w for w in WORDS if w != "<s>"]), 4, prepend_bos=True)


def test_metrics_against_manual():
    batch = ioi(word_level(), 5, seed=2)
    logits = torch.randn(5, batch.n_pos, 40)
    i = torch.arange(5)
    final = logits[:, -1]
    assert torch.allclose(logit_diff(logits, batch), final[i, batch.answer] - final[i, batch.wrong])
    p = torch.exp(final[i, batch.answer]) / torch.exp(final).sum(-1)
    assert torch.allclose(answer_prob(logits, batch), p, atol=1e-6)
    assert torch.allclose(answer_loss(logits, batch), -torch.log(p), atol=1e-5)
    assert torch.allclose(make_metric(batch, "prob")(logits), p, atol=1e-6)
    with pytest.raises(ValueError, match="batch size"):
        logit_diff(logits[:3], batch)
    with pytest.raises(ValueError, match=r"\[batch, pos, vocab\]"):
        logit_diff(logits[:, -1], batch)


def test_normalized_logit_diff_is_0_at_corrupt_and_1_at_clean():
    batch = ioi(word_level(), 6, seed=0)
    model = make_model()  # d_vocab 61 covers the word-level vocabulary
    metric = make_metric(batch, "normalized_logit_diff", model)
    with torch.no_grad():
        assert abs(float(metric(model(batch.clean)).mean()) - 1) < 1e-5
        assert abs(float(metric(model(batch.corrupt)).mean())) < 1e-5
    with pytest.raises(ValueError, match="model="):
        make_metric(batch, "normalized_logit_diff")
    with pytest.raises(ValueError, match="kind"):
        make_metric(batch, "accuracy")
    with pytest.raises(TypeError, match="IOIBatch"):
        make_metric(batch.clean)


def test_ioi_from_a_model_and_without_tokenizer():
    model = make_model()
    with pytest.raises(ValueError, match="no tokenizer attached"):
        ioi(model, 4)
    with pytest.raises(ValueError, match="no tokenizer attached"):
        ioi(model.tokenizer, 4)  # ioi(None): what a user gets from a model without a tokenizer
    model.tokenizer = hf_word_level()
    batch = ioi(model, 5, seed=1)
    assert torch.equal(batch.clean, ioi(hf_word_level(), 5, seed=1).clean)
    from lnfree._checks import model_id, model_label

    assert batch.model_name == model_label(model) and batch.model_id == model_id(model)
    # the result contract: short repr, HTML repr, identity equality, labels per prompt, a titled plot
    assert batch.labels[0] == f"0: {batch.io_names[0]} vs {batch.s_names[0]}" and len(batch.labels) == 5
    assert "\n" not in repr(batch) and len(repr(batch)) <= 240 and "n_prompts=5" in repr(batch)
    assert "<table" in batch._repr_html_() and batch == batch and hash(batch) != hash(ioi(model, 5, seed=1))
    fig = batch.plot(model)
    assert len(fig.data) == 2 and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    clean_ld, corrupt_ld = batch.logit_diffs(model)
    with torch.no_grad():
        assert torch.allclose(clean_ld, logit_diff(model(batch.clean), batch), atol=1e-6)
    assert list(batch.to_frame()["label"]) == list(batch.labels)


def test_metrics_read_the_last_real_token():
    from lnfree._checks import TokenBatch
    from lnfree.tasks import logit_diff_metric

    batch = ioi(word_level(), 3, seed=2)
    logits = torch.randn(3, batch.n_pos + 2, 40)
    mask = torch.ones(3, batch.n_pos + 2, dtype=torch.long)
    mask[0, -2:] = 0  # row 0 right-padded by 2: its answer is read at position n_pos - 1
    mask[1, :2] = 0  # row 1 left-padded: its last real token is the last position
    mask[2, -1] = 0
    from dataclasses import replace

    padded = replace(batch, attention_mask=mask)
    last = torch.tensor([batch.n_pos - 1, batch.n_pos + 1, batch.n_pos])
    final = logits[torch.arange(3), last]
    i = torch.arange(3)
    assert torch.allclose(logit_diff(logits, padded), final[i, batch.answer] - final[i, batch.wrong])
    m = logit_diff_metric(batch.answer, batch.wrong, attention_mask=mask)
    assert torch.allclose(m(logits), final[i, batch.answer] - final[i, batch.wrong])
    assert torch.allclose(logit_diff_metric(batch.answer, batch.wrong)(logits),
                          logits[i, -1, batch.answer] - logits[i, -1, batch.wrong])
    with pytest.raises(ValueError, match="attention mask"):
        logit_diff(logits[:, :-1], padded)
    with pytest.raises(ValueError, match="one id per prompt"):
        logit_diff_metric(batch.answer, batch.wrong[:2])
    assert isinstance(TokenBatch(batch.clean, mask[:, : batch.n_pos]), tuple)
