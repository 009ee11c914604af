"""The `lnfree` command. Each subcommand lives next to the code it drives and registers itself.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func=callable(args) -> int` as the default. Bad input raises `CLIError` (or ValueError /
TypeError / FileNotFoundError): the command prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Optional, Sequence

from lnfree._errors import CLIError  # noqa: F401  (defined below every layer; commands import it from there)

# module path of each subcommand group; a module that fails to import disables only itself
SUBCOMMAND_MODULES = [
    "lnfree.removal.cli",
    "lnfree.zoo.cli",
    "lnfree.report.cli",
    "lnfree.removal.costs_cli",
]


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"lnfree: warning: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    from lnfree import __version__

    parser = argparse.ArgumentParser(prog="lnfree", description="Transformers with and without LayerNorm.")
    parser.add_argument("--version", action="version", version=f"lnfree {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if name.startswith(e.name or "\0"):
                continue  # not written yet
            raise
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    args.argv = argv  # the command as given (remove-ln prints it back, with --resume, after Ctrl-C)
    shown, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"lnfree {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
