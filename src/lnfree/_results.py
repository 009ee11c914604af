"""The result contract every analysis follows: a frozen dataclass with a short repr and an HTML repr.

Results are ``@result`` classes (``dataclass(frozen=True, eq=False)``; the repr comes from `Result`):
identity equality and hashing (tensors have no truth value, so value equality would raise),
``labels``, the settings used, ``model_name`` / ``model_id`` provenance, ``to_frame()``,
``plot()`` and, where ranking fits, ``top(k)``. Headline numbers are `Estimate`s: fields, or
zero-argument methods named in ``_headline``.

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
from typing import Any, ClassVar

import numpy as np
import torch

from lnfree.stats import Estimate

_MAX_REPR = 240
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


def tensor_summary(x: torch.Tensor) -> str:
    """``float32[4, 16]``: how a tensor appears where a repr must stay short."""
    return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
