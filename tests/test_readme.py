"""The README's tour runs as written, on the embedded models, and prints what its comments say.

Convention (stated in the README): a ``print(...)`` line's trailing comment starts with the exact text the
call prints; an explanation may follow after ": "; a comment ending in "..." gives a prefix (a long repr).
The printed values are also checked against independent computations.
"""

import ast
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_source() -> str:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]


def expected_outputs(src: str) -> dict[int, str]:
    """Line number of each top-level print statement -> the output its comment promises."""
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print":
            line = lines[node.end_lineno - 1]
            assert "#" in line, f"print without a comment saying what it prints: {line!r}"
            comment = line.split("#", 1)[1].strip()
            out[node.lineno] = comment if comment.endswith("...") else comment.split(": ")[0]
    return out


def run_tour(src: str) -> tuple[dict, dict[int, str]]:
    """Execute statement by statement; capture what each top-level statement prints."""
    namespace: dict = {}
    printed = {}
    for node in ast.parse(src).body:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(ast.Module([node], []), str(README), "exec"), namespace)
        printed[node.lineno] = buf.getvalue().rstrip("\n")
    return namespace, printed


def test_expected_outputs_parser():
    src = "x = 1\nprint([1, 2])  # [1, 2]\nprint('ab: c')  # ab: an explanation\nprint('long repr')  # long ...\n"
    assert expected_outputs(src) == {2: "[1, 2]", 3: "ab", 4: "long ..."}
    with pytest.raises(AssertionError, match="without a comment"):
        expected_outputs("print(1)\n")


@pytest.mark.slow
def test_readme_tour_prints_what_its_comments_say():
    src = tour_source()
    assert "lnfree.zoo.load" in src
    expected = expected_outputs(src)
    assert len(expected) >= 6
    ns, printed = run_tour(src)
    for line, want in expected.items():
        got = printed[line]
        if want.endswith("..."):
            assert got.startswith(want[:-3].rstrip()), f"README line {line}: prints {got!r}, comment says {want!r}"
        else:
            assert got == want, f"README line {line}: prints {got!r}, comment says {want!r}"

    # the values themselves, independently
    assert ns["twin"].is_ln_free and ns["dla"].nmae().value < 1e-6  # DLA exact without LN
    ln_nmae = ns["lnfree"].direct_logit_attribution(ns["model"], ns["tokens"]).nmae()
    assert ln_nmae.value > 1.0 and ln_nmae.low < ln_nmae.value < ln_nmae.high
    err = ns["err"]
    a, b = err.estimate.flatten().double().numpy(), err.truth.flatten().double().numpy()
    assert err.pearson.value == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-6)
    assert all(re.fullmatch(r"L\d+N\d+", n) for n in ns["neurons"].neurons(3))
    assert ns["abl"].references() == ns["neurons"].neurons(3)  # the cumulative set: all three neurons


def test_readme_pins_torch_and_names_two_commands():
    text = README.read_text()
    assert "torch==2.13.0" in text
    assert "make demo" in text and "make test" in text
