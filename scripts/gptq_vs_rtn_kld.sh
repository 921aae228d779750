#!/usr/bin/env bash
# GPTQ against importance-weighted RTN on ggml's grids, the whole model, by KL divergence
# (issue 18; docs/quantize.md, "The K grids at the model level"). For each type, both files
# come from the same calibration windows and are written --pure; each is scored by
# `quantlab eval kld` on every text against the source model's stored logits.
#
#   scripts/gptq_vs_rtn_kld.sh OUT_DIR TEXT [TEXT...]
#   TYPES="q4_k q2_k" NSAMPLES=32 WINDOWS=8 MODEL=smollm2 scripts/gptq_vs_rtn_kld.sh ...
#
# Prints one line per (type, method, text): mean KLD with its error, perplexity, top-1
# agreement, file size and quantization seconds. Files already in OUT_DIR are reused.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR TEXT [TEXT...]" >&2
    exit 2
fi
out=$1; shift
mkdir -p "$out"
cargo build --release --quiet -p quantlab-cli
Q=${CARGO_TARGET_DIR:-target}/release/quantlab
model=${MODEL:-smollm2}
windows=${WINDOWS:-8}
kld() {
    python3 -c "import json,sys; d=json.load(sys.stdin); print('kld %.5f +- %.5f ppl %.3f top1 %.3f' % (d['kld_mean'], d['kld_err'], d['ppl'], d['top1_agreement']))"
}
for t in "$@"; do
    b="$out/base-$(basename "$t").st"
    [[ -f $b ]] || "$Q" eval kld --base "$model" --model "$model" --text "$t" \
        --max-windows "$windows" --save-base "$b" --json >/dev/null
done
for ty in ${TYPES:-q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k}; do
    for m in gptq rtn; do
        f="$out/$ty-$m.gguf"
        s=$SECONDS
        if [[ ! -f $f ]]; then
            "$Q" quantize --model "$model" --method "$m" --format "gguf:$ty" --pure \
                --calib shipped --nsamples "${NSAMPLES:-32}" --out "$f" >/dev/null ||
                { echo "$ty $m: quantize failed"; continue; }
        fi
        q=$((SECONDS - s))
        for t in "$@"; do
            b="$out/base-$(basename "$t").st"
            r=$("$Q" eval kld --base "$b" --model "$f" --text "$t" --max-windows "$windows" --json | kld)
            echo "$ty $m $(basename "$t") $r bytes $(stat -c %s "$f") quantize ${q}s"
        done
    done
done
