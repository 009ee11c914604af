"""The HTML report opened in a real headless browser (Debian's chromium), offline.

Checks that plotly really drew every figure (the DOM after scripts ran holds an SVG plot inside each
figure block) and that a screenshot shows them (non-trivial PNG, not blank, the traces' colours
present). Without chromium this test FAILS, loudly, unless LNFREE_ALLOW_NO_BROWSER=1 (then it skips).
"""

import os
import re

import _browser as browser
import numpy as np
import pytest
import torch
from conftest import make_model
from test_report import SMALL, fake_ioi

from lnfree.report.figures import COLORS
from lnfree.report.pipeline import run_report, write_report

N_FIGURES = 8


def _chromium() -> str:
    found = browser.find_chromium()
    if found:
        return found
    reason = ("chromium is not installed, so the HTML report cannot be checked in a real browser: install it "
              "(`make test` does when you are root; else: sudo apt-get install -y chromium) "
              "or set LNFREE_ALLOW_NO_BROWSER=1 to skip this test")
    if os.environ.get("LNFREE_ALLOW_NO_BROWSER") == "1":
        pytest.skip(reason)
    pytest.fail(reason, pytrace=False)


def _hex(c: str) -> np.ndarray:
    return np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)])


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    toks = torch.randint(0, 61, (6, 12), generator=torch.Generator().manual_seed(0))
    free = make_model()
    free.estimate_ln_scales(toks)
    rd = run_report({"ln": make_model(), "free": free.remove_ln()}, {"t": toks}, sizes=SMALL, progress=False,
                    ioi=fake_ioi(4, 61))
    html, _ = write_report(rd, tmp_path)

    dom, png = browser.render(html, tmp_path / "shot.png", width=1000, height=2000, browser=exe)
    dom = re.sub(r"<script.*?</script>", "", dom, flags=re.S)  # the page as drawn, without plotly.js's source
    blocks = dom.split('<div class="figure">')[1:]
    assert len(blocks) == N_FIGURES
    for i, block in enumerate(blocks):
        assert 'class="main-svg"' in block, f"figure {i + 1} was not drawn by plotly"
    assert len(re.findall(r'class="main-svg"', dom)) >= N_FIGURES
    assert "WebGL" not in dom  # no figure fell back to a WebGL warning

    assert png.stat().st_size > 30_000
    px = browser.read_png(png)[..., :3].reshape(-1, 3).astype(int)
    assert px.shape[0] == 1000 * 2000
    assert (px < 245).any(1).mean() > 0.05  # not a blank page
    assert len(np.unique(px, axis=0)) > 100
    for color in COLORS[:2]:  # the two models' traces (CE bars, NMAE lines)
        assert (np.abs(px - _hex(color)).max(1) < 16).sum() > 500, f"no pixels of trace colour {color}"


def test_png_reader_against_a_known_image(tmp_path):
    """The tiny PNG decoder used above, on an image written with every filter type."""
    import struct
    import zlib

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    rows = []
    prev = np.zeros(12, dtype=np.int64)
    for y in range(5):
        cur = img[y].reshape(-1).astype(np.int64)
        f = y % 5
        left = np.concatenate([np.zeros(3, dtype=np.int64), cur[:-3]])
        ul = np.concatenate([np.zeros(3, dtype=np.int64), prev[:-3]])
        if f == 0:
            enc = cur
        elif f == 1:
            enc = cur - left
        elif f == 2:
            enc = cur - prev
        elif f == 3:
            enc = cur - (left + prev) // 2
        else:
            pred = [browser._paeth(a, b, c) for a, b, c in zip(left, prev, ul)]
            enc = cur - np.array(pred)
        rows.append(bytes([f]) + bytes((enc % 256).astype(np.uint8)))
        prev = cur

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    (tmp_path / "x.png").write_bytes(data)
    assert np.array_equal(browser.read_png(tmp_path / "x.png"), img)
