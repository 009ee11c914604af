"""Make, export and document the zoo family (``tiny-ln``, ``tiny-vanilla``, ``tiny-lnfree``).

- `train_family`: text files -> tokenizer -> pretraining -> LN-removal fine-tune and vanilla
  fine-tune -> export, each stage skipped when its output exists (so a crashed run resumes), with
  a JSON record (``OUT/family.json``) of the command, seed, steps, tokens and wall times.
- `export_run`: export the models of a finished run directory.
- `export_family`: write the shipped files (fp16 safetensors per model, ``zoo.json``, tokenizer,
  held-out tokens), check the fp16 round trip against the fp32 models, evaluate every model on
  every held-out set (CE with bootstrap CIs, bits per byte) and enforce the size budget.
- `render_model_card` / `write_model_card`: the model card (``docs/zoo.md``), generated from ``zoo.json``.

Run directory layout (``OUT``; the same as ``python -m lnfree.zoo.train``'s, so its outputs are reused)::

    OUT/tokenizer.json  OUT/train_tokens.npy  OUT/heldout_<stem>.npy
    OUT/pretrain/{ckpt/, final/, train_log.jsonl}      (lnfree.zoo.train.pretrain)
    OUT/ft_lnfree/{checkpoints/, final_tl/, summary.json}   (lnfree.removal.remove_layernorm)
    OUT/ft_vanilla/...                                      (the same with vanilla=True)
    OUT/family.json                                         this module's record
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from lnfree.zoo import FORMAT, FORMAT_VERSION, MANIFEST

MAX_BYTES = 30_000_000  # the shipped data directory's budget (decimal MB)
CE_TOL = 0.01  # nats/token the fp16 round trip may change held-out CE by
REQUIRED_PROVENANCE = ("steps", "tokens_seen", "seed", "wall_time_s", "command", "date")
DEFAULT_HELDOUT = {
    "persuasion": "/work/shared/corpus/heldout/austen_persuasion.txt",
    "cfi": "/work/shared/corpus/heldout/cfi_en.txt",
}
ROLES = {
    "tiny-ln": "base model, pretrained with LayerNorm",
    "tiny-vanilla": "control: tiny-ln fine-tuned with LayerNorm kept (same data, steps, optimiser)",
    "tiny-lnfree": "tiny-ln fine-tuned with the LN-removal procedure; every LN site removed",
}
# architecture fields that every model of a family must share
ARCH_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "d_vocab_out", "act_fn",
             "positional_embedding_type", "attn_only", "parallel_attn_mlp", "eps", "original_architecture")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
PathArg = Union[str, os.PathLike]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _cfg_json(cfg) -> dict:
    """JSON-able init fields of a HookedTransformerConfig (no device / dtype)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.name in ("device", "n_devices", "dtype"):
            continue
        v = getattr(cfg, f.name)
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[f.name] = v
    return out


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
    cfg = _cfg_json((with_ln or [first])[0].cfg)
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


# ---- model card ------------------------------------------------------------------------------
def _est(d: Optional[dict], digits: int = 3) -> str:
    if not d:
        return "n/a"
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _hms(seconds) -> str:
    if seconds is None:
        return "n/a"
    seconds = float(seconds)
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _n(x) -> str:
    return "n/a" if x is None else f"{int(x):,}"


HELDOUT_LABELS = {"persuasion": "Persuasion (in-domain)", "cfi": "cfi_en (out-of-domain)"}


def render_model_card(manifest: Mapping) -> str:
    """The model card (markdown) for an export manifest (``zoo.json``); every number comes from it.

    Example:
        >>> text = render_model_card(json.loads(Path("src/lnfree/zoo/data/zoo.json").read_text()))  # doctest: +SKIP
    """
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} manifest (format={manifest.get('format')!r})")
    sections = (_card_intro, _card_models, _card_architecture, _card_heldout, _card_results, _card_export_check,
                _card_provenance)
    return "\n".join(line for section in sections for line in section(manifest))


