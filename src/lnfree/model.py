"""`LNFreeTransformer`: a HookedTransformer in which every normalization layer is a removable site.

Sites, in the order the paper removes them within a layer type:
``blocks.{i}.ln1.qk`` (attention query/key input), ``blocks.{i}.ln1.v`` (attention value input),
``blocks.{i}.ln2`` (MLP input) and ``ln_final``. Each is ``live``, ``frozen`` (fixed scalar scale,
the paper's fake LN) or ``removed`` (scale, centering, w and b folded into the weights that read
the site; the norm module becomes the identity).

Every TransformerLens norm kind is a site: LayerNorm, LNPre, RMSNorm and RMSPre. The paper's
procedure generalises directly to RMSNorm: its per-token RMS is replaced by a fixed average RMS
sigma (frozen: x / sigma * w, no centering), and removal folds w / sigma into the readers.
Grouped-query attention folds into the shared key/value weights; rotary, ALiBi, parallel
attention + MLP, gated MLPs, split q/k/v inputs, attn_in and attn_result work in every mode.
Features that cannot be handled are refused at construction (`unsupported_features`).

All LN logic of the package lives here and in `lnfree.layernorm`; analyses ask the model
(`ln_mode`, `ln_scale`, `site_hook`, `site_readers`) instead of re-deriving it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from jaxtyping import Int
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, TransformerBlock
from transformer_lens.utilities import repeat_along_head_dimension
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from lnfree import _hooks
from lnfree.layernorm import MODES, RemovableLayerNorm

Scale = Union[float, tuple[float, ...]]  # a scalar, or positional: (sigma_0, ..., sigma_{k-1}, sigma_rest)
ScalesArg = Union[None, float, int, Sequence[float], Mapping[str, Union[float, Sequence[float]]]]
SitesArg = Union[None, str, Sequence[str]]


class LNFreeBlock(TransformerBlock):
    """TransformerBlock whose ln1 is called once per path (query/key, value).

    Mirrors `TransformerBlock.forward` of TransformerLens 3.9 step by step (hooks, split q/k/v
    inputs, attn_in, parallel attention + MLP), so with every path live it computes exactly what
    TransformerLens computes. Without split inputs the query and key share one ln1 call (one
    ``hook_scale``); with `use_split_qkv_input` ln1 is applied to the query and to the key input
    separately (each [batch, pos, head, d_model]), as TransformerLens does.
    """

    def forward(self, resid_pre, shortformer_pos_embed=None, past_kv_cache_entry=None, attention_mask=None):
        cfg = self.cfg
        resid_pre = self.hook_resid_pre(resid_pre)  # [batch, pos, d_model]
        attn_in = resid_pre
        if cfg.use_attn_in:
            attn_in = self.hook_attn_in(repeat_along_head_dimension(resid_pre, n_heads=cfg.n_heads))
        extra = 0.0  # TransformerLens adds 0.0 to the normalized q/k inputs of non-shortformer models
        if cfg.use_split_qkv_input:
            grouped = cfg.n_key_value_heads is not None and not cfg.ungroup_grouped_query_attention
            n_kv_heads = cfg.n_key_value_heads if grouped else cfg.n_heads
            query_input = self.hook_q_input(repeat_along_head_dimension(resid_pre, n_heads=cfg.n_heads))
            key_input = self.hook_k_input(repeat_along_head_dimension(resid_pre, n_heads=n_kv_heads))
            value_input = self.hook_v_input(repeat_along_head_dimension(resid_pre, n_heads=n_kv_heads))
            q_in = self.ln1(query_input, "qk") + extra
            k_in = self.ln1(key_input, "qk") + extra
        else:
            value_input = attn_in
            q_in = k_in = self.ln1(attn_in, "qk") + extra
        attn_out = self.attn(
            query_input=q_in,
            key_input=k_in,
            value_input=self.ln1(value_input, "v"),
            past_kv_cache_entry=past_kv_cache_entry,
            attention_mask=attention_mask,
        )
        attn_out = self.hook_attn_out(attn_out)
        if resid_pre.device != attn_out.device:
            resid_pre = resid_pre.to(attn_out.device)
        if cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        if cfg.parallel_attn_mlp:
            mlp_in = resid_pre if not cfg.use_hook_mlp_in else self.hook_mlp_in(resid_pre.clone())
            mlp_out = self.apply_mlp(self.ln2(mlp_in))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = resid_mid if not cfg.use_hook_mlp_in else self.hook_mlp_in(resid_mid.clone())
        mlp_out = self.apply_mlp(self.ln2(mlp_in))
        return self.hook_resid_post(resid_mid + mlp_out)


def _is_scale(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _warn_if_not_finite(out) -> None:
    first = out[0] if isinstance(out, tuple) else out
    if isinstance(first, torch.Tensor) and first.is_floating_point() and not bool(torch.isfinite(first).all()):
        warnings.warn(
            "non-finite outputs from a model with frozen or removed norm sites: without the per-token "
            "scale the residual stream overflowed. Freeze fewer sites, fine-tune while freezing "
            "(lnfree.removal.remove_layernorm), or use a wider dtype.",
            RuntimeWarning,
            stacklevel=3,
        )


# TransformerLens module class -> RemovableLayerNorm kind.
_NORM_KINDS = {LayerNorm: "LN", LayerNormPre: "LNPre", RMSNorm: "RMS", RMSNormPre: "RMSPre"}


def unsupported_features(cfg) -> list[str]:
    """Features of a TransformerLens config that LNFreeTransformer refuses, each named with its option.

    Everything else TransformerLens's HookedTransformer builds is supported: LayerNorm, LNPre,
    RMSNorm and RMSPre sites (also mixed, e.g. `final_rms`), grouped-query attention, rotary and
    ALiBi positions, local attention, parallel attention + MLP, gated MLPs, split q/k/v inputs,
    attn_in, attn_result, QK-norm, attention-score soft-capping.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=10, act_fn="gelu",
        ...                               positional_embedding_type="shortformer")
        >>> unsupported_features(cfg)
        ["shortformer positional embeddings (positional_embedding_type='shortformer')"]
    """
    reasons = {
        "shortformer positional embeddings (positional_embedding_type='shortformer')":
            cfg.positional_embedding_type == "shortformer",
        "Gemma-2-style post-norms (use_normalization_before_and_after=True)": cfg.use_normalization_before_and_after,
        f"post-norm architecture {cfg.original_architecture} (ln1/ln2 normalize sublayer outputs)":
            cfg.original_architecture in POST_NORM_ARCHITECTURES,
        f"layer-norm activation {cfg.act_fn!r} (SoLU's MLP LayerNorm)": cfg.is_layer_norm_activation(),
        "a LayerNorm after the embedding (post_embedding_ln=True, BLOOM)": cfg.post_embedding_ln,
        "mixture-of-experts MLPs (num_experts)": bool(cfg.num_experts),
        "4-bit quantized weights (load_in_4bit=True)": bool(getattr(cfg, "load_in_4bit", False)),
        "output logit soft-capping (output_logits_soft_cap > 0)": cfg.output_logits_soft_cap > 0,
    }
    return [name for name, on in reasons.items() if on]


_WHY = {
    "shortformer": "the positional embedding is added after ln1 to queries and keys only, so folding ln1 "
                   "into W_Q/W_K would also rescale it",
    "post-norm": "those norms act on sublayer outputs, which are not sites",
    "SoLU": "the MLP's own LayerNorm is not a removable site",
    "post_embedding_ln": "the embedding LayerNorm is not a removable site",
    "mixture-of-experts": "folding into the router and every expert is not implemented",
    "4-bit": "quantized weights cannot be folded",
    "soft-capping": "the logits are then not linear in the residual stream, so direct logit attribution "
                    "and LN-free decompositions would be wrong",
}


def _check_supported(cfg) -> None:
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre", None):
        raise ValueError(
            f"LNFreeTransformer supports normalization_type 'LN', 'LNPre', 'RMS', 'RMSPre' or None; "
            f"this model uses {cfg.normalization_type!r}"
        )
    bad = unsupported_features(cfg)
    if bad:
        why = [reason for key, reason in _WHY.items() if any(key in b for b in bad)]
        raise ValueError(f"LNFreeTransformer does not support models with {'; '.join(bad)}: {'; '.join(why)}")


def _as_number(x):
    """A 0-d tensor or numpy scalar is a number (``scales=torch.tensor(1.5)``); anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim == 0 and not x.dtype.is_complex and x.dtype != torch.bool:
        return float(x)
    if hasattr(x, "item") and getattr(x, "shape", None) == () and not isinstance(x, (bool, torch.Tensor)):
        return float(x.item())
    return x


