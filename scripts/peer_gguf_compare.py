#!/usr/bin/env python3
"""Benchmark (not a test): our GGUF exports against llama.cpp's own quantizer, measured by
llama.cpp itself (llama-cpp-python), with the perplexity protocol of docs/perplexity.md
(non-overlapping windows of --ctx tokens, no BOS, every token but each window's first scored).

Usage:
  scripts/peer_gguf_compare.py --f32 SMOL-F32.gguf --text crates/models/data/eval.txt \
      [--ctx 512] [--max-windows N] [--types q4_0,q4_1] [--ours LABEL=FILE ...] [--ours-ppl LABEL=PPL ...]

--f32 is an F32 GGUF written by our writer (`quantlab quantize --model smollm2 --method rtn
--format gguf:f32 --out F32.gguf`); for each of --types, llama.cpp's `llama_model_quantize`
writes its own file from it (no imatrix). Each --ours file (e.g. `gptq-q4_0=smol-gptq.gguf`)
is evaluated by llama.cpp; --ours-ppl gives our own perplexity of it (quantlab eval ppl) for
the table. Prints a Markdown table: label, type, size (bytes), bpw (file bits over the
parameters of every tensor), ppl ours, ppl llama.cpp; and one JSON line per row.

Build llama-cpp-python with AMX off on machines with AMX (../shared/docs/environment.md).
"""
import argparse
import ctypes
import json
import math
import os
import sys
import tempfile
import time

import numpy as np


def ftype_of(name):
    import llama_cpp

    table = {
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
        "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
        "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
        "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
        "q3_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
        "q4_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
        "q5_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    }
    return table[name]


def llama_quantize(src, dst, ftype):
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}) failed: {rc}")


def gguf_bpw(path):
    """File bits over the parameter count of every tensor (gguf package)."""
    import gguf

    r = gguf.GGUFReader(path)
    n = sum(int(np.prod(t.shape)) for t in r.tensors)
    return 8.0 * os.path.getsize(path) / n


def llama_ppl(path, text, ctx, max_windows):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=ctx, logits_all=True, n_threads=2, verbose=False)
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)
    nw = len(toks) // ctx
    if max_windows:
        nw = min(nw, max_windows)
    nll, n = 0.0, 0
    t0 = time.time()
    for w in range(nw):
        win = toks[w * ctx:(w + 1) * ctx]
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:ctx], dtype=np.float64)
        for i in range(1, ctx):
            row = logits[i - 1]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll += lse - row[win[i]]
            n += 1
    return math.exp(nll / n), nw, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--types", default="q4_0")
    ap.add_argument("--ours", action="append", default=[])
    ap.add_argument("--ours-ppl", action="append", default=[])
    ap.add_argument("--keep", default=None, help="directory for llama.cpp's files")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    ours_ppl = dict(x.split("=", 1) for x in a.ours_ppl)
    rows = []
    work = a.keep or tempfile.mkdtemp(prefix="peer-gguf-")
    os.makedirs(work, exist_ok=True)
    files = [("f32 (ours)", "f32", a.f32)]
    for t in [t for t in a.types.split(",") if t]:
        dst = os.path.join(work, f"llamacpp-{t}.gguf")
        if not os.path.exists(dst):
            llama_quantize(a.f32, dst, ftype_of(t))
        files.append((f"llama.cpp {t}", t, dst))
    for x in a.ours:
        label, path = x.split("=", 1)
        files.append((label, label.rsplit("-", 1)[-1], path))
    for label, ty, path in files:
        ppl, nw, secs = llama_ppl(path, text, a.ctx, a.max_windows)
        row = {
            "label": label,
            "type": ty,
            "size": os.path.getsize(path),
            "bpw": gguf_bpw(path),
            "ppl_ours": float(ours_ppl[label]) if label in ours_ppl else None,
            "ppl_llama_cpp": ppl,
            "windows": nw,
            "seconds": secs,
            "path": path,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| file | type | size (bytes) | bpw | ppl ours | ppl llama.cpp |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        po = f"{r['ppl_ours']:.4f}" if r["ppl_ours"] is not None else "-"
        print(f"| {r['label']} | {r['type']} | {r['size']} | {r['bpw']:.3f} | {po} | {r['ppl_llama_cpp']:.4f} |")


if __name__ == "__main__":
    main()