def _card_intro(m: Mapping) -> list:
    shape = next(iter(m["heldout"].values()))["shape"]
    first = next(iter(m["heldout"]))
    return [
        "# The lnfree zoo: tiny-ln, tiny-vanilla, tiny-lnfree",
        "",
        "<!-- Generated by lnfree.zoo.family.write_model_card from the export's zoo.json (src/lnfree/zoo/data).",
        "     Do not edit by hand: re-export the family (lnfree zoo export) or run `lnfree zoo card`. -->",
        "",
        f"Exported {m['created']}. A small GPT-2-architecture family made as in Baroni et al. (2025),",
        "\"Transformers Don't Need LayerNorm at Inference Time\", Table 1: a model trained with LayerNorm, the",
        "same model fine-tuned with its LayerNorm removed, and the control fine-tune with LayerNorm kept.",
        "No machine here can download GPT-2; these load offline in about a second on a CPU.",
        "",
        "```python",
        "from lnfree import zoo",
        "model = zoo.load(\"tiny-lnfree\")          # LNFreeTransformer (HookedTransformer), fp32, tokenizer attached",
        "model.is_ln_free                         # True: every LN site removed",
        f"tokens = zoo.heldout(\"{first}\")       # LongTensor [{shape[0]}, {shape[1]}], rows start with BOS (id 0)",
        "zoo.names()                              # ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']",
        "```",
    ]


def _card_models(m: Mapping) -> list:
    L = ["", "## Models", "", "| name | what | LN sites | steps | tokens seen | training time | file |",
         "|---|---|---|---|---|---|---|"]
    for name, e in m["models"].items():
        modes = {}
        for s in e["ln_state"].values():
            modes[s["mode"]] = modes.get(s["mode"], 0) + 1
        p = e["provenance"]
        steps = _n(p.get("steps")) + (f" (+{_n(p['base_steps'])} pretraining)" if p.get("base_steps") else "")
        time_ = _hms(p.get("wall_time_s")) + (f" (+{_hms(p['base_wall_time_s'])})" if p.get("base_wall_time_s") else "")
        L.append(f"| `{name}` | {e.get('role', '')} | {', '.join(f'{v} {k}' for k, v in modes.items())} | {steps} | "
                 f"{_n(p.get('tokens_seen'))} | {time_} | {e['bytes'] / 1e6:.2f} MB fp16 |")
    return L + ["", "Tokens seen count every token of every training sequence, pretraining included for the "
                "fine-tuned models; training time is wall-clock on the machine named under Provenance."]


def _card_architecture(m: Mapping) -> list:
    cfg, tok = m["config"], m["tokenizer"]
    n_params = sum(_param_count(cfg).values())
    V, d = cfg["d_vocab"], cfg["d_model"]
    return [
        "", "## Architecture", "",
        f"GPT-2 (TransformerLens `HookedTransformer`, loaded as `lnfree.LNFreeTransformer`): {cfg['n_layers']} "
        f"layers, d_model {d}, {cfg['n_heads']} heads of d_head {cfg['d_head']}, d_mlp {cfg['d_mlp']}, context "
        f"{cfg['n_ctx']}, vocabulary {V}, activation `{cfg['act_fn']}`, {cfg['positional_embedding_type']} learned "
        f"positional embeddings, untied embedding and unembedding, LayerNorm eps {cfg['eps']}. {n_params:,} parameters.",
        "LN-free models have `normalization_type=None` after loading and every site (`blocks.{i}.ln1.qk`, `.ln1.v`, "
        "`.ln2`, `ln_final`) removed: centering, LN weight, bias and the fixed scale are folded into W_Q/W_K, W_V, "
        "W_in and W_U.",
        "", "## Tokenizer", "",
        f"{tok['kind']}, {tok['vocab_size']:,} tokens, trained on the training corpus; `<|endoftext|>` (id "
        f"{tok['bos_token_id']}) is the only special token and serves as BOS, EOS and padding. `to_tokens` "
        "prepends it, as TransformerLens does for GPT-2.",
        f"Why {V:,} and not GPT-2's 50,257: on a CPU the unembedding dominates the cost with a 50k vocabulary (the "
        f"corpus README measured ~900 vs ~4,000 training tokens/s), and with d_model {d} the two untied embedding "
        f"matrices take {2 * V * d / 1e6:.1f} M parameters instead of {2 * 50257 * d / 1e6:.1f} M, which is what "
        f"lets three fp16 models fit the {m.get('max_bytes', MAX_BYTES) / 1e6:.0f} MB budget of the package "
        f"(this export: {m.get('size_bytes', 0) / 1e6:.2f} MB).",
    ]


