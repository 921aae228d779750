#!/usr/bin/env python3
"""bitsandbytes itself as the oracle for quantlab's bitsandbytes tensors (test helper).

    bnb_dequant.py dequant OUT_PREFIX IN.safetensors [IN ...]

        Every 4-bit weight in IN (a `P.weight.quant_state.bitsandbytes__nf4|fp4` key) is loaded
        the way transformers loads a pre-quantized bitsandbytes checkpoint:
        `bnb.nn.Params4bit.from_prequantized(P.weight, {P.weight.*})`, which rebuilds
        bitsandbytes' own `QuantState` through `QuantState.from_dict`, then dequantized with
        `bitsandbytes.functional.dequantize_4bit`. Every LLM.int8 weight (a `P.SCB` key) becomes
        an `Int8Params` with its `SCB` (as transformers' 8-bit loader sets them) and is
        dequantized with `bitsandbytes.functional.int8_vectorwise_dequant`.
        For the i-th IN (from 0), `OUT_PREFIX<i>.safetensors` gets each `P.weight` upcast to
        float32 (exact from float16 / bfloat16); stdout gets JSON {"torch", "bitsandbytes",
        "weights": [{P.weight: {"dtype", "shape"}} per IN]}.

    bnb_dequant.py quantize OUT.safetensors IN.safetensors

        IN holds float32 weights NAME `[out, in]`; its header metadata maps NAME to
        "nf4", "fp4", "nf4+dq", "fp4+dq" (bitsandbytes.functional.quantize_4bit, blocksize 64,
        compress_statistics for +dq) or "int8" (int8_vectorwise_quant). OUT gets what
        bitsandbytes serializes for that module (Linear4bit: `NAME.weight` plus
        `QuantState.as_dict(packed=True)` under `NAME.weight.`; Linear8bitLt: `NAME.weight`
        and `NAME.SCB`).

Shares no code with the Rust packers. Exits 3 (after a message on stderr) when torch or
bitsandbytes cannot be imported (the Rust test probes the imports first and prints SKIP).
"""

import json
import sys

try:
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import load_file, save_file
except Exception as e:  # noqa: BLE001 - any import failure means "no oracle here"
    print(f"bitsandbytes oracle unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)

QS = ".weight.quant_state.bitsandbytes__"


def dequant(out_prefix, in_paths):
    infos = []
    for i, path in enumerate(in_paths):
        out, info = {}, {}
        t = load_file(path)
        for key in sorted(t):
            if QS in key:
                p = key[: key.index(QS)]
                w = f"{p}.weight"
                stats = {k[len(p) + 1 :]: v for k, v in t.items() if k.startswith(w + ".")}
                param = bnb.nn.Params4bit.from_prequantized(
                    data=t[w], quantized_stats=stats, requires_grad=False, device="cpu"
                )
                y = F.dequantize_4bit(param.data, param.quant_state)
            elif key.endswith(".SCB"):
                p = key[: -len(".SCB")]
                w = f"{p}.weight"
                param = bnb.nn.Int8Params(t[w], requires_grad=False, has_fp16_weights=False)
                param = param.to("cpu")
                param.SCB = t[key]
                y = F.int8_vectorwise_dequant(param.CB, param.SCB)
            else:
                continue
            if w in out:
                raise SystemExit(f"{w} appears twice")
            info[w] = {"dtype": str(y.dtype).replace("torch.", ""), "shape": list(y.shape)}
            out[w] = y.float().contiguous()
        save_file(out, f"{out_prefix}{i}.safetensors")
        infos.append(info)
    return infos


def quantize(out_path, in_path):
    from safetensors import safe_open

    with safe_open(in_path, "pt") as f:
        meta = f.metadata() or {}
    t = load_file(in_path)
    out = {}
    for name, kind in sorted(meta.items()):
        a = t[name]
        if kind == "int8":
            cb, scb, _ = F.int8_vectorwise_quant(a)
            out[f"{name}.weight"] = cb.contiguous()
            out[f"{name}.SCB"] = scb.contiguous()
            continue
        qt, _, dq = kind.partition("+")
        q, state = F.quantize_4bit(a, blocksize=64, compress_statistics=dq == "dq", quant_type=qt)
        out[f"{name}.weight"] = q.contiguous()
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.weight.{k}"] = v.contiguous()
    save_file(out, out_path)
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in out.items()}


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("dequant", "quantize"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "dequant":
        info = dequant(sys.argv[2], sys.argv[3:])
    else:
        info = quantize(sys.argv[2], sys.argv[3])
    print(json.dumps({"torch": torch.__version__, "bitsandbytes": bnb.__version__, "weights": info}))


if __name__ == "__main__":
    main()
