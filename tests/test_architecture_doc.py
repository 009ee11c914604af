"""docs/architecture.md's module tree is true: every module it names exists in src/lnfree, and every module of
src/lnfree is in it (issue 20.7). The test reads the doc, so a module added or moved fails here until its line
is written. (Its layer table is checked against the imports in tests/test_import_graph.py.)

The tree's format: the first code block of the page; an entry is the first word of a line (``name.py`` or
``name/``), nested by two-space indentation; the ``#`` comment after a package entry, and its continuation
lines, may name that package's modules (``schedule.py (+ PAPER_RECIPES), sigma.py``)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "lnfree"
DOC = REPO / "docs" / "architecture.md"


def tree_modules(text: str) -> set[str]:
    """Paths (relative to src/lnfree, e.g. ``removal/costs.py``; a package as its ``__init__.py``) the tree names."""
    block = text.split("```", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert lines[0].strip() == "src/lnfree/", f"the tree must start at src/lnfree/, got {lines[0]!r}"
    named, stack, last_pkg = set(), [], None
    for line in lines[1:]:
        entry, _, comment = line.partition("#")
        if entry.strip():
            depth = (len(entry) - len(entry.lstrip())) // 2 - 1
            name = entry.split()[0]
            stack = stack[:depth]
            path = "/".join(stack + [name.rstrip("/")])
            if name.endswith("/"):
                stack.append(name.rstrip("/"))
                named.add(f"{path}/__init__.py")
                last_pkg = path
            else:
                named.add(path)
                last_pkg = None
        if last_pkg is not None:  # the package's comment (and its continuation lines) may list its modules
            named |= {f"{last_pkg}/{m}.py" for m in re.findall(r"(?<![\w/])(\w+)\.py\b", comment)}
    return named


def package_modules() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")}


def test_tree_parser_on_a_known_tree():
    text = ("# t\n\n```\nsrc/lnfree/\n  model.py     # the model\n  removal/     # the fine-tune: schedule.py (+ x),\n"
            "               # sigma.py, cli.py (not zoo/train.py)\n  analysis/\n    dla.py     # uses model.py\n  cli.py\n```\n")
    assert tree_modules(text) == {"model.py", "removal/__init__.py", "removal/schedule.py", "removal/sigma.py",
                                  "removal/cli.py", "analysis/__init__.py", "analysis/dla.py", "cli.py"}


def test_every_module_in_the_tree_exists_and_every_module_is_in_the_tree():
    named, real = tree_modules(DOC.read_text(encoding="utf-8")), package_modules()
    assert not named - real, f"docs/architecture.md names modules that do not exist: {sorted(named - real)}"
    assert not real - named, f"modules missing from docs/architecture.md's tree: {sorted(real - named)}"
