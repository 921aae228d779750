//! Our GGUF reader against the `gguf` Python package (the peer): files written by its
//! GGUFWriter (metadata of every value type, F32/F16/I32/Q8_0/Q4_0/Q4_1/BF16 tensors) read
//! back with identical names, shapes, types, offsets and values; the real SmolLM2 GGUF listed
//! like GGUFReader lists it; our ggml type table equal to the package's `GGML_QUANT_SIZES`.
//!
//! Skips visibly (a `SKIP` line on stderr, outside the test harness's capture) when python3,
//! the `gguf` package or the model file is missing. The Python reader is only ever pointed at
//! files it wrote itself or at the trusted model file.

use quantlab_checkpoints::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use quantlab_checkpoints::inspect::{inspect, FileFormat};
use serde_json::Value as J;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const MODEL: &str = "/root/.cache/quantlab/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {why}");
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Runs a Python script with a time limit; `None` (after a SKIP line) when python3 or the
/// `gguf` package is missing.
fn python_json(args: &[&str]) -> Option<J> {
    let probe = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            skip(&format!(
                "python3 has no gguf/numpy package: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return None;
        }
        Err(e) => {
            skip(&format!("python3 not runnable: {e}"));
            return None;
        }
    }
    let has_timeout = Command::new("timeout").arg("--version").output().is_ok();
    let out = if has_timeout {
        Command::new("timeout")
            .arg("120")
            .arg("python3")
            .args(args)
            .output()
    } else {
        Command::new("python3").args(args).output()
    }
    .expect("run python3");
    assert!(
        out.status.success(),
        "python3 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("python printed JSON"))
}

fn u(v: &J) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

fn f32_of(v: &J) -> u32 {
    u(&v["bits"]) as u32
}

/// Compares one scalar of type `ty` written by Python with our value.
fn check_scalar(key: &str, ty: &str, want: &J, got: &GgufValue) {
    let ok = match (ty, got) {
        ("u8", GgufValue::U8(x)) => u(want) == u64::from(*x),
        ("i8", GgufValue::I8(x)) => want.as_i64() == Some(i64::from(*x)),
        ("u16", GgufValue::U16(x)) => u(want) == u64::from(*x),
        ("i16", GgufValue::I16(x)) => want.as_i64() == Some(i64::from(*x)),
        ("u32", GgufValue::U32(x)) => u(want) == u64::from(*x),
        ("i32", GgufValue::I32(x)) => want.as_i64() == Some(i64::from(*x)),
        ("u64", GgufValue::U64(x)) => u(want) == *x,
        ("i64", GgufValue::I64(x)) => want.as_i64() == Some(*x),
        ("f32", GgufValue::F32(x)) => f32_of(want) == x.to_bits(),
        ("f64", GgufValue::F64(x)) => u(&want["bits"]) == x.to_bits(),
        ("bool", GgufValue::Bool(x)) => want.as_bool() == Some(*x),
        ("string", GgufValue::String(x)) => want.as_str() == Some(x.as_str()),
        _ => false,
    };
    assert!(ok, "{key}: python wrote {ty} {want}, we read {got:?}");
}

fn check_array(key: &str, elem: &str, want: &[J], got: &GgufArray) {
    assert_eq!(got.len(), want.len(), "{key}: length");
    assert_eq!(got.element_type().name(), elem, "{key}: element type");
    for (i, w) in want.iter().enumerate() {
        let g = match got {
            GgufArray::U8(v) => GgufValue::U8(v[i]),
            GgufArray::I8(v) => GgufValue::I8(v[i]),
            GgufArray::U16(v) => GgufValue::U16(v[i]),
            GgufArray::I16(v) => GgufValue::I16(v[i]),
            GgufArray::U32(v) => GgufValue::U32(v[i]),
            GgufArray::I32(v) => GgufValue::I32(v[i]),
            GgufArray::F32(v) => GgufValue::F32(v[i]),
            GgufArray::Bool(v) => GgufValue::Bool(v[i]),
            GgufArray::String(v) => GgufValue::String(v[i].clone()),
            GgufArray::U64(v) => GgufValue::U64(v[i]),
            GgufArray::I64(v) => GgufValue::I64(v[i]),
            GgufArray::F64(v) => GgufValue::F64(v[i]),
            GgufArray::Array(v) => {
                let inner: Vec<J> = w["values"].as_array().unwrap().clone();
                check_array(
                    &format!("{key}[{i}]"),
                    w["type"].as_str().unwrap(),
                    &inner,
                    &v[i],
                );
                continue;
            }
            _ => panic!("{key}: unexpected array kind"),
        };
        check_scalar(&format!("{key}[{i}]"), elem, w, &g);
    }
}

#[test]
fn gguf_reads_files_written_by_the_python_gguf_package() {
    let dir = tempfile::tempdir().unwrap();
    let Some(oracle) = python_json(&[
        script("gguf_write.py").to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ]) else {
        return;
    };
    for file in oracle["files"].as_array().unwrap() {
        let path = Path::new(file["path"].as_str().unwrap());
        let f = GgufFile::open(path).unwrap();
        let name = path.display();
        assert_eq!(f.version, 3, "{name}");
        assert_eq!(f.alignment, u(&file["alignment"]), "{name}");
        assert_eq!(f.data_offset, u(&file["data_offset"]), "{name}");
        assert_eq!(f.file_size, u(&file["file_size"]), "{name}");

        // Metadata: every key, in order, with the exact value written.
        let keys: Vec<&str> = f.metadata.iter().map(|(k, _)| k.as_str()).collect();
        let reader_keys: Vec<&str> = file["reader_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, reader_keys, "{name}: keys as GGUFReader lists them");
        let kvs = file["kv"].as_array().unwrap();
        assert_eq!(kvs.len(), f.metadata.len(), "{name}: written keys");
        for kv in kvs {
            let key = kv["key"].as_str().unwrap();
            let ty = kv["type"].as_str().unwrap();
            let got = f
                .get(key)
                .unwrap_or_else(|| panic!("{name}: {key} missing"));
            assert_eq!(got.value_type().name(), ty, "{key}");
            if ty == "array" {
                check_array(
                    key,
                    kv["element_type"].as_str().unwrap(),
                    kv["value"].as_array().unwrap(),
                    got.as_array().unwrap(),
                );
            } else {
                check_scalar(key, ty, &kv["value"], got);
            }
        }

        // Tensors: what was handed to the writer, and what GGUFReader reads back.
        let written = file["written_tensors"].as_array().unwrap();
        let read = file["reader_tensors"].as_array().unwrap();
        assert_eq!(f.tensors.len(), written.len(), "{name}");
        assert_eq!(f.tensors.len(), read.len(), "{name}");
        let quantized = file["quantized"].as_array().unwrap();
        assert!(
            quantized.iter().any(|q| q == "Q8_0") && quantized.iter().any(|q| q == "Q4_0"),
            "the gguf package quantized Q8_0 and Q4_0: {quantized:?}"
        );
        for ((t, w), r) in f.tensors.iter().zip(written).zip(read) {
            assert_eq!(t.name, w["name"].as_str().unwrap());
            assert_eq!(
                t.ggml_type.name(),
                w["type"].as_str().unwrap(),
                "{}",
                t.name
            );
            assert_eq!(u64::from(t.ggml_type.id()), u(&r["type_id"]), "{}", t.name);
            // numpy shapes are row-major; GGUF stores ne[0] (the last numpy axis) first.
            let mut np_shape: Vec<u64> = w["np_shape"].as_array().unwrap().iter().map(u).collect();
            np_shape.reverse();
            assert_eq!(t.dims, np_shape, "{}", t.name);
            let rs: Vec<u64> = r["shape"].as_array().unwrap().iter().map(u).collect();
            assert_eq!(t.dims, rs, "{}", t.name);
            assert_eq!(t.n_elements, u(&r["n_elements"]), "{}", t.name);
            assert_eq!(t.n_bytes, u(&r["n_bytes"]), "{}", t.name);
            assert_eq!(f.tensor_range(t).start, u(&r["data_offset"]), "{}", t.name);
            assert_eq!(t.offset % f.alignment, 0, "{}", t.name);
        }

        // The inspection agrees with the reader's totals.
        let ins = inspect(path).unwrap();
        assert_eq!(ins.format, FileFormat::Gguf);
        assert_eq!(ins.tensor_count, read.len() as u64);
        let bytes: u64 = read.iter().map(|r| u(&r["n_bytes"])).sum();
        let params: u64 = read.iter().map(|r| u(&r["n_elements"])).sum();
        assert_eq!((ins.total_bytes, ins.parameter_count), (bytes, params));
        let g = ins.gguf.as_ref().unwrap();
        assert_eq!((g.version, g.alignment), (3, f.alignment));
        let arr = g
            .metadata
            .iter()
            .find(|m| m.key == "test.arr_string")
            .unwrap();
        assert_eq!(
            (
                arr.value_type.as_str(),
                arr.element_type.as_deref(),
                arr.len
            ),
            ("array", Some("string"), Some(4))
        );
        let nested = g
            .metadata
            .iter()
            .find(|m| m.key == "test.arr_nested")
            .unwrap();
        assert_eq!(
            (nested.element_type.as_deref(), nested.len),
            (Some("array<i32>"), Some(3))
        );
        let f32v = g.metadata.iter().find(|m| m.key == "test.f32").unwrap();
        assert_eq!(f32v.value, Some(serde_json::json!(0.1)));
    }
}

#[test]
fn gguf_type_table_matches_the_python_package() {
    let Some(oracle) = python_json(&[
        "-c",
        "import json, gguf; print(json.dumps({'sizes': {t.name: list(v) for t, v in \
         gguf.GGML_QUANT_SIZES.items()}, 'ids': {t.name: int(t) for t in \
         gguf.GGMLQuantizationType}}))",
    ]) else {
        return;
    };
    let ids = oracle["ids"].as_object().unwrap();
    let sizes = oracle["sizes"].as_object().unwrap();
    let mut checked = 0;
    for (name, id) in ids {
        let t = GgmlType::from_id(u(id) as u32)
            .unwrap_or_else(|| panic!("python type {name} = {id} unknown to us"));
        assert_eq!(t.name(), name);
        let s = sizes[name].as_array().unwrap();
        assert_eq!(
            (t.block_size(), t.type_size()),
            (u(&s[0]), u(&s[1])),
            "{name}"
        );
        checked += 1;
    }
    // Every type of ours is one of the package's (no invented ids).
    for t in GgmlType::ALL {
        assert!(ids.contains_key(t.name()), "{t} not in the python package");
    }
    assert_eq!(checked, GgmlType::ALL.len());
    // Removed ids stay unknown.
    for id in [4, 5, 31, 32, 33, 36, 37, 38, 1000] {
        assert!(GgmlType::from_id(id).is_none(), "{id}");
    }
}

#[test]
fn gguf_smollm2_listing_matches_gguf_reader() {
    if !Path::new(MODEL).exists() {
        skip(&format!("{MODEL} not present"));
        return;
    }
    let Some(oracle) = python_json(&[script("gguf_read.py").to_str().unwrap(), MODEL]) else {
        return;
    };
    let ins = inspect(Path::new(MODEL)).unwrap();
    let g = ins.gguf.as_ref().unwrap();
    assert_eq!(ins.format, FileFormat::Gguf);
    assert_eq!(g.alignment, u(&oracle["alignment"]));
    assert_eq!(g.data_offset, u(&oracle["data_offset"]));

    let read = oracle["tensors"].as_array().unwrap();
    assert_eq!(ins.tensors.len(), read.len());
    assert!((250..300).contains(&read.len()), "{} tensors", read.len());
    for (t, r) in ins.tensors.iter().zip(read) {
        assert_eq!(t.name, r["name"].as_str().unwrap());
        assert_eq!(t.dtype, r["type"].as_str().unwrap(), "{}", t.name);
        let rs: Vec<u64> = r["shape"].as_array().unwrap().iter().map(u).collect();
        assert_eq!(t.shape, rs, "{}", t.name);
        assert_eq!(t.n_elements, u(&r["n_elements"]), "{}", t.name);
        assert_eq!(t.bytes, u(&r["n_bytes"]), "{}", t.name);
        assert_eq!(t.offset, u(&r["data_offset"]), "{}", t.name);
    }
    let bytes: u64 = read.iter().map(|r| u(&r["n_bytes"])).sum();
    let params: u64 = read.iter().map(|r| u(&r["n_elements"])).sum();
    assert_eq!(ins.total_bytes, bytes);
    assert_eq!(ins.parameter_count, params);

    // Metadata: same keys in order; scalars equal; arrays by element type and length; a few
    // string elements compared exactly through the full reader.
    let fields = oracle["fields"].as_array().unwrap();
    assert_eq!(g.metadata.len(), fields.len());
    let full = GgufFile::open(Path::new(MODEL)).unwrap();
    for (m, f) in g.metadata.iter().zip(fields) {
        assert_eq!(m.key, f["key"].as_str().unwrap());
        assert_eq!(m.value_type, f["type"].as_str().unwrap(), "{}", m.key);
        if m.value_type == "array" {
            assert_eq!(
                m.element_type.as_deref(),
                f["element_type"].as_str(),
                "{}",
                m.key
            );
            assert_eq!(m.len, f["len"].as_u64(), "{}", m.key);
            if let Some(samples) = f.get("samples").and_then(|s| s.as_object()) {
                let Some(GgufValue::Array(GgufArray::String(v))) = full.get(&m.key) else {
                    panic!("{}: not a string array", m.key)
                };
                for (i, s) in samples {
                    let i: usize = i.parse().unwrap();
                    assert_eq!(v[i], s.as_str().unwrap(), "{}[{i}]", m.key);
                }
            }
        } else if m.value_type == "f32" || m.value_type == "f64" {
            let want = f["value"].as_f64().unwrap();
            let got = m.value.as_ref().and_then(|v| v.as_f64()).unwrap();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{}: {got} vs {want}",
                m.key
            );
        } else {
            assert_eq!(m.value.as_ref(), Some(&f["value"]), "{}", m.key);
        }
    }
    // Facts from environment.md, independent of both readers.
    assert_eq!(full.get("llama.block_count"), Some(&GgufValue::U32(30)));
    assert_eq!(
        full.get("llama.embedding_length"),
        Some(&GgufValue::U32(576))
    );
    assert_eq!(
        full.get("tokenizer.ggml.pre").and_then(|v| v.as_str()),
        Some("smollm")
    );
}
