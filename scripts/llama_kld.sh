#!/usr/bin/env bash
# Benchmark (not a test): mean KL divergence against a base model and perplexity of GGUF
# files, both computed by llama.cpp's own `llama-perplexity` (as llama.cpp users compare
# quantizations), on the same text and windows.
#
#   LLAMA_BIN=DIR scripts/llama_kld.sh TEXT BASE.gguf LABEL=FILE.gguf [LABEL=FILE.gguf ...]
#
#   LLAMA_BIN     folder holding llama-perplexity (../shared/docs/environment.md: build it
#                 from the llama-cpp-python sdist; default ~/.cache/llamacpp/build/bin)
#   KLD_CHUNKS    windows of 512 tokens (default 10); KLD_THREADS threads (default 2)
#
# The base logits are computed once per text (`--kl-divergence-base`, kept beside BASE as
# BASE.<text name>.kld). Prints one Markdown row per file: label, file bytes, mean KLD +-
# its error, 99th-percentile KLD, top-1 agreement (llama.cpp's "Same top p"), PPL(Q).
set -euo pipefail
bin=${LLAMA_BIN:-$HOME/.cache/llamacpp/build/bin}
chunks=${KLD_CHUNKS:-10}
threads=${KLD_THREADS:-2}
text=$1
base=$2
shift 2
[[ -x "$bin/llama-perplexity" ]] || { echo "llama_kld.sh: no $bin/llama-perplexity (set LLAMA_BIN)" >&2; exit 2; }
[[ -f "$text" ]] || { echo "llama_kld.sh: no text file $text" >&2; exit 2; }
kld="$base.$(basename "$text").c$chunks.kld"
common=(-f "$text" -c 512 --chunks "$chunks" -t "$threads" -b 512)
if [[ ! -s "$kld" ]]; then
    "$bin/llama-perplexity" -m "$base" "${common[@]}" --kl-divergence-base "$kld.tmp" > "$kld.log" 2>&1
    mv "$kld.tmp" "$kld"
fi
echo "| file | bytes | mean KLD | KLD p99 | top-1 agreement | PPL(Q) |"
echo "| --- | --- | --- | --- | --- | --- |"
for pair in "$@"; do
    label=${pair%%=*}
    file=${pair#*=}
    log=$(mktemp)
    "$bin/llama-perplexity" -m "$file" "${common[@]}" --kl-divergence-base "$kld" --kl-divergence > "$log" 2>&1 || {
        echo "llama_kld.sh: llama-perplexity failed on $file:" >&2
        tail -5 "$log" >&2
        exit 1
    }
    mean=$(grep -E "^Mean +KLD:" "$log" | head -1 | sed -E 's/^Mean +KLD: *//')
    p99=$(grep -E "^99\.0% +KLD:" "$log" | head -1 | sed -E 's/^99\.0% +KLD: *//')
    top=$(grep -E "^Same top p:" "$log" | head -1 | sed -E 's/^Same top p: *//')
    ppl=$(grep -E "^Mean +PPL\(Q\)" "$log" | head -1 | sed -E 's/^Mean +PPL\(Q\) *: *//')
    echo "| $label | $(stat -c %s "$file") | $mean | $p99 | $top | $ppl |"
    rm -f "$log"
done
