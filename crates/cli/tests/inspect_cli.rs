//! `quantlab inspect` on small hand-built files: the table and `--json`. The expected values
//! are computed by hand from the byte layouts written here (GGUF and safetensors specs).

use std::path::Path;
use std::process::Command;

fn quantlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(args)
        .output()
        .expect("run quantlab");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn str_gguf(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// GGUF v3: keys `general.architecture = "llama"` and `tokenizer.ggml.tokens = ["a", "b",
/// "c"]`; tensors `token_embd.weight` Q8_0 ne [64, 3] (6 blocks of 34 bytes = 204) at 0 and
/// `output_norm.weight` F32 [64] (256 bytes) at 224.
fn write_gguf(path: &Path) {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    str_gguf(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    str_gguf(&mut b, "llama");
    str_gguf(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&3u64.to_le_bytes());
    for t in ["a", "b", "c"] {
        str_gguf(&mut b, t);
    }
    for (name, dims, ty, off) in [
        ("token_embd.weight", &[64u64, 3][..], 8u32, 0u64),
        ("output_norm.weight", &[64][..], 0, 224),
    ] {
        str_gguf(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.resize(b.len() + 224 + 256, 0);
    std::fs::write(path, b).unwrap();
}

#[test]
fn inspect_cli_gguf_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.bin");
    write_gguf(&path);
    let p = path.to_str().unwrap();

    let (ok, table, err) = quantlab(&["inspect", p]);
    assert!(ok, "{err}");
    assert!(table.contains("GGUF v3 (alignment 32"), "{table}");
    assert!(table.contains("metadata (2 keys)"), "{table}");
    assert!(table.contains("tensors (2)"), "{table}");
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
            .to_string()
    };
    let tokens = row("tokenizer.ggml.tokens");
    assert!(
        tokens.contains("array<string>") && tokens.contains("[3 elements]"),
        "{tokens}"
    );
    assert!(row("general.architecture").contains("llama"));
    let emb = row("token_embd.weight");
    let norm = row("output_norm.weight");
    let cols = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    // NAME DTYPE SHAPE... ELEMENTS BYTES OFFSET.
    let e = cols(&emb);
    assert_eq!(e[1], "Q8_0");
    assert_eq!(e[e.len() - 3..], ["192", "204", "256"]);
    let n = cols(&norm);
    assert_eq!(n[1], "F32");
    assert_eq!(n[n.len() - 3..], ["64", "256", "480"]);
    assert!(emb.contains("[64, 3]") && norm.contains("[64]"));
    // Aligned: the dtype column starts at the same place, numbers end at the same place.
    assert_eq!(emb.find("Q8_0"), norm.find("F32 "));
    assert_eq!(emb.len(), norm.len());
    // Totals: 460 bytes, 256 parameters.
    let total = table.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(
        total.contains("2 tensors, 256 parameters, 460 bytes"),
        "{total}"
    );
    assert!(total.contains("14.375 bits per parameter"), "{total}");

    let (ok, json, err) = quantlab(&["inspect", "--json", p]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["tensor_count"], 2);
    assert_eq!(v["total_bytes"], 460);
    assert_eq!(v["parameter_count"], 256);
    // Header: 24 + 2 keys (8+20+4+8+5 = 45; 8+21+4+4+8+3*9 = 72) + 2 tensor infos
    // (8+17+4+16+4+8 = 57; 8+18+4+8+4+8 = 50) = 248, padded to 256.
    assert_eq!(v["gguf"]["data_offset"], 256);
    assert_eq!(v["gguf"]["version"], 3);
    assert_eq!(v["tensors"][1]["offset"], 256 + 224);
    assert_eq!(v["tensors"][0]["shape"], serde_json::json!([64, 3]));
    let md = &v["gguf"]["metadata"];
    assert_eq!(md[0]["key"], "general.architecture");
    assert_eq!(md[0]["value"], "llama");
    assert_eq!(md[1]["element_type"], "string");
    assert_eq!(md[1]["len"], 3);
    assert!(
        md[1].get("value").is_none(),
        "arrays are summarised, not printed"
    );
}

#[test]
fn inspect_cli_safetensors_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"I32","shape":[3],"data_offsets":[4,16]},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.resize(b.len() + 16, 0);
    let path = dir.path().join("w.gguf"); // a misleading extension
    std::fs::write(&path, &b).unwrap();
    let p = path.to_str().unwrap();

    let (ok, table, err) = quantlab(&["inspect", p]);
    assert!(ok, "{err}");
    assert!(table.contains("format  safetensors"), "{table}");
    let names: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("  a ") || l.starts_with("  b "))
        .collect();
    assert_eq!(names.len(), 2, "{table}");
    assert!(names[0].starts_with("  a ") && names[0].contains("F16"));
    assert!(
        table.contains("total   2 tensors, 5 parameters, 16 bytes"),
        "{table}"
    );

    let (ok, json_out, _) = quantlab(&["inspect", p, "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["safetensors"]["metadata"]["format"], "pt");
    assert_eq!(v["tensors"][1]["offset"], 8 + json.len() as u64 + 4);

    // Broken files: non-zero exit, the file and the field named on stderr.
    b.truncate(b.len() - 1);
    std::fs::write(&path, &b).unwrap();
    let (ok, _, err) = quantlab(&["inspect", p]);
    assert!(!ok);
    assert!(err.contains(p) && err.contains("data section"), "{err}");
    std::fs::write(&path, b"hello world").unwrap();
    let (ok, _, err) = quantlab(&["inspect", p]);
    assert!(!ok);
    assert!(err.contains("not a GGUF or safetensors file"), "{err}");
}
