#!/usr/bin/env python3
"""Execute quantlab's notebooks headless, top to bottom, with the evcxr Rust kernel.

Usage: scripts/run_notebooks.py [NOTEBOOK.ipynb ...] [--out DIR] [--timeout S]

With no notebook named, runs every notebooks/*.ipynb in name order. For each notebook:

* checks the committed file carries no outputs (run scripts/strip_notebooks.py otherwise);
* executes it with nbclient, kernel "rust", the notebook's folder as working directory (so
  `:dep quantlab = { path = "../crates/quantlab" }` resolves), a generous per-cell timeout;
* fails on the first cell error (exit status 1), printing the cell and the error, and on a
  cell whose output reports a Rust panic (evcxr catches a panicking cell, e.g. a failed
  `assert!`, prints it and runs on without an error the executor could see);
* checks that every cell tagged `figure` produced a rich output (image/*, image/svg+xml or
  text/html), and that a notebook whose code calls a plot or report helper produced at least
  one such output;
* prints the notebook's wall time and its slowest cells.

The kernel builds in a persistent folder, ~/.cache/quantlab/evcxr/<checkout> (override with
QUANTLAB_EVCXR_DIR), so the second notebook and the next run reuse compiled crates; cells are
compiled at opt-level 0 and dependencies at 2 (see prepare_evcxr_env and docs/notebooks.md).
Executed copies (with outputs) go to --out (default target/notebooks-executed), never back
into notebooks/.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

REPO = Path(__file__).resolve().parent.parent
RICH = ("text/html", "image/svg+xml", "image/png", "image/jpeg")
# Code that promises a figure or an HTML table when it ends a cell.
PLOT_CALLS = ("plots::", "evcxr_figure", "Table::new")


# evcxr compiles each cell, and every `:dep` crate, in one cargo project whose generated
# Cargo.toml has `[profile.dev] opt-level = <:opt level>` (evcxr's default 2) for the whole
# graph; our workspace profiles do not apply there. The runner compiles the cells at
# CELL_OPT (they are glue: a few loops over small arrays) and every dependency -- quantlab,
# its crates, ndarray, plotters, candle... -- at DEPS_OPT, through a cargo config file in a
# parent folder of the build folder (`[profile.dev.package."*"]` overrides the generated
# profile for all non-member packages). Measured on notebook 01 (docs/notebooks.md): the
# cached run takes about 20% less time than with evcxr's default, numerics unchanged.
CELL_OPT = "0"
DEPS_OPT = "2"
PROC_MACRO_CRATES = ("proc-macro2", "quote", "syn", "unicode-ident", "serde_derive",
                     "thiserror-impl", "zerocopy-derive")


def evcxr_root() -> Path:
    """The persistent folder for evcxr: QUANTLAB_EVCXR_DIR, or ~/.cache/quantlab/evcxr/shared.

    It must lie outside the repository: inside it, cargo would take the workspace's
    Cargo.toml for the evcxr crate's workspace root and refuse to load it. One folder for
    every checkout, so a fresh clone (CI) reuses the compiled registry crates (candle,
    tokenizers, faer, plotters: minutes of compilation on 2 cores) and rebuilds only the
    workspace's own crates; runs from two checkouts take turns on a lock (see main).
    """
    if os.environ.get("QUANTLAB_EVCXR_DIR"):
        return Path(os.environ["QUANTLAB_EVCXR_DIR"]).resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "quantlab" / "evcxr" / "shared"


def prepare_evcxr_env() -> Path:
    """Lay out the evcxr folder and set the kernel's environment; returns the folder.

    root/work                 EVCXR_TMPDIR: evcxr's cargo project and target dir (kept)
    root/config/evcxr.toml    EVCXR_CONFIG_DIR: opt_level for the cells
    root/.cargo/config.toml   opt-level for every dependency
    """
    root = evcxr_root()
    work, config = root / "work", root / "config"
    for d in (work, config, root / ".cargo"):
        d.mkdir(parents=True, exist_ok=True)
    (config / "evcxr.toml").write_text(
        "# written by scripts/run_notebooks.py\n"
        f'[evcxr]\nopt_level = "{CELL_OPT}"\n')
    # "*" also matches proc macros, which evcxr's default (the build-override profile)
    # compiles at opt-level 0; keep the common ones there, they only run at compile time.
    proc_macros = "".join(f'[profile.dev.package.{p}]\nopt-level = 0\n' for p in PROC_MACRO_CRATES)
    (root / ".cargo" / "config.toml").write_text(
        "# written by scripts/run_notebooks.py: dependencies of evcxr's cell crate\n"
        f'[profile.dev.package."*"]\nopt-level = {DEPS_OPT}\n' + proc_macros)
    os.environ["EVCXR_TMPDIR"] = str(work)
    os.environ["EVCXR_CONFIG_DIR"] = str(config)
    # evcxr loads each cell as a cdylib linked to the toolchain's libstd-*.so. rustc writes
    # its RUNPATH relative to target/.../deps/, but evcxr loads the copy one folder up, so
    # the path has one `..` too many: harmless when the build folder and the toolchain share
    # no parent (a /tmp folder), fatal ("dlopen failed") when both live under $HOME. Put the
    # toolchain's library folder on the loader path instead.
    libdir = subprocess.run(["rustc", "--print", "target-libdir"], cwd=work, check=True,
                            capture_output=True, text=True).stdout.strip()
    old = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = libdir + (f":{old}" if old else "")
    print(f"evcxr folder: {root} (cells at opt-level {CELL_OPT}, dependencies at {DEPS_OPT})",
          flush=True)
    return root


def committed_outputs(nb) -> list[str]:
    """Cells of a notebook that still carry outputs or execution counts."""
    bad = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            bad.append(f"cell {i}: {len(cell.outputs)} output(s)")
        elif cell.get("execution_count") is not None:
            bad.append(f"cell {i}: execution_count {cell.execution_count}")
    return bad


def rich_outputs(cell) -> int:
    return sum(
        1
        for o in cell.get("outputs", [])
        if o.get("output_type") in ("display_data", "execute_result")
        and any(m in o.get("data", {}) for m in RICH)
    )


def cell_seconds(cell) -> float | None:
    ex = cell.get("metadata", {}).get("execution", {})
    a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if not a or not b:
        return None
    from datetime import datetime

    def parse(s: str) -> datetime:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))

    return (parse(b) - parse(a)).total_seconds()


def panic_text(cell) -> str:
    """The stream output of a cell from the line that reports a Rust panic on, or ""."""
    text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream")
    at = text.find("panicked at")
    if at < 0:
        return ""
    start = text.rfind("\n", 0, at) + 1
    return text[start:start + 2000]


def first_line(cell) -> str:
    for line in cell.source.splitlines():
        if line.strip():
            return line.strip()[:60]
    return "(empty)"


def run_one(path: Path, out_dir: Path, timeout: int, startup_timeout: int) -> tuple[bool, float]:
    nb = nbformat.read(path, as_version=4)
    problems = committed_outputs(nb)
    if problems:
        print(f"FAIL {path.name}: committed with outputs ({'; '.join(problems[:5])}); "
              f"run scripts/strip_notebooks.py", flush=True)
        return False, 0.0
    client = NotebookClient(
        nb,
        timeout=timeout,
        startup_timeout=startup_timeout,
        kernel_name="rust",
        allow_errors=False,
        record_timing=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    print(f"---- {path.relative_to(REPO)}: executing {sum(c.cell_type == 'code' for c in nb.cells)} "
          f"code cells (per-cell timeout {timeout} s)", flush=True)
    t0 = time.monotonic()
    ok = True
    try:
        client.execute()
    except CellTimeoutError as e:
        ok = False
        print(f"FAIL {path.name}: a cell ran past {timeout} s\n{e}", flush=True)
    except CellExecutionError as e:
        ok = False
        print(f"FAIL {path.name}: a cell raised an error\n{e}", flush=True)
    except Exception as e:  # kernel died, could not start, ...
        ok = False
        print(f"FAIL {path.name}: {type(e).__name__}: {e}", flush=True)
    wall = time.monotonic() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)

    if ok:
        # evcxr catches a panic in a cell (a failed assert!, an unwrap on an error), prints it
        # to the cell's stderr and goes on to the next cell without reporting an error, so
        # the executor sees success: look for the panic message ourselves.
        panicked = [
            f"cell {i} ({first_line(c)!r}): "
            + " ".join([line.strip() for line in text.splitlines() if line.strip()][:2])
            for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for text in [panic_text(c)] if text
        ]
        if panicked:
            ok = False
            print(f"FAIL {path.name}: a cell panicked:\n  " + "\n  ".join(panicked), flush=True)
    if ok:
        # Output checks: tagged cells must show a figure/table, and a notebook that calls the
        # plot/report helpers must show at least one.
        missing = [
            f"cell {i} ({first_line(c)!r})"
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and "figure" in c.get("metadata", {}).get("tags", [])
            and rich_outputs(c) == 0
        ]
        if missing:
            ok = False
            print(f"FAIL {path.name}: cells tagged `figure` produced no image/SVG/HTML output: "
                  + ", ".join(missing), flush=True)
        promises = any(c.cell_type == "code" and any(p in c.source for p in PLOT_CALLS)
                       for c in nb.cells)
        total_rich = sum(rich_outputs(c) for c in nb.cells if c.cell_type == "code")
        if promises and total_rich == 0:
            ok = False
            print(f"FAIL {path.name}: calls plot/report helpers but produced no image/SVG/HTML "
                  f"output", flush=True)
        print(f"     {total_rich} rich output(s) (image/SVG/HTML)", flush=True)

    timed = [(cell_seconds(c), i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    timed = sorted(((s, i, c) for s, i, c in timed if s is not None), key=lambda t: -t[0])
    for s, i, c in timed[:3]:
        print(f"     slowest: cell {i:2d} {s:7.1f} s  {first_line(c)}", flush=True)
    print(f"{'ok  ' if ok else 'FAIL'} {path.name}: {wall:.1f} s wall", flush=True)
    return ok, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "target" / "notebooks-executed")
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("QUANTLAB_CELL_TIMEOUT", 1200)),
                    help="per-cell timeout in seconds (the first cell compiles the workspace)")
    ap.add_argument("--startup-timeout", type=int, default=180)
    args = ap.parse_args()

    paths = [p.resolve() for p in args.notebooks] or sorted((REPO / "notebooks").glob("*.ipynb"))
    if not paths:
        print("no notebooks found under notebooks/", file=sys.stderr)
        return 1

    root = prepare_evcxr_env()
    # one run at a time per evcxr folder: two checkouts would rewrite each other's sources
    lock = open(root / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    results = []
    for p in paths:
        results.append((p.name, *run_one(p, args.out, args.timeout, args.startup_timeout)))
    total = sum(w for _, _, w in results)
    failed = [n for n, ok, _ in results if not ok]
    print(f"notebooks: {len(results) - len(failed)} passed, {len(failed)} failed, "
          f"{total:.1f} s total" + (f" (failed: {', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
