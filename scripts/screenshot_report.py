"""Screenshot of a report for the README / docs: ``docs/img/report.png``.

    lnfree demo --out out/demo
    python scripts/screenshot_report.py out/demo/report.html --out docs/img/report.png
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the chromium driver is test tooling
from _browser import read_png, render  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", help="the report (HTML file)")
    p.add_argument("--out", default="docs/img/report.png")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=2300)
    args = p.parse_args(argv)
    dom, png = render(args.html, args.out, width=args.width, height=args.height)
    if 'class="main-svg"' not in dom:
        print("error: plotly drew no figure", file=sys.stderr)
        return 1
    px = read_png(png)
    print(f"wrote {png} ({png.stat().st_size} bytes, {px.shape[1]}x{px.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
