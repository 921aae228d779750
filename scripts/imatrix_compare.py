#!/usr/bin/env python3
"""Compares two importance matrices in llama.cpp's GGUF layout with the `gguf` package's own
reader (a benchmark / cross-check, not a test): for every entry both hold, the importance
`in_sum2 / counts` per input column, and prints JSON with the entries in each, the tokens
(counts) of each, and the relative difference per entry (median and max over entries of
||a - b|| / ||b||) plus the Pearson correlation of log-importance over all columns.

    scripts/imatrix_compare.py OURS.imatrix LLAMA.imatrix
"""
import json
import sys

import numpy as np
import gguf


def load(path):
    r = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float64).reshape(-1)
    meta = {k: r.fields[k].contents() for k in r.fields if k.startswith("imatrix.") or k == "general.type"}
    imp = {}
    for k, s in sums.items():
        c = counts[k]
        imp[k] = (s.reshape(len(c), -1) / np.maximum(c, 1)[:, None]).reshape(-1)
    return imp, counts, meta


a, ca, ma = load(sys.argv[1])
b, cb, mb = load(sys.argv[2])
common = sorted(set(a) & set(b))
rel = [float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in common]
la = np.concatenate([np.log(a[k] + 1e-12) for k in common])
lb = np.concatenate([np.log(b[k] + 1e-12) for k in common])
worst = common[int(np.argmax(rel))] if rel else None
print(json.dumps({
    "entries": [len(a), len(b)],
    "common": len(common),
    "only_first": sorted(set(a) - set(b))[:5],
    "only_second": sorted(set(b) - set(a))[:5],
    "tokens": [float(next(iter(ca.values()))[0]), float(next(iter(cb.values()))[0])],
    "meta": [{k: str(v) for k, v in ma.items()}, {k: str(v) for k, v in mb.items()}],
    "rel_diff_median": float(np.median(rel)) if rel else None,
    "rel_diff_max": max(rel) if rel else None,
    "rel_diff_max_entry": worst,
    "log_importance_correlation": float(np.corrcoef(la, lb)[0, 1]) if rel else None,
}, indent=1))
