"""Write the shipped zoo files: fp16 weights, ``zoo.json``, tokenizer, held-out tokens, after checking them.

`export_family` checks the fp16 round trip against the fp32 models, evaluates every model on every
held-out set (CE with bootstrap CIs, bits per byte) and enforces the size budget. The model card is
`lnfree.zoo.card`; the family recipe (train, then export) is `lnfree.zoo.family`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from lnfree.zoo import CE_TOL, FORMAT, FORMAT_VERSION, MANIFEST, MAX_BYTES

PathArg = Union[str, os.PathLike]
REQUIRED_PROVENANCE = ("steps", "tokens_seen", "seed", "wall_time_s", "command", "date")
ROLES = {
    "tiny-ln": "base model, pretrained with LayerNorm",
    "tiny-vanilla": "control: tiny-ln fine-tuned with LayerNorm kept (same data, steps, optimiser)",
    "tiny-lnfree": "tiny-ln fine-tuned with the LN-removal procedure; every LN site removed",
}
# architecture fields that every model of a family must share
ARCH_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "d_vocab_out", "act_fn",
             "positional_embedding_type", "attn_only", "parallel_attn_mlp", "eps", "original_architecture")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---- tokens and bytes ------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_byte_lengths(tokenizer_json: str) -> np.ndarray:
    """Bytes of text each token id stands for, from a byte-level BPE ``tokenizer.json`` string.

    Special tokens (``<|endoftext|>``) count 0 bytes. Used for bits per byte.

    Example:
        >>> lengths = token_byte_lengths(Path("tokenizer.json").read_text())   # doctest: +SKIP
        >>> int(lengths[0])                                                    # doctest: +SKIP
        0
    """
    spec = json.loads(tokenizer_json)
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    inv = {c: b for b, c in _bytes_to_unicode().items()}
    out = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if token in special:
            continue
        bad = [c for c in token if c not in inv]
        if bad:
            raise ValueError(f"token {token!r} (id {i}) is not byte-level BPE: character {bad[0]!r} stands for no byte")
        out[i] = len(token)  # one character per byte
    return out


# ---- export --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """What `export_family` wrote and measured.

    Attributes:
        out_dir: the exported directory.
        size_bytes: total bytes of its files (checked against ``settings["max_bytes"]``).
        labels: model names, in export order.
        checks: per model, the fp16 round trip: ``max_abs_logit_diff``, ``ce_fp32``, ``ce_fp16``, ``ce_diff``.
        evaluation: per model and held-out set, ``{"ce": Estimate, "bpb": Estimate}`` (nats/token, bits/byte).
        gaps: per held-out set, ``"a - b"`` -> Estimate of the CE difference (paired bootstrap over sequences).
        settings: the arguments used.
    """

    out_dir: Path
    size_bytes: int
    labels: list
    checks: dict
    evaluation: dict
    gaps: dict
    settings: dict = field(default_factory=dict)

    def to_frame(self):
        """Long format: model, heldout, metric (``ce`` / ``bpb``), value, low, high."""
        import pandas as pd

        rows = [{"model": m, "heldout": h, "metric": k, "value": e.value, "low": e.low, "high": e.high}
                for m, sets in self.evaluation.items() for h, d in sets.items() for k, e in d.items()]
        return pd.DataFrame(rows)

    def plot(self):
        """Bar chart of held-out CE per model and set, with bootstrap CIs (plotly Figure, not shown)."""
        import plotly.graph_objects as go

        df = self.to_frame()
        df = df[df.metric == "ce"]
        fig = go.Figure()
        for m in self.labels:
            d = df[df.model == m]
            fig.add_bar(name=m, x=d.heldout, y=d.value,
                        error_y=dict(type="data", symmetric=False, array=d.high - d.value, arrayminus=d.value - d.low))
        fig.update_layout(barmode="group", title="Held-out cross-entropy", yaxis_title="nats/token")
        return fig

    def __str__(self) -> str:
        lines = [f"exported {len(self.labels)} models to {self.out_dir} ({self.size_bytes / 1e6:.2f} MB)"]
        for m in self.labels:
            c = self.checks[m]
            evals = "  ".join(f"{h} CE {d['ce']}" for h, d in self.evaluation[m].items())
            lines.append(f"  {m}: fp16 max|dlogit| {c['max_abs_logit_diff']:.2e}, dCE {c['ce_diff']:+.2e}; {evals}")
        return "\n".join(lines)


def _tokenizer_json(tokenizer) -> str:
    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {tokenizer}")
        return p.read_text()
    raw = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(raw, "to_str"):
        raise TypeError(f"tokenizer must be a tokenizer.json path, a tokenizers.Tokenizer or a fast HF tokenizer; "
                        f"got {type(tokenizer).__name__}")
    return raw.to_str()


def _as_models(models) -> dict:
    from transformer_lens import HookedTransformer

    from lnfree.model import LNFreeTransformer

    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty dict name -> LNFreeTransformer, got {models!r:.80}")
    out = {}
    for name, m in models.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"model name {name!r} must be lowercase letters, digits, '.', '_' or '-' (e.g. 'tiny-ln')")
        if not isinstance(m, HookedTransformer):
            raise TypeError(f"models[{name!r}] must be an LNFreeTransformer, got {type(m).__name__}")
        out[name] = LNFreeTransformer.from_hooked(m)
    return out


def _family_config(models: dict) -> dict:
    """The shared config (normalization 'LN', so every LN site exists on load); errors if architectures differ."""
    from lnfree.io.tl_dir import cfg_to_json

    first_name, first = next(iter(models.items()))
    arch = {k: getattr(first.cfg, k) for k in ARCH_KEYS}
    for name, m in models.items():
        other = {k: getattr(m.cfg, k) for k in ARCH_KEYS}
        diff = {k: (arch[k], other[k]) for k in ARCH_KEYS if arch[k] != other[k]}
        if diff:
            raise ValueError(f"models {first_name!r} and {name!r} have different architectures: {diff}")
        if m.cfg.normalization_type not in ("LN", None):
            raise ValueError(f"models[{name!r}] has normalization_type {m.cfg.normalization_type!r}; the zoo stores "
                             "LayerNorm ('LN') models and their LN-free versions")
    with_ln = [m for m in models.values() if m.cfg.normalization_type == "LN"]
    cfg = cfg_to_json((with_ln or [first])[0].cfg, dtype=False)
    cfg["normalization_type"] = "LN"
    return cfg


def _heldout_arrays(heldout, d_vocab: int, n_ctx: int) -> dict:
    if not isinstance(heldout, Mapping) or not heldout:
        raise ValueError("heldout must be a non-empty dict name -> token array [n, seq] "
                         "(or {'tokens': ..., 'source': ...})")
    out = {}
    for name, value in heldout.items():
        source = None
        if isinstance(value, Mapping):
            value, source = value.get("tokens"), value.get("source")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"held-out set name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
            raise ValueError(f"heldout[{name!r}] must be a token array [n, seq] with seq >= 2, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"heldout[{name!r}] must hold integer token ids, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= min(d_vocab, 65536):
            raise ValueError(f"heldout[{name!r}] ids span [{arr.min()}, {arr.max()}], "
                             f"outside [0, {min(d_vocab, 65536)})")
        if arr.shape[1] > n_ctx:
            raise ValueError(f"heldout[{name!r}] rows have {arr.shape[1]} tokens, more than n_ctx={n_ctx}")
        out[name] = (arr.astype(np.uint16), source)
    return out


def _provenance(meta, names: Sequence[str]) -> tuple[dict, dict]:
    if not isinstance(meta, Mapping) or not isinstance(meta.get("models"), Mapping):
        raise ValueError("meta must be a dict with 'models': {name: provenance dict} (and optional family-level keys)")
    per_model = {}
    for name in names:
        prov = meta["models"].get(name)
        if not isinstance(prov, Mapping):
            raise ValueError(f"meta['models'] has no provenance for {name!r}; it needs {REQUIRED_PROVENANCE}")
        missing = [k for k in REQUIRED_PROVENANCE if k not in prov]
        if missing:
            raise ValueError(f"meta['models'][{name!r}] lacks {missing}; required: {REQUIRED_PROVENANCE}")
        per_model[name] = dict(prov)
    family = {k: v for k, v in meta.items() if k != "models"}
    json.dumps([per_model, family])  # fails early on non-JSON values
    return per_model, family


def _save_weights(model, path: Path, name: str) -> None:
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    state = {}
    for key, value in model.state_dict().items():
        if key not in params:
            continue  # buffers (attention mask, IGNORE, LN sigma) are rebuilt or stored in zoo.json
        v = value.detach().to("cpu")
        if v.is_floating_point():
            half = v.to(torch.float16)
            if not torch.isfinite(half).all():
                raise ValueError(f"{name}: weight {key} does not fit float16 (max |w| = {float(v.abs().max()):.3g})")
            v = half
        state[key] = v.contiguous()
    save_file(state, str(path), metadata={"format": "pt", "lnfree_zoo_model": name})


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def _fp16_check(original, loaded, rows: torch.Tensor, batch_size: int) -> dict:
    """Max |logit difference| and CE (nats/token) of the fp32 model vs its fp16 round trip."""
    from lnfree.evaluation import cross_entropy

    device = next(original.parameters()).device
    was_training = original.training
    original.eval()
    try:
        diff = 0.0
        for start in range(0, rows.shape[0], batch_size):
            b = rows[start:start + batch_size]
            a = original(b.to(device)).float().cpu()
            diff = max(diff, float((a - loaded(b).float()).abs().max()))
        ce32 = cross_entropy(original, rows, batch_size=batch_size, n_boot=10).value
    finally:
        original.train(was_training)
    ce16 = cross_entropy(loaded, rows, batch_size=batch_size, n_boot=10).value
    return {"max_abs_logit_diff": diff, "ce_fp32": ce32, "ce_fp16": ce16, "ce_diff": ce16 - ce32,
            "rows": int(rows.shape[0])}


def export_family(
    models: Mapping,
    tokenizer,
    heldout: Mapping,
    meta: Mapping,
    out_dir: PathArg,
    *,
    n_check: int = 4,
    ce_tol: float = CE_TOL,
    max_bytes: int = MAX_BYTES,
    n_eval: Optional[int] = None,
    batch_size: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    model_card: Optional[PathArg] = None,
    progress: bool = True,
) -> ExportResult:
    """Write the zoo files to `out_dir`, after checking them; refuse (ValueError) on any failed check.

    Args:
        models: name -> LNFreeTransformer (fp32), e.g. {"tiny-ln": base, "tiny-vanilla": v, "tiny-lnfree": f}.
            Same architecture; each is stored as fp16 with its LN state (modes and scales per site).
        tokenizer: path of ``tokenizer.json`` (or a fast HF / ``tokenizers`` tokenizer).
        heldout: name -> uint16-able token array ``[n, seq]`` whose rows start with BOS (or a dict
            ``{"tokens": array, "source": "file the text came from"}``).
        meta: ``{"models": {name: provenance}}`` plus family-level keys (stored under "provenance").
            Each provenance needs ``steps, tokens_seen, seed, wall_time_s, command, date``.
        out_dir: destination (e.g. ``src/lnfree/zoo/data``); earlier zoo files there are replaced.
        n_check: rows of each held-out set for the fp16 round-trip check.
        ce_tol: largest allowed |CE(fp16) - CE(fp32)| on those rows (nats/token).
        max_bytes: size budget of the directory.
        n_eval: held-out rows evaluated for the manifest and model card (None: all).
        batch_size, n_boot, seed: evaluation settings (bootstrap CIs resample sequences).
        model_card: if given, `write_model_card` writes the card there from the new ``zoo.json``.

    The checks: every weight fits fp16; the exported model loads with `lnfree.zoo.load` and has the
    original's LN modes; its logits and CE match the original's (|dCE| <= ce_tol); the directory
    fits `max_bytes`. Reported numbers (CE with bootstrap CI, bits per byte, paired gaps) are
    measured on the loaded (fp16-stored) models, i.e. what users get.

    Example:
        >>> res = export_family({"tiny-ln": base, "tiny-lnfree": ln_free}, "runs/zoo/tokenizer.json",
        ...                     {"persuasion": np.load("heldout.npy")}, meta, "out/zoo")   # doctest: +SKIP
        >>> print(res)                                                                   # doctest: +SKIP
    """
    models = _as_models(models)
    _check_export_args(n_check=n_check, batch_size=batch_size, n_boot=n_boot, max_bytes=max_bytes, n_eval=n_eval,
                       ce_tol=ce_tol)
    config = _family_config(models)
    sets = _heldout_arrays(heldout, config["d_vocab"], config["n_ctx"])
    prov, family_prov = _provenance(meta, list(models))
    tok_json = _tokenizer_json(tokenizer)
    byte_len = token_byte_lengths(tok_json)
    if byte_len.shape[0] > config["d_vocab"]:
        raise ValueError(f"the tokenizer has {byte_len.shape[0]} tokens, more than the models' "
                         f"d_vocab={config['d_vocab']}")
    for name, (arr, _) in sets.items():
        if arr.max() >= byte_len.shape[0]:
            raise ValueError(f"heldout[{name!r}] holds id {arr.max()}, outside the tokenizer's "
                             f"{byte_len.shape[0]} tokens")

    out = Path(out_dir)
    stage = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        manifest = _write_files(stage, models, sets, tok_json, byte_len, config, prov, family_prov)
        _write_manifest(stage, manifest, max_bytes)  # fail on size before the slow checks
        loaded, checks = _round_trip(stage, models, sets, n_check, ce_tol, batch_size)
        evaluation, gaps = _evaluate(loaded, sets, manifest, n_eval, batch_size, n_boot, seed, progress)
        for name, c in checks.items():
            manifest["models"][name]["export_check"] = c
        manifest["gaps"] = {h: {k: e.to_dict() for k, e in g.items()} for h, g in gaps.items()}
        manifest["evaluation"] = {"rows": n_eval, "batch_size": batch_size, "n_boot": n_boot, "seed": seed,
                                  "exclude_position_0": False, "ce_unit": "nats/token", "level": 0.95,
                                  "ci": "percentile bootstrap over sequences (lnfree.stats.bootstrap)",
                                  "fp16_check": {"rows_per_set": n_check, "ce_tol": ce_tol}}
        _write_manifest(stage, manifest, max_bytes)
        _install(stage, out, max_bytes)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if model_card is not None:
        from lnfree.zoo.card import write_model_card

        write_model_card(out / MANIFEST, model_card)
    settings = {"n_check": n_check, "ce_tol": ce_tol, "max_bytes": max_bytes, "n_eval": n_eval,
                "batch_size": batch_size, "n_boot": n_boot, "seed": seed}
    return ExportResult(out, _dir_size(out), list(models), checks, evaluation, gaps, settings)


def _check_export_args(*, n_eval, ce_tol, **positive_ints) -> None:
    for arg, v in positive_ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
    if n_eval is not None and (isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1):
        raise ValueError(f"n_eval must be None (all rows) or an int >= 1, got {n_eval!r}")
    if isinstance(ce_tol, bool) or not isinstance(ce_tol, (int, float)) or not ce_tol > 0:
        raise ValueError(f"ce_tol must be a positive number, got {ce_tol!r}")


def _write_files(stage: Path, models: dict, sets: dict, tok_json: str, byte_len: np.ndarray, config: dict,
                 prov: dict, family_prov: dict) -> dict:
    """Tokenizer, held-out arrays and fp16 weights into `stage`; returns the manifest (not yet written)."""
    (stage / "tokenizer.json").write_text(tok_json)
    heldout_meta = {}
    for name, (arr, source) in sets.items():
        np.save(stage / f"heldout_{name}.npy", arr)
        row_bytes = byte_len[arr[:, 1:].astype(np.int64)].sum(axis=1)  # the predicted tokens' text
        heldout_meta[name] = {"file": f"heldout_{name}.npy", "shape": list(arr.shape), "source": source,
                              "bytes_per_row": row_bytes.tolist(), "n_bytes": int(row_bytes.sum()),
                              "n_predicted_tokens": int(arr.shape[0] * (arr.shape[1] - 1))}
    entries = {}
    for name, model in models.items():
        path = stage / f"{name}.safetensors"
        _save_weights(model, path, name)
        entries[name] = {"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size,
                         "storage_dtype": "float16", "role": ROLES.get(name, ""), "ln_state": model.ln_state(),
                         "is_ln_free": model.is_ln_free, "provenance": prov[name]}
    return {"format": FORMAT, "version": FORMAT_VERSION, "created": _now(), "config": config,
            "tokenizer": {"file": "tokenizer.json", "sha256": _sha256(stage / "tokenizer.json"),
                          "vocab_size": int(byte_len.shape[0]), "bos_token_id": 0,
                          "kind": "byte-level BPE (GPT-2 style pre-tokenizer and decoder)"},
            "heldout": heldout_meta, "models": entries, "provenance": family_prov}


def _write_manifest(stage: Path, manifest: dict, max_bytes: int) -> None:
    """Write zoo.json with ``size_bytes`` = the directory's final size (zoo.json included); enforce the budget."""
    manifest["max_bytes"] = max_bytes
    manifest["size_bytes"] = 0
    for _ in range(4):  # the size field's own digits change the size: iterate to the fixed point
        _write_json(stage / MANIFEST, manifest)
        size = _dir_size(stage)
        if size == manifest["size_bytes"]:
            break
        manifest["size_bytes"] = size
    if size > max_bytes:
        files = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.2f} MB" for f in sorted(stage.iterdir()))
        raise ValueError(f"the export takes {size / 1e6:.2f} MB, over the {max_bytes / 1e6:.2f} MB budget ({files})")


