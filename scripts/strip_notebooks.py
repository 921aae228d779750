#!/usr/bin/env python3
"""Strip outputs from notebooks before they are committed.

Usage: scripts/strip_notebooks.py [--check] [NOTEBOOK.ipynb ...]

With no notebook named, works on every notebooks/*.ipynb. Removes every code cell's outputs
and execution count, the per-cell execution timing metadata, and the notebook-level
`widgets` metadata; keeps sources, tags and the kernel spec. Writes a file only when it
changes. With --check, writes nothing and exits 1 if any notebook would change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent


def strip(nb) -> None:
    for cell in nb.cells:
        md = cell.get("metadata", {})
        for key in ("execution", "collapsed", "scrolled", "ExecuteTime"):
            md.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report, do not write")
    ap.add_argument("notebooks", nargs="*", type=Path)
    args = ap.parse_args()
    paths = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    dirty = []
    for p in paths:
        before = p.read_text(encoding="utf-8")
        nb = nbformat.reads(before, as_version=4)
        strip(nb)
        after = nbformat.writes(nb) + "\n"
        if after != before:
            dirty.append(p)
            if not args.check:
                p.write_text(after, encoding="utf-8")
    verb = "would change" if args.check else "stripped"
    for p in dirty:
        print(f"{verb}: {p}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
