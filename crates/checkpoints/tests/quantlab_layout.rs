//! The project's own layout of quantized linears (`quantlab_checkpoints::quantlab`): every
//! kind of linear the pipeline stores (uniform with a ragged last group and act-order
//! `g_idx`, asymmetric, ggml Q4_1 with its value zeros, NF4 with double-quantized absmax, an
//! AWQ input scale) is read back equal, tensor by tensor, to what was written, as the
//! safetensors package's own reader sees the file; damaged files are refused naming the file
//! and the tensor or layer.

use std::collections::BTreeMap;

use ndarray::Array2;
use quantlab_checkpoints::quantlab::{layer_layout, linear_tensors, read_linears};
use quantlab_grids::{
    quantize_rtn, DoubleQuant, FormatSpec, GgmlGrid, Granularity, QuantizedLinear, UniformGrid,
};
use serde_json::{Map, Value};

fn weights(out: usize, inp: usize, seed: f32) -> Array2<f32> {
    Array2::from_shape_fn((out, inp), |(r, k)| {
        ((r * inp + k) as f32 * 0.713 + seed).sin() * (1.0 + (k % 5) as f32)
    })
}

fn linears() -> Vec<(String, QuantizedLinear, Option<Vec<f32>>)> {
    let int4 = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let int3a = FormatSpec::Uniform(UniformGrid::new(3, false).unwrap());
    let mut act = quantize_rtn(
        "a",
        weights(6, 80, 0.1).view(),
        &int4,
        Granularity::Group(32),
    )
    .unwrap();
    // an act-order g_idx: groups follow a permutation of the columns
    act.g_idx = (0..80u32).map(|k| ((k * 37) % 80) / 32).collect();
    let asym = quantize_rtn(
        "b",
        weights(5, 64, 0.2).view(),
        &int3a,
        Granularity::PerChannel,
    )
    .unwrap();
    let q41 = quantize_rtn(
        "c",
        weights(4, 64, 0.3).view(),
        &FormatSpec::Ggml(GgmlGrid::Q4_1),
        Granularity::Group(32),
    )
    .unwrap();
    let nf4 = quantize_rtn(
        "d",
        weights(8, 128, 0.4).view(),
        &FormatSpec::Nf4,
        Granularity::Group(64),
    )
    .unwrap()
    .with_double_quant(DoubleQuant { blocksize: 4 })
    .unwrap();
    let awq = quantize_rtn(
        "e",
        weights(3, 32, 0.5).view(),
        &int4,
        Granularity::Group(32),
    )
    .unwrap();
    let s: Vec<f32> = (0..32).map(|k| 0.5 + k as f32 / 16.0).collect();
    vec![
        ("model.layers.0.self_attn.q_proj".into(), act, None),
        ("model.layers.0.self_attn.k_proj".into(), asym, None),
        ("model.layers.0.mlp.up_proj".into(), q41, None),
        ("model.layers.1.mlp.down_proj".into(), nf4, None),
        ("model.layers.1.self_attn.o_proj".into(), awq, Some(s)),
    ]
}

fn write(
    dir: &std::path::Path,
    ls: &[(String, QuantizedLinear, Option<Vec<f32>>)],
) -> Map<String, Value> {
    let tensors: Vec<_> = ls
        .iter()
        .flat_map(|(n, q, s)| linear_tensors(n, q, s.as_deref()))
        .collect();
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n, t)),
        None,
        &dir.join("q.safetensors"),
    )
    .unwrap();
    let mut layers = Map::new();
    for (n, q, _) in ls {
        layers.insert(n.clone(), Value::Object(layer_layout(q)));
    }
    // a skipped linear has an entry but no tensors
    layers.insert(
        "model.layers.1.mlp.gate_proj".into(),
        serde_json::json!({"quantized": false}),
    );
    layers
}

#[test]
fn every_kind_of_linear_reads_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let ls = linears();
    let layers = write(dir.path(), &ls);
    let path = dir.path().join("q.safetensors");
    let back = read_linears(&path, &layers).unwrap();
    assert_eq!(back.linears.len(), ls.len());
    for (n, q, s) in &ls {
        let b = &back.linears[n];
        assert_eq!(b.spec, q.spec, "{n}");
        assert_eq!(b.granularity, q.granularity, "{n}");
        assert_eq!(b.codes, q.codes, "{n}");
        assert_eq!(b.scales, q.scales, "{n}");
        assert_eq!(b.zeros, q.zeros, "{n}");
        assert_eq!(b.g_idx, q.g_idx, "{n}");
        assert_eq!(b.dequantize(), q.dequantize(), "{n}");
        match (&b.nested, &q.nested) {
            (Some(x), Some(y)) => {
                assert_eq!(
                    (&x.codes, &x.nested_absmax, x.offset, x.blocksize),
                    (&y.codes, &y.nested_absmax, y.offset, y.blocksize)
                );
            }
            (None, None) => {}
            _ => panic!("{n}: double quantization lost"),
        }
        assert_eq!(back.awq_scales.get(n), s.as_ref(), "{n}");
    }
    // the file as the safetensors package reads it: names, dtypes, shapes and bytes
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (n, q, _) = &ls[0];
    let codes = st.tensor(&format!("{n}.codes")).unwrap();
    assert_eq!(
        (codes.dtype(), codes.shape()),
        (safetensors::Dtype::U8, &[6usize, 80][..])
    );
    assert_eq!(codes.data(), q.codes.as_slice().unwrap());
    let scales = st.tensor(&format!("{n}.scales")).unwrap();
    assert_eq!(scales.shape(), &[6, 3]);
    let first = f32::from_le_bytes(scales.data()[..4].try_into().unwrap());
    assert_eq!(first, q.scales[[0, 0]]);
    let g = st.tensor(&format!("{n}.g_idx")).unwrap();
    assert_eq!(
        (g.dtype(), g.shape()),
        (safetensors::Dtype::U32, &[80usize][..])
    );
    let names: BTreeMap<String, ()> = st
        .names()
        .into_iter()
        .map(|n| (n.to_string(), ()))
        .collect();
    assert!(names.contains_key("model.layers.1.mlp.down_proj.dq_codes"));
    assert!(names.contains_key("model.layers.1.self_attn.o_proj.awq_scale"));
    assert!(!names
        .keys()
        .any(|k| k.starts_with("model.layers.1.mlp.gate_proj")));
}

#[test]
fn damaged_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ls = linears();
    let mut layers = write(dir.path(), &ls);
    let path = dir.path().join("q.safetensors");
    // a layer whose tensors are missing
    let mut extra = layers.clone();
    extra.insert(
        "model.layers.9.mlp.up_proj".into(),
        Value::Object(layer_layout(&ls[0].1)),
    );
    let e = read_linears(&path, &extra).unwrap_err().to_string();
    assert!(
        e.contains("q.safetensors")
            && e.contains("model.layers.9.mlp.up_proj.codes")
            && e.contains("missing"),
        "{e}"
    );
    // a bad format_spec
    let name = ls[1].0.clone();
    layers.get_mut(&name).unwrap()["format_spec"] = Value::String("int9".into());
    let e = read_linears(&path, &layers).unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("format_spec"), "{e}");
    // a truncated file
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_linears(&cut, &write(dir.path(), &ls))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.safetensors"), "{e}");
    // no file
    let e = read_linears(&dir.path().join("none.safetensors"), &layers)
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.safetensors"), "{e}");
}