def _round_trip(stage: Path, models: dict, sets: dict, n_check: int, ce_tol: float, batch_size: int):
    """Load each written model as users will; compare it with the original (refuse a CE change > ce_tol)."""
    from lnfree import zoo

    rows = torch.cat([torch.from_numpy(a[:n_check].astype(np.int64)) for a, _ in sets.values()])
    loaded, checks = {}, {}
    for name, model in models.items():
        m = zoo.load(name, device="cpu", data_dir=stage)
        if m.ln_modes() != model.ln_modes():
            raise ValueError(f"{name}: LN modes changed in the round trip")
        checks[name] = c = _fp16_check(model, m, rows, batch_size)
        if not abs(c["ce_diff"]) <= ce_tol:
            raise ValueError(f"{name}: fp16 storage changes CE by {c['ce_diff']:+.4g} nats/token on {c['rows']} "
                             f"held-out rows (limit {ce_tol}); max |logit diff| {c['max_abs_logit_diff']:.3g}")
        loaded[name] = m
    return loaded, checks


def _evaluate(loaded: dict, sets: dict, manifest: dict, n_eval, batch_size: int, n_boot: int, seed: int,
              progress: bool):
    """CE (bootstrap CI), bits per byte, per-sequence CE into the manifest; paired gaps between models."""
    from lnfree.evaluation import cross_entropy
    from lnfree.stats import bootstrap

    evaluation, per_seq = {}, {}
    for name, m in loaded.items():
        evaluation[name] = {}
        for h, (arr, _) in sets.items():
            rows = torch.from_numpy(arr[:n_eval].astype(np.int64))
            r = cross_entropy(m, rows, batch_size=batch_size, n_boot=n_boot, seed=seed, progress=progress)
            n_bytes = int(sum(manifest["heldout"][h]["bytes_per_row"][: rows.shape[0]]))
            bpb = r.bits_per_byte(n_bytes)
            evaluation[name][h] = {"ce": r.mean, "bpb": bpb}
            per_seq[(name, h)] = r.per_sequence.double().numpy()
            manifest["models"][name].setdefault("eval", {})[h] = {
                "ce": r.mean.to_dict(), "bpb": bpb.to_dict(), "rows": int(rows.shape[0]), "n_tokens": r.n_tokens,
                "n_bytes": n_bytes, "per_sequence": [round(float(x), 6) for x in per_seq[(name, h)]]}
    names = list(loaded)
    gaps = {h: {f"{a} - {b}": bootstrap(per_seq[(a, h)] - per_seq[(b, h)], n_boot=n_boot, seed=seed)
                for i, a in enumerate(names) for b in names[:i]} for h in sets}
    return evaluation, gaps


def _is_zoo_file(p: Path) -> bool:
    return p.name in (MANIFEST, "tokenizer.json") or p.suffix == ".safetensors" or (
        p.name.startswith("heldout_") and p.suffix == ".npy")


def _install(stage: Path, out: Path, max_bytes: int) -> None:
    """Replace the zoo files of `out` by the staged ones (other files are kept and counted)."""
    out.mkdir(parents=True, exist_ok=True)
    others = [p for p in out.rglob("*") if p.is_file() and not (p.parent == out and _is_zoo_file(p))]
    total = _dir_size(stage) + sum(p.stat().st_size for p in others)
    if total > max_bytes:
        raise ValueError(f"{out} would hold {total / 1e6:.2f} MB with its other files "
                         f"{[p.name for p in others][:5]}: over the {max_bytes / 1e6:.2f} MB budget")
    for p in out.iterdir():
        if p.is_file() and _is_zoo_file(p):
            p.unlink()
    for p in sorted(stage.iterdir(), key=lambda p: p.name == MANIFEST):  # manifest last
        p.chmod(0o644)  # safetensors writes 0600; package data must be readable by everyone
        shutil.move(str(p), out / p.name)
