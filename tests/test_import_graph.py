"""No import cycles inside src/lnfree, counting every import statement (module level and inside functions).

A deferred import inside a function still ties two modules together: A imports B and B imports A is a
cycle whatever the timing, and it hides layering mistakes (issue 12). The graph is read with ``ast``
from the source files, so the test is cheap and names the cycle it finds. Dynamic imports through
``importlib`` (the lazy ``__init__`` exports, the CLI's subcommand list) are not edges: those
packages only route names to their modules. Imports of the top package itself (``from lnfree import zoo``
counts as lnfree.zoo, a bare ``import lnfree`` as nothing) are not edges either: Python runs
``lnfree/__init__.py`` before any submodule whatever it imports, and it holds only the lazy exports and
the wiring of the model's upward calls (`lnfree._hooks`).
"""

import ast
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(src: Path = SRC, top: str = "lnfree") -> dict[str, Path]:
    out = {}
    for path in (src / top).rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _lazy_tables(modules) -> dict[str, dict[str, str]]:
    """package -> {name: module} from its ``__init__``'s lazy export table (``_EXPORTS`` / ``_LAZY``)."""
    out = {}
    for mod, path in modules.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(isinstance(t, ast.Name) and t.id in ("_EXPORTS", "_LAZY") for t in node.targets)):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                        target = v.value if v.value in modules else f"{mod}.{v.value}"
                        out.setdefault(mod, {})[k.value] = target
    return out


