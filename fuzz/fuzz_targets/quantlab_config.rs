//! Our own checkpoint reader (`quantlab_pipeline::save::load_quantized`): a fixed tiny model
//! (`config.json`, `model.safetensors`) with a fuzzed `quantization_config.json` and
//! `quantized.safetensors`.
//!
//! Input: the two files joined by `quantlab_fuzz::SEP`; an empty or missing part means the
//! file is absent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantlab_fuzz::{put, scratch, split, tiny};
use quantlab_pipeline::save::load_quantized;

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| tiny::write_hf_dir(dir));
    let files = ["quantization_config.json", "quantized.safetensors"];
    for (name, part) in files.iter().zip(split(data, files.len())) {
        let _ = std::fs::remove_file(dir.join(name));
        put(dir, name, part.filter(|p| !p.is_empty()));
    }
    if let Ok(ck) = load_quantized(dir) {
        for (name, q) in &ck.linears {
            let w = q.dequantize();
            assert_eq!(w.dim(), q.shape(), "{name}");
        }
    }
});
