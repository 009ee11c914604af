"""`patching_core.tl_weight_layout`: TransformerLens's per-pass weight copies made no-ops, bit for bit.

Checked against the model without the layout (the independent computation is TransformerLens's own
forward pass with its own copies): logits, activation patching and AtP (with the QK fix and GradDrop)
must be *equal*, not close; the parameters must be restored; an in-place weight edit must not be
served a stale cached copy.
"""

import contextlib

import pytest
import torch

from lnfree.analysis import act_patching, atp
from lnfree.analysis.patching import activation_patching, attribution_patching
from lnfree.analysis.patching_core import tl_weight_layout
from conftest import make_model
from test_patching_arch import _pair, arch_model, make_metric


@pytest.fixture(params=["llama", "neox-split", "gpt2"])
def net(request):
    return make_model() if request.param == "gpt2" else arch_model(request.param)


def _params(model):
    return {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in model.named_parameters()}


def test_forward_is_bit_identical_and_parameters_are_restored(net):
    tokens = _pair(net.cfg.d_vocab)[0]
    before = _params(net)
    with torch.no_grad():
        ref = net(tokens)
        with tl_weight_layout(net):
            inside = net(tokens)
            if net.cfg.gated_mlp:  # the layout TransformerLens wants: its .contiguous() is a no-op
                assert net.blocks[0].mlp.W_in.T.is_contiguous() and net.unembed.W_U.T.is_contiguous()
        again = net(tokens)
    assert torch.equal(ref, inside) and torch.equal(ref, again)
    after = _params(net)
    assert before.keys() == after.keys()
    for name, (ptr, stride, value) in before.items():
        assert after[name][0] == ptr and after[name][1] == stride and torch.equal(after[name][2], value), name


def test_in_place_edit_is_not_served_a_stale_copy(net):
    tokens = _pair(net.cfg.d_vocab)[0]
    with torch.no_grad(), tl_weight_layout(net):  # fills the cache
        net(tokens)
    with torch.no_grad():
        net.unembed.W_U.mul_(2.0)
        net.blocks[1].mlp.W_out.add_(0.5)
        ref = net(tokens)
        with tl_weight_layout(net):
            inside = net(tokens)
    assert torch.equal(ref, inside)


@pytest.mark.parametrize("site, by_pos, method", [("resid_pre", True, "atp"), ("z", False, "atp*"),
                                                  ("k", True, "atp*"), ("mlp_out", True, "atp+graddrop")])
def test_patching_results_are_bit_identical_without_the_layout(net, monkeypatch, site, by_pos, method):
    clean, corrupt = _pair(net.cfg.d_vocab)
    metric = make_metric(net.cfg.d_vocab)
    kw = dict(site=site, by_pos=by_pos, n_boot=20)
    with_layout = (attribution_patching(net, clean, corrupt, metric, method=method, **kw),
                   activation_patching(net, clean, corrupt, metric, **kw))
    monkeypatch.setattr(atp, "tl_weight_layout", lambda model: contextlib.nullcontext())
    monkeypatch.setattr(act_patching, "tl_weight_layout", lambda model: contextlib.nullcontext())
    without = (attribution_patching(net, clean, corrupt, metric, method=method, **kw),
               activation_patching(net, clean, corrupt, metric, **kw))
    for a, b in zip(with_layout, without):
        assert torch.equal(a.per_prompt.nan_to_num(-7.0), b.per_prompt.nan_to_num(-7.0))