def import_graph(src: Path = SRC, top: str = "lnfree") -> dict[str, set[str]]:
    """module -> the lnfree modules it imports (``from lnfree import zoo`` counts as lnfree.zoo).

    A name taken from a package's lazy export table (``from lnfree.removal import remove_layernorm``)
    counts as an import of the module that defines it, so the lazy routing cannot hide a cycle.
    """
    modules = _modules(src, top)
    lazy = _lazy_tables(modules)
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
                targets += [lazy[base][a.name] for a in node.names if a.name in lazy.get(base, {})]
            else:
                continue
            for t in targets:
                hit = _resolve(t, modules)
                if hit and hit not in (mod, top):  # the top package only routes names (lazy)
                    graph[mod].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_known_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_deferred_relative_and_lazily_routed_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b  # deferred\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom .c import x\n")
    (pkg / "d.py").write_text("from pkg.sub import lazy_name\n")  # routed by sub's _EXPORTS to pkg.sub.c
    (pkg / "sub" / "__init__.py").write_text('_EXPORTS = {"lazy_name": "c"}\n')
    (pkg / "sub" / "c.py").write_text("def f():\n    import pkg.d\n")
    g = import_graph(tmp_path, "pkg")
    assert g["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and g["pkg.sub.b"] == {"pkg.a", "pkg.sub.c"}
    assert g["pkg.d"] == {"pkg.sub", "pkg.sub.c"}
    assert sorted(cycles(g)) == [["pkg.a", "pkg.sub.b"], ["pkg.d", "pkg.sub.c"]]
    real = import_graph()
    assert "lnfree.report.stages" in real["lnfree.report.pipeline"]
    assert "lnfree.norm_algebra" in real["lnfree._checks"]  # a deferred import inside ln_state_label()


def test_no_import_cycles_inside_lnfree():
    """Imports point one way (docs/architecture.md): low-level helpers < model < loading < analyses < top."""
    found = cycles(import_graph())
    assert found == [], "import cycles inside src/lnfree: " + "; ".join(" <-> ".join(c) for c in found)


def test_model_methods_implemented_above_the_model_work_from_a_bare_model_import():
    """from_pretrained / save_pretrained reach the loading layer through lnfree._hooks, set by lnfree/__init__.py."""
    code = (
        "import sys, tempfile\n"
        "from lnfree.model import LNFreeTransformer\n"
        "assert 'lnfree.resolve' not in sys.modules and 'lnfree.loading' not in sys.modules\n"
        "m = LNFreeTransformer.from_pretrained('tiny-ln', device='cpu')\n"
        "d = tempfile.mkdtemp()\n"
        "m.save_pretrained(d)\n"
        "from lnfree.loading import load_model\n"
        "import torch\n"
        "t = torch.tensor([[1, 2, 3, 4]])\n"
        "assert torch.allclose(load_model(d, device='cpu')(t), m(t), atol=1e-4)\n"
        "print(m.zoo_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "tiny-ln"


# ---- the layers of docs/architecture.md ------------------------------------------------------------------
DOC = SRC.parent / "docs" / "architecture.md"


def _top_level_split(text: str) -> list[str]:
    """Comma-separated entries, parenthesised comments dropped (their commas included)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        if depth == 0 and ch == ",":
            out.append(cur)
            cur = ""
        elif depth == 0:
            cur += ch
        depth -= ch == ")"
    return [e.strip() for e in out + [cur] if e.strip()]


def doc_layers(text: str) -> dict[str, int]:
    """entry -> layer number from the code block under "## Import direction" (see the doc for the format)."""
    section = text.split("## Import direction", 1)[1]
    block = section.split("```", 2)[1]
    layers, joined = {}, {}
    for line in block.splitlines():
        head = re.match(r"^(\d+)\s+[\w-]+:\s*(.*)$", line)
        if head:
            current = int(head.group(1))
            joined[current] = head.group(2)
        elif line.strip():
            joined[current] += " " + line.strip()
    for layer, text in joined.items():
        for entry in _top_level_split(text):
            layers[entry] = layer
    return layers


def _module_path(mod: str, modules) -> str:
    """lnfree.removal.costs -> removal/costs.py; a package is its __init__.py (lnfree -> __init__.py)."""
    rel = modules[mod].relative_to(SRC / "lnfree")
    return rel.as_posix()


def _match(entry: str, path: str):
    """How specifically `entry` names `path` (higher wins), or None."""
    if entry.endswith("/"):
        return (1, entry.count("/")) if path.startswith(entry) else None
    if "*" in entry:
        return (2, len(entry)) if fnmatch.fnmatch(path, entry) else None
    name = entry if entry.endswith(".py") else entry + ".py"
    return (3, 0) if path == name else None


def place(layers: dict[str, int], paths) -> tuple[dict[str, int], list[str], list[str]]:
    """(path -> layer, paths no entry places, entries that place nothing)."""
    placed, unplaced, used = {}, [], set()
    for path in paths:
        hits = [(m, e) for e in layers if (m := _match(e, path)) is not None]
        if not hits:
            unplaced.append(path)
            continue
        best = max(hits)[1]
        used.add(best)
        placed[path] = layers[best]
    return placed, unplaced, [e for e in layers if e not in used]


def upward_imports(graph: dict[str, set[str]], layer_of: dict[str, int]) -> list[str]:
    return sorted(f"{a} (layer {layer_of[a]}) imports {b} (layer {layer_of[b]})"
                  for a, targets in graph.items() for b in targets if layer_of[b] > layer_of[a])


def test_layer_table_parser_and_the_rule_on_a_known_case():
    text = ("## Import direction\n\n```\n0  base:   _errors, training/ (files, log), removal/data.py\n"
            "1  model:  model.py (LNFreeTransformer, as_lnfree)\n3  analyses: removal/ (the trainer,\n"
            "              costs), paper/\n4  top:    cli.py, */cli.py\n```\n")
    layers = doc_layers(text)
    assert layers == {"_errors": 0, "training/": 0, "removal/data.py": 0, "model.py": 1, "removal/": 3,
                      "paper/": 3, "cli.py": 4, "*/cli.py": 4}
    paths = ["_errors.py", "training/log.py", "removal/data.py", "removal/trainer.py", "removal/cli.py",
             "model.py", "cli.py", "paper/reproduce.py", "stray.py"]
    placed, unplaced, unused = place(layers, paths)
    assert placed["removal/data.py"] == 0 and placed["removal/trainer.py"] == 3 and placed["removal/cli.py"] == 4
    assert unplaced == ["stray.py"] and unused == []
    graph = {"paper/reproduce.py": {"cli.py", "model.py"}, "cli.py": {"removal/cli.py"}, "model.py": set()}
    assert upward_imports(graph, placed) == ["paper/reproduce.py (layer 3) imports cli.py (layer 4)"]


def test_imports_point_down_the_layers_of_architecture_md():
    """Every module is placed by docs/architecture.md's layer table, every entry places one, no import goes up."""
    modules = _modules()
    paths = {m: _module_path(m, modules) for m in modules}
    placed, unplaced, unused = place(doc_layers(DOC.read_text(encoding="utf-8")), sorted(paths.values()))
    assert not unplaced, f"modules missing from the layer table of docs/architecture.md: {unplaced}"
    assert not unused, f"entries of docs/architecture.md's layer table that name no module: {unused}"
    graph = {paths[a]: {paths[b] for b in targets} for a, targets in import_graph().items()}
    bad = upward_imports(graph, placed)
    assert not bad, "imports against the layers of docs/architecture.md: " + "; ".join(bad)
