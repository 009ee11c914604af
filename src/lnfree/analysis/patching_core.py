"""What activation and attribution patching share: sites, input checks, and `PatchingResult`.

A *site* is a kind of activation (``resid_pre``, ``z``, ``q``, ...); a *component* is one
(layer[, head][, position]) slice of it. `_Spec` maps components onto activations and scores.

Padding: a batch may carry an attention mask (``attention_mask=`` or a `TokenBatch`). Clean
and corrupt must then have the *same* mask (the same real positions), since a patch moves an
activation from one prompt's position to the other's; padded positions are never patched and
never counted (their per-prompt entries are NaN, and means over prompts skip them).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import weakref
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from lnfree._checks import (
    check_choice,
    check_tokenizer,
    model_id,
    model_label,
    resolve_batch,
)
from lnfree._results import Result, result
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args
from lnfree.tl_layout import tl_weight_layout  # noqa: F401  (atp, act_patching: TL's per-pass copies made no-ops)

Metric = Callable[[torch.Tensor], torch.Tensor]

RESID_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("z", "result", "q", "k", "v")
SITES = RESID_SITES + HEAD_SITES + ("pattern",)
# Sites inside block l: GradDrop's pass l zeroes them exactly (see lnfree.analysis.atp).
BLOCK_INTERNAL = frozenset(SITES) - {"resid_pre", "resid_mid", "resid_post"}
DIRECTIONS = ("denoise", "noise")
METHOD_NAMES = {"activation": "Activation patching", "atp": "AtP", "atp+qk": "AtP + QK fix",
                "atp+graddrop": "AtP + GradDrop", "atp*": "AtP*"}


# ---- sites ---------------------------------------------------------------------------------
def hook_name(site: str, layer: int) -> str:
    if site in RESID_SITES:
        return f"blocks.{layer}.hook_{site}"
    return f"blocks.{layer}.attn.hook_{site}"


def n_heads_at(model, site: str) -> int:
    """Heads of a head site: k and v have the key/value heads under grouped-query attention."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if site in ("k", "v") and n_kv and not getattr(cfg, "ungroup_grouped_query_attention", False):
        return int(n_kv)
    return int(cfg.n_heads)


