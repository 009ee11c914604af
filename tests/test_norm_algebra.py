"""lnfree.norm_algebra: what a site's reader sees, checked against the forward pass itself (issue 20.3).

Every fact `norm_site` states (centres or not, weight, bias, the direction a reader's vector picks up,
the scale) is compared with what the model's own modules compute on random inputs, for every norm kind
and mode, on the final norm and on block sites.
"""

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from lnfree._checks import ln_state_label
from lnfree.model import LNFreeTransformer
from lnfree.norm_algebra import NormSite, is_rms, norm_site

KINDS = ("LN", "LNPre", "RMS", "RMSPre")
SITES = ("ln_final", "blocks.1.ln2", "blocks.0.ln1.v")


def make_model(normalization_type="LN", **kw) -> LNFreeTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=23, n_ctx=12,
                                  act_fn="gelu_new", normalization_type=normalization_type, **kw)
    m = LNFreeTransformer(cfg).eval()
    with torch.no_grad():  # non-trivial weights and biases, so dropping one would show
        for name, p in m.named_parameters():
            if name.endswith(".w") and "ln" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".b") and "ln" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
        m.W_E.mul_(5.0)
    return m


def _model(kind: str, mode: str, **kw):
    m = make_model(kind, **kw)
    tokens = torch.randint(0, m.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(0))
    m.estimate_ln_scales(tokens)
    if mode == "frozen":
        m.freeze_ln()
    elif mode == "removed":
        m.remove_ln()
    return m


def _reader_output(model, site: str, x: torch.Tensor) -> torch.Tensor:
    """What the site's reader computes from the residual x: the forward pass's own modules."""
    if site == "ln_final":
        return model.unembed(model.ln_final(x))
    block = model.blocks[int(site.split(".")[1])]
    if site.endswith("ln2"):
        return block.mlp(block.ln2(x))
    return torch.einsum("bpd,hde->bphe", block.ln1(x, "v"), block.attn.W_V) + block.attn.b_V


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["live", "frozen", "removed"])
def test_norm_site_matches_the_forward_pass(kind, mode):
    torch.manual_seed(1)
    model = _model(kind, mode)
    d = model.cfg.d_model
    x = 3 * torch.randn(2, 5, d)
    for site in SITES:
        ns = norm_site(model, site)
        assert (ns.kind, ns.mode, ns.applied) == (kind, mode, mode != "removed")
        # centring: the reader cannot see the all-ones direction exactly when the kind centres (also removed)
        with torch.no_grad():
            shift = _reader_output(model, site, x + 2.0) - _reader_output(model, site, x)
        assert bool(shift.abs().max() < 1e-4) == ns.centers, (site, shift.abs().max())
        assert ns.rms == kind.startswith("RMS") and ns.centers == kind.startswith("LN")
        module, path = model._site(site)
        if mode == "removed":
            assert ns.weight is None and ns.bias is None
            out, scale = ns.apply(x, want_scale=True)
            assert torch.equal(out, x) and torch.equal(scale, torch.ones(2, 5, 1))
            u = torch.randn(d)
            assert torch.equal(ns.input_direction(u), u)
            continue
        # apply == the module's forward; its scale == what hook_scale shows in the forward pass
        with torch.no_grad():
            out, scale = ns.apply(x, want_scale=True)
            assert torch.equal(out, module(x, path))
            if mode == "frozen":
                assert torch.equal(scale, torch.full((2, 5, 1), model.ln_scale(site)))
            else:
                expect = (x - x.mean(-1, keepdim=True)) if ns.centers else x
                torch.testing.assert_close(scale, (expect.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt())
            # the bias is what the norm outputs for a zero input (frozen and live alike), else zeros
            zero_out, _ = ns.apply(torch.zeros(1, 1, d))
            expect_b = ns.bias if ns.bias is not None else torch.zeros(d)
            torch.testing.assert_close(zero_out[0, 0], expect_b.detach())
        assert (ns.bias is not None) == (kind == "LN") and (ns.weight is not None) == (kind in ("LN", "RMS"))
        # input_direction(u) / scale is the gradient of norm(x) . u at the forward pass's own (held) scale
        xg = x.clone().requires_grad_(True)
        u = torch.randn(d)
        with model.hooks(fwd_hooks=[(model.site_hook(site), lambda s, hook: s.detach())]):
            (module(xg, path) * u).sum().backward()
        torch.testing.assert_close(xg.grad, ns.input_direction(u).expand_as(x) / scale, rtol=1e-5, atol=1e-6)


def test_input_direction_along_another_axis():
    model = _model("LN", "live")
    ns = norm_site(model, "ln_final")
    W = torch.randn(model.cfg.d_model, 7, dtype=torch.float64)
    torch.testing.assert_close(ns.input_direction(W, dim=0), ns.input_direction(W.T).T)


def test_no_final_norm_is_the_identity():
    model = make_model(normalization_type=None)
    ns = norm_site(model, "ln_final")
    assert (ns.kind, ns.mode, ns.applied, ns.centers, ns.rms) == (None, "removed", False, False, False)
    x = torch.randn(2, 3, model.cfg.d_model)
    out, scale = ns.apply(x, want_scale=True)
    assert out is x and scale is None


def test_mixed_kinds_final_rms_and_is_rms():
    mixed = make_model(normalization_type="LN", final_rms=True)
    assert norm_site(mixed, "ln_final").kind == "RMS" and not norm_site(mixed, "ln_final").centers
    assert norm_site(mixed, "blocks.0.ln2").centers
    assert not is_rms(mixed) and ln_state_label(mixed) == "LN"
    rms = _model("RMS", "removed")
    assert rms.cfg.normalization_type is None and is_rms(rms)  # the kind survives removal
    assert ln_state_label(rms) == "norm-free" and ln_state_label(_model("LN", "removed")) == "LN-free"
    assert ln_state_label(_model("RMSPre", "live")) == "RMSNorm"


def test_unknown_site_is_refused():
    with pytest.raises(ValueError, match="unknown LN site"):
        norm_site(make_model(), "blocks.9.ln2")
    assert isinstance(norm_site(make_model(), "blocks.0.ln1.qk"), NormSite)
