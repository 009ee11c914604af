"""Losses of the removal fine-tune: next-token cross-entropy and the paper's auxiliary loss.

The auxiliary loss pulls every token's residual-stream norm entering ``ln_final``
(``blocks.{L-1}.hook_resid_post``) towards the typical norm, so that a single fixed scale fits
all tokens once ln_final is frozen::

    aux = lambda * mean_{b,s} (sigma_{b,s} - sigma_hat)^2

with ``sigma_{b,s} = sqrt(mean_d (x - mean_d x)^2 + eps)`` the per-token std and ``sigma_hat`` the
mean of sigma over the micro-batch excluding position 0 and end-of-text tokens, held constant
(no gradient flows through it).

`site_scale_loss` is lnfree's per-site variant (not the paper's): at every norm's input, the squared log
ratio of each token's scale to the typical scale. It pulls outliers (SmolLM2's massive activations, up to
10x the typical RMS at ' the'; rare tokens whose excess frozen gated MLPs square layer after layer) towards
the typical scale, before and after their site is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int


def token_std(
    resid: Float[torch.Tensor, "batch pos d_model"], eps: float = 1e-5, *, center: bool = True
) -> Float[torch.Tensor, "batch pos"]:
    """Per-token std of the residual stream, as LayerNorm computes its scale (RMS if ``center=False``,
    as RMSNorm computes it).

    Example:
        >>> token_std(torch.tensor([[[1.0, -1.0]]]), eps=0.0)
        tensor([[1.]])
        >>> token_std(torch.tensor([[[3.0, 3.0]]]), eps=0.0, center=False)
        tensor([[3.]])
    """
    x = resid if resid.dtype == torch.float64 else resid.float()
    if center:
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + eps).sqrt()


def typical_std_mask(
    tokens: Int[torch.Tensor, "batch pos"], eot_token_id: Optional[int] = None
) -> torch.Tensor:
    """[batch, pos] bool: tokens that define sigma_hat (not position 0, not end-of-text)."""
    mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    mask[:, 0] = False
    if eot_token_id is not None:
        mask &= tokens != eot_token_id
    return mask


def aux_norm_loss(
    resid: Float[torch.Tensor, "batch pos d_model"],
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    eot_token_id: Optional[int] = None,
    eps: float = 1e-5,
    center: bool = True,
) -> Float[torch.Tensor, ""]:
    """Unweighted auxiliary loss ``mean_{b,s} (sigma_{b,s} - sigma_hat)^2`` (multiply by lambda).

    ``center=False`` measures sigma as the RMS (for RMSNorm models, whose final norm does not centre).

    If no token qualifies for sigma_hat (e.g. one-token sequences), sigma_hat is the mean over
    all tokens.

    Example:
        >>> resid = torch.randn(2, 5, 8, requires_grad=True)
        >>> loss = aux_norm_loss(resid, torch.zeros(2, 5, dtype=torch.long))
        >>> loss.backward(); resid.grad.shape
        torch.Size([2, 5, 8])
    """
    if resid.ndim != 3 or tokens.shape != resid.shape[:2]:
        raise ValueError(f"resid must be [batch, pos, d_model] and tokens [batch, pos]; got "
                         f"{tuple(resid.shape)} and {tuple(tokens.shape)}")
    sigma = token_std(resid, eps, center=center)
    with torch.no_grad():
        mask = typical_std_mask(tokens, eot_token_id)
        sigma_hat = sigma[mask].mean() if bool(mask.any()) else sigma.mean()
    return (sigma - sigma_hat).pow(2).mean()


def next_token_ce(
    logits: Float[torch.Tensor, "batch pos d_vocab"],
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    ignore_label: Optional[int] = None,
) -> Float[torch.Tensor, ""]:
    """Mean next-token cross-entropy (nats) over every predicted position, in float32.

    ``ignore_label`` (e.g. end-of-text, as the paper's collator masks it) drops the positions whose
    label is that id from the mean.

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> round(float(next_token_ce(logits, torch.tensor([[0, 1, 2]]))), 4)   # log 4
        1.3863
    """
    labels = tokens[:, 1:].reshape(-1)
    if ignore_label is not None:
        labels = labels.masked_fill(labels == ignore_label, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100)


def distill_kl(
    student_logits: Float[torch.Tensor, "batch pos d_vocab"],
    teacher_logits: Float[torch.Tensor, "batch pos d_vocab"],
    *,
    temperature: float = 1.0,
) -> Float[torch.Tensor, ""]:
    """KL(teacher || student) of the next-token distributions, mean over positions, times T^2.

    ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` at every position, in float32; exactly 0 when the
    logits are equal. The teacher's logits carry no gradient.

    Example:
        >>> x = torch.randn(2, 3, 5)
        >>> float(distill_kl(x, x))
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * (t * t)


def site_scale_loss(
    scales: list[Float[torch.Tensor, "batch pos 1"]],
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    eot_token_id: Optional[int] = None,
) -> Float[torch.Tensor, ""]:
    """Mean over sites of ``mean_{b,s} log(scale_{b,s} / scale_hat)^2`` (multiply by its weight).

    `scales` are per-token scales at norm inputs (e.g. what a live `hook_scale` gives, with gradients); ``scale_hat`` is the
    mean scale of the typical tokens (not position 0, not end-of-text: `typical_std_mask`), held constant, and
    the mean runs over those tokens too. The log makes a 10x outlier cost (log 10)^2 whatever the site's scale.
    No scales (every site frozen): 0.

    Example:
        >>> s = torch.tensor([[[9.0], [1.0], [10.0]]])   # position 0 is left out
        >>> round(float(site_scale_loss([s], torch.ones(1, 3, dtype=torch.long))), 4)   # log(1/5.5)^2, log(10/5.5)^2
        1.6318
    """
    if not scales:
        return torch.zeros((), device=tokens.device)
    mask = typical_std_mask(tokens, eot_token_id)
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    total = 0.0
    for s in scales:
        if s.shape[:2] != tokens.shape:
            raise ValueError(f"a site's scale has shape {tuple(s.shape)}; expected [batch, pos, ...] = {tuple(tokens.shape)}")
        log_s = s.float().reshape(s.shape[0], s.shape[1], -1).log()[mask]  # [n, 1] (or per head)
        centre = log_s.detach().exp().mean(0).log()  # log of the mean scale
        total = total + (log_s - centre).pow(2).mean()
    return total / len(scales)
