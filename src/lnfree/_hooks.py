"""The model layer's two calls upward: `LNFreeTransformer.from_pretrained` and `.save_pretrained`.

Their implementations, `lnfree.io.resolve.load` and `lnfree.io.save.save_pretrained`, sit above the model
layer: they build and read `LNFreeTransformer`s, so they import `lnfree.model`, and `lnfree.model` must
not import them back (imports point one way; docs/architecture.md). The model module calls them
through this registry instead, and `lnfree/__init__.py` registers them: Python runs the package's
``__init__`` before any of its submodules, so the registry is filled whichever way the class is imported.

    >>> from lnfree import _hooks
    >>> sorted(_hooks.registered())
    ['from_pretrained', 'save_pretrained']
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
    """Make `fn` the implementation of the model method `name`."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _REGISTRY[name] = fn


def registered() -> tuple[str, ...]:
    """The method names that have an implementation."""
    return tuple(_REGISTRY)


def call(name: str, *args, **kwargs):
    """Run the implementation registered for `name`."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise RuntimeError(f"LNFreeTransformer.{name} has no implementation registered "
                           "(lnfree/__init__.py registers it when the package is imported)") from None
    return fn(*args, **kwargs)
