"""Griffe extension for the docs build: lnfree's docstrings title their doctest section "Example:";
Google style (as griffe parses it) only knows "Examples:". Rename it so the doctest renders as code."""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        doc = getattr(obj, "docstring", None)
        if doc is not None and "Example:" in doc.value:
            doc.value = _EXAMPLE.sub(r"\1Examples:", doc.value)
