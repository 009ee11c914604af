"""Run every benchmark (benchmarks/bench_*.py) and print one table of results against their targets.

Each benchmark module exposes ``run(quick: bool) -> list[dict]`` returning rows with keys
``benchmark``, ``measured``, ``target``, ``unit``, ``pass`` (True / False, or None for rows that are
informational). Modules are imported by file path, so new ``bench_*.py`` files are picked up
without registration; a benchmark that fails is reported as an ERROR row and the others still run.
Each benchmark's own printout is captured (shown with ``--verbose``, stored with ``--json``).

The table's ``ratio`` column is measured / target; ``need`` says which side of 1 passes (targets
are ">= target" for speed-ups and "<= target" for costs; a row may say so with a ``direction``
key, else it is read from its unit, else from its pass flag).

    python benchmarks/run_all.py --quick             # small settings, a few minutes on 2 busy cores
    python benchmarks/run_all.py                     # the targets' settings
    python benchmarks/run_all.py --only dla memory --json out.json --verbose
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(only: list[str] | None = None) -> list[Path]:
    """bench_*.py files next to this script, optionally those whose name contains one of `only`."""
    files = sorted(HERE.glob("bench_*.py"))
    if only:
        files = [f for f in files if any(o in f.stem for o in only)]
    return files


def load(file: Path):
    """Import a benchmark module from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lnfree_benchmarks.{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{file.name} has no run(quick) function")
    return module


def machine() -> dict:
    """Where the numbers were measured: CPU count and model, load average, memory."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_default"] = torch.get_num_threads()
    return info


def direction(row: dict) -> str | None:
    """">=" (higher passes), "<=" (lower passes) or None (informational / unknown)."""
    if row.get("direction") in (">=", "<="):
        return row["direction"]
    unit = str(row.get("unit", ""))
    if ">=" in unit or "faster" in unit:
        return ">="
    if "<=" in unit:
        return "<="
    m, t, ok = row.get("measured"), row.get("target"), row.get("pass")
    if isinstance(ok, bool) and _number(m) and _number(t) and (m >= t) != (m <= t):
        return ">=" if ok == (m >= t) else "<="
    return None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_one(file: Path, quick: bool) -> tuple[list[dict], str, float]:
    """(rows tagged with the script name, captured output, seconds)."""
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            rows = load(file).run(quick)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError(f"run() must return a list of dicts, got {type(rows).__name__}")
    except Exception as e:  # one broken benchmark must not hide the others
        traceback.print_exc(file=out)
        rows = [{"benchmark": f"{file.stem}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}",
                 "measured": None, "target": None, "unit": "", "pass": False}]
    seconds = time.perf_counter() - t0
    for row in rows:
        row.setdefault("script", file.name)
    return rows, out.getvalue(), seconds


def _fmt(x, width: int) -> str:
    if _number(x):
        return f"{x:>{width}.3g}"
    return f"{'-' if x is None else str(x):>{width}}"


def table(rows: list[dict]) -> str:
    """One plain-text table (also valid Markdown)."""
    header = ["benchmark", "measured", "unit", "target", "ratio", "need", "status"]
    body = []
    for r in rows:
        d = direction(r)
        ratio = r["measured"] / r["target"] if _number(r.get("measured")) and _number(r.get("target")) and r["target"] else None
        status = {True: "PASS", False: "FAIL", None: "info"}.get(r.get("pass"), str(r.get("pass")))
        body.append([str(r["benchmark"]), _fmt(r.get("measured"), 8), str(r.get("unit", "")), _fmt(r.get("target"), 6),
                     _fmt(ratio, 6), f"{d} 1" if d and ratio is not None else "-", status])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(b) for b in body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick settings")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only bench_*NAME*.py")
    parser.add_argument("--json", metavar="FILE", help="also write machine, rows and captured output here")
    parser.add_argument("--verbose", action="store_true", help="print each benchmark's own output")
    args = parser.parse_args(argv)

    files = discover(args.only)
    if not files:
        parser.error(f"no benchmarks match {args.only}")
    info = machine()
    all_rows, logs = [], {}
    started = time.perf_counter()
    for file in files:
        print(f"running {file.name}{' --quick' if args.quick else ''} ...", file=sys.stderr, flush=True)
        rows, log, seconds = run_one(file, args.quick)
        all_rows += rows
        logs[file.name] = {"seconds": round(seconds, 1), "output": log}
        print(f"  done in {seconds:.0f} s", file=sys.stderr, flush=True)
        if args.verbose:
            print(f"---- {file.name} ({seconds:.0f} s)\n{log.rstrip()}\n")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    total = time.perf_counter() - started
    mode = "quick" if args.quick else "full"
    print(f"lnfree benchmarks ({mode}), {total:.0f} s: {info['nproc']} x {info['cpu']}, "
          f"load average {info.get('loadavg')} at start, {info.get('loadavg_end')} at end")
    print(table(all_rows))
    failed = [r for r in all_rows if r.get("pass") is False]
    print(f"{sum(r.get('pass') is True for r in all_rows)} pass, {len(failed)} fail, "
          f"{sum(r.get('pass') is None for r in all_rows)} informational")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "machine": info, "seconds": round(total, 1),
                                               "rows": all_rows, "logs": logs}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
