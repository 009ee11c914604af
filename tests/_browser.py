"""Test tooling, not part of the package: open a report in a real headless browser (Debian's chromium).

Gives the rendered DOM and a screenshot. Used by tests/test_browser.py (the report's figures really
render, offline) and by ``scripts/screenshot_report.py`` (the README's screenshot).

Example:
    >>> dom, png = render("out/demo/report.html", "shot.png")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def find_chromium() -> Optional[str]:
    """Path of a chromium/chrome executable, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(html: Union[str, Path], png: Union[str, Path], *, width: int = 1200, height: int = 3000,
           budget_ms: int = 15000, timeout: float = 300, browser: Optional[str] = None) -> tuple[str, Path]:
    """Load `html` (a file) in headless chromium; returns (the DOM after scripts ran, the screenshot path).

    `budget_ms` is chromium's virtual-time budget: scripts (plotly drawing the figures) run that long
    before the DOM is dumped and the screenshot taken.
    """
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium found (apt-get install chromium)")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"no such report: {html}")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lnfree-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", "--dump-dom",
               html.as_uri()]
        env = dict(os.environ, HOME=profile)  # chromium writes caches under HOME
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout, png


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def read_png(path: Union[str, Path]) -> np.ndarray:
    """Pixels [height, width, channels] (uint8) of an 8-bit, non-interlaced RGB/RGBA/grey PNG.

    A small decoder (no imaging library needed): chunks, zlib, and the five row filters.
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    if header is None:
        raise ValueError(f"{path} has no IHDR chunk")
    w, h, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG (bit depth {depth}, color type {color}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = w * channels
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    bpp = channels
    for y in range(h):
        f = raw[y * (stride + 1)]
        row = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if f == 0:
            cur = row
        elif f == 1:  # Sub: running sum per channel
            cur = np.cumsum(row.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            cur = (row + prev) % 256
        elif f in (3, 4):  # Average, Paeth: sequential in x
            r, up, c = row.tolist(), prev.tolist(), [0] * stride
            for i in range(stride):
                a = c[i - bpp] if i >= bpp else 0
                if f == 3:
                    c[i] = (r[i] + ((a + up[i]) >> 1)) & 255
                else:
                    ul = up[i - bpp] if i >= bpp else 0
                    c[i] = (r[i] + _paeth(a, up[i], ul)) & 255
            cur = np.asarray(c, dtype=np.int64)
        else:
            raise ValueError(f"bad PNG row filter {f}")
        out[y] = cur
        prev = cur
    return out.reshape(h, w, channels)
