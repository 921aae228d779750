"""Lists a (trusted) GGUF file with the `gguf` package's GGUFReader, as JSON.

Usage: python3 gguf_read.py FILE.gguf      (never point GGUFReader at hostile files)
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGUFValueType as V

NAMES = {
    V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32",
    V.INT32: "i32", V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string", V.ARRAY: "array",
    V.UINT64: "u64", V.INT64: "i64", V.FLOAT64: "f64",
}

r = gguf.GGUFReader(sys.argv[1])
fields = []
for name, f in r.fields.items():
    if name.startswith("GGUF."):
        continue
    main = f.types[0]
    entry = {"key": name, "type": NAMES[main]}
    if main == V.ARRAY:
        entry["element_type"] = NAMES[f.types[1]]
        entry["len"] = len(f.data)
        if f.types[-1] == V.STRING:
            # A few elements to compare exactly (first, middle, last).
            items = f.contents()
            entry["samples"] = {str(i): items[i] for i in {0, len(items) // 2, len(items) - 1} if items}
    elif main == V.STRING:
        entry["value"] = f.contents()
    elif main in (V.FLOAT32, V.FLOAT64):
        entry["value"] = float(f.contents())
    else:
        entry["value"] = f.contents()
    fields.append(entry)

tensors = [
    {
        "name": t.name,
        "type": t.tensor_type.name,
        "shape": [int(x) for x in t.shape],
        "n_elements": int(t.n_elements),
        "n_bytes": int(t.n_bytes),
        "data_offset": int(t.data_offset),
    }
    for t in r.tensors
]
print(json.dumps({"alignment": int(r.alignment), "data_offset": int(r.data_offset),
                  "fields": fields, "tensors": tensors}))
