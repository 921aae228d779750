#!/usr/bin/env python3
"""Independent reader of GPTQ / AWQ Hugging Face directories, written from
docs/formats.md with numpy and safetensors only (shares no code with crates/checkpoints).

Usage: export_hf.py DIR OUT.safetensors

Reads DIR/config.json's quantization_config, every *.safetensors shard (through
model.safetensors.index.json when present), and writes to OUT one float32 tensor
`<module>.weight` of shape [out, in] per quantized linear:

* GPTQ (`checkpoint_format` "gptq" = v1, "gptq_v2"):
  qweight int32 [in*b/32, out], packed along the input dim LSB first (3-bit: 32 values in
  three words as one 96-bit little-endian stream); qzeros int32 [G, out*b/32] packed the
  same way along the output dim; W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]),
  z = qzeros + 1 in v1, qzeros in v2.
* AWQ GEMM: qweight int32 [in, out/8], nibble i of word c holds column 8c + [0,2,4,6,1,3,5,7][i];
  qzeros the same; W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n].

Prints a JSON summary {"format": ..., "modules": [...]} on stdout.
"""
import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def load_dir(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    t = {}
    for f in files:
        # numpy has no bfloat16: read only the quantized tensors.
        with safe_open(os.path.join(d, f), framework="np") as h:
            for k in h.keys():
                if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"):
                    t[k] = h.get_tensor(k)
    return t


def unpack_stream(words, bits, n):
    """n values of `bits` bits from a 1-D uint32 word stream, value j at bit bits*j."""
    w = words.astype(np.uint64)
    vals = np.zeros(n, dtype=np.int64)
    for j in range(n):
        bit = bits * j
        i, s = bit // 32, bit % 32
        lo = int(w[i])
        hi = int(w[i + 1]) if i + 1 < len(w) else 0
        vals[j] = ((lo | (hi << 32)) >> s) & ((1 << bits) - 1)
    return vals


def gptq_codes_along_rows(packed, bits, n):
    packed = packed.view(np.uint32)
    return np.stack([unpack_stream(packed[:, c], bits, n) for c in range(packed.shape[1])], axis=1)


def main():
    d, out_path = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(d, "config.json")))
    qc = cfg["quantization_config"]
    t = load_dir(d)
    mods = sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight"))
    out = {}
    if qc["quant_method"] == "gptq":
        bits = qc["bits"]
        v1 = qc.get("checkpoint_format", "gptq") == "gptq"
        for m in mods:
            qw, qz = t[m + ".qweight"], t[m + ".qzeros"]
            s = t[m + ".scales"].astype(np.float32)
            g_idx = t[m + ".g_idx"].astype(np.int64)
            n_in, n_out = len(g_idx), qw.shape[1]
            q = gptq_codes_along_rows(qw, bits, n_in)  # [in, out]
            z = gptq_codes_along_rows(qz.T.copy(), bits, n_out).T  # [G, out]
            if v1:
                z = z + 1
            W = s[g_idx] * (q - z[g_idx]).astype(np.float32)
            out[m + ".weight"] = np.ascontiguousarray(W.T.astype(np.float32))
    elif qc["quant_method"] == "awq":
        order = [0, 2, 4, 6, 1, 3, 5, 7]

        def unpack(a):
            a = a.view(np.uint32)
            r = np.zeros((a.shape[0], a.shape[1] * 8), dtype=np.int64)
            for i in range(8):
                r[:, order[i]::8] = (a >> np.uint32(4 * i)) & np.uint32(15)
            return r

        for m in mods:
            q, z = unpack(t[m + ".qweight"]), unpack(t[m + ".qzeros"])
            s = t[m + ".scales"].astype(np.float32)
            g = q.shape[0] // s.shape[0]
            k = np.arange(q.shape[0]) // g
            W = (q - z[k]).astype(np.float32) * s[k]
            out[m + ".weight"] = np.ascontiguousarray(W.T.astype(np.float32))
    else:
        raise SystemExit("unsupported quant_method " + qc["quant_method"])
    save_file(out, out_path)
    print(json.dumps({"format": qc["quant_method"], "modules": mods}))


main()
