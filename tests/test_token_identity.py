"""Token ids remember the tokenizer that wrote them; analyses refuse ids of another tokenizer (issue 23.1)."""

import copy
import pickle

import pytest
import torch

import lnfree
from lnfree import tasks, zoo
from lnfree import tokenizer as T
from lnfree.tokenizer import Tokens, gpt2_tokenizer, tokenizer_id
from tests.conftest import make_model


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    """A tiny random model reading GPT-2's vocabulary (50257 ids > the zoo's 4096: zoo ids fit in it)."""
    m = make_model(d_vocab=50257, n_ctx=64)
    m.cfg.model_name = "tiny-gpt2-vocab"
    m.set_tokenizer(gpt2_tokenizer(add_bos_token=True))
    return m


@pytest.fixture(scope="module")
def tiny_ln():
    return zoo.load("tiny-ln")


def test_heldout_slices_and_copies_keep_the_tokenizer():
    h = zoo.heldout("persuasion")
    assert isinstance(h, Tokens) and h.tokenizer_id.n_tokens == len(zoo.tokenizer())
    for kept in (h[:2, :32], h[:2, :32].to("cpu"), h.clone(), h.long(), h.contiguous(), copy.deepcopy(h),
                 pickle.loads(pickle.dumps(h[:2]))):
        assert isinstance(kept, Tokens) and kept.tokenizer_id == h.tokenizer_id
    assert torch.equal(pickle.loads(pickle.dumps(h[:2])), h[:2])
    # every other op gives an ordinary tensor: arithmetic, reductions, model outputs
    for plain in (h + 1, h.sum(), h.float(), torch.cat([h[:1], h[1:2]]), h.plain()):
        assert type(plain) is torch.Tensor


def test_cross_entropy_refuses_another_tokenizers_ids_naming_both(gpt2_vocab_model):
    toks = zoo.heldout("persuasion")[:2, :32]
    with pytest.raises(ValueError) as e:
        lnfree.cross_entropy(gpt2_vocab_model, toks)
    msg = str(e.value)
    assert "zoo family's tokenizer (4096 tokens" in msg and "the tokenizer of tiny-gpt2-vocab (50257 tokens" in msg
    assert "lnfree.tokenize(model, texts)" in msg
    # plain ids stay accepted (the user says they are right), and their numbers are the model's own
    ce = lnfree.cross_entropy(gpt2_vocab_model, toks.plain())
    with torch.no_grad():
        logits = gpt2_vocab_model(toks.plain())
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50257), toks.plain()[:, 1:].reshape(-1))
    assert abs(float(ce.mean) - float(ref)) < 1e-5


def test_patching_refuses_ioi_prompts_and_metrics_of_another_tokenizer(gpt2_vocab_model, tiny_ln):
    batch = tasks.ioi(tiny_ln, 4)
    assert batch.tokenizer_id.label == "the tokenizer of tiny-ln"
    with pytest.raises(ValueError, match="clean came from the tokenizer of tiny-ln"):
        lnfree.attribution_patching(gpt2_vocab_model, batch.clean, batch.corrupt, batch.metric(), site="z")
    with pytest.raises(ValueError, match="clean came from the tokenizer of tiny-ln"):
        lnfree.activation_patching(gpt2_vocab_model, batch.clean, batch.corrupt, batch.metric(), site="z")
    # right prompts, wrong metric: its answer ids are another vocabulary's
    other = tasks.ioi(gpt2_tokenizer(), 4)
    with pytest.raises(ValueError, match="the metric's answer ids came from the tokenizer 'gpt2_tokenizer_"):
        lnfree.attribution_patching(tiny_ln, batch.clean, batch.corrupt, other.metric(), site="z")
    with pytest.raises(ValueError, match="the metric's answer ids came from"):
        lnfree.attribution_patching(tiny_ln, batch.clean, batch.corrupt,
                                    tasks.logit_diff_metric(other.answer, other.wrong), site="z")
    with pytest.raises(ValueError, match="the IOI prompts came from"):
        batch.metric("normalized_logit_diff", gpt2_vocab_model)


def test_every_token_analysis_goes_through_the_check(gpt2_vocab_model, tiny_ln):
    toks = zoo.heldout("persuasion")[:2, :16]
    calls = {
        "direct_logit_attribution": lambda m, t: lnfree.direct_logit_attribution(m, t),
        "calibration": lambda m, t: lnfree.calibration(m, t),
        "first_token_norm": lambda m, t: lnfree.first_token_norm(m, t),
        "attention_sink_rate": lambda m, t: lnfree.attention_sink_rate(m, t),
        "ablate_neurons": lambda m, t: lnfree.ablate_neurons(m, t, ["L0N1"]),
        "table1_ce": lambda m, t: lnfree.paper.table1.table1_ce(m, t, batch_size=2),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="came from the zoo family's tokenizer"):
            call(gpt2_vocab_model, toks)
        call(tiny_ln, toks)  # the family's own model reads them


def test_same_vocabulary_is_the_same_tokenizer_and_is_hashed_once(gpt2_vocab_model, monkeypatch):
    # another GPT-2 tokenizer object (another instance, add_bos_token differs): the same ids, accepted
    batch = tasks.ioi(gpt2_tokenizer(), 2)
    lnfree.attribution_patching(gpt2_vocab_model, batch.clean, batch.corrupt, batch.metric(), site="z")
    tok = gpt2_tokenizer()
    calls = []
    real = type(tok).get_vocab
    monkeypatch.setattr(type(tok), "get_vocab", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = tokenizer_id(tok)
    assert tokenizer_id(tok).fingerprint == first.fingerprint and len(calls) == 1
    tok.add_tokens(["<|new-token|>"])  # a changed vocabulary is hashed again, and differs
    assert tokenizer_id(tok).fingerprint != first.fingerprint and len(calls) == 2


def test_tokenize_marks_its_tokens_and_refuses_an_empty_list(gpt2_vocab_model, tiny_ln):
    batch = lnfree.tokenize(tiny_ln, ["A fine morning.", "Anne walked to the house at noon."])
    assert isinstance(batch.tokens, Tokens) and batch.tokens.tokenizer_id.label == "the tokenizer of tiny-ln"
    with pytest.raises(ValueError, match="came from the tokenizer of tiny-ln"):
        lnfree.cross_entropy(gpt2_vocab_model, batch)
    for bad in ([], (), None, [1, 2]):
        with pytest.raises(ValueError, match="texts must be a string or a non-empty list of strings"):
            lnfree.tokenize(tiny_ln, bad)


def test_the_fingerprint_ignores_tokenizers_without_a_vocabulary():
    assert tokenizer_id(object()) is None
    assert T.with_tokenizer(torch.tensor([1, 2]), object()).__class__ is torch.Tensor
