"""Dataclass values <-> (a JSON tree, a dict of named tensors): what `Result.save` writes, without pickle.

Generic over dataclass fields, so a field added to a result or to `lnfree.stats.Estimate` needs no
change here. Plain JSON for None, bools, ints, strings, finite floats and lists; tagged objects for the
rest, so the round trip is exact (a tuple stays a tuple, an int an int, NaN a NaN):

- ``{"$float": "nan" | "inf" | "-inf"}`` (strict JSON has no such numbers; finite floats are written
  with ``repr``, which reads back bit for bit),
- ``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` (any encodable keys, order kept),
- ``{"$tensor": name}`` / ``{"$ndarray": name}``: stored under ``name`` in the tensor dict (saved as
  safetensors; dtype and shape kept; `Tokens` add ``"$tokenizer"``, the identity of the tokenizer that wrote them),
- ``{"$dataclass": "module.QualName", "fields": {...}}``: rebuilt through its constructor; only classes
  defined inside lnfree are rebuilt (a file never names arbitrary code to import).

Anything else (a DataFrame, a tokenizer, a function) is refused with the field's path named.

    >>> import torch
    >>> from lnfree.stats import Estimate
    >>> tree, tensors = encode({"x": (1, 2.5, float("nan")), "t": torch.arange(3), "e": Estimate(1.0, 0.5, 1.5, 4)})
    >>> list(tensors)
    ["result['t']"]
    >>> back = decode(tree, tensors)
    >>> back["x"][:2], back["t"].tolist(), back["e"].high, back["e"] == Estimate(1.0, 0.5, 1.5, 4)
    ((1, 2.5), [0, 1, 2], 1.5, True)
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import numpy as np
import torch

from lnfree.tokenizer import TokenizerId, Tokens

_PACKAGE = "lnfree"
_SPECIAL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


class CodecError(TypeError):
    """A value that cannot be written (or a tree that cannot be read back), with its path named."""


def encode(obj: Any, tensors: dict | None = None, path: str = "result") -> tuple[Any, dict]:
    """(JSON-able tree, {name: tensor}) for `obj`; tensor names are the fields' paths."""
    tensors = {} if tensors is None else tensors
    return _encode(obj, tensors, path), tensors


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(obj, torch.Tensor):
        ident = getattr(obj, "tokenizer_id", None)  # `lnfree.tokenizer.Tokens`: ids that remember their tokenizer
        obj = obj.as_subclass(torch.Tensor) if isinstance(obj, Tokens) else obj
        tensors[path] = obj.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared ones
        return {"$tensor": path} if ident is None else {"$tensor": path, "$tokenizer": list(ident)}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"$ndarray": path}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {"$dict": [[_encode(k, tensors, f"{path}.key{i}"), _encode(v, tensors, f"{path}[{k!r}]")]
                          for i, (k, v) in enumerate(obj.items())]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = {f.name: _encode(getattr(obj, f.name), tensors, f"{path}.{f.name}") for f in dataclasses.fields(obj)}
        return {"$dataclass": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    raise CodecError(f"{path}: cannot save a {type(obj).__module__}.{type(obj).__qualname__} (results save "
                     "tensors, numbers, strings, tuples, lists, dicts and dataclasses such as Estimate)")


def decode(tree: Any, tensors: dict, path: str = "result") -> Any:
    """The value `encode` was given, rebuilt from its tree and tensors."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, dict) or len(tree) not in (1, 2):
        raise CodecError(f"{path}: unreadable entry {str(tree)[:80]!r}")
    if "$float" in tree:
        return _SPECIAL[tree["$float"]]
    if "$tuple" in tree:
        return tuple(decode(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree["$tuple"]))
    if "$dict" in tree:
        return {decode(k, tensors, path): decode(v, tensors, f"{path}[{i}]") for i, (k, v) in enumerate(tree["$dict"])}
    if "$tensor" in tree or "$ndarray" in tree:
        name = tree.get("$tensor", tree.get("$ndarray"))
        if name not in tensors:
            raise CodecError(f"{path}: tensor {name!r} is missing from the tensor file")
        if "$tokenizer" in tree:
            return Tokens.wrap(tensors[name], TokenizerId(*tree["$tokenizer"]))
        return tensors[name] if "$tensor" in tree else tensors[name].numpy()
    if "$dataclass" in tree:
        return _decode_dataclass(tree, tensors, path)
    raise CodecError(f"{path}: unknown entry {sorted(tree)}")


def dataclass_type(name: str, path: str = "result") -> type:
    """The dataclass a tree names (``"lnfree.stats.Estimate"``); only lnfree's own classes are looked up."""
    module, _, qualname = name.rpartition(".")
    if module != _PACKAGE and not module.startswith(_PACKAGE + "."):
        raise CodecError(f"{path}: {name!r} is not an lnfree class; only lnfree's results can be loaded")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError):
        raise CodecError(f"{path}: this lnfree has no {name!r} (the file was written by another version)") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise CodecError(f"{path}: {name!r} is not a dataclass")
    return cls


def _decode_dataclass(tree: dict, tensors: dict, path: str) -> Any:
    cls = dataclass_type(tree["$dataclass"], path)
    saved = tree["fields"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(saved) != set(fields):
        missing, unknown = sorted(set(fields) - set(saved)), sorted(set(saved) - set(fields))
        raise CodecError(f"{path}: the saved {cls.__name__} has other fields than this lnfree's (missing: {missing}, "
                         f"unknown: {unknown}): it was written by another version; re-run the analysis")
    values = {k: decode(v, tensors, f"{path}.{k}") for k, v in saved.items()}
    obj = cls(**{k: v for k, v in values.items() if fields[k].init})
    for k, v in values.items():
        if not fields[k].init:
            object.__setattr__(obj, k, v)
    return obj
