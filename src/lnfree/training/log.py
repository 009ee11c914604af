"""The JSONL run log every trainer writes: one JSON record per line, rewound on resume.

After a kill and a resume from the checkpoint of step s, `rewind` drops what the killed process
logged after that checkpoint, so the log reads as one run (no step recorded twice).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from lnfree.training.files import atomic_write_text


class JsonlLog:
    """Append-only JSONL file (or nothing when `path` is None), optionally echoed to stdout.

    Example:
        >>> log = JsonlLog("runs/x/log.jsonl")            # doctest: +SKIP
        >>> log.write({"event": "step", "step": 1})       # doctest: +SKIP
    """

    def __init__(self, path: Optional[os.PathLike], echo: bool = False):
        self.path = None if path is None else Path(path)
        self.echo = echo

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        if self.echo:
            print(line, file=sys.stdout, flush=True)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def records(self) -> list[dict]:
        """Every complete record (a line cut short by a kill is skipped)."""
        if self.path is None or not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def rewind(self, step: int) -> int:
        """Keep the records up to the checkpoint of `step`; drop later ones. Returns how many were dropped.

        The cut is after the last ``{"event": "checkpoint", "step": step}`` record if there is one;
        in logs without checkpoint records, every record whose ``step`` exceeds `step` is dropped.
        """
        recs = self.records()
        if not recs:
            return 0
        cut = None
        for i, r in enumerate(recs):
            if r.get("event") == "checkpoint" and r.get("step") == step:
                cut = i + 1
        kept = recs[:cut] if cut is not None else [r for r in recs if r.get("step") is None or r["step"] <= step]
        dropped = len(recs) - len(kept)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return dropped
