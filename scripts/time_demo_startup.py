"""Time `lnfree demo`'s start-up (imports, the three zoo models, data) in the scenarios of docs/report.md#timing.

    python scripts/time_demo_startup.py            # the four scenarios, in subprocesses (CPU s and wall s)
    python scripts/time_demo_startup.py --phase    # one measurement in this interpreter

Scenarios: no bytecode anywhere (an empty PYTHONPYCACHEPREFIX) with the page cache of the venv dropped
(posix_fadvise DONTNEED), the same again, the venv's own bytecode with the page cache dropped, warm.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def phase() -> str:
    t0, c0 = time.perf_counter(), _cpu()
    import torch  # noqa: F401
    import transformer_lens  # noqa: F401
    t1, c1 = time.perf_counter(), _cpu()
    from lnfree.cli import build_parser

    build_parser()
    import lnfree.report.pipeline  # noqa: F401
    t2, c2 = time.perf_counter(), _cpu()
    from lnfree import zoo

    [zoo.load(n, device="cpu") for n in ("tiny-ln", "tiny-lnfree", "tiny-vanilla")]
    [zoo.heldout(n) for n in zoo.info()["heldout"]]
    t3, c3 = time.perf_counter(), _cpu()
    return (f"torch+TL import {t1 - t0:.1f}s wall/{c1 - c0:.1f}s cpu | lnfree+report {t2 - t1:.1f}/{c2 - c1:.1f} | "
            f"zoo models+data {t3 - t2:.1f}/{c3 - c2:.1f} | total {t3 - t0:.1f}/{c3 - c0:.1f}")


def drop_page_cache(*roots) -> None:
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                try:
                    fd = os.open(os.path.join(d, f), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def run(label: str, **env) -> None:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    e.update(env, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, __file__, "--phase"], env=e, capture_output=True, text=True)
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"{label}: {p.stdout.strip() or p.stderr[-500:]} (load {load})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", action="store_true")
    args = p.parse_args(argv)
    if args.phase:
        print(phase())
        return 0
    venv = Path(sys.prefix)
    with tempfile.TemporaryDirectory() as pyc:
        drop_page_cache(venv, ROOT / "src")
        run("no bytecode, page cache dropped", PYTHONPYCACHEPREFIX=pyc)
        run("no bytecode, second run", PYTHONPYCACHEPREFIX=pyc)
    drop_page_cache(venv, ROOT / "src")
    run("venv bytecode, page cache dropped")
    run("warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
