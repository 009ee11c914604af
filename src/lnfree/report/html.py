"""Self-contained HTML reports: plotly figures embedded with one inline copy of plotly.js.

The file opens with no network: nothing is fetched from a CDN.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:0.92em}
.figure{margin:1em 0}
"""


@dataclass
class Report:
    """An HTML report built section by section.

    Example:
        >>> r = Report("LN vs LN-free")
        >>> r.section("Cross-entropy", "Mean CE on held-out text.")
        >>> r.table(pd.DataFrame({"model": ["a"], "ce": [3.2]}))
        >>> r.write("report.html")  # doctest: +SKIP
    """

    title: str
    blocks: list[str] = field(default_factory=list)
    n_figures: int = 0

    def section(self, heading: str, text: str = "") -> None:
        self.blocks.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            self.text(text)

    def text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, frame: pd.DataFrame, float_format: str = "{:.4g}") -> None:
        self.blocks.append(frame.to_html(index=False, float_format=float_format.format, border=0))

    def figure(self, fig: go.Figure) -> None:
        self.n_figures += 1
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self.n_figures}")
        self.blocks.append(f'<div class="figure">{div}</div>')

    def to_html(self) -> str:
        head = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        )
        return head + f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.blocks) + "</body></html>"

    def write(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def jsonable(obj: Any) -> Any:
    """Numbers, tensors, dataclasses and frames -> plain JSON types (nan/inf -> None)."""
    import dataclasses

    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, pd.DataFrame):
        return jsonable(obj.to_dict(orient="records"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return jsonable(obj.to_dict())
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def write_json(data: Any, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2), encoding="utf-8")
    return path
