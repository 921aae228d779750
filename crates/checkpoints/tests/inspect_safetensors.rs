//! safetensors listing against the `safetensors` Python package's numpy API (the peer), and
//! the bounded header reader on broken and hostile files.

use quantlab_checkpoints::inspect::{inspect, FileFormat};
use quantlab_checkpoints::safetensors_header::SafetensorsHeader;
use quantlab_checkpoints::CheckpointError;
use serde_json::Value as J;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

const WRITER: &str = r#"
import json, sys
import numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(7)
tensors = {
    "model.embed.weight": rng.standard_normal((10, 6)).astype(np.float32),
    "model.layers.0.q.weight": rng.standard_normal((6, 6)).astype(np.float16),
    "model.layers.0.q.scales": rng.standard_normal((1, 6)).astype(np.float32),
    "model.layers.0.q.qweight": rng.integers(-2**31, 2**31 - 1, (3, 6), dtype=np.int32),
    "codes": rng.integers(0, 255, (17,), dtype=np.uint8),
    "mask": rng.integers(0, 2, (2, 2, 2)).astype(np.bool_),
    "step": np.array(12345, dtype=np.int64),
    "double": rng.standard_normal(3).astype(np.float64),
    "i8": rng.integers(-128, 127, (5, 1), dtype=np.int8),
}
meta = {"format": "pt", "quant_method": "gptq"}
save_file(tensors, sys.argv[1], metadata=meta)
names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
         np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL", np.dtype(np.int64): "I64",
         np.dtype(np.float64): "F64", np.dtype(np.int8): "I8"}
print(json.dumps({"metadata": meta, "tensors": {k: {"dtype": names[v.dtype], "shape": list(v.shape),
      "nbytes": int(v.nbytes), "size": int(v.size)} for k, v in tensors.items()}}))
"#;

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {why}");
}

#[test]
fn inspect_safetensors_written_by_the_numpy_api() {
    let dir = tempfile::tempdir().unwrap();
    // The extension is deliberately not .safetensors: detection is by content.
    let path = dir.path().join("model.bin");
    let out = match Command::new("python3")
        .args(["-c", WRITER, path.to_str().unwrap()])
        .output()
    {
        Ok(o) => o,
        Err(e) => return skip(&format!("python3 not runnable: {e}")),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("ModuleNotFoundError") {
            return skip(&format!("python3 lacks safetensors/numpy: {}", err.trim()));
        }
        panic!("python writer failed: {err}");
    }
    let oracle: J = serde_json::from_slice(&out.stdout).unwrap();
    let want = oracle["tensors"].as_object().unwrap();

    let ins = inspect(&path).unwrap();
    assert_eq!(ins.format, FileFormat::Safetensors);
    assert_eq!(ins.tensor_count as usize, want.len());
    let mut offset = None;
    for t in &ins.tensors {
        let w = &want[&t.name];
        assert_eq!(t.dtype, w["dtype"].as_str().unwrap(), "{}", t.name);
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{}", t.name);
        assert_eq!(t.bytes, w["nbytes"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.n_elements, w["size"].as_u64().unwrap(), "{}", t.name);
        // Listed in data order, packed back to back.
        if let Some(o) = offset {
            assert_eq!(t.offset, o, "{}", t.name);
        }
        offset = Some(t.offset + t.bytes);
    }
    let total: u64 = want.values().map(|w| w["nbytes"].as_u64().unwrap()).sum();
    let params: u64 = want.values().map(|w| w["size"].as_u64().unwrap()).sum();
    assert_eq!((ins.total_bytes, ins.parameter_count), (total, params));
    let st = ins.safetensors.as_ref().unwrap();
    assert_eq!(offset, Some(ins.file_size), "the last tensor ends the file");
    assert_eq!(st.data_offset, 8 + st.header_size);
    assert_eq!(
        st.metadata.get("quant_method").map(String::as_str),
        Some("gptq")
    );
    assert_eq!(st.metadata.len(), 2);

    // The same file truncated at many cut points: an error naming the file, never a panic.
    let bytes = std::fs::read(&path).unwrap();
    let cut_path = dir.path().join("cut.bin");
    for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let r = SafetensorsHeader::parse(&bytes[..cut], "cut.bin");
        let e = r.expect_err("truncated").to_string();
        assert!(e.starts_with("cut.bin: "), "{e}");
        if cut % 91 == 0 {
            std::fs::write(&cut_path, &bytes[..cut]).unwrap();
            assert!(inspect(&cut_path).is_err(), "cut {cut}");
        }
    }
}

fn file(json: &str, data: usize) -> Vec<u8> {
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.resize(b.len() + data, 0);
    b
}

#[track_caller]
fn expect_err(b: &[u8], fragments: &[&str]) {
    let t = Instant::now();
    let e = SafetensorsHeader::parse(b, "bad.safetensors").expect_err("must be rejected");
    assert!(t.elapsed() < Duration::from_millis(500));
    assert!(matches!(e, CheckpointError::Malformed { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with("bad.safetensors: "), "{msg}");
    for f in fragments {
        assert!(msg.contains(f), "{msg:?} lacks {f:?}");
    }
}

#[test]
fn inspect_safetensors_hostile_headers_are_errors() {
    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[3,1],"data_offsets":[8,14]}}"#;
    let h = SafetensorsHeader::parse(&file(ok, 14), "ok").unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[1].n_bytes(), 6);

    // Header length beyond the file, beyond the limit, absurd.
    let mut b = file(ok, 14);
    b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    expect_err(&b, &["header length", "limit"]);
    b[..8].copy_from_slice(&5000u64.to_le_bytes());
    expect_err(&b, &["header length", "5000 bytes but only"]);
    expect_err(&[1, 2, 3], &["fewer than the 8-byte length prefix"]);
    // Not JSON / not an object / wrong field types.
    expect_err(&file("{nope", 0), &["header", "JSON"]);
    expect_err(&file("[1,2]", 0), &["header"]);
    expect_err(
        &file(
            r#"{"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
        &["tensor \"w\""],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
        ),
        &["tensor \"w\""],
    );
    expect_err(
        &file(r#"{"__metadata__":{"a":1}}"#, 0),
        &["__metadata__", "strings"],
    );
    // Sizes and offsets.
    expect_err(
        &file(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ),
        &["tensor \"w\"", "do not hold 3 F32 elements (12 bytes)"],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            8,
        ),
        &["tensor \"w\""],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#,
            0,
        ),
        &["tensor \"w\"", "overflows"],
    );
    expect_err(
        &file(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
            12,
        ),
        &["tensor \"b\"", "contiguous"],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            3,
        ),
        &["data section has 3 bytes"],
    );
    expect_err(
        &file(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            5,
        ),
        &["tensors cover 4 bytes"],
    );
    // Deeply nested JSON: serde_json's recursion limit, not a stack overflow.
    let deep = format!("{{\"w\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    expect_err(&file(&deep, 0), &["header"]);
}