class Spec:
    """Geometry of one site: the score tensor and how components map onto activations."""

    def __init__(self, site: str, by_pos: bool, n_layers: int, n_heads: int, n_pos: int):
        self.site, self.by_pos, self.n_layers, self.n_heads, self.n_pos = site, by_pos, n_layers, n_heads, n_pos

    @property
    def kind(self) -> str:
        return "resid" if self.site in RESID_SITES else "pattern" if self.site == "pattern" else "head"

    @property
    def dims(self) -> tuple[str, ...]:
        d = ("layer",) if self.kind == "resid" else ("layer", "head")
        return d + (("pos",) if self.by_pos else ())

    @property
    def shape(self) -> tuple[int, ...]:
        sizes = {"layer": self.n_layers, "head": self.n_heads, "pos": self.n_pos}
        return tuple(sizes[d] for d in self.dims)

    def labels(self) -> tuple[str, ...]:
        out = []
        for idx in itertools.product(*(range(n) for n in self.shape)):
            name = f"{idx[0]}_{self.site}" if self.kind == "resid" else f"L{idx[0]}H{idx[1]}"
            out.append(name + (f"@{idx[-1]}" if self.by_pos else ""))
        return tuple(out)

    def real(self, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The real-position mask [batch, *cell] broadcastable onto one layer's activation."""
        if mask is None:
            return None
        if self.kind == "resid":
            return mask[:, :, None]
        if self.kind == "head":
            return mask[:, :, None, None]
        return mask[:, None, :, None]  # pattern: destination (query) positions

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Per-prompt, per-component sums of an activation-shaped product [batch, ...]."""
        x = x.sum(-1)  # over d_model / d_head / src_pos
        if self.kind == "head":
            x = x.transpose(1, 2)  # [batch, pos, head] -> [batch, head, pos]
        if not self.by_pos:
            x = x.sum(-1)
        return x

    def pad_components(self, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Bool [batch, *shape]: True where a component sits on a padded position (by_pos only)."""
        if mask is None or not self.by_pos:
            return None
        pad = ~mask  # [batch, pos]
        shape = (mask.shape[0],) + self.shape
        return pad[:, None, None, :].expand(shape) if self.kind != "resid" else pad[:, None, :].expand(shape)

    def replica_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """Boolean mask [k, *cell] selecting, for replica r, component idx[r] (layer dropped)."""
        k, (P, H) = idx.shape[0], (self.n_pos, self.n_heads)
        ar = torch.arange(k)
        if self.kind == "resid":
            m = torch.zeros(k, P, 1, dtype=torch.bool)
            if self.by_pos:
                m[ar, idx[:, 0], 0] = True
            else:
                m[:] = True
        elif self.kind == "head":
            m = torch.zeros(k, P, H, 1, dtype=torch.bool)
            if self.by_pos:
                m[ar, idx[:, 1], idx[:, 0], 0] = True
            else:
                m[ar, :, idx[:, 0], 0] = True
        else:
            m = torch.zeros(k, H, P, 1, dtype=torch.bool)
            if self.by_pos:
                m[ar, idx[:, 0], idx[:, 1], 0] = True
            else:
                m[ar, idx[:, 0], :, 0] = True
        return m


def make_spec(model, site: str, by_pos: bool, n_pos: int) -> Spec:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; allowed sites are {SITES}")
    if not isinstance(by_pos, bool):
        raise TypeError(f"by_pos must be a bool, got {type(by_pos).__name__}")
    if model.cfg.attn_only and site in ("resid_mid", "mlp_out"):
        raise ValueError(f"site {site!r} does not exist in an attention-only model")
    return Spec(site, by_pos, model.cfg.n_layers, n_heads_at(model, site), n_pos)


@contextlib.contextmanager
def site_enabled(model, site: str):
    """'result' needs cfg.use_attn_result; switch it on for the call and restore it."""
    old = model.cfg.use_attn_result
    if site == "result":
        model.cfg.use_attn_result = True
    try:
        yield
    finally:
        model.cfg.use_attn_result = old


# ---- inputs ----------------------------------------------------------------------------------
def resolve_pair(model, clean, corrupt, attention_mask=None):
    """(clean, corrupt, mask or None) on the model's device; one mask shared by both prompts.

    ``attention_mask`` is one mask for both, or a tuple (clean_mask, corrupt_mask); clean and
    corrupt may also be `TokenBatch`es. The two masks must be equal.
    """
    if isinstance(attention_mask, tuple) and len(attention_mask) == 2:  # (clean_mask, corrupt_mask)
        m_clean, m_corrupt = attention_mask
    else:
        m_clean = m_corrupt = attention_mask
    clean, mc = resolve_batch(model, clean, m_clean, name="clean")
    corrupt, mk = resolve_batch(model, corrupt, m_corrupt, name="corrupt")
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupt must have the same shape, got {tuple(clean.shape)} and "
                         f"{tuple(corrupt.shape)}")
    if mc is not None or mk is not None:
        ones = torch.ones_like(clean, dtype=torch.bool)
        mc, mk = (ones if mc is None else mc), (ones if mk is None else mk.to(ones.device))
        differ = (mc != mk).any(1)
        if bool(differ.any()):
            raise ValueError(
                f"clean and corrupt are padded differently (their attention masks differ in rows "
                f"{torch.nonzero(differ).flatten().tolist()[:8]}); patching moves an activation between the same "
                "position of both prompts, so both need the same real positions: pad the pairs alike, or "
                "patch pairs of equal length")
    device = model.cfg.device
    mask = None if mc is None else mc.to(device)
    return clean.to(device), corrupt.to(device), mask


def check_direction(direction: str) -> str:
    return check_choice(direction, DIRECTIONS, "direction")


class Prepared(NamedTuple):
    model: object
    clean: torch.Tensor
    corrupt: torch.Tensor
    mask: Optional[torch.Tensor]
    spec: Spec
    base: torch.Tensor  # the run patched into (corrupt when denoising)
    source: torch.Tensor  # the run activations come from


def prepare(model, clean, corrupt, attention_mask, *, site: str, by_pos: bool, direction: str,
            n_boot, level, seed, metric=None) -> Prepared:
    """The checks every patching method starts with: model, prompt pair and mask, metric's tokenizer,
    direction, bootstrap settings, site; and which prompts are the base and the source run."""
    from lnfree.model import as_lnfree  # here: importing the model module loads TransformerLens

    model = as_lnfree(model)
    clean, corrupt, mask = resolve_pair(model, clean, corrupt, attention_mask)
    check_tokenizer(model, metric, name="the metric's answer ids")
    check_direction(direction)
    check_bootstrap_args(n_boot, level, seed)
    spec = make_spec(model, site, by_pos, clean.shape[1])
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    return Prepared(model, clean, corrupt, mask, spec, base, source)


def eval_metric(metric: Metric, logits: torch.Tensor, n: int) -> torch.Tensor:
    """metric(logits) with its output validated: a float tensor [n], one value per prompt."""
    if not callable(metric):
        raise TypeError(f"metric must be callable logits[batch, pos, vocab] -> tensor[batch], got "
                        f"{type(metric).__name__}")
    out = metric(logits)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"metric must return a torch.Tensor of shape [batch]={n}, got {type(out).__name__}")
    if tuple(out.shape) != (n,):
        raise ValueError(f"metric must return one scalar per prompt, shape ({n},); got shape {tuple(out.shape)}"
                         " (return per-prompt values, not their mean)")
    if not out.dtype.is_floating_point:
        raise TypeError(f"metric must return floating-point values, got dtype {out.dtype}")
    return out


