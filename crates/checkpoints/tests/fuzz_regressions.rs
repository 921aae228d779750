//! Inputs found by the fuzz targets in `fuzz/` (docs/fuzzing.md), kept as ordinary tests so
//! CI replays them without the fuzzer. Each test says which target found the input and checks
//! the reader's answer against an independent oracle where one exists (the `safetensors`
//! crate's own parser for safetensors headers).

use quantlab_checkpoints::safetensors_header::SafetensorsHeader;
use quantlab_checkpoints::CheckpointError;

fn unhex(parts: &[&str]) -> Vec<u8> {
    let s: String = parts.concat();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn safetensors_file(json: &str, data: usize) -> Vec<u8> {
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.resize(b.len() + data, 0);
    b
}

/// `safetensors_header` target, first run (after 2.9 million inputs): a tensor entry naming
/// `shape` twice (`"shape":[0,4]`, then `"shape":[3]`). serde_json keeps the last copy, so
/// we read a BOOL [3] tensor, while the `safetensors` crate rejects the header ("duplicate
/// field `shape`"). The fuzzer's input, byte for byte.
const REPEATED_SHAPE: &[&str] = &[
    "38010000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c2264223a7b226474",
    "797065223a22493634222c227368617065223a5b5d2c22646174615f6f666673657473223a5b302c385d7d2c2261223a",
    "7b226474797065223a22463332222c227368617065223a5b322c335d2c22646174615f6f666673657473223a5b382c33",
    "325d7d2c2262223a7b226474797065223a2242463136222c227368617065223a5b325d2c22646174615f6f6666736574",
    "73223a5b33322c33365d7d2c2265223a7b226474797065223a225538222c227368617065223a5b302c345d2c22646174",
    "6d6f64656c2e6c61796572732e302e696e7075745f6c617965726474797065223a22424f4f4c222c227368617065223a",
    "5b335d2c22646174615f6f666673657473223a5b33362c33395d7d207d20202007000000000000000000803f00000040",
    "000040c1050080400000a0400001c040003c00bc010003",
];

#[test]
fn safetensors_repeated_tensor_field_is_rejected_like_the_peer() {
    let b = unhex(REPEATED_SHAPE);
    assert_eq!(b.len(), 359);
    // The oracle: the reference parser refuses the file.
    let peer = safetensors::SafeTensors::deserialize(&b)
        .map(|_| ())
        .unwrap_err();
    assert!(
        peer.to_string().contains("duplicate field `shape`"),
        "{peer}"
    );
    // We refuse it too, naming the file, the header and the repeated key.
    let e = SafetensorsHeader::parse(&b, "fuzz.safetensors").unwrap_err();
    assert!(matches!(e, CheckpointError::Malformed { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with("fuzz.safetensors: header: "), "{msg}");
    assert!(msg.contains("repeated key \"shape\""), "{msg}");
}

/// The same defect reduced by hand, at every level of the header: a repeated tensor field, a
/// repeated tensor name, a repeated `__metadata__` key. Without the repeat each file is valid.
#[test]
fn safetensors_repeated_keys_at_any_level_are_rejected() {
    let ok = r#"{"__metadata__":{"a":"x"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    SafetensorsHeader::parse(&safetensors_file(ok, 8), "ok").unwrap();
    for (json, key) in [
        (
            r#"{"w":{"dtype":"F32","shape":[4],"shape":[2],"data_offsets":[0,8]}}"#,
            "shape",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}}"#,
            "w",
        ),
        (
            r#"{"__metadata__":{"a":"x","a":"y"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            "a",
        ),
    ] {
        let b = safetensors_file(json, 8);
        let e = SafetensorsHeader::parse(&b, "dup.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dup.safetensors: header: "), "{e}");
        assert!(e.contains(&format!("repeated key {key:?}")), "{json}: {e}");
    }
}

/// `quant_config` target (after 0.6 million inputs; the fuzzer's input was 23 bytes:
/// `config.json` = `{"hiddt":true}`, `quantize_config.json` = `1`). With no
/// `quantization_config` in `config.json`, a side file whose JSON is not an object panics in
/// `export/read.rs` `quant_config` ("cannot access key \"quant_method\" in JSON number", from
/// `v["quant_method"] = ...`). Minimal fix: reject a side file that is not a JSON object (or
/// `null`) with `CheckpointError::Malformed` naming the file, before indexing it.
#[test]
fn side_config_that_is_not_an_object() {
    use quantlab_checkpoints::export::read::{detect_format, read_quantized_dir};
    for (side, json) in [
        ("quantize_config.json", "1"),
        ("quant_config.json", "[4, \"gptq\"]"),
        ("quantize_config.json", "\"gptq\""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), br#"{"hiddt":true}"#).unwrap();
        std::fs::write(dir.path().join(side), json).unwrap();
        for e in [
            detect_format(dir.path()).map(|_| ()).unwrap_err(),
            read_quantized_dir(dir.path()).map(|_| ()).unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(msg.contains(side), "{side} = {json}: {msg}");
        }
    }
}

/// Found by replaying a hand-mutated `quant_config` seed through the fuzz target (the fuzzer
/// itself did not reach it in two 3-minute runs): the bnb-nf4-dq seed with the `quant_state`
/// shape set to `[2^36, 2^32]`. `export/read.rs` computes `shape[0] * shape[1]` unchecked:
/// "attempt to multiply with overflow" with overflow checks (tests, dev builds); without them
/// the product wraps to 0 and the size checks that follow compare against the wrapped value.
/// Minimal fix: `shape[0].checked_mul(shape[1])`, a `Pack` error naming the `quant_state`
/// tensor when it overflows (and when it disagrees with the stored bytes, as now).
#[test]
fn bnb_quant_state_shape_overflow() {
    use quantlab_checkpoints::export::read::read_quantized_dir;
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        br#"{"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes",
            "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}}"#,
    )
    .unwrap();
    let state = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16",
        "shape": [68719476736, 4294967296]}"#;
    let weight = [0u8; 16];
    let absmax = 1.0f32.to_le_bytes();
    let views = vec![
        (
            "l.weight".to_string(),
            TensorView::new(Dtype::U8, vec![16, 1], &weight).unwrap(),
        ),
        (
            "l.weight.absmax".to_string(),
            TensorView::new(Dtype::F32, vec![1], &absmax).unwrap(),
        ),
        (
            "l.weight.quant_state.bitsandbytes__nf4".to_string(),
            TensorView::new(Dtype::U8, vec![state.len()], state).unwrap(),
        ),
    ];
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = read_quantized_dir(dir.path()).map(|_| ()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("l.weight"), "{msg}");
}
