#!/usr/bin/env python3
"""Peer check of our GGUF blocks with the `gguf` Python package (gguf.quants).

Usage: pack_gguf.py IN.safetensors OUT.safetensors

IN holds, for every case `c` listed in the JSON metadata entry "cases" ({"c": "Q4_K", ...}):
`c.x` (float32 [rows, cols], the input we quantized) and `c.bytes` (uint8 [rows, row_bytes],
our blocks). OUT receives `c.deq` = gguf.quants.dequantize(c.bytes, type) (float32
[rows, cols]) and, where gguf.quants can quantize the type, `c.ref` =
gguf.quants.quantize(c.x, type) (uint8 [rows, row_bytes]).
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with safe_open(src, framework="np") as f:
        cases = json.loads(f.metadata()["cases"])
    t = load_file(src)
    out = {}
    for name, tname in cases.items():
        qtype = GGMLQuantizationType[tname]
        data = t[name + ".bytes"]
        out[name + ".deq"] = np.ascontiguousarray(quants.dequantize(data, qtype), dtype=np.float32)
        try:
            ref = quants.quantize(t[name + ".x"], qtype)
        except NotImplementedError:
            continue
        out[name + ".ref"] = np.ascontiguousarray(ref, dtype=np.uint8)
    save_file(out, dst)


if __name__ == "__main__":
    main()