def _card_heldout(m: Mapping) -> list:
    sets = m["heldout"]
    L = ["", "## Held-out data", "", "| set | source | rows x tokens | predicted tokens | bytes | bytes/token |",
         "|---|---|---|---|---|---|"]
    for h, s in sets.items():
        src = Path(s["source"]).name if s.get("source") else "n/a"
        L.append(f"| `{h}` | {src} | {s['shape'][0]} x {s['shape'][1]} | {s['n_predicted_tokens']:,} | "
                 f"{s['n_bytes']:,} | {s['n_bytes'] / s['n_predicted_tokens']:.2f} |")
    widths = "/".join(map(str, sorted({s["shape"][1] - 1 for s in sets.values()})))
    return L + ["", f"Each row is BOS followed by {widths} consecutive tokens of the text (rows follow each other). "
                "Bytes are those of the predicted tokens' text (BOS counts none)."]


def _card_results(m: Mapping) -> list:
    models, hs, ev = m["models"], list(m["heldout"]), m.get("evaluation", {})
    L = ["", "## Results (the paper's Table 1 for this family)", "",
         f"Mean next-token cross-entropy in nats/token with {int(ev.get('level', 0.95) * 100)}% bootstrap CIs over "
         f"sequences ({ev.get('n_boot', 'n/a')} resamples), and bits per byte; every prediction of each row is "
         "scored, the one made at the BOS position included. Measured on the fp16-stored models as loaded by "
         "`zoo.load` (fp32 compute).", "",
         "| model | " + " | ".join(f"CE {HELDOUT_LABELS.get(h, h)}" for h in hs) + " | "
         + " | ".join(f"bits/byte {h}" for h in hs) + " |",
         "|---" * (1 + 2 * len(hs)) + "|"]
    for name, e in models.items():
        ce = [_est(e.get("eval", {}).get(h, {}).get("ce"), 4) for h in hs]
        bpb = [_est(e.get("eval", {}).get(h, {}).get("bpb"), 3) for h in hs]
        L.append(f"| `{name}` | " + " | ".join(ce) + " | " + " | ".join(bpb) + " |")
    rows = {h: e.get("eval", {}).get(h, {}).get("rows") for e in models.values() for h in hs}
    L += ["", "Rows evaluated per set: " + ", ".join(f"{h} {rows[h]}" for h in hs) + "."]
    gaps = m.get("gaps", {})
    L += ["", "### Differences (paired over sequences)", "",
          "| difference | " + " | ".join(f"{h} (nats/token)" for h in hs) + " |", "|---" * (1 + len(hs)) + "|"]
    for k in dict.fromkeys(k for h in hs for k in gaps.get(h, {})):
        L.append(f"| {k} | " + " | ".join(_est(gaps.get(h, {}).get(k), 4) for h in hs) + " |")
    return L + ["", *_gap_statement(m, hs)]


def _card_export_check(m: Mapping) -> list:
    fp16 = m.get("evaluation", {}).get("fp16_check", {})
    L = ["", "## Export check (fp16 storage)", "",
         f"Weights are stored in float16 and upcast on load. On the first {fp16.get('rows_per_set', 'n/a')} rows of "
         "each held-out set, compared with the fp32 models before export (the export refuses a CE change above "
         f"{fp16.get('ce_tol', CE_TOL)} nats):", "",
         "| model | max abs logit diff | CE fp32 | CE fp16 | difference |", "|---|---|---|---|---|"]
    for name, e in m["models"].items():
        c = e.get("export_check")
        if c:
            L.append(f"| `{name}` | {c['max_abs_logit_diff']:.2e} | {c['ce_fp32']:.5f} | {c['ce_fp16']:.5f} | "
                     f"{c['ce_diff']:+.1e} |")
    return L


def _card_provenance(m: Mapping) -> list:
    L = ["", "## Provenance", ""]
    for name, e in m["models"].items():
        p = e["provenance"]
        L.append(f"- `{name}`: {_n(p.get('steps'))} steps, seed {p.get('seed')}, {_hms(p.get('wall_time_s'))}, "
                 f"finished {p.get('date')}. Command: `{p.get('command')}`"
                 + (f" ({p['command_source']})" if p.get("command_source") else ""))
        for k in ("removal", "train_config"):
            if p.get(k):
                L.append(f"  - {k}: `{json.dumps(p[k], sort_keys=True)}`")
    fam = m.get("provenance", {})
    for k, v in fam.items():
        L.append(f"- {k}: `{v if isinstance(v, str) else json.dumps(v, sort_keys=True)}`")
    commands = [c for c in fam.get("commands", []) if c] or [
        "lnfree zoo train --text /work/shared/corpus/train/*.txt --out runs/zoo --minutes 80 --ft-steps 300 "
        "--seed 0 --export-dir src/lnfree/zoo/data --card docs/zoo.md"]
    return L + ["", "## Reproduce", "", "```bash", *commands, "# or, from a finished run directory:",
                "lnfree zoo export --run RUN_DIR --to src/lnfree/zoo/data --card docs/zoo.md", "```", "",
                "Stages whose outputs exist are skipped, so the same command resumes a crashed run; "
                "`RUN_DIR/family.json` records each stage's command, seed, steps, tokens and wall time. "
                "`tests/test_zoo.py` reloads all three models and recomputes these numbers.", ""]


