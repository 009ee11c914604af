"""The result contract every analysis follows: a frozen dataclass with a short repr and an HTML repr.

Results are ``@result`` classes (``dataclass(frozen=True, eq=False)``; the repr comes from `Result`):
identity equality and hashing (tensors have no truth value, so value equality would raise),
``labels``, the settings used, ``model_name`` / ``model_id`` provenance, ``to_frame()``,
``plot()`` and, where ranking fits, ``top(k)``. Headline numbers are `Estimate`s: fields, or
zero-argument methods named in ``_headline``.

Every result saves and loads exactly: ``result.save(path)`` writes the directory `path` with
``result.json`` (every field but the tensors: format, version, type, lnfree version) and
``tensors.safetensors``; ``lnfree.load_result(path)`` (or ``DLAResult.load(path)``, which also checks
the type) reads it back with every field equal. No pickle (see `lnfree._codec`).

    >>> from lnfree._results import Result, result
    >>> from lnfree.stats import Estimate
    >>> @result
    ... class Toy(Result):
    ...     score: Estimate
    ...     labels: tuple = ("a",)
    ...     model_name: str = "toy (LN)"
    >>> Toy(Estimate(1.0, 0.5, 1.5, 10))
    Toy(model='toy (LN)', labels=1, score=1 [0.5, 1.5])
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
import torch

from lnfree._codec import CodecError, dataclass_type, decode, encode
from lnfree.stats import Estimate

_MAX_REPR = 240
#: the on-disk format `Result.save` writes; a file of another version is refused, with the reason
FORMAT, FORMAT_VERSION = "lnfree.result", 1
_JSON, _TENSORS = "result.json", "tensors.safetensors"
PathArg = Union[str, Path]
_PROVENANCE = ("model_name", "model_id", "names")


def result(cls):
    """Decorator: ``dataclass(frozen=True, eq=False)`` keeping `Result`'s short repr."""
    return dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word boundary, marked with "..."."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


