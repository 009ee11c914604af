"""`lnfree.tl_layout` in the removal trainer: a run keeps its weights in the layout TransformerLens copies them
into (no per-pass copy), trains bit-identically to a run without it, and hands the model back contiguous,
finished or stopped."""

import pytest
import torch

from lnfree import tl_layout
from lnfree.removal import remove_layernorm
from lnfree.removal import trainer as trainer_mod
import conftest
from conftest import make_llama, removal_data as _data

RUN = conftest.REMOVAL_RUN


def _train(monkeypatch, layout: bool, **kw):
    if not layout:
        monkeypatch.setattr(trainer_mod, "to_tl_layout", lambda model, swapped=None: [])
    seen = []

    def callback(record):
        if record.get("event") == "step":
            seen.append(model.blocks[0].mlp.W_in.T.is_contiguous() and not model.blocks[0].mlp.W_in.is_contiguous())

    model = make_llama()
    out = remove_layernorm(model, _data(), callback=callback, **RUN, **kw)
    monkeypatch.undo()
    return out, seen


@pytest.mark.parametrize("variant", [{}, {"distill": 0.5, "lora_rank": 4}])
def test_training_in_tl_layout_is_bit_identical_and_ends_contiguous(monkeypatch, variant):
    fast, seen_fast = _train(monkeypatch, True, **variant)
    plain, seen_plain = _train(monkeypatch, False, **variant)
    assert seen_fast and all(seen_fast) and not any(seen_plain)  # the run really trained in TL's layout
    a, b = fast.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert all(p.is_contiguous() for p in fast.parameters())
    assert fast.removal_summary["ln_free"] and plain.removal_summary["ln_free"]


def test_a_stopped_run_leaves_the_model_contiguous():
    class Stop(Exception):
        pass

    def callback(record):
        if record.get("event") == "step":
            raise Stop

    model = make_llama()
    with pytest.raises(Stop):
        remove_layernorm(model, _data(), callback=callback, **RUN)
    assert all(p.is_contiguous() for p in model.parameters())


def test_to_tl_layout_keeps_values_and_makes_the_copy_a_noop():
    model = make_llama()
    tokens = _data(3)
    ref = model(tokens)
    swapped = tl_layout.to_tl_layout(model)
    assert len(swapped) == 2 * 7 + 1  # per layer W_Q, _W_K, _W_V, W_O, W_gate, W_in, W_out; and W_U
    assert model.unembed.W_U.T.is_contiguous() and model.blocks[1].attn.W_O.permute(2, 0, 1).is_contiguous()
    assert torch.equal(model(tokens), ref)
    tl_layout.contiguous_parameters(model)
    assert all(p.is_contiguous() for p in model.parameters()) and torch.equal(model(tokens), ref)


def test_clip_grad_norm_equals_torch_and_ignores_the_layout():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=g) * 3, torch.randn(4, generator=g), torch.randn(3, 6, 2, generator=g)]

    def params(layout: bool):
        out = []
        for t in grads:
            p = torch.nn.Parameter(torch.zeros_like(t))
            p.grad = t.clone()
            if layout and t.dim() >= 2:  # the gradient stored transposed, as in TL's layout
                p.grad = t.transpose(0, 1).contiguous().transpose(0, 1)
            out.append(p)
        return out

    ref, ours, permuted = params(False), params(False), params(True)
    total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert trainer_mod.clip_grad_norm(ours, 1.0) == float(total) == trainer_mod.clip_grad_norm(permuted, 1.0)
    for r, o, q in zip(ref, ours, permuted):
        assert torch.equal(r.grad, o.grad) and torch.equal(r.grad, q.grad)