def _gap_statement(manifest: Mapping, hs: Sequence[str]) -> list:
    gaps = manifest.get("gaps", {})
    models = manifest["models"]
    out = []
    key = "tiny-lnfree - tiny-vanilla"
    for h in hs:
        g = gaps.get(h, {}).get(key)
        if g is None:
            continue
        ref = models["tiny-vanilla"]["eval"][h]["ce"]["value"]
        if g["low"] > 0:
            verdict = "worse than the vanilla control, and the 95% CI excludes zero"
        elif g["high"] < 0:
            verdict = "better than the vanilla control, and the 95% CI excludes zero"
        else:
            verdict = "not distinguishable from the vanilla control (the 95% CI includes zero)"
        out.append(f"- {HELDOUT_LABELS.get(h, h)}: LN-free minus vanilla = {g['value']:+.4f} nats/token "
                   f"[{g['low']:+.4f}, {g['high']:+.4f}] ({100 * g['value'] / ref:+.2f}% of vanilla's CE): {verdict}.")
    if out:
        out = ["How much removing LayerNorm costs, measured against the control that had the same fine-tuning:",
               ""] + out + ["", "This is the comparison the paper makes (its Table 1); the difference between "
                            "`tiny-vanilla` and `tiny-ln` is the effect of the extra fine-tuning alone."]
    return out


def _param_count(cfg: Mapping) -> dict:
    d, L, V, C, m = cfg["d_model"], cfg["n_layers"], cfg["d_vocab"], cfg["n_ctx"], cfg["d_mlp"]
    h, dh = cfg["n_heads"], cfg["d_head"]
    per_layer = 4 * h * d * dh + 3 * h * dh + d + 2 * d * m + m + d + 4 * d
    return {"embed": V * d, "pos_embed": C * d, "blocks": L * per_layer, "ln_final": 2 * d, "unembed": d * V + V}


def write_model_card(json_path: PathArg, out_md: PathArg) -> Path:
    """Render the model card from an export's ``zoo.json`` and write it to `out_md` (e.g. docs/zoo.md).

    Example:
        >>> write_model_card("src/lnfree/zoo/data/zoo.json", "docs/zoo.md")   # doctest: +SKIP
        PosixPath('docs/zoo.md')
    """
    manifest = json.loads(Path(json_path).read_text())
    out = Path(out_md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_model_card(manifest))
    return out


# ---- training the family -----------------------------------------------------------------------
def _load_base(run: Path, tokenizer):
    from lnfree.model import LNFreeTransformer
    from lnfree.zoo.train import load_model

    return LNFreeTransformer.from_hooked(load_model(run / "pretrain" / "final", tokenizer=tokenizer))


def _load_ft(ft_dir: Path, base_cfg, tokenizer):
    """The fine-tuned model of a finished removal run (``final_tl/``), on the base (LN) config."""
    from safetensors.torch import load_file

    from lnfree.model import LNFreeTransformer
    from lnfree.zoo import _load_weights

    tl = ft_dir / "final_tl"
    modes = json.loads((tl / "config.json").read_text())["ln_modes"]
    # a copy: marking every site removed sets normalization_type=None on the model's config
    model = LNFreeTransformer(copy.deepcopy(base_cfg), tokenizer=tokenizer)
    state = {s: {"mode": m, "scale": 1.0 if m == "removed" else None} for s, m in modes.items()}
    _load_weights(model, load_file(str(tl / "model.safetensors")), state, where=str(tl))
    return model.eval()


def _ft_rows(tokens: np.ndarray, seq_len: int, bos: int) -> np.ndarray:
    """Non-overlapping ``[BOS] + (seq_len-1)`` rows of the training stream, as in pretraining."""
    body = seq_len - 1
    n = len(tokens) // body
    out = np.empty((n, seq_len), dtype=np.uint16)
    out[:, 0] = bos
    out[:, 1:] = np.asarray(tokens[: n * body]).reshape(n, body)
    return out


