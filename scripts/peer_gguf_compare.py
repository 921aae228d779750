#!/usr/bin/env python3
"""Benchmark (not a test): our GGUF exports against llama.cpp's own quantizer, measured by
llama.cpp itself (llama-cpp-python), with the perplexity protocol of docs/perplexity.md
(non-overlapping windows of --ctx tokens, no BOS, every token but each window's first scored).

Usage:
  scripts/peer_gguf_compare.py --f32 SMOL-F32.gguf --text crates/models/data/eval.txt \
      [--ctx 512] [--max-windows N] [--types q4_0,q4_1] [--ours LABEL=FILE ...] [--ours-ppl LABEL=PPL ...]
      [--ours-ppl-json LABEL=FILE ...] [--cache ROWS.jsonl] [--no-f32]

--f32 is an F32 GGUF written by our writer (`quantlab quantize --model smollm2 --method rtn
--format gguf:f32 --out F32.gguf`); for each of --types, llama.cpp's `llama_model_quantize`
writes its own file from it (no imatrix). Each --ours file (e.g. `gptq-q4_0=smol-gptq.gguf`)
is evaluated by llama.cpp; --ours-ppl gives our own perplexity of it (quantlab eval ppl) for
the table (--ours-ppl-json: the JSON that `quantlab eval ppl --json` printed). Prints a
Markdown table: label, type, size (bytes), bpw (file bits over the parameters of every
tensor), ppl ours, ppl llama.cpp; and one JSON line per row. When --ours labels end in
`-<type>` and llama.cpp's own file of that type is in the run (--types), a second table pairs
them by type: type, file bytes, bpw, ppl llama.cpp on ours, ppl ours, ppl llama.cpp on its own
file, and the relative difference.

--cache ROWS.jsonl keeps every measured row (appended) and reuses a row whose file path, size
and modification time are unchanged, so a long comparison can be assembled over several runs;
--no-f32 leaves the F32 file out of the measurements (its row is still taken from the cache).

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
    ap.add_argument("--ours-ppl-json", action="append", default=[])
    ap.add_argument("--cache", default=None, help="JSON lines of measured rows, reused and appended")
    ap.add_argument("--no-f32", action="store_true")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    ours_ppl = dict(x.split("=", 1) for x in a.ours_ppl)
    for x in a.ours_ppl_json:
        label, path = x.split("=", 1)
        with open(path, encoding="utf-8") as f:
            ours_ppl[label] = json.load(f)["ppl"]
    cache = {}
    if a.cache and os.path.exists(a.cache):
        with open(a.cache, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    cache[(r["path"], r["size"], r.get("mtime"), r["windows_asked"], a.ctx)] = r
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
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime, a.max_windows, a.ctx)
        if key in cache:
            row = dict(cache[key], label=label, type=ty)
        elif label == "f32 (ours)" and a.no_f32:
            continue
        else:
            ppl, nw, secs = llama_ppl(path, text, a.ctx, a.max_windows)
            row = {
                "label": label,
                "type": ty,
                "size": st.st_size,
                "mtime": st.st_mtime,
                "bpw": gguf_bpw(path),
                "ppl_llama_cpp": ppl,
                "windows": nw,
                "windows_asked": a.max_windows,
                "seconds": secs,
                "path": path,
            }
            if a.cache:
                with open(a.cache, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
        row["ppl_ours"] = float(ours_ppl[label]) if label in ours_ppl else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| file | type | size (bytes) | bpw | ppl ours | ppl llama.cpp |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        po = f"{r['ppl_ours']:.4f}" if r["ppl_ours"] is not None else "-"
        print(f"| {r['label']} | {r['type']} | {r['size']} | {r['bpw']:.3f} | {po} | {r['ppl_llama_cpp']:.4f} |")
    theirs = {r["type"]: r for r in rows if r["label"].startswith("llama.cpp ")}
    pairs = [(r, theirs[r["type"]]) for r in rows
             if not r["label"].startswith("llama.cpp ") and r["label"] != "f32 (ours)" and r["type"] in theirs]
    if pairs:
        print()
        print("| type | ours: file bytes | bpw | ppl llama.cpp on ours | ppl ours | llama.cpp's own: file bytes | bpw | ppl llama.cpp | ours vs llama.cpp's own |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for o, t in pairs:
            po = f"{o['ppl_ours']:.3f}" if o["ppl_ours"] is not None else "-"
            d = 100.0 * (o["ppl_llama_cpp"] / t["ppl_llama_cpp"] - 1.0)
            print(f"| {o['type']} | {o['size']:,} | {o['bpw']:.3f} | {o['ppl_llama_cpp']:.3f} | {po} | "
                  f"{t['size']:,} | {t['bpw']:.3f} | {t['ppl_llama_cpp']:.3f} | {d:+.1f}% |")


if __name__ == "__main__":
    main()
