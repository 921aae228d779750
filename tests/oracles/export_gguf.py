#!/usr/bin/env python3
"""Reads a GGUF file we wrote with the `gguf` package's GGUFReader (trusted files only) and
dequantizes every tensor with `gguf.quants.dequantize`.

Usage: export_gguf.py FILE.gguf OUT.safetensors

Prints JSON: {"version", "alignment", "data_offset", "fields": {key: value (strings, numbers,
short arrays in full, long arrays as {"len", "first", "last"})}, "tensors": [{"name", "type",
"shape" (ne order), "offset"}]}. OUT receives every tensor dequantized to float32, shaped
as the reader gives it (numpy order, outermost first).
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGUFValueType as V
from safetensors.numpy import save_file

r = gguf.GGUFReader(sys.argv[1])
fields = {}
for name, f in r.fields.items():
    if name.startswith("GGUF."):
        continue
    v = f.contents()
    if isinstance(v, list) and len(v) > 8:
        v = {"len": len(v), "first": v[0], "last": v[-1]}
    fields[name] = v
tensors = []
out = {}
for t in r.tensors:
    tensors.append({
        "name": t.name,
        "type": t.tensor_type.name,
        "shape": [int(x) for x in t.shape],
        "offset": int(t.data_offset),
    })
    out[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
save_file(out, sys.argv[2])
print(json.dumps({
    "version": int(r.fields["GGUF.version"].contents()),
    "alignment": int(r.alignment),
    "data_offset": int(r.data_offset),
    "fields": fields,
    "tensors": tensors,
}))