def _short(value: Any) -> str | None:
    """A one-line rendering of a setting (floats to 4 significant digits), or None when it is bulk data."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, str):
        return repr(_clip(value, 58))
    if value is None or isinstance(value, (bool, int, np.integer)):
        return str(value)
    if isinstance(value, Estimate):
        return str(value)
    if isinstance(value, (tuple, list)) and len(value) <= 6 and all(_short(v) is not None for v in value):
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            text = "(" + ", ".join(_short(v) for v in value) + ("," if len(value) == 1 else "") + ")"
            return text if len(text) <= 60 else None
    return None


class Result:
    """Base of every analysis result: short ``__repr__``, ``_repr_html_``, identity eq/hash.

    Subclasses list zero-argument methods returning headline `Estimate`s in ``_headline``.
    """

    _headline: ClassVar[tuple[str, ...]] = ()

    # eq=False keeps object identity for == and hash(); spelled out so subclasses cannot lose it.
    __hash__ = object.__hash__

    def __eq__(self, other):  # noqa: D105
        return self is other

    def headline(self) -> dict[str, Estimate]:
        """The headline numbers: every `Estimate` field, then the ``_headline`` methods' values."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if isinstance(getattr(self, f.name), Estimate)}
        for name in self._headline:
            out[name] = getattr(self, name)()
        return out

    def settings(self) -> dict[str, str]:
        """Short scalar fields (the settings used), rendered; tensors and frames are left out."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _PROVENANCE or f.name == "labels" or isinstance(value, Estimate):
                continue
            text = _short(value)
            if text is not None:
                out[f.name] = text
        return out

    def _provenance(self) -> dict[str, str]:
        out = {}
        if getattr(self, "names", None) is not None:
            out["models"] = " vs ".join(map(str, self.names))
        elif getattr(self, "model_name", None):
            out["model"] = repr(self.model_name)
        labels = getattr(self, "labels", None)
        if labels is not None:
            out["labels"] = str(len(labels))
        return out

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in self._provenance().items()]
        parts += [f"{k}={v}" for k, v in self.headline().items()]
        parts += [f"{k}={v}" for k, v in self.settings().items()]
        name = type(self).__name__
        text = f"{name}({', '.join(parts)})"
        if len(text) > _MAX_REPR:  # drop whole settings from the end (never cut mid-word); "..." says so
            while parts and len(f"{name}({', '.join(parts + ['...'])})") > _MAX_REPR:
                parts.pop()
            text = f"{name}({', '.join(parts + ['...'])})"
        return text

    __str__ = __repr__

    def _repr_html_(self) -> str:
        rows = [("", k, v) for k, v in self._provenance().items()]
        rows += [("headline", k, str(v)) for k, v in self.headline().items()]
        rows += [("setting", k, v) for k, v in self.settings().items()]
        body = "".join(
            f"<tr><td style='color:#888'>{html.escape(g)}</td><td><b>{html.escape(k)}</b></td>"
            f"<td>{html.escape(str(v))}</td></tr>" for g, k, v in rows
        )
        return (f"<div><b>{html.escape(type(self).__name__)}</b>"
                f"<table style='font-size:90%'>{body}</table></div>")

    # ---- saving ----------------------------------------------------------------------------
    def save(self, path: PathArg) -> Path:
        """Write this result to the directory `path` (``result.json`` + ``tensors.safetensors``).

        `lnfree.load_result(path)` reads it back with every field equal (tensors bit for bit, dtype and
        shape kept). Returns the directory.

        Example:
            >>> import tempfile, torch
            >>> from lnfree.stats import Estimate
            >>> from lnfree.analysis.geometry import ResidNorms
            >>> res = ResidNorms(labels=("0_resid_pre",), first=torch.ones(2, 1), rest=torch.ones(2, 1))
            >>> back = load_result(res.save(tempfile.mkdtemp()))
            >>> type(back).__name__, torch.equal(back.first, res.first)
            ('ResidNorms', True)
        """
        return save_result(self, path)

    @classmethod
    def load(cls, path: PathArg) -> "Result":
        """Read a result written by `save`; refuses a directory holding another result type.

        Example:
            >>> from lnfree.analysis.dla import DLAResult
            >>> DLAResult.load("out/dla")          # doctest: +SKIP
        """
        return load_result(path, cls)


def save_result(res: Result, path: PathArg) -> Path:
    """`res.save(path)`: the directory `path` with ``result.json`` and ``tensors.safetensors``."""
    from safetensors.torch import save as safetensors_bytes

    from lnfree import __version__

    if not isinstance(res, Result):
        raise TypeError(f"only lnfree results can be saved this way, got {type(res).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a directory (a result saves as result.json + tensors.safetensors), "
                         f"but {path} is a file")
    cls = type(res)
    tree, tensors = encode(res, path=cls.__name__)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "type": f"{cls.__module__}.{cls.__qualname__}",
              "lnfree_version": __version__, "result": tree}
    text = json.dumps(header, indent=1, allow_nan=False) + "\n"  # encode() leaves no NaN: strict JSON
    path.mkdir(parents=True, exist_ok=True)
    _replace(path / _TENSORS, safetensors_bytes(tensors))  # first: result.json names these tensors
    _replace(path / _JSON, text.encode("utf-8"))
    return path


def _replace(file: Path, data: bytes) -> None:
    """Write a sibling temporary file (open()'s mode: the umask's) and rename it over `file`."""
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def load_result(path: PathArg, expected: type = Result) -> Result:
    """Read a result saved with ``result.save(path)``: every field equal to the saved one's.

    `expected` (default: any result) refuses a directory holding another type. A file of another
    format version, or of a result type whose fields have changed since, is refused with the reason.

    Example:
        >>> import lnfree
        >>> dla = lnfree.load_result("out/dla")          # doctest: +SKIP
    """
    from safetensors.torch import load_file

    path = Path(path)
    header = _read_header(path)
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / _JSON} is format {header.get('format')!r} version {header.get('version')!r} "
                         f"(written by lnfree {header.get('lnfree_version', '?')}); this lnfree reads {FORMAT!r} "
                         f"version {FORMAT_VERSION}: load it with the lnfree that wrote it, or re-run the analysis")
    try:
        cls = dataclass_type(str(header.get("type")), str(path))
    except CodecError as e:
        raise ValueError(str(e)) from None
    if not issubclass(cls, expected):
        raise ValueError(f"{path} holds a {cls.__name__}, not a {expected.__name__}; "
                         f"read it with lnfree.load_result(path) or {cls.__name__}.load(path)")
    tensors = load_file(str(path / _TENSORS)) if (path / _TENSORS).is_file() else None
    if tensors is None:
        raise ValueError(f"{path} has no {_TENSORS} (saved results have both {_JSON} and {_TENSORS})")
    try:
        out = decode(header["result"], tensors, cls.__name__)
    except CodecError as e:
        raise ValueError(f"{path}: {e}") from None
    if type(out) is not cls:
        raise ValueError(f"{path}: the type {header['type']!r} does not match its content ({type(out).__name__})")
    return out


def _read_header(path: Path) -> dict:
    file = path / _JSON
    if not file.is_file():
        raise FileNotFoundError(f"no saved result at {path} (expected {file}, written by result.save(path))")
    try:
        header = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); was it written by result.save?") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} does not hold a saved result (a JSON object with format, version, type)")
    return header


def tensor_summary(x: torch.Tensor) -> str:
    """``float32[4, 16]``: how a tensor appears where a repr must stay short."""
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
