//! llama.cpp's importance-matrix files: the legacy `.dat` layout built byte by byte from its
//! description (independent of our writer), the GGUF layout read back by the `gguf` Python
//! package (the peer's own reader), round trips, and malformed files refused by name.

use quantlab_checkpoints::export::gguf::{write_gguf_metadata, GgufTensor};
use quantlab_checkpoints::gguf::{GgufFile, GgufValue};
use quantlab_checkpoints::imatrix::{Imatrix, ImatrixEntry, ImatrixFormat};
use serde_json::Value as J;
use std::path::Path;
use std::process::Command;

fn le_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A legacy file as llama-imatrix writes it: values are `mean(x^2) * ncall`.
fn legacy_bytes(entries: &[(&str, i32, &[f32])], chunks: Option<(i32, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    le_i32(&mut b, entries.len() as i32);
    for (name, ncall, vals) in entries {
        le_i32(&mut b, name.len() as i32);
        b.extend_from_slice(name.as_bytes());
        le_i32(&mut b, *ncall);
        le_i32(&mut b, vals.len() as i32);
        for v in *vals {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    if let Some((n, ds)) = chunks {
        le_i32(&mut b, n);
        le_i32(&mut b, ds.len() as i32);
        b.extend_from_slice(ds.as_bytes());
    }
    b
}

#[test]
fn legacy_file_is_read_as_llama_quantize_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.dat");
    // ncall 4: stored values are mean * 4
    let bytes = legacy_bytes(
        &[
            ("blk.0.attn_q.weight", 4, &[4.0, 8.0, 2.0]),
            ("blk.0.ffn_down.weight", 0, &[0.5, 0.25]),
        ],
        Some((4, "calib.txt")),
    );
    std::fs::write(&p, &bytes).unwrap();
    let m = Imatrix::read(&p).unwrap();
    assert_eq!(m.format, ImatrixFormat::Legacy);
    assert_eq!(m.chunk_count, 4);
    assert_eq!(m.datasets, vec!["calib.txt".to_string()]);
    assert_eq!(m.entries.len(), 2);
    assert_eq!(
        m.importance("blk.0.attn_q.weight").unwrap(),
        vec![1.0, 2.0, 0.5]
    );
    // ncall 0: llama-quantize takes the stored values as they are
    assert_eq!(
        m.importance("blk.0.ffn_down.weight").unwrap(),
        vec![0.5, 0.25]
    );

    // the trailing chunk count / dataset is optional
    let p2 = dir.path().join("b.dat");
    std::fs::write(
        &p2,
        legacy_bytes(&[("blk.1.attn_k.weight", 2, &[2.0])], None),
    )
    .unwrap();
    let m2 = Imatrix::read(&p2).unwrap();
    assert_eq!(m2.chunk_count, 0);
    assert!(m2.datasets.is_empty());
    assert_eq!(m2.importance("blk.1.attn_k.weight").unwrap(), vec![1.0]);

    // our legacy writer reproduces the file byte for byte
    let p3 = dir.path().join("c.dat");
    m.write(&p3, ImatrixFormat::Legacy).unwrap();
    assert_eq!(std::fs::read(&p3).unwrap(), bytes);
}

#[test]
fn gguf_layout_follows_llama_cpp_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.imatrix");
    let mut m = Imatrix::new(vec!["a.txt".into(), "b.txt".into()], 512);
    m.chunk_count = 3;
    m.insert("blk.0.attn_v.weight", vec![3.0, 6.0, 1.5, 0.0], 1536.0);
    // two stacked matrices (experts) with different counts
    m.entries.insert(
        "blk.1.ffn_down_exps.weight".into(),
        ImatrixEntry {
            sums: vec![2.0, 4.0, 9.0, 3.0],
            counts: vec![2.0, 3.0],
        },
    );
    m.write(&p, ImatrixFormat::Gguf).unwrap();

    let g = GgufFile::open(&p).unwrap();
    assert_eq!(
        g.get("general.type"),
        Some(&GgufValue::String("imatrix".into()))
    );
    assert_eq!(g.get("imatrix.chunk_count"), Some(&GgufValue::U32(3)));
    assert_eq!(g.get("imatrix.chunk_size"), Some(&GgufValue::U32(512)));
    assert!(g.get("general.file_type").is_none());
    let dims = |n: &str| g.tensor(n).unwrap().dims.clone();
    assert_eq!(dims("blk.0.attn_v.weight.in_sum2"), vec![4, 1]);
    assert_eq!(dims("blk.0.attn_v.weight.counts"), vec![1, 1]);
    assert_eq!(dims("blk.1.ffn_down_exps.weight.in_sum2"), vec![2, 2]);
    assert_eq!(dims("blk.1.ffn_down_exps.weight.counts"), vec![1, 2]);

    let back = Imatrix::read(&p).unwrap();
    assert_eq!(back.entries, m.entries);
    assert_eq!(back.datasets, m.datasets);
    assert_eq!(
        back.importance("blk.1.ffn_down_exps.weight").unwrap(),
        vec![1.0, 2.0, 3.0, 1.0]
    );
    // the legacy layout has one count per entry: refused by name for the experts
    let e = m
        .write(&dir.path().join("x.dat"), ImatrixFormat::Legacy)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ffn_down_exps") && e.contains("GGUF"), "{e}");
    assert!(!dir.path().join("x.dat").exists());

    // GGUF -> legacy: ncall = ceil(tokens / chunk_size) = 3, values = mean * 3
    m.entries.remove("blk.1.ffn_down_exps.weight");
    let pd = dir.path().join("m.dat");
    m.write(&pd, ImatrixFormat::Legacy).unwrap();
    let want = legacy_bytes(
        &[(
            "blk.0.attn_v.weight",
            3,
            &[
                3.0 * (3.0 / 1536.0),
                6.0 * (3.0 / 1536.0),
                1.5 * (3.0 / 1536.0),
                0.0,
            ],
        )],
        Some((3, "a.txt")),
    );
    assert_eq!(std::fs::read(&pd).unwrap(), want);
    let l = Imatrix::read(&pd).unwrap();
    let (a, b) = (
        l.importance("blk.0.attn_v.weight").unwrap(),
        m.importance("blk.0.attn_v.weight").unwrap(),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{a:?} {b:?}");
    }
}

#[test]
fn gguf_imatrix_is_read_by_the_gguf_package() {
    let probe = Command::new("python3")
        .args(["-c", "import gguf, numpy, safetensors"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIP: python3 lacks gguf/numpy/safetensors");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.imatrix");
    let mut m = Imatrix::new(vec!["calib.txt".into()], 256);
    m.chunk_count = 2;
    let sums: Vec<f32> = (0..64)
        .map(|i| (i as f32 * 0.37).sin().abs() * 10.0)
        .collect();
    m.insert("blk.3.ffn_up.weight", sums.clone(), 512.0);
    m.write(&p, ImatrixFormat::Gguf).unwrap();
    let st = dir.path().join("t.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oracles/export_gguf.py");
    let out = Command::new("timeout")
        .arg("120")
        .arg("python3")
        .arg(&script)
        .arg(&p)
        .arg(&st)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: J = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["fields"]["general.type"], "imatrix");
    assert_eq!(j["fields"]["imatrix.chunk_size"], 256);
    assert_eq!(j["fields"]["imatrix.chunk_count"], 2);
    assert_eq!(
        j["fields"]["imatrix.datasets"],
        serde_json::json!(["calib.txt"])
    );
    let t: Vec<(String, Vec<u64>)> = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect();
    assert!(t.contains(&("blk.3.ffn_up.weight.in_sum2".into(), vec![64, 1])));
    assert!(t.contains(&("blk.3.ffn_up.weight.counts".into(), vec![1, 1])));
    // the package's values, through safetensors
    let bytes = std::fs::read(&st).unwrap();
    let f = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v: Vec<f32> = f
        .tensor("blk.3.ffn_up.weight.in_sum2")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(v, sums);
}

#[test]
fn malformed_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| Imatrix::read(p).unwrap_err().to_string();

    // truncated inside the values of the first entry
    let mut b = legacy_bytes(&[("blk.0.attn_q.weight", 1, &[1.0, 2.0, 3.0])], None);
    b.truncate(b.len() - 5);
    let p = dir.path().join("t.dat");
    std::fs::write(&p, &b).unwrap();
    let e = err(&p);
    assert!(
        e.contains("t.dat") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );

    // a huge name length
    let mut b = Vec::new();
    le_i32(&mut b, 1);
    le_i32(&mut b, i32::MAX);
    let p = dir.path().join("n.dat");
    std::fs::write(&p, &b).unwrap();
    assert!(err(&p).contains("name length"), "{}", err(&p));

    // empty and zero-entry files
    let p = dir.path().join("e.dat");
    std::fs::write(&p, []).unwrap();
    assert!(err(&p).contains("e.dat"));
    std::fs::write(&p, 0i32.to_le_bytes()).unwrap();
    assert!(err(&p).contains("no entries"), "{}", err(&p));

    // a model GGUF given instead of an importance matrix
    let p = dir.path().join("model.gguf");
    write_gguf_metadata(
        &p,
        &[(
            "general.architecture".into(),
            GgufValue::String("llama".into()),
        )],
        &[(
            "blk.0.ffn_down.weight".into(),
            GgufTensor::f32(&[2, 32], &[0.5; 64]),
        )],
    )
    .unwrap();
    assert!(err(&p).contains("not an importance matrix"), "{}", err(&p));

    // sums without counts
    let p = dir.path().join("orphan.imatrix");
    quantlab_checkpoints::export::gguf::write_gguf_raw(
        &p,
        &[],
        &[(
            "blk.0.attn_q.weight.in_sum2".into(),
            GgufTensor::f32(&[1, 4], &[1.0; 4]),
        )],
    )
    .unwrap();
    let e = err(&p);
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("counts"),
        "{e}"
    );

    // an F16 statistic
    let p = dir.path().join("f16.imatrix");
    quantlab_checkpoints::export::gguf::write_gguf_raw(
        &p,
        &[],
        &[
            (
                "blk.0.attn_q.weight.in_sum2".into(),
                GgufTensor::f16(&[1, 4], &[1.0; 4]),
            ),
            (
                "blk.0.attn_q.weight.counts".into(),
                GgufTensor::f32(&[1, 1], &[1.0]),
            ),
        ],
    )
    .unwrap();
    assert!(err(&p).contains("F32"), "{}", err(&p));
}
