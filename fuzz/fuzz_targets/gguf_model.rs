//! GGUF weight loading in the models crate (`quantlab_models::weights::GgufWeights`: candle's
//! GGUF reader, our config from GGUF metadata, dequantization of every tensor and the q/k
//! un-permutation), then `LlamaModel::from_source`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantlab_checkpoints::gguf::{GgufFile, ALIGNMENT_KEY};
use quantlab_checkpoints::CheckpointError;
use quantlab_fuzz::scratch;
use quantlab_models::weights::{GgufWeights, WeightSource};
use quantlab_models::LlamaModel;

/// Whether our bounded reader sees a `general.alignment` of 0: candle's reader divides by it.
/// `GgufWeights::open` contains that panic as an error (see `crates/models/tests/
/// fuzz_regressions.rs`), but libFuzzer's panic hook aborts before any unwinding, so such
/// inputs are skipped here.
fn zero_alignment(data: &[u8]) -> bool {
    matches!(
        GgufFile::parse(data, "fuzz"),
        Err(CheckpointError::Malformed { field, detail, .. })
            if field.contains(ALIGNMENT_KEY) && detail.ends_with("(0)")
    )
}

fuzz_target!(|data: &[u8]| {
    if zero_alignment(data) {
        return;
    }
    let path = scratch().join("model.gguf");
    std::fs::write(&path, data).expect("write");
    let Ok(w) = GgufWeights::open(&path) else {
        return;
    };
    for name in w.names() {
        let _ = w.load(&name);
    }
    let Ok(cfg) = w.config() else { return };
    if let Ok(m) = LlamaModel::from_source(cfg, &w) {
        let v = m.config().vocab_size;
        if v > 1 && m.config().hidden_size <= 4096 {
            let logits = m.forward(&[0, 1]).expect("a model that loads runs");
            assert_eq!(logits.dims(), &[2, v]);
        }
    }
});
