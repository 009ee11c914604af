"""The report's result objects on disk: every `Result` of a `ReportData` saved with `Result.save`.

`write_report` writes them next to the page (``{stem}_results/``: one directory per result, and
``index.json`` mapping each result's keys, e.g. ``["dla", "tiny-ln"]``, to its directory);
`load_results` reads them back into the same nested dict as ``ReportData.results``, every field equal
(`lnfree.load_result`). The report's JSON keeps its own summary numbers; this is the full data.

Example:
    >>> from lnfree.report.saved import load_results, save_results
    >>> index = save_results(rd.results, "out/demo/report_results")   # doctest: +SKIP
    >>> load_results("out/demo/report_results")["dla"]["tiny-ln"]      # doctest: +SKIP
    DLAResult(model='tiny-ln (LN)', ...)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Union

from lnfree._results import Result, load_result

INDEX = "index.json"
PathArg = Union[str, Path]


def _leaves(tree: Any, keys: tuple = ()) -> Iterator[tuple[tuple, Result]]:
    if isinstance(tree, Result):
        yield keys, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, keys + (str(k),))
    else:
        raise TypeError(f"report results {'/'.join(keys) or '(top)'}: expected a Result or a dict of them, "
                        f"got {type(tree).__name__}")


def save_results(results: dict, root: PathArg) -> dict[str, list[str]]:
    """Save every `Result` in the nested dict `results` under `root`; returns {directory: keys}.

    `root` is replaced when it holds an earlier save (its ``index.json``); any other existing
    directory is refused rather than overwritten.
    """
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict (stage -> ... -> Result), got {type(results).__name__}")
    root = Path(root)
    if root.exists():
        if not (root / INDEX).is_file():
            raise FileExistsError(f"{root} exists and is not a saved set of report results (no {INDEX}); "
                                  "choose another output directory")
        shutil.rmtree(root)
    index: dict[str, list[str]] = {}
    for keys, res in _leaves(results):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", ".".join(keys)) or "result"
        while name in index:  # two keys that differ only in characters a file name cannot hold
            name += "_"
        res.save(root / name)
        index[name] = list(keys)
    root.mkdir(parents=True, exist_ok=True)
    (root / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def load_results(root: PathArg) -> dict:
    """The nested dict `save_results` saved under `root` (every result loaded with `lnfree.load_result`)."""
    root = Path(root)
    if not (root / INDEX).is_file():
        raise FileNotFoundError(f"no saved report results at {root} (expected {root / INDEX}, written by write_report)")
    out: dict = {}
    for name, keys in json.loads((root / INDEX).read_text(encoding="utf-8")).items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = load_result(root / name)
    return out