def _as_scale(x):
    """`_as_number`, and a list / 1-d tensor (a positional scale) as a tuple of floats."""
    if isinstance(x, list):
        return tuple(_as_number(v) for v in x)
    if isinstance(x, tuple):
        return tuple(_as_number(v) for v in x)
    return _as_number(x)


class LNFreeTransformer(HookedTransformer):
    """HookedTransformer with removable LayerNorm / RMSNorm sites.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, d_vocab=50,
        ...                               act_fn="gelu_new", normalization_type="LN")
        >>> model = LNFreeTransformer(cfg)
        >>> tokens = torch.randint(0, 50, (4, 16))
        >>> scales = model.estimate_ln_scales(tokens)
        >>> with model.ln_frozen():             # every site frozen at its estimated scale
        ...     frozen_logits = model(tokens)
        >>> model.remove_ln()                   # fold the scales into the weights, for good
        >>> torch.allclose(model(tokens), frozen_logits, atol=1e-5)
        True
        >>> model.is_ln_free
        True
    """

    def __init__(self, cfg, tokenizer=None, move_to_device: bool = True, **kwargs):
        # Own copy: remove_ln edits cfg.normalization_type, which must not leak into sibling models.
        cfg = copy.deepcopy(HookedTransformerConfig.unwrap(cfg))
        _check_supported(cfg)
        super().__init__(cfg, tokenizer=tokenizer, move_to_device=move_to_device, **kwargs)
        self._install_sites()

    def forward(self, *args, **kwargs):
        """HookedTransformer.forward, refusing float16 once LN no longer bounds the residual stream.

        Token ids are range-checked: the embedding would silently wrap a negative id around. In eval
        mode with frozen or removed sites, non-finite outputs raise a RuntimeWarning: without the
        per-token scale the residual stream can overflow (e.g. gated-MLP models such as SmolLM2 with
        every site frozen and no fine-tuning: activations square at every layer).
        """
        input = args[0] if args else kwargs.get("input")
        self._check_forward_ids(input, kwargs)
        fixed, positional = self._norm_status()
        if self.W_E.dtype == torch.float16 and fixed:
            raise ValueError(
                "float16 is unsafe for a model with frozen or removed LN sites: without LN the residual "
                "stream reaches norms in the thousands and overflows float16 (max 65504). Use "
                "model.to(torch.float32) or model.to(torch.bfloat16)."
            )
        with self._positions_set(input, kwargs, positional):
            out = super().forward(*args, **kwargs)
        if fixed and not self.training:  # training loops keep their own checks (and no extra host sync)
            _warn_if_not_finite(out)
        return out

    def _check_forward_ids(self, input, kwargs) -> None:
        if kwargs.get("start_at_layer") is not None or not isinstance(input, torch.Tensor):
            return
        if input.is_floating_point() or input.dtype == torch.bool or input.numel() == 0:
            return
        lo, hi = int(input.min()), int(input.max())
        if lo < 0 or hi >= self.cfg.d_vocab:
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}); got min {lo}, max {hi}")
        fixed_positions = self.cfg.positional_embedding_type in ("standard", "shortformer")
        if fixed_positions and kwargs.get("past_kv_cache") is None and input.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"sequences of {input.shape[-1]} tokens exceed the context length n_ctx={self.cfg.n_ctx}")

    def _norm_status(self) -> tuple[bool, list[RemovableLayerNorm]]:
        """One walk over the norm modules (every forward): whether any site is frozen or removed, and the
        modules with a positional frozen scale."""
        fixed, positional = False, []
        for m in self.modules():
            if isinstance(m, RemovableLayerNorm):
                fixed = fixed or any(mode != "live" for mode in m.modes.values())
                if any(m.modes[p] == "frozen" and m.is_positional(p) for p in m.paths):
                    positional.append(m)
        return fixed, positional

    @contextlib.contextmanager
    def _positions_set(self, input, kwargs, modules: list[RemovableLayerNorm]):
        """While positional frozen scales are in use (`modules`): give them each token's position (left padding
        and a KV cache shift it) and warn when a row's first token is not the one they were calibrated on."""
        if not modules or not isinstance(input, torch.Tensor):
            yield
            return
        is_tokens = not input.is_floating_point()  # else a residual stream (start_at_layer)
        shape = (input[None] if input.ndim == 1 else input).shape[:2] if is_tokens else input.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0).to(input.device)
        else:
            positions = torch.arange(shape[1], device=input.device)[None].expand(shape)
        cache = kwargs.get("past_kv_cache")
        if cache is not None and len(cache.entries) and cache.entries[0].past_keys is not None:
            positions = positions + cache.entries[0].past_keys.shape[1]
        if is_tokens:
            self._check_first_token(input.reshape(shape), positions, mask, modules)
        for m in modules:
            m.positions = positions
        try:
            yield
        finally:
            for m in modules:
                m.positions = None

    @staticmethod
    def _check_first_token(tokens, positions, mask, modules) -> None:
        expected = {t for m in modules for p in m.paths if m.is_positional(p)
                    for t in [m.first_token.get(p)] if t is not None}
        first = (positions == 0) if mask is None else (positions == 0) & mask.bool().to(tokens.device)
        seen = set(tokens[first].unique().tolist())
        if expected and not seen <= expected:
            warnings.warn(
                f"positional frozen norm scales were calibrated with token {sorted(expected)} at position 0, but "
                f"these rows start with {sorted(seen - expected)[:5]}: position 0's scale assumes that first token "
                "(prepend it, e.g. the tokenizer's BOS, or re-estimate the scales)",
                UserWarning, stacklevel=4)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_hooked(cls, model: HookedTransformer) -> "LNFreeTransformer":
        """Wrap an existing HookedTransformer; parameters are shared, not copied.

        The wrapped model is left untouched: later LN removal writes new parameters rather than
        editing shared ones in place.

        Example:
            >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
            >>> cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, d_vocab=20, act_fn="gelu")
            >>> ht = HookedTransformer(cfg)
            >>> m = LNFreeTransformer.from_hooked(ht)
            >>> m.W_E.data_ptr() == ht.W_E.data_ptr()
            True
        """
        if isinstance(model, LNFreeTransformer):
            return model
        if not isinstance(model, HookedTransformer):
            raise TypeError(f"from_hooked expects a HookedTransformer, got {type(model).__name__}")
        _check_supported(model.cfg)
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        memo[id(model.tokenizer)] = model.tokenizer
        new = copy.deepcopy(model, memo)
        new.__class__ = cls
        new._install_sites()
        return new

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "LNFreeTransformer":
        """Load any model reference: a zoo name, a .gguf file, a run/checkpoint/TransformerLens/HF dir, a hub id.

        The same as `lnfree.load` (`lnfree.io.resolve.load`): the same kinds, arguments and model.

        Example:
            >>> model = LNFreeTransformer.from_pretrained("tiny-ln", device="cpu")  # doctest: +SKIP
        """
        return _hooks.call("from_pretrained", name_or_path, **kwargs)  # lnfree.io.resolve.load

    def save_pretrained(self, path: str, **kwargs) -> str:
        """Save in a directory `lnfree.load` reads back: HF GPT-2 where it can hold the model, else an lnfree
        directory (bit for bit, every mode); returns the format written. See `lnfree.io.save.save_pretrained`.
        """
        return _hooks.call("save_pretrained", self, path, **kwargs)  # lnfree.io.save.save_pretrained

    def _install_sites(self) -> None:
        """Swap TransformerLens LayerNorms for RemovableLayerNorms, keeping their parameters."""
        for block in self.blocks:
            block.__class__ = LNFreeBlock
            block.ln1 = self._as_removable(block.ln1, ("qk", "v"))
            if hasattr(block, "ln2"):
                block.ln2 = self._as_removable(block.ln2, ("main",))
        if hasattr(self, "ln_final"):
            self.ln_final = self._as_removable(self.ln_final, ("main",))
        self.setup()

    def _as_removable(self, ln: nn.Module, paths: tuple[str, ...]) -> nn.Module:
        if isinstance(ln, RemovableLayerNorm):
            return ln
        kind = _NORM_KINDS.get(type(ln))
        if kind is not None:
            new = RemovableLayerNorm(self.cfg, paths, w=getattr(ln, "w", None), b=getattr(ln, "b", None), kind=kind)
        elif isinstance(ln, nn.Identity):
            new = RemovableLayerNorm(self.cfg, paths, kind="LNPre")
            for p in paths:
                new.modes[p] = "removed"
        else:
            raise ValueError(f"unsupported normalization module {type(ln).__name__}")
        return new.to(self.cfg.device) if self.cfg.device is not None else new

    def load_and_process_state_dict(self, state_dict, *args, **kwargs):
        """As HookedTransformer's; re-installs LN sites afterwards (fold_ln swaps LN modules)."""
        super().load_and_process_state_dict(state_dict, *args, **kwargs)
        self._install_sites()

    # ---- sites -------------------------------------------------------------------------
    @property
    def ln_sites(self) -> list[str]:
        """All LN site names, in layer order: ln1.qk, ln1.v, ln2 per block, then ln_final."""
        sites = []
        for i, block in enumerate(self.blocks):
            sites += [f"blocks.{i}.ln1.qk", f"blocks.{i}.ln1.v"]
            if hasattr(block, "ln2"):
                sites.append(f"blocks.{i}.ln2")
        if hasattr(self, "ln_final"):
            sites.append("ln_final")
        return sites

    def _site(self, site: str) -> tuple[RemovableLayerNorm, str]:
        if not isinstance(site, str):
            raise TypeError(f"site must be a string like 'blocks.0.ln2', got {type(site).__name__}")
        parts = site.split(".")
        try:
            if site == "ln_final" and hasattr(self, "ln_final"):
                return self.ln_final, "main"
            if parts[0] == "blocks" and parts[1].isdigit() and str(int(parts[1])) == parts[1] \
                    and int(parts[1]) < self.cfg.n_layers:  # canonical index only: no 'blocks.01'
                block = self.blocks[int(parts[1])]
                if len(parts) == 4 and parts[2] == "ln1" and parts[3] in ("qk", "v"):
                    return block.ln1, parts[3]
                if len(parts) == 3 and parts[2] == "ln2" and hasattr(block, "ln2"):
                    return block.ln2, "main"
        except (ValueError, IndexError):
            pass
        raise ValueError(
            f"unknown LN site {site!r}; valid sites are 'blocks.{{i}}.ln1.qk', 'blocks.{{i}}.ln1.v', "
            f"'blocks.{{i}}.ln2' for i in 0..{self.cfg.n_layers - 1}, and 'ln_final'"
        )

    def _sites(self, sites: SitesArg) -> list[str]:
        if sites is None:
            return self.ln_sites
        if isinstance(sites, str):
            sites = [sites]
        sites = list(sites)
        for s in sites:
            self._site(s)
        return sites

    def ln_mode(self, site: str) -> str:
        """"live", "frozen" or "removed" for one site."""
        module, path = self._site(site)
        return module.modes[path]

    def ln_modes(self) -> dict[str, str]:
        """Mode of every site, in `ln_sites` order."""
        return {s: self.ln_mode(s) for s in self.ln_sites}

    def ln_scale(self, site: str) -> Optional[Scale]:
        """The fixed scale stored for a site (estimated or frozen), or None if never set.

        A float, or for a positional scale the tuple (sigma_0, ..., sigma_{k-1}, sigma_rest).
        """
        module, path = self._site(site)
        return module.get_sigma(path)

    def site_hook(self, site: str, kind: str = "scale") -> str:
        """Hook name of a site's scale or normalized output, e.g. 'blocks.0.ln1.hook_scale_v'."""
        if kind not in ("scale", "normalized"):
            raise ValueError(f"kind must be 'scale' or 'normalized', got {kind!r}")
        self._site(site)
        if site.endswith(".ln1.qk"):
            return site[: -len(".qk")] + f".hook_{kind}"
        if site.endswith(".ln1.v"):
            return site[: -len(".v")] + f".hook_{kind}_v"
        return f"{site}.hook_{kind}"

    def ln_state(self) -> dict[str, dict]:
        """JSON-able mode and scale of every site, for checkpoints (see `load_ln_state`).

        A positional scale is a list (sigma_0, ..., sigma_rest) with the position-0 token it assumes
        (``first_token``).
        """
        state = {}
        for s in self.ln_sites:
            module, path = self._site(s)
            scale = self.ln_scale(s)
            state[s] = {"mode": self.ln_mode(s), "scale": list(scale) if isinstance(scale, tuple) else scale}
            if isinstance(scale, tuple):
                state[s]["first_token"] = module.first_token.get(path)
        return state

    def load_ln_state(self, state: Mapping[str, Mapping]) -> "LNFreeTransformer":
        """Restore modes and scales saved by `ln_state` onto weights saved from the same model.

        Removed sites are only marked removed: the folded weights must come with the state dict.
        """
        # a model whose every site was removed is rebuilt without a final norm module (normalization_type None)
        state = {s: e for s, e in state.items()
                 if not (s == "ln_final" and s not in self.ln_sites and isinstance(e, Mapping)
                         and e.get("mode") == "removed")}
        if set(state) != set(self.ln_sites):
            raise ValueError(f"LN state has sites {sorted(state)[:4]}..., this model has {self.ln_sites[:4]}...")
        for site, entry in state.items():  # validate everything before changing anything
            self._site(site)
            if not isinstance(entry, Mapping):
                raise TypeError(f"LN state for {site} must be a dict with 'mode' and 'scale', got {entry!r}")
            mode = entry.get("mode")
            if mode not in MODES:
                raise ValueError(f"LN state for {site} has mode {mode!r}; allowed: {MODES}")
            scale = entry.get("scale")
            values = scale if isinstance(scale, (list, tuple)) else [scale]
            ok = scale is None or (len(values) >= 1 and all(_is_scale(v) for v in values))
            if not ok or (scale is None and mode == "frozen") or (isinstance(scale, (list, tuple)) and len(values) < 2):
                raise ValueError(f"LN state for {site} has scale {scale!r}: a frozen site needs a finite positive "
                                 "scale (or a list of >= 2 for a positional one), the others that or None")
            if isinstance(scale, (list, tuple)) and mode == "removed":
                raise ValueError(f"LN state for {site}: a removed site cannot have a positional scale")
        for site, entry in state.items():
            module, path = self._site(site)
            module.store_sigma(path, entry.get("scale"))
            module.first_token[path] = entry.get("first_token")
            module.modes[path] = entry["mode"]
        self.cfg.normalization_type = None if self.is_ln_free else self.cfg.normalization_type
        return self

    def is_positional(self, site: str) -> bool:
        """True when a site's stored scale is positional (its own value for the first positions)."""
        module, path = self._site(site)
        return module.is_positional(path)

    @property
    def is_norm_free(self) -> bool:
        """True when no site normalises by its input: each is removed or fully frozen (a fixed linear map
        per position; a positional scale included)."""
        return all(self.ln_mode(s) == "removed" or (self.ln_mode(s) == "frozen" and self._site(s)[0].blend[
            self._site(s)[1]] == 1.0) for s in self.ln_sites)

    @property
    def is_ln_free(self) -> bool:
        """True when every site is removed (the model is linear in its residual stream reads)."""
        return all(m == "removed" for m in self.ln_modes().values())

    # ---- scales ------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording_ln_std(self, mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                         positional: int = 0) -> Iterator["LNStdStats"]:
        """Record, during forward passes, each site's per-token scale: what the live `hook_scale` is
        (or would be, for frozen and removed sites): the std sqrt(var + eps) for LayerNorm, the RMS
        sqrt(mean(x^2) + eps) for RMSNorm.

        `mask` ([batch, pos] bool) selects the tokens counted. Yields an `LNStdStats` whose
        `.means()` gives the mean std per site. With `positional` = k > 0, positions 0..k-1 (`positions`,
        [batch, pos], default the index along pos) are also counted apart, under the keys ``"{site}@{p}"``,
        and the plain site key counts only positions >= k.
        """
        stats = LNStdStats(mask, positions, positional)
        modules = {}
        for site in self.ln_sites:
            module, path = self._site(site)
            modules.setdefault(id(module), (module, {}))[1][path] = site
        try:
            for module, path_to_site in modules.values():
                module.recorder = stats.recorder_for(path_to_site)
            yield stats
        finally:
            for module, _ in modules.values():
                module.recorder = None

    @torch.no_grad()
    def estimate_ln_scales(
        self,
        tokens: Union[Int[torch.Tensor, "batch pos"], "TokenBatch"],
        batch_size: int = 16,
        exclude_position_0: bool = False,
        store: bool = True,
        progress: bool = False,
        attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
        positional: int = 0,
    ) -> dict[str, Scale]:
        """Mean over batch and positions of each site's per-token scale, as the paper computes it.

        The scale is the live `hook_scale`: sqrt(mean(x_c^2) + eps) (the std) for LayerNorm sites,
        sqrt(mean(x^2) + eps) (the RMS, no centering) for RMSNorm sites. Padding (`attention_mask=`, or a
        `TokenBatch` from `lnfree.tokenize`) is left out: a padded batch gives its rows' scales, each real
        token weighted once.

        `positional` = k > 0 estimates a positional scale (sigma_0, ..., sigma_{k-1}, sigma_rest): positions
        0..k-1 (counted from each row's first real token) get their own mean, the rest one mean. Every row
        must then start with the same first token, which the scale records (see `RemovableLayerNorm`).

        Stored on the model (unless `store=False`) so that `freeze_ln()` without scales uses them.
        Removed sites have no scale to estimate and are skipped.

        Example:
            >>> scales = model.estimate_ln_scales(tokens, exclude_position_0=True)
            >>> scales["ln_final"]  # doctest: +SKIP
            3.71
            >>> model.estimate_ln_scales(tokens, positional=1)["ln_final"]  # doctest: +SKIP
            (41.2, 3.70)
        """
        from lnfree._checks import forward_kwargs, positive_int, resolve_batch

        if self.is_ln_free:
            raise ValueError("this model is LN-free (every site removed): there are no LN scales to estimate")
        tokens, mask = resolve_batch(self, tokens, attention_mask)
        batch_size = positive_int(batch_size, "batch_size")
        positional = positive_int(positional, "positional", allow_zero=True)
        real = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if mask is None else mask
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        counted = real & (positions > 0) if exclude_position_0 else real
        if not bool(counted.any()):
            raise ValueError("exclude_position_0=True needs sequences of at least 2 tokens")
        first_token = self._first_token(tokens, real, positions) if positional else None
        if positional and exclude_position_0:
            raise ValueError("positional=k already gives position 0 its own scale; do not also exclude it")
        from tqdm.auto import tqdm

        totals: dict[str, list[float]] = {}
        for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc="LN scales"):
            rows = slice(start, start + batch_size)
            with self.recording_ln_std(counted[rows], positions[rows], positional) as stats:
                self(tokens[rows].to(self.cfg.device), return_type=None,
                     **forward_kwargs(self, tokens[rows], None if mask is None else mask[rows]))
            for key, (s, n) in stats.sums.items():
                acc = totals.setdefault(key, [0.0, 0])
                acc[0] += s
                acc[1] += n
        scales: dict[str, Scale] = {}
        for site in self.ln_sites:
            if self.ln_mode(site) == "removed":
                continue
            keys = [f"{site}@{p}" for p in range(positional)] + [site]
            missing = [k for k in keys if totals.get(k, [0, 0])[1] == 0]
            if missing:
                raise ValueError(f"no token at {missing[0].split('@')[-1] if '@' in missing[0] else 'the later positions'}"
                                 f" to estimate {site}'s scale: use rows of more than {positional} real tokens")
            values = tuple(totals[k][0] / totals[k][1] for k in keys)
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite activations at {site} (scale {bad[0]}): the model's forward "
                                         "pass overflowed before this site; check its weights and frozen sites")
            scales[site] = values if positional else values[0]
        if store:
            for site, value in scales.items():
                module, path = self._site(site)
                module.store_sigma(path, value)
                module.first_token[path] = first_token
        return scales

    @staticmethod
    def _first_token(tokens, real, positions) -> int:
        first = tokens[real & (positions == 0)].unique()
        if first.numel() != 1:
            raise ValueError(f"positional scales assume one fixed first token, but the rows start with "
                             f"{first.tolist()[:5]}: prepend the same token (e.g. BOS) to every row")
        return int(first)

    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must have shape [batch, pos] with batch, pos >= 1, got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab:
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.d_vocab}); got min {int(tokens.min())}, max {int(tokens.max())}"
            )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens exceed the context length n_ctx={self.cfg.n_ctx}")
        return tokens

    def _resolve_scales(self, sites: list[str], scales: ScalesArg) -> dict[str, Scale]:
        """One scale per site (a float, or a positional tuple of >= 2) from `scales` or the stored ones."""
        scales = _as_scale(scales)
        if isinstance(scales, Mapping):
            scales = {k: _as_scale(v) for k, v in scales.items()}
        if scales is None:
            out = {s: self.ln_scale(s) for s in sites}
            missing = [s for s, v in out.items() if v is None]
            if missing:
                raise ValueError(
                    f"no stored scale for {missing[:3]}{'...' if len(missing) > 3 else ''}: call "
                    "model.estimate_ln_scales(tokens) first, or pass scales= (a float or a dict site -> float)"
                )
        elif isinstance(scales, bool) or not isinstance(scales, (int, float, tuple, Mapping)):
            raise TypeError(f"scales must be None, a float, a tuple (positional), or a dict site -> float; "
                            f"got {type(scales).__name__}")
        elif isinstance(scales, Mapping):
            unknown = set(scales) - set(self.ln_sites)
            if unknown:
                self._site(sorted(unknown)[0])  # raises with the list of valid names
            missing = [s for s in sites if s not in scales]
            if missing:
                raise ValueError(f"scales dict has no entry for sites {missing[:3]}; give one per site to freeze")
            out = {s: scales[s] for s in sites}
        else:
            out = {s: scales for s in sites}
        for s, v in out.items():
            values = v if isinstance(v, tuple) else (v,)
            if not all(_is_scale(x) for x in values) or (isinstance(v, tuple) and len(v) < 2):
                raise ValueError(f"scale for {s} must be a finite positive number, got {v!r} (or, positional, a "
                                 "tuple of >= 2 such numbers)")
        return {s: (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v)) for s, v in out.items()}

    # ---- modes -------------------------------------------------------------------------
    def freeze_ln(self, sites: SitesArg = None, scales: ScalesArg = None) -> "LNFreeTransformer":
        """Replace the per-token scale of `sites` (None = all not removed) by a fixed scalar.

        `scales`: a float for all, a dict site -> float, or None for the stored estimates.

        Example:
            >>> model.freeze_ln("blocks.0.ln2", scales=3.0).ln_mode("blocks.0.ln2")
            'frozen'
        """
        explicit = sites is not None
        sites = self._sites(sites)
        if not explicit:
            sites = [s for s in sites if self.ln_mode(s) != "removed"]
        removed = [s for s in sites if self.ln_mode(s) == "removed"]
        if removed:
            raise ValueError(f"sites {removed} are removed (permanent) and cannot be frozen")
        for site, value in self._resolve_scales(sites, scales).items():
            module, path = self._site(site)
            module.set_mode(path, "frozen", value)
        return self

    def unfreeze_ln(self, sites: SitesArg = None) -> "LNFreeTransformer":
        """Make frozen `sites` (None = all frozen ones) live again; their stored scale is kept."""
        explicit = sites is not None
        for site in self._sites(sites):
            mode = self.ln_mode(site)
            if mode == "removed":
                if explicit:
                    raise ValueError(f"site {site} is removed; removal is permanent (reload the model to undo it)")
                continue
            module, path = self._site(site)
            module.set_mode(path, "live")
        return self

    @contextlib.contextmanager
    def ln_frozen(self, sites: SitesArg = None, scales: ScalesArg = None) -> Iterator["LNFreeTransformer"]:
        """Context manager: freeze `sites`, restore the previous modes and scales on exit.

        Example:
            >>> with model.ln_frozen(scales=2.0):
            ...     logits = model(tokens)
        """
        saved = {s: (self.ln_mode(s), self.ln_scale(s)) for s in self.ln_sites}
        self.freeze_ln(sites, scales)
        try:
            yield self
        finally:
            for site, (mode, sigma) in saved.items():
                if self.ln_mode(site) == "removed":
                    continue
                module, path = self._site(site)
                module.store_sigma(path, sigma)
                module.modes[path] = mode

    @torch.no_grad()
    def remove_ln(self, sites: SitesArg = None, scales: ScalesArg = None) -> "LNFreeTransformer":
        """Permanently remove `sites` (None = all): fold their fixed scale into the weights.

        Frozen sites keep their scale; live sites take `scales` or the stored estimate. For each
        site, centering (LayerNorm only), w, b and 1/sigma are folded into the weights that read
        it (`site_readers`: W_Q/W_K, W_V, W_in/W_gate, W_U and their biases); the site becomes
        the identity and the logits equal the frozen model's. When every site is removed, `cfg.normalization_type` becomes None.

        Example:
            >>> model.remove_ln(scales=3.0).is_ln_free
            True
        """
        sites = [s for s in self._sites(sites) if self.ln_mode(s) != "removed"]
        live = [s for s in sites if self.ln_mode(s) == "live"]
        if live:
            self.freeze_ln(live, scales)
        for site in sites:
            self._fold_site(site)
        if self.is_ln_free:
            self.cfg.normalization_type = None
        return self

    def _fold_site(self, site: str) -> None:
        module, path = self._site(site)
        a = module.blend[path]
        if a < 1.0:  # folding 1/sigma would silently drop the live part of the blended scale
            raise ValueError(f"cannot remove {site}: its frozen scale is still being phased in (blend {a:.3g} < 1, "
                             f"the removal trainer's freeze_ramp); set its blend to 1 first")
        sigma = module.get_sigma(path)
        if isinstance(sigma, tuple):
            raise ValueError(f"cannot remove {site}: its frozen scale is positional {sigma} (one value per leading "
                             "position), which no weight shared by all positions can hold. A frozen site is already "
                             "norm-free (a fixed linear map per position): keep it frozen, and remove the others "
                             "(model.remove_ln([s for s in model.ln_sites if not model.is_positional(s)]))")
        acc = torch.promote_types(self.W_E.dtype, torch.float32)  # float64 models fold in float64
        w = module.w.detach().to(acc) if module.has_params else None
        b = module.b.detach().to(acc) if module.has_bias else None
        has_b = b is not None and bool(b.abs().max() > 0)
        readers = self.site_readers(site)
        if has_b and any(bias is None for _, bias, _ in readers):
            raise ValueError(
                f"cannot remove {site}: its LayerNorm bias b is nonzero and a weight reading it has no "
                "bias to fold it into (a gated MLP adds b_in after the gate product); freeze it instead"
            )
        for weight, bias, reads_dim in readers:
            W = weight.detach().to(acc)
            shape = [1] * W.ndim
            shape[reads_dim] = -1
            M = W * w.view(shape) if w is not None else W
            if module.centered:  # LayerNorm subtracts the mean: fold it as a centered weight
                M = M - M.mean(reads_dim, keepdim=True)
            M = M / sigma
            if has_b:
                self._set_param(bias, bias.detach().to(acc) + torch.tensordot(b, W, dims=([0], [reads_dim])))
            self._set_param(weight, M)
        module.set_mode(path, "removed")
        module.store_sigma(path, 1.0)

    def site_readers(self, site: str) -> list[tuple[nn.Parameter, Optional[nn.Parameter], int]]:
        """The parameters that read a site's output: (weight, bias or None, index of the d_model dim).

        These are what `remove_ln` folds a site into: W_Q and W_K (with b_Q, b_K) for
        ``ln1.qk``, W_V (b_V) for ``ln1.v``, W_in (b_in) and W_gate for ``ln2``, W_U (b_U) for
        ``ln_final``. Grouped-query attention gives its stored, shared key/value weights
        (`_W_K`, `_W_V`, [n_key_value_heads, d_model, d_head]), not the repeated views. A gated
        MLP's bias is None: TransformerLens adds b_in after the gate product, so it does not
        read the site. The parameters are the model's own (not copies).

        Example:
            >>> from transformer_lens import HookedTransformerConfig
            >>> cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, n_heads=4, d_head=4, d_vocab=20,
            ...                               act_fn="silu", normalization_type="RMS", n_key_value_heads=2)
            >>> model = LNFreeTransformer(cfg)
            >>> [(tuple(w.shape), dim) for w, _, dim in model.site_readers("blocks.0.ln1.qk")]
            [((4, 16, 4), 1), ((2, 16, 4), 1)]
        """
        self._site(site)
        if site == "ln_final":
            return [(self.unembed.W_U, self.unembed.b_U, 0)]
        block = self.blocks[int(site.split(".")[1])]
        attn = block.attn
        grouped = hasattr(attn, "_W_K")  # GroupedQueryAttention: W_K / W_V are repeated views
        if site.endswith("ln1.qk"):
            W_K, b_K = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
            return [(attn.W_Q, attn.b_Q, 1), (W_K, b_K, 1)]
        if site.endswith("ln1.v"):
            return [(attn._W_V, attn._b_V, 1) if grouped else (attn.W_V, attn.b_V, 1)]
        mlp = block.mlp
        if hasattr(mlp, "W_gate"):
            return [(mlp.W_in, None, 0), (mlp.W_gate, None, 0)]
        return [(mlp.W_in, mlp.b_in, 0)]

    # Older name, kept for callers written before `site_readers` was public.
    _readers = site_readers

    def _set_param(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Replace a parameter by a new one (never in place: from_hooked models share tensors)."""
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if p is param:
                    setattr(module, name, nn.Parameter(value.to(p.dtype), requires_grad=p.requires_grad))
                    return
        raise RuntimeError("parameter to replace not found in model")


def as_lnfree(model, name: str = "model"):
    """Wrap a HookedTransformer as an LNFreeTransformer (sharing weights); refuse anything else.

    The shared model check of every analysis (it lives here, beside the class, so that `lnfree._checks`
    stays below the model layer). ``name`` is the argument name used in errors.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, d_vocab=20, act_fn="gelu")
        >>> type(as_lnfree(HookedTransformer(cfg))).__name__
        'LNFreeTransformer'
    """
    if isinstance(model, HookedTransformer) and not isinstance(model, LNFreeTransformer):
        model = LNFreeTransformer.from_hooked(model)
    if not isinstance(model, LNFreeTransformer):
        raise TypeError(f"{name} must be a HookedTransformer / LNFreeTransformer, got {type(model).__name__}")
    if hasattr(model, "ln_final") and model.ln_mode("ln_final") != "removed" and model.cfg.normalization_type is None:
        # HookedTransformer.forward then skips ln_final: every number would be wrong.
        raise ValueError(
            f"{name}: ln_final is {model.ln_mode('ln_final')!r} but cfg.normalization_type is None, so the "
            "forward pass skips the final norm. Was this cfg object shared with a model on which "
            "remove_ln() ran? Give each model its own cfg (copy.deepcopy)."
        )
    return model


class LNStdStats:
    """Accumulates per-site sums of per-token input std (see `recording_ln_std`).

    Sums stay on the model's device (no host sync per site per forward); `sums` and `means()`
    convert to Python floats when read.
    """

    def __init__(self, mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                 positional: int = 0):
        self.mask = mask
        self.positions = positions
        self.positional = positional
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}

    def _buckets(self, std: torch.Tensor) -> list[tuple[str, Optional[torch.Tensor]]]:
        """(key suffix, [batch, pos] selection) per counted bucket: '@p' for positions p < k, '' for the rest."""
        if not self.positional:
            return [("", self.mask)]
        pos = self.positions
        if pos is None:
            pos = torch.arange(std.shape[1], device=std.device)[None].expand(std.shape[:2])
        pos = pos.to(std.device)
        keep = torch.ones_like(pos, dtype=torch.bool) if self.mask is None else self.mask.to(std.device)
        out = [(f"@{p}", keep & (pos == p)) for p in range(self.positional)]
        return out + [("", keep & (pos >= self.positional))]

    def recorder_for(self, path_to_site: dict[str, str]):
        def record(path: str, std: torch.Tensor) -> None:
            site = path_to_site[path]
            for suffix, sel in self._buckets(std):
                x = std if sel is None else std[sel.to(std.device)]
                s, n = self._sums.get(site + suffix, (0.0, 0))
                self._sums[site + suffix] = (s + x.double().sum(), n + x.numel())

        return record

    @property
    def sums(self) -> dict[str, tuple[float, int]]:
        return {site: (float(s), n) for site, (s, n) in self._sums.items()}

    def means(self) -> dict[str, float]:
        return {site: s / n for site, (s, n) in self.sums.items() if n > 0}
