#!/usr/bin/env python3
"""Independent GPTQ / AWQ unpacker, written from docs/formats.md (shares no code with the
Rust packers in crates/checkpoints/src/pack/).

Usage: pack_gptq_awq.py IN.safetensors OUT.safetensors

IN holds, for every case `c` listed in the JSON metadata entry "cases"
({"c": {"kind": "gptq" | "awq", "format": "v1" | "v2"}, ...}), the tensors
`c.qweight`, `c.qzeros`, `c.scales` (and `c.g_idx` for GPTQ). OUT receives `c.W`, the
dequantized weight as the loaders define it, float32 [in, out]:

* GPTQ v1: W[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1)); v2: no +1.
* AWQ:     W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n].

Exit status 0 on success; anything else is a failure the Rust test reports.
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file, save_file
from safetensors import safe_open


def gptq_unpack_rows(packed, bits, n_values):
    """Unpack along axis 0 of a uint32 array: the formats.md word layout, LSB first."""
    packed = packed.astype(np.uint32)
    cols = packed.shape[1]
    out = np.zeros((n_values, cols), dtype=np.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        mask = np.uint32((1 << bits) - 1)
        for r in range(packed.shape[0]):
            for i in range(per):
                out[r * per + i] = (packed[r] >> np.uint32(bits * i)) & mask
        return out
    assert bits == 3
    m7 = np.uint32(7)
    for t in range(packed.shape[0] // 3):
        w0, w1, w2 = packed[3 * t], packed[3 * t + 1], packed[3 * t + 2]
        base = 32 * t
        # Word0: values 0..9 at bit 3k, low 2 bits of value 10 at bits 30..31.
        for k in range(10):
            out[base + k] = (w0 >> np.uint32(3 * k)) & m7
        v10 = ((w0 >> np.uint32(30)) & np.uint32(3)) | ((w1 & np.uint32(1)) << np.uint32(2))
        out[base + 10] = v10
        # Word1: bit 2 of value 10 at bit 0, values 11..20 at bit 3k+1, bit 0 of value 21 at 31.
        for k in range(10):
            out[base + 11 + k] = (w1 >> np.uint32(3 * k + 1)) & m7
        v21 = ((w1 >> np.uint32(31)) & np.uint32(1)) | ((w2 & np.uint32(3)) << np.uint32(1))
        out[base + 21] = v21
        # Word2: bits 1..2 of value 21 at bits 0..1, values 22..31 at bit 3k+2.
        for k in range(10):
            out[base + 22 + k] = (w2 >> np.uint32(3 * k + 2)) & m7
    return out


def gptq_dequant(t, fmt):
    qweight = t["qweight"].view(np.uint32)
    qzeros = t["qzeros"].view(np.uint32)
    scales = t["scales"].astype(np.float32)
    g_idx = t["g_idx"].astype(np.int64)
    n_in = g_idx.shape[0]
    n_out = qweight.shape[1]
    bits = qweight.shape[0] * 32 // n_in
    assert qweight.shape[0] * 32 == n_in * bits, "qweight rows"
    q = gptq_unpack_rows(qweight, bits, n_in)  # [in, out]
    # qzeros is packed along the output dimension: unpack its transpose.
    z = gptq_unpack_rows(qzeros.T.copy(), bits, n_out).T  # [G, out]
    if fmt == "v1":
        z = z + 1
    zk = z[g_idx, :]  # [in, out]
    sk = scales[g_idx, :]
    return (sk * (q - zk).astype(np.float32)).astype(np.float32)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column 8c + AWQ_ORDER[i]


def awq_unpack(packed):
    packed = packed.view(np.uint32)
    rows, words = packed.shape
    out = np.zeros((rows, words * 8), dtype=np.int64)
    for i in range(8):
        nib = (packed >> np.uint32(4 * i)) & np.uint32(0xF)
        out[:, AWQ_ORDER[i]::8] = nib
    return out


def awq_dequant(t):
    q = awq_unpack(t["qweight"])  # [in, out]
    z = awq_unpack(t["qzeros"])  # [in/g, out]
    s = t["scales"].astype(np.float32)
    g = q.shape[0] // s.shape[0]
    gk = np.arange(q.shape[0]) // g
    return ((q - z[gk, :]).astype(np.float32) * s[gk, :]).astype(np.float32)


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with safe_open(src, framework="np") as f:
        cases = json.loads(f.metadata()["cases"])
    tensors = load_file(src)
    out = {}
    for name, spec in cases.items():
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
        if spec["kind"] == "gptq":
            out[name + ".W"] = gptq_dequant(t, spec["format"])
        else:
            out[name + ".W"] = awq_dequant(t)
    save_file(out, dst)


if __name__ == "__main__":
    main()