def metric_label(metric) -> str:
    kind = getattr(metric, "kind", None)
    return str(kind) if kind else getattr(metric, "__name__", type(metric).__name__)


def prompts_id(clean: torch.Tensor, corrupt: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    """A fingerprint of the prompt pairs: results on different prompts must not be combined."""
    h = hashlib.sha1()
    for t in (clean, corrupt) + (() if mask is None else (mask,)):
        h.update(t.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:12]


def position_labels(model, clean: torch.Tensor, corrupt: torch.Tensor, mask: Optional[torch.Tensor]
                    ) -> tuple[str, ...]:
    """``"3: ' Mary'"`` per position, from the longest prompt (``' Mary'/' John'`` where clean and
    corrupt differ); plain indices when the model has no tokenizer."""
    P = clean.shape[1]
    tok = getattr(model, "tokenizer", None)
    row = 0 if mask is None else int(mask.sum(1).argmax())
    if tok is None or not callable(getattr(tok, "decode", None)):
        return tuple(str(p) for p in range(P))
    out = []
    try:
        for p in range(P):
            if mask is not None and not bool(mask[row, p]):
                out.append(f"{p}: [pad]")
                continue
            a, b = int(clean[row, p]), int(corrupt[row, p])
            text = repr(tok.decode([a])) if a == b else f"{tok.decode([a])!r}/{tok.decode([b])!r}"
            out.append(f"{p}: {text}")
    except Exception:  # a tokenizer that cannot decode single ids: indices are still honest labels
        return tuple(str(p) for p in range(P))
    return tuple(out)


_MODEL_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_model_id(model) -> str:
    """`lnfree._checks.model_id`, cached per model while the tensors it reads are unchanged.

    The fingerprint reads W_E, W_U, the first W_Q and the norm modes; the cache key is those
    tensors' identities and in-place versions, so any edit to them recomputes it (a sweep on a
    large model otherwise spends seconds converting the embeddings to float64).
    """
    tensors = [model.W_E, model.W_U] + ([model.blocks[0].attn.W_Q] if model.cfg.n_layers else [])
    modes = tuple(sorted(model.ln_modes().items())) if hasattr(model, "ln_modes") else ()
    key = (tuple((id(t), t._version) for t in tensors), modes)
    hit = _MODEL_IDS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = model_id(model)
    _MODEL_IDS[model] = (key, value)
    return value


def masked_mean(per_prompt: torch.Tensor) -> torch.Tensor:
    """Mean over prompts skipping NaN (padded) entries; NaN where every prompt is padded."""
    real = ~torch.isnan(per_prompt)
    n = real.sum(0)
    total = torch.where(real, per_prompt, torch.zeros_like(per_prompt)).sum(0)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


# ---- results -------------------------------------------------------------------------------
@result
class PatchingResult(Result):
    """Per-component patching effects (activation patching) or their AtP / AtP* estimates.

    Attributes:
        scores: tensor shaped `dims` (e.g. [layer, head, pos]): the change of the metric, patched
            minus base run, averaged over prompts (activation patching), or its estimate. With
            GradDrop the estimate is of the magnitude of that change (``signed=False``).
        per_prompt: [prompt, *dims] the same per prompt pair (NaN on padded positions, and on
            layers left out with ``layers=``).
        values: activation patching only: the patched mean metric (what TransformerLens's
            patching functions return), shaped like `scores`.
        labels: one per component, in ``scores.flatten()`` order (``L{l}H{h}[@pos]``,
            ``{l}_{site}[@pos]``); pos_labels: one per position, ``"3: ' Mary'"``.
        metric_clean, metric_corrupt: mean metric of the unpatched clean / corrupted runs;
            clean_metric / corrupt_metric per prompt. effect: their mean difference with a CI.
        model_name, model_id, prompts_id: what produced the result (results from different
            models or prompts are never combined).
    """

    scores: torch.Tensor
    per_prompt: torch.Tensor
    dims: tuple[str, ...]
    labels: tuple[str, ...]
    pos_labels: tuple[str, ...]
    site: str
    by_pos: bool
    direction: str
    method: str
    metric: str
    metric_clean: float
    metric_corrupt: float
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    effect: Estimate
    n_prompts: int
    model_name: str
    model_id: str
    prompts_id: str
    signed: bool = True
    ln: Optional[str] = None
    qk_fix: bool = False
    grad_drop: bool = False
    padded: bool = False
    values: Optional[torch.Tensor] = None
    layers: Optional[tuple[int, ...]] = None
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def baseline(self) -> float:
        """Mean metric of the unpatched base run (corrupted when denoising, clean when noising)."""
        return self.metric_corrupt if self.direction == "denoise" else self.metric_clean

    def _index_frame(self):
        import pandas as pd

        idx = np.array(list(itertools.product(*(range(n) for n in self.scores.shape)))).reshape(-1, len(self.dims))
        df = pd.DataFrame(idx, columns=list(self.dims))
        df.insert(0, "label", list(self.labels))
        if "pos" in self.dims:
            df["token"] = [self.pos_labels[p] for p in df["pos"]]
        return df

    def to_frame(self, *, per_prompt: bool = False):
        """Long format: one row per component (``per_prompt=True``: per component and prompt)."""
        import pandas as pd

        df = self._index_frame()
        if per_prompt:
            pp = self.per_prompt.detach().cpu().double().reshape(self.per_prompt.shape[0], -1).numpy()
            frames = [df.assign(prompt=b, score=pp[b]) for b in range(pp.shape[0])]
            df = pd.concat(frames, ignore_index=True)
        else:
            df["score"] = self.scores.detach().cpu().flatten().double().numpy()
            if self.values is not None:
                df["value"] = self.values.detach().cpu().flatten().double().numpy()
        df["site"], df["method"], df["model"] = self.site, self.method, self.model_name
        return df

    def top(self, k: int = 10):
        """The k components with the largest |score| (padded-everywhere components left out)."""
        from lnfree._checks import positive_int

        k = positive_int(k, "k")
        df = self.to_frame().dropna(subset=["score"])
        return df.reindex(df["score"].abs().sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def plot(self, title: Optional[str] = None):
        """Plotly heatmap: rows layer (or layer x head), columns head or position (labelled by token)."""
        import plotly.graph_objects as go

        s = self.scores.detach().cpu().double()
        if s.ndim == 1:
            z, y, x, xt, yt = s[:, None].numpy(), [f"L{l}" for l in range(s.shape[0])], [self.site], "site", "layer"
        elif s.ndim == 2:
            z, y, yt = s.numpy(), [f"L{l}" for l in range(s.shape[0])], "layer"
            if self.dims[1] == "pos":
                x, xt = list(self.pos_labels), "position (token)"
            else:
                x, xt = [f"H{i}" for i in range(s.shape[1])], "head"
        else:
            z = s.reshape(-1, s.shape[-1]).numpy()
            y = [f"L{l}H{h}" for l in range(s.shape[0]) for h in range(s.shape[1])]
            x, xt, yt = list(self.pos_labels), "destination position (token)" if self.site == "pattern" \
                else "position (token)", "layer, head"
        what = "effect on metric" if self.signed else "|effect| estimate"
        kw = dict(colorscale="RdBu", zmid=0.0) if self.signed else dict(colorscale="Viridis")
        fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorbar=dict(title=what), **kw))
        fig.update_yaxes(autorange="reversed", title_text=yt)
        fig.update_xaxes(title_text=xt)
        fig.update_layout(title=title or f"{METHOD_NAMES.get(self.method, self.method)}: {self.site} "
                                         f"({self.direction}), {self.model_name}")
        return fig


