//! `config.json` -> `LlamaConfig` (`quantlab_models::LlamaConfig::from_hf_json`), then, for a
//! config that parses, building a model from a fixed tiny set of weights
//! (`LlamaModel::from_source`), so hostile sizes reach the code that allocates from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantlab_fuzz::tiny;
use quantlab_models::{LlamaConfig, LlamaModel};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = LlamaConfig::from_hf_json(text, "config.json") else {
        return;
    };
    cfg.validate("config.json")
        .expect("a parsed config validates");
    if let Ok(m) = LlamaModel::from_source(cfg, tiny::weights()) {
        let logits = m.forward(&[0, 1]).expect("a model that loads runs");
        assert_eq!(logits.dims(), &[2, tiny::VOCAB]);
    }
});
