#!/usr/bin/env python3
"""Quantize SmolLM2 under several methods and print a Markdown table of the results.

A benchmark, not a test: it runs `quantlab quantize ... --json --eval TEXT` once per
configuration and tabulates bits per weight, size, perplexity before/after, the KL divergence against the
full-precision model (mean, its standard error, top-1 agreement), the mean relative
output error of the linears and the time split (forward / Hessian / solver / AWQ search).

    scripts/accuracy_table.py                       # the default grid (RTN/GPTQ/AWQ/AWQ+GPTQ x 4/3 bits, g128)
    scripts/accuracy_table.py --methods rtn gptq --bits 4 --group-size 128 --max-windows 8
    scripts/accuracy_table.py --json results.json   # also keep the raw reports

Needs the release CLI (`cargo build --release -p quantlab-cli`) and the cached model
(`quantlab fetch smollm2`). Every run uses the same calibration draw (--seed) and the same
evaluation windows, so the rows are comparable.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantlab", default=os.path.join(ROOT, "target", "release", "quantlab"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq", "awq+gptq"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--eval", default=os.path.join(ROOT, "crates", "models", "data", "eval.txt"))
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="first N eval windows (default: all)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--extra", nargs="*", default=[], help="extra arguments for every run")
    ap.add_argument("--json", help="write the raw reports here")
    a = ap.parse_args()

    if not os.path.exists(a.quantlab):
        print(f"{a.quantlab} not found: cargo build --release -p quantlab-cli", file=sys.stderr)
        return 2
    rows = []
    reports = []
    work = tempfile.mkdtemp(prefix="quantlab-table-")
    for bits in a.bits:
        for m in a.methods:
            cmd = [a.quantlab, "quantize", "--model", a.model, "--method", m, "--bits", str(bits),
                   "--group-size", str(a.group_size), "--nsamples", str(a.nsamples),
                   "--seqlen", str(a.seqlen), "--eval", a.eval, "--eval-ctx", str(a.eval_ctx),
                   "--json", "--out", os.path.join(work, f"{m}-{bits}"), *a.extra]
            if a.max_windows:
                cmd += ["--max-windows", str(a.max_windows)]
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.time() - t0
            if p.returncode != 0:
                print(f"FAILED: {' '.join(cmd)}\n{p.stderr}", file=sys.stderr)
                return 1
            shutil.rmtree(os.path.join(work, f"{m}-{bits}"), ignore_errors=True)
            r = json.loads(p.stdout)
            reports.append(r)
            t = r["timings"]
            k = r.get("kld") or {}
            rows.append((m, bits, r["group_size"], r["bits_per_weight"], r["size_bytes"] / 1e6,
                         r.get("ppl_before"), r.get("ppl_after"), k.get("kld_mean", float("nan")),
                         k.get("kld_err", float("nan")), 100 * k.get("top1_agreement", float("nan")),
                         r["mean_rel_output_error"],
                         r["seconds"], t["forward"], t["hessian"], t["solver"], t["awq_search"], wall))
            print(f"done {m} {bits}-bit in {wall:.0f} s: ppl {r.get('ppl_after')}", file=sys.stderr)
    print(f"model {a.model}; eval {os.path.relpath(a.eval, ROOT)}, ctx {a.eval_ctx}, "
          f"windows {reports[0].get('eval', {}).get('windows')}; calibration {a.nsamples} x {a.seqlen} tokens\n")
    print("| method | bits | group | bpw | size MB | ppl fp | ppl q | mean KLD | ± | top-1 % | mean rel err | quantize s | forward s | hessian s | solver s | awq search s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {} | {:.3f} | {:.1f} | {:.3f} | {:.3f} | {:.4f} | {:.4f} | {:.1f} | {:.4f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |".format(*r))
    shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
