"""The README's 60-second tour runs as written, on the embedded models."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    tour = blocks[0]
    assert "lnfree.zoo.load" in tour
    namespace: dict = {}
    exec(compile(tour, str(README), "exec"), namespace)
    assert namespace["twin"].is_ln_free
    overall = namespace["dla"].nmae()  # an Estimate, as the README prints it
    assert overall.value < 1e-6  # DLA is exact on the LN-free twin


def test_readme_pins_torch_and_names_two_commands():
    text = README.read_text()
    assert "torch==2.13.0" in text
    assert "make demo" in text and "make test" in text
