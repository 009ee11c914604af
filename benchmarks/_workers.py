"""What the subprocess-per-method benchmarks share: the worker subprocess, the settings, the command line.

A benchmark script runs each method in its own process (``script --worker METHOD ...``, which prints one
JSON line), so that each method's peak memory is its own. Not a benchmark itself: `run_all.py` only
picks up ``bench_*.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Optional


def spawn(script: str, method: str, quick: bool, threads: int, batch: Optional[int],
          env: Optional[dict] = None) -> dict:
    """Run ``script --worker method`` in a fresh interpreter and return the JSON it printed last."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", method, "--threads", str(threads)]
    cmd += (["--quick"] if quick else []) + ([] if batch is None else ["--batch", str(batch)])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {method!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def settings(quick_cfg: dict, full_cfg: dict, quick: bool, batch: Optional[int]) -> dict:
    """A copy of the quick or full settings, with the batch size overridden when given."""
    cfg = dict(quick_cfg if quick else full_cfg)
    if batch is not None:
        cfg["batch"] = batch
    return cfg


def main(argv, *, doc: str, worker: Callable, run: Callable, config: Callable, quick_help: str,
         batch_help: str, methods: tuple = ("ours", "tl")) -> None:
    """The command line: ``--worker`` runs one method and prints its JSON; otherwise run and print the rows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--batch", type=int, default=None, help=batch_help)
    parser.add_argument("--worker", choices=list(methods), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, config(args.quick, args.batch), args.threads)))
        return
    for row in run(args.quick, args.threads, args.batch):
        flag = {True: "PASS", False: "FAIL", None: "INFO"}[row["pass"]]
        print(f"[{flag}] {row['benchmark']}: {row['measured']:.3g} {row['unit']} target {row['target']}")
