"""Writes GGUF test files with the `gguf` package and prints, as JSON, what was written
(the values handed to GGUFWriter) and what GGUFReader reads back (offsets, shapes).

Usage: python3 gguf_write.py OUT_DIR      (never point GGUFReader at hostile files)
"""
import json
import math
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V


def f32_bits(x):
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def f64_bits(x):
    return int(np.array([x], dtype=np.float64).view(np.uint64)[0])


# (key, value type, value, array element type); values are written as given.
KVS = [
    ("test.u8", V.UINT8, 200, None),
    ("test.i8", V.INT8, -100, None),
    ("test.u16", V.UINT16, 60000, None),
    ("test.i16", V.INT16, -30000, None),
    ("test.u32", V.UINT32, 4000000000, None),
    ("test.i32", V.INT32, -2000000000, None),
    ("test.f32", V.FLOAT32, 0.1, None),
    ("test.bool_t", V.BOOL, True, None),
    ("test.bool_f", V.BOOL, False, None),
    ("test.string", V.STRING, "h\u00e9llo w\u00f6rld \u2603", None),
    ("test.u64", V.UINT64, 2**63 + 5, None),
    ("test.i64", V.INT64, -(2**62) - 3, None),
    ("test.f64", V.FLOAT64, math.pi, None),
    ("test.arr_u8", V.ARRAY, [1, 2, 255], V.UINT8),
    ("test.arr_i8", V.ARRAY, [-128, 0, 127], V.INT8),
    ("test.arr_u16", V.ARRAY, [0, 65535], V.UINT16),
    ("test.arr_i16", V.ARRAY, [-32768, 32767, 5], V.INT16),
    ("test.arr_u32", V.ARRAY, [7, 4294967295], V.UINT32),
    ("test.arr_i32", V.ARRAY, [-1, 2, -3, 4], V.INT32),
    ("test.arr_f32", V.ARRAY, [0.5, -1.25, 3.0e-8, 1.0e30], V.FLOAT32),
    ("test.arr_bool", V.ARRAY, [True, False, True], V.BOOL),
    ("test.arr_string", V.ARRAY, ["a", "bc", "", "\u00fc\u00df"], V.STRING),
    ("test.arr_u64", V.ARRAY, [0, 2**64 - 1], V.UINT64),
    ("test.arr_i64", V.ARRAY, [-(2**63), 2**63 - 1], V.INT64),
    ("test.arr_f64", V.ARRAY, [math.e, -0.0, 1e-300], V.FLOAT64),
    ("test.arr_nested", V.ARRAY, [[1, 2], [3], [4, 5, 6]], None),
]

TYPE_NAMES = {
    V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32",
    V.INT32: "i32", V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string", V.ARRAY: "array",
    V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64",
}


def encode(value, vtype):
    """Exact JSON form: floats as bit patterns, arrays as lists."""
    if vtype == V.FLOAT32:
        return {"bits": f32_bits(value)}
    if vtype == V.FLOAT64:
        return {"bits": f64_bits(value)}
    return value


def kv_json(key, vtype, value, sub):
    if vtype != V.ARRAY:
        return {"key": key, "type": TYPE_NAMES[vtype], "value": encode(value, vtype)}
    if sub is None:  # nested: the writer infers int -> INT32 for the inner elements
        inner = V.ARRAY
        elems = [{"type": "i32", "values": v} for v in value]
    else:
        inner = sub
        elems = [encode(v, sub) for v in value]
    return {"key": key, "type": "array", "element_type": TYPE_NAMES[inner], "value": elems}


def write(path, alignment):
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(path, arch="quantlabtest")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    expected_kv = [{"key": "general.architecture", "type": "string", "value": "quantlabtest"}]
    if alignment is not None:
        expected_kv.append({"key": "general.alignment", "type": "u32", "value": alignment})
    for key, vtype, value, sub in KVS:
        w.add_key_value(key, value, vtype, sub_type=sub)
        expected_kv.append(kv_json(key, vtype, value, sub))

    tensors = []  # name, ggml type name, numpy (row-major) shape
    def add(name, arr, qtype=None):
        if qtype is None:
            w.add_tensor(name, arr)
            tensors.append((name, {np.float32: "F32", np.float16: "F16", np.int32: "I32"}[arr.dtype.type], list(arr.shape)))
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            tensors.append((name, qtype.name, list(arr.shape)))

    add("t.f32", rng.standard_normal((3, 64)).astype(np.float32))
    add("t.f16", rng.standard_normal((2, 32)).astype(np.float16))
    add("t.bias", rng.standard_normal(7).astype(np.float32))
    add("t.i32", np.arange(24, dtype=np.int32).reshape(2, 3, 4))
    quantized = []
    for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16):
        try:
            add("t." + q.name.lower(), rng.standard_normal((4, 64)).astype(np.float32), q)
            quantized.append(q.name)
        except NotImplementedError:
            pass

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    r = gguf.GGUFReader(path)
    read_tensors = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "type_id": int(t.tensor_type),
            "shape": [int(x) for x in t.shape],
            "n_elements": int(t.n_elements),
            "n_bytes": int(t.n_bytes),
            "data_offset": int(t.data_offset),
        }
        for t in r.tensors
    ]
    return {
        "path": path,
        "kv": expected_kv,
        "reader_keys": [k for k in r.fields if not k.startswith("GGUF.")],
        "written_tensors": [{"name": n, "type": t, "np_shape": s} for n, t, s in tensors],
        "reader_tensors": read_tensors,
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "file_size": os.path.getsize(path),
        "quantized": quantized,
    }


def main():
    out = sys.argv[1]
    files = [write(os.path.join(out, "default.gguf"), None), write(os.path.join(out, "align64.gguf"), 64)]
    sizes = {t.name: list(v) for t, v in gguf.GGML_QUANT_SIZES.items()}
    ids = {t.name: int(t) for t in gguf.GGMLQuantizationType}
    print(json.dumps({"gguf_version": gguf.__version__ if hasattr(gguf, "__version__") else "?",
                      "files": files, "quant_sizes": sizes, "type_ids": ids}))


if __name__ == "__main__":
    main()
