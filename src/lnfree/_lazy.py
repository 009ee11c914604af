"""Names a package imports on first use (PEP 562): the one ``__getattr__`` of every lazy package.

``lnfree``, ``lnfree.analysis``, ``lnfree.removal``, ``lnfree.report`` and ``lnfree.zoo`` keep a table
(``_EXPORTS`` or ``_LAZY``: name -> the module defining it) so that ``import lnfree`` and the ``lnfree``
command start fast; each package's ``__getattr__`` is built here from its table.
"""

from __future__ import annotations

import importlib
from typing import Callable, Collection, Mapping


def lazy_getattr(package: str, exports: Mapping[str, str], submodules: Collection[str] = ()) -> Callable[[str], object]:
    """The module-level ``__getattr__`` of `package`, importing a name's module on first use.

    Args:
        package: the package's dotted name (its ``__name__``).
        exports: name -> the module defining it, dotted from the top (``"lnfree.report.pipeline"``) or one
            name relative to `package` (``"trainer"``), as tests/test_import_graph.py reads the table.
        submodules: names returned as the submodule of that name.

    Example:
        >>> getattr_ = lazy_getattr("lnfree.removal", {"remove_layernorm": "trainer"})
        >>> getattr_("remove_layernorm").__name__
        'remove_layernorm'
    """

    def __getattr__(name: str):
        if name in exports:
            module = exports[name]
            return getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