def _heldout_files(run: Path, heldout_files: Mapping) -> dict:
    return {name: run / f"heldout_{Path(f).stem}.npy" for name, f in heldout_files.items()}


class _Record:
    """``OUT/family.json``: the command of every invocation and what each stage did."""

    def __init__(self, path: Path, command: Optional[str], settings: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"format": "lnfree-zoo-run", "stages": {}}
        self.data.setdefault("invocations", []).append({"command": command, "started": _now(), "settings": settings,
                                                       "torch": torch.__version__})
        self.data["settings"] = settings
        self.save()

    def stage(self, name: str) -> Optional[dict]:
        return self.data["stages"].get(name)

    def set(self, name: str, entry: dict) -> None:
        self.data["stages"][name] = entry
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, self.data)


def train_family(
    text_files: Sequence[PathArg],
    out_dir: PathArg,
    *,
    minutes: float = 80.0,
    max_steps: int = 5000,
    ft_steps: int = 300,
    seed: int = 0,
    heldout_files: Optional[Mapping[str, PathArg]] = None,
    vocab_size: int = 4096,
    n_heldout: int = 100,
    ft_batch_size: int = 32,
    ft_micro_batch_size: Optional[int] = None,
    ft_eval_rows: int = 32,
    precision: str = "bf16",
    export_dir: Optional[PathArg] = None,
    model_card: Optional[PathArg] = None,
    n_eval: Optional[int] = None,
    model_overrides: Optional[Mapping] = None,
    train_overrides: Optional[Mapping] = None,
    command: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Reproduce the zoo family from text files; returns the run record (also in ``OUT/family.json``).

    Stages (each skipped when its output exists, so rerunning the same call resumes):
    1. tokenizer: byte-level BPE of `vocab_size` on `text_files` + the tokenized stream
       (`lnfree.zoo.train.train_tokenizer`, `tokenize_files`);
    2. held-out: ``[n_heldout, n_ctx]`` rows per `heldout_files` entry (name -> text file);
    3. pretraining: `lnfree.zoo.train.pretrain` for `minutes` / `max_steps` (resumes from checkpoints);
    4. LN-free and vanilla fine-tunes: `lnfree.removal.remove_layernorm` on the pretraining data,
       `ft_steps` steps of `ft_batch_size` ``[BOS] + 255``-token rows, the same seed (resumes);
    5. export: `export_run` to `export_dir` (default ``OUT/export``) and the model card to `model_card`.

    `model_overrides` / `train_overrides` change the architecture / `TrainConfig` (small smoke runs).

    Example:
        >>> record = train_family(glob.glob("/work/shared/corpus/train/*.txt"), "runs/zoo", minutes=80,
        ...                       ft_steps=300, seed=0, export_dir="src/lnfree/zoo/data")   # doctest: +SKIP
    """
    files = [Path(f) for f in text_files]
    if not files:
        raise ValueError("text_files is empty: give the training text files")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"text files not found: {missing[:3]}")
    heldout_files = dict(DEFAULT_HELDOUT if heldout_files is None else heldout_files)
    for name in heldout_files:
        if not _NAME_RE.match(name):
            raise ValueError(f"held-out name {name!r} must be lowercase letters, digits, '.', '_' or '-'")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    for arg, v in (("ft_steps", ft_steps), ("max_steps", max_steps), ("vocab_size", vocab_size),
                   ("n_heldout", n_heldout), ("ft_batch_size", ft_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(export_dir) if export_dir is not None else out / "export"
    settings = {"text_files": [str(f) for f in files], "minutes": minutes, "max_steps": max_steps,
                "ft_steps": ft_steps, "seed": seed, "heldout_files": {k: str(v) for k, v in heldout_files.items()},
                "vocab_size": vocab_size, "n_heldout": n_heldout, "ft_batch_size": ft_batch_size,
                "ft_micro_batch_size": ft_micro_batch_size, "ft_eval_rows": ft_eval_rows, "precision": precision,
                "export_dir": str(export_dir), "model_card": None if model_card is None else str(model_card),
                "n_eval": n_eval, "model_overrides": dict(model_overrides or {}),
                "train_overrides": dict(train_overrides or {})}
    rec = _Record(out / "family.json", command, settings)
    tok = _stage_tokenizer(rec, out, files, vocab_size, command)
    model_kw = _zt().base_model_kwargs(len(tok), **dict(model_overrides or {}))
    held = _stage_heldout(rec, out, tok, heldout_files, n_heldout, model_kw["n_ctx"])
    tc = _zt().TrainConfig(seed=seed, max_steps=max_steps, max_minutes=float(minutes), seq_len=model_kw["n_ctx"],
                           bf16_autocast=precision == "bf16", adaptive_threads=True, time_schedule=True, model=model_kw)
    _stage_pretrain(rec, out, tok, held, dataclasses.replace(tc, **dict(train_overrides or {})), command, progress)
    for name, vanilla in (("ft_lnfree", False), ("ft_vanilla", True)):
        _stage_finetune(rec, out, name, tok, held, vanilla=vanilla, steps=ft_steps, seed=seed, command=command,
                        batch_size=ft_batch_size, micro_batch_size=ft_micro_batch_size, eval_rows=ft_eval_rows,
                        bf16=precision == "bf16", progress=progress)
    done = rec.stage("export")
    if (export_dir / MANIFEST).exists() and done and done.get("status") == "ran":
        return rec.data
    t0 = time.time()
    res = export_run(out, export_dir, model_card=model_card, n_eval=n_eval, progress=progress)
    rec.set("export", {"status": "ran", "command": command, "dir": str(export_dir), "size_bytes": res.size_bytes,
                       "checks": res.checks, "wall_s": round(time.time() - t0, 1), "finished": _now()})
    return rec.data


def _zt():
    from lnfree.zoo import train

    return train


def _stage_tokenizer(rec: _Record, out: Path, files: list, vocab_size: int, command):
    """Stage 1: ``OUT/tokenizer.json`` and ``OUT/train_tokens.npy`` (each file one document); the tokenizer."""
    zt = _zt()
    tok_path, tokens_path = out / "tokenizer.json", out / "train_tokens.npy"
    if tok_path.exists() and tokens_path.exists():
        if rec.stage("tokenizer") is None:
            rec.set("tokenizer", {"status": "found", "files": [str(tok_path), str(tokens_path)]})
        return zt.load_tokenizer(tok_path)
    t0 = time.time()
    zt.train_tokenizer(files, vocab_size, tok_path)
    tok = zt.load_tokenizer(tok_path)
    ids = zt.tokenize_files(files, tok)
    np.save(tokens_path, ids)
    rec.set("tokenizer", {"status": "ran", "command": command, "vocab": len(tok), "train_tokens": int(len(ids)),
                          "text_bytes": sum(f.stat().st_size for f in files), "wall_s": round(time.time() - t0, 1),
                          "finished": _now()})
    return tok


def _stage_heldout(rec: _Record, out: Path, tok, heldout_files: Mapping, n_rows: int, n_ctx: int) -> dict:
    """Stage 2: ``OUT/heldout_<stem>.npy`` ``[n_rows, n_ctx]`` per held-out text; returns name -> array."""
    paths = _heldout_files(out, heldout_files)
    made = {}
    for name, f in heldout_files.items():
        if not paths[name].exists():
            arr = _zt().heldout_sequences(f, tok, n_rows, n_ctx)
            np.save(paths[name], arr)
            made[name] = list(arr.shape)
    if made or rec.stage("heldout") is None:
        rec.set("heldout", {"status": "ran" if made else "found", "files": {k: str(v) for k, v in paths.items()},
                            "sources": {k: str(v) for k, v in heldout_files.items()}, "made": made})
    return {name: np.load(p) for name, p in paths.items()}


def _stage_pretrain(rec: _Record, out: Path, tok, held: dict, tc, command, progress: bool) -> None:
    """Stage 3: ``OUT/pretrain/final`` by `lnfree.zoo.train.pretrain` (resuming from its checkpoints)."""
    zt = _zt()
    final = out / "pretrain" / "final"
    if not final.exists():
        _refuse_if_active(out / "pretrain")
        t0 = time.time()
        resume = zt.latest_checkpoint(out / "pretrain") is not None
        rec.set("pretrain", {"status": "running", "command": command, "started": _now(), "resumed": resume,
                             "config": dataclasses.asdict(tc)})
        evals = {name: arr[: tc.eval_seqs] for name, arr in held.items()}
        zt.pretrain(np.load(out / "train_tokens.npy"), tc, out / "pretrain", resume=resume, eval_sets=evals,
                    bos=zt.eot_id(tok), progress=progress)
        rec.set("pretrain", {**rec.stage("pretrain"), "status": "ran", "finished": _now(),
                             "wall_s_this_call": round(time.time() - t0, 1)})
    conf = json.loads((final / "config.json").read_text())
    _check_found("pretrain", final, {"seed": (conf["train"]["seed"], tc.seed),
                                     "d_vocab": (conf["model"]["d_vocab"], len(tok))})
    if rec.stage("pretrain") is None:
        rec.set("pretrain", {"status": "found", "dir": str(final)})


def _stage_finetune(rec: _Record, out: Path, name: str, tok, held: dict, *, vanilla: bool, steps: int, seed: int,
                    command, batch_size: int, micro_batch_size, eval_rows: int, bf16: bool, progress: bool) -> None:
    """Stage 4: ``OUT/{name}`` by `lnfree.removal.remove_layernorm` on ``[BOS] + 255``-token training rows."""
    ft_dir = out / name
    if not (ft_dir / "summary.json").exists():
        from lnfree.removal import remove_layernorm

        base = _load_base(out, tok)
        rows = _ft_rows(np.load(out / "train_tokens.npy", mmap_mode="r"), base.cfg.n_ctx, _zt().eot_id(tok))
        evals = next(iter(held.values()))[:eval_rows] if eval_rows else None
        rec.set(name, {"status": "running", "command": command, "started": _now()})
        t0 = time.time()
        remove_layernorm(base, rows, steps=steps, vanilla=vanilla, out_dir=ft_dir, resume="auto", batch_size=batch_size,
                         micro_batch_size=micro_batch_size, eval_data=evals, seed=seed, bf16=bf16, progress=progress)
        rec.set(name, {**rec.stage(name), "status": "ran", "finished": _now(),
                       "wall_s_this_call": round(time.time() - t0, 1)})
    summary = json.loads((ft_dir / "summary.json").read_text())
    _check_found(name, ft_dir, {"seed": (summary["config"]["seed"], seed), "steps": (summary["steps"], steps),
                                "vanilla": (summary["vanilla"], vanilla)})
    if rec.stage(name) is None:
        rec.set(name, {"status": "found", "dir": str(ft_dir)})


def _refuse_if_active(pretrain_dir: Path, quiet_s: float = 180.0) -> None:
    """Refuse to resume a pretraining that another process is still writing (its log moved recently)."""
    log = pretrain_dir / "train_log.jsonl"
    if log.exists():
        age = time.time() - log.stat().st_mtime
        if age < quiet_s:
            raise ValueError(f"{pretrain_dir} looks active (its train_log.jsonl was written {age:.0f} s ago) and has no "
                             f"final/ yet: wait for that run to finish, or for {quiet_s:.0f} s of silence if it died")


def _check_found(stage: str, path: Path, pairs: Mapping[str, tuple]) -> None:
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}={a!r} (asked for {b!r})" for k, (a, b) in bad.items())
        raise ValueError(f"{path} holds a {stage} stage made with {detail}: pass another out_dir or matching settings")


def _pretrain_provenance(run: Path, record: Mapping) -> dict:
    final = run / "pretrain" / "final"
    conf = json.loads((final / "config.json").read_text())
    tc, res = conf["train"], conf.get("result", {})
    steps = int(res.get("step", 0))
    start = None
    log = run / "pretrain" / "train_log.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "start" and "time" in rec:
                start = rec["time"]
    cmd = (f"python -m lnfree.zoo.train pretrain --data {run} --out {run / 'pretrain'} --max-minutes {tc['max_minutes']} "
           f"--max-steps {tc['max_steps']} --seed {tc['seed']} --precision {'bf16' if tc['bf16_autocast'] else 'fp32'}")
    stage = record.get("stages", {}).get("pretrain", {})
    ran_here = stage.get("status") == "ran" and stage.get("command")
    return {"steps": steps, "tokens_seen": steps * tc["batch_size"] * tc["seq_len"], "seed": tc["seed"],
            "wall_time_s": res.get("elapsed_total_s"), "command": stage["command"] if ran_here else cmd,
            "command_source": None if ran_here else "equivalent command, reconstructed from pretrain/final/config.json",
            "equivalent_command": cmd,
            "date": _dt.datetime.fromtimestamp((final / "model.safetensors").stat().st_mtime,
                                               _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "started": start, "stop_reason": res.get("reason"),
            "train_eval_ce": {k[5:]: v for k, v in res.items() if k.startswith("eval_")},
            "train_config": {k: tc[k] for k in ("batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "max_steps",
                                                "max_minutes", "weight_decay", "bf16_autocast") if k in tc}}


def _ft_provenance(run: Path, name: str, base: dict, record: dict) -> dict:
    ft = run / name
    s = json.loads((ft / "summary.json").read_text())
    cfg = s["config"]
    stage = record.get("stages", {}).get(name, {})
    ran_here = stage.get("status") == "ran" and stage.get("command")
    cmd = stage["command"] if ran_here else (
        f"lnfree remove-ln {run / 'pretrain' / 'final'} --data <[BOS]+255-token rows of {run / 'train_tokens.npy'}> "
        f"--out {ft} --steps {cfg['steps']} --batch-size {cfg['batch_size']} --seed {cfg['seed']}"
        + (" --vanilla" if cfg["vanilla"] else "") + (" --bf16" if cfg["bf16"] else ""))
    return {"base": "tiny-ln", "steps": s["steps"], "ft_tokens": s["tokens"],
            "command_source": None if ran_here else "equivalent command, reconstructed from summary.json",
            "tokens_seen": base["tokens_seen"] + s["tokens"], "base_steps": base["steps"],
            "base_wall_time_s": base["wall_time_s"], "seed": cfg["seed"], "wall_time_s": s["wall_time_s"],
            "command": cmd, "date": _dt.datetime.fromtimestamp((ft / "summary.json").stat().st_mtime,
                                                                _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "removal": {k: cfg[k] for k in ("steps", "batch_size", "seq_len", "lr", "min_lr", "warmup", "aux_lambda",
                                            "vanilla", "bf16") if k in cfg},
            "sigma": s.get("sigma"), "ce_before": s.get("ce_before"), "ce_after": s.get("ce_after"),
            "rollbacks": s.get("rollbacks")}


def export_run(run_dir: PathArg, export_dir: PathArg, *, model_card: Optional[PathArg] = None,
               n_eval: Optional[int] = None, progress: bool = True, **kwargs) -> ExportResult:
    """Export the family of a finished `train_family` run (or a run dir with the same layout).

    Example:
        >>> res = export_run("runs/zoo", "src/lnfree/zoo/data", model_card="docs/zoo.md")   # doctest: +SKIP
    """
    from lnfree.zoo.train import load_tokenizer

    run = Path(run_dir)
    needed = [run / "tokenizer.json", run / "pretrain" / "final" / "config.json",
              run / "ft_lnfree" / "summary.json", run / "ft_vanilla" / "summary.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{run} is not a finished zoo run: missing {missing} (run `lnfree zoo train` first)")
    record = json.loads((run / "family.json").read_text()) if (run / "family.json").exists() else {}
    held_src = record.get("settings", {}).get("heldout_files") or DEFAULT_HELDOUT
    held_paths = _heldout_files(run, held_src)
    absent = [str(p) for p in held_paths.values() if not p.exists()]
    if absent:
        raise FileNotFoundError(f"held-out token files missing: {absent}")
    tok = load_tokenizer(run / "tokenizer.json")
    base = _load_base(run, tok)
    models = {"tiny-ln": base,
              "tiny-vanilla": _load_ft(run / "ft_vanilla", base.cfg, tok),
              "tiny-lnfree": _load_ft(run / "ft_lnfree", base.cfg, tok)}
    if not models["tiny-lnfree"].is_ln_free:
        raise ValueError(f"{run / 'ft_lnfree'} does not hold an LN-free model")
    if models["tiny-vanilla"].is_ln_free or any(m != "live" for m in models["tiny-vanilla"].ln_modes().values()):
        raise ValueError(f"{run / 'ft_vanilla'} does not hold a model with every LN site live")
    pre = _pretrain_provenance(run, record)
    meta = {"models": {"tiny-ln": pre,
                       "tiny-vanilla": _ft_provenance(run, "ft_vanilla", pre, record),
                       "tiny-lnfree": _ft_provenance(run, "ft_lnfree", pre, record)},
            "run_dir": str(run),
            "commands": list(dict.fromkeys(i["command"] for i in record.get("invocations", []) if i.get("command"))),
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} (CPU)"}
    heldout = {name: {"tokens": np.load(p), "source": str(held_src[name])} for name, p in held_paths.items()}
    return export_family(models, run / "tokenizer.json", heldout, meta, export_dir, model_card=model_card,
                         n_eval=n_eval, progress=progress, **kwargs)