def make_result(model, spec: Spec, *, per_prompt, clean_pp, corrupt_pp, clean, corrupt, mask, metric,
                direction, method, n_boot, level, seed, values_pp=None, **extra) -> PatchingResult:
    """Assemble a PatchingResult: NaN on padded components, means over prompts, the effect CI."""
    pad = spec.pad_components(None if mask is None else mask.cpu())
    if pad is not None:
        per_prompt = per_prompt.masked_fill(pad, float("nan"))
        values_pp = None if values_pp is None else values_pp.masked_fill(pad, float("nan"))
    diff = (clean_pp - corrupt_pp).double()
    effect = bootstrap(diff.numpy(), n_boot=n_boot, level=level, seed=seed)
    return PatchingResult(
        scores=masked_mean(per_prompt), per_prompt=per_prompt, dims=spec.dims, labels=spec.labels(),
        pos_labels=position_labels(model, clean, corrupt, mask), site=spec.site, by_pos=spec.by_pos,
        direction=direction, method=method, metric=metric_label(metric),
        metric_clean=float(clean_pp.mean()), metric_corrupt=float(corrupt_pp.mean()),
        clean_metric=clean_pp, corrupt_metric=corrupt_pp, effect=effect, n_prompts=int(clean.shape[0]),
        model_name=model_label(model), model_id=cached_model_id(model), prompts_id=prompts_id(clean, corrupt, mask),
        padded=mask is not None and not bool(mask.all()),
        values=None if values_pp is None else masked_mean(values_pp), n_boot=n_boot, level=level, seed=seed, **extra,
    )
