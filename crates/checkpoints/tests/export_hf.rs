//! Hugging Face directory export: write -> read equals the dequantized QuantizedLinear (with
//! the f16 rounding of the stored scales, computed here from the codes by the formulas of
//! formats.md); an independent numpy reader (tests/oracles/export_hf.py) gets the same
//! GPTQ and AWQ weights bit for bit; shards and index; errors leave no directory.

use half::f16;
use ndarray::Array2;
use quantlab_checkpoints::export::hf::{
    write_hf_dir, DenseDtype, DenseTensor, HfExport, HfQuantFormat,
};
use quantlab_checkpoints::export::read::{detect_format, read_quantized_dir, DetectedFormat};
use quantlab_checkpoints::pack::GptqFormat;
use quantlab_grids::double_quant::DoubleQuant;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, QuantizedLinear, UniformGrid};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn random(rng: &mut StdRng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| 0.3 * (rng.random::<f32>() * 2.0 - 1.0))
}

const NAMES: [&str; 3] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
];
const SHAPES: [(usize, usize); 3] = [(64, 64), (128, 64), (64, 128)];

fn linears(
    spec: &FormatSpec,
    gran: Granularity,
    seed: u64,
) -> Vec<(String, QuantizedLinear, Array2<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    NAMES
        .iter()
        .zip(SHAPES)
        .map(|(n, (o, i))| {
            let w = random(&mut rng, o, i);
            let q = quantize_rtn(n, w.view(), spec, gran).unwrap();
            (n.to_string(), q, w)
        })
        .collect()
}

fn export(ls: &[(String, QuantizedLinear, Array2<f32>)]) -> HfExport {
    let mut ex = HfExport::new(
        serde_json::json!({"model_type": "llama", "hidden_size": 64, "torch_dtype": "float16"}),
    );
    ex.linears = ls.iter().map(|(n, q, _)| (n.clone(), q.clone())).collect();
    ex.dense.push((
        "model.embed_tokens.weight".into(),
        DenseTensor {
            shape: vec![10, 64],
            data: (0..640).map(|i| (i as f32 * 0.37).sin()).collect(),
            dtype: DenseDtype::BF16,
        },
    ));
    ex.dense.push((
        "model.norm.weight".into(),
        DenseTensor {
            shape: vec![64],
            data: (0..64).map(|i| 1.0 + i as f32 / 128.0).collect(),
            dtype: DenseDtype::F32,
        },
    ));
    ex.dense.push((
        "model.layers.0.mlp.up_proj.bias".into(),
        DenseTensor {
            shape: vec![128],
            data: (0..128).map(|i| i as f32 / 100.0).collect(),
            dtype: DenseDtype::F16,
        },
    ));
    ex.files
        .push(("tokenizer.json".into(), b"{\"model\": {}}".to_vec()));
    ex
}

/// The weight a loader computes: uniform `s16 * (q - z)` with the scale rounded to f16.
fn expected_uniform(q: &QuantizedLinear) -> Array2<f32> {
    Array2::from_shape_fn(q.shape(), |(r, k)| {
        let p = q.params(r, k);
        f16::from_f32(p.scale).to_f32() * (q.codes[[r, k]] as f32 - p.zero)
    })
}

fn as_map(v: Vec<(String, Array2<f32>)>) -> HashMap<String, Array2<f32>> {
    v.into_iter().collect()
}

fn check_dense(got: &HashMap<String, Array2<f32>>) {
    let e = &got["model.embed_tokens.weight"];
    assert_eq!(e.dim(), (10, 64));
    assert_eq!(
        e[[3, 5]],
        half::bf16::from_f32((197.0f32 * 0.37).sin()).to_f32()
    );
    assert_eq!(got["model.norm.weight"].dim(), (1, 64));
    assert_eq!(got["model.norm.weight"][[0, 10]], 1.0 + 10.0 / 128.0);
    assert_eq!(
        got["model.layers.0.mlp.up_proj.bias"][[0, 7]],
        f16::from_f32(0.07).to_f32()
    );
}

fn bit_equal(a: &Array2<f32>, b: &Array2<f32>) -> bool {
    a.dim() == b.dim()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn gptq_and_awq_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "gptq-v1-sym4",
            FormatSpec::Uniform(UniformGrid::new(4, true).unwrap()),
            Granularity::Group(32),
            HfQuantFormat::Gptq(GptqFormat::V1),
        ),
        (
            "gptq-v2-asym4",
            FormatSpec::Uniform(UniformGrid::new(4, false).unwrap()),
            Granularity::Group(32),
            HfQuantFormat::Gptq(GptqFormat::V2),
        ),
        (
            "gptq-v2-asym3",
            FormatSpec::Uniform(UniformGrid::new(3, false).unwrap()),
            Granularity::PerChannel,
            HfQuantFormat::Gptq(GptqFormat::V2),
        ),
        (
            "gptq-v1-sym8",
            FormatSpec::Uniform(UniformGrid::new(8, true).unwrap()),
            Granularity::Group(64),
            HfQuantFormat::Gptq(GptqFormat::V1),
        ),
        (
            "awq-asym4",
            FormatSpec::Uniform(UniformGrid::new(4, false).unwrap()),
            Granularity::Group(32),
            HfQuantFormat::Awq,
        ),
    ];
    for (label, spec, gran, fmt) in cases {
        let ls = linears(&spec, gran, 3);
        let out = dir.path().join(label);
        write_hf_dir(&out, &export(&ls), fmt).unwrap();
        let (config, got) = read_quantized_dir(&out).unwrap();
        let qc = &config["quantization_config"];
        let got = as_map(got);
        for (n, q, _) in &ls {
            let w = &got[&format!("{n}.weight")];
            assert!(bit_equal(w, &expected_uniform(q)), "{label} {n}");
        }
        check_dense(&got);
        assert_eq!(
            got.len(),
            ls.len() + 3,
            "{label}: {:?}",
            got.keys().collect::<Vec<_>>()
        );
        assert_eq!(config["model_type"], "llama");
        assert!(out.join("tokenizer.json").is_file());
        match fmt {
            HfQuantFormat::Gptq(f) => {
                let UniformGrid { bits, sym, .. } = match spec {
                    FormatSpec::Uniform(g) => g,
                    _ => unreachable!(),
                };
                let gs = match gran {
                    Granularity::Group(g) => g as i64,
                    _ => -1,
                };
                let want = serde_json::json!({"quant_method": "gptq", "bits": bits, "group_size": gs,
                    "desc_act": false, "sym": sym, "static_groups": false, "true_sequential": true,
                    "damp_percent": 0.01, "checkpoint_format": f.checkpoint_format(), "lm_head": false});
                assert_eq!(qc, &want, "{label}");
                let side: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(out.join("quantize_config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(side, want);
                assert_eq!(detect_format(&out).unwrap(), DetectedFormat::Gptq(f));
            }
            _ => {
                assert_eq!(
                    qc,
                    &serde_json::json!({"quant_method": "awq", "zero_point": true, "group_size": 32, "bits": 4, "version": "gemm"})
                );
                let side: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(out.join("quant_config.json")).unwrap())
                        .unwrap();
                assert_eq!(
                    side,
                    serde_json::json!({"zero_point": true, "q_group_size": 32, "w_bit": 4, "version": "GEMM"})
                );
            }
        }

        // The independent numpy reader agrees bit for bit.
        let oracle = dir.path().join(format!("{label}.safetensors"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oracles/export_hf.py");
        let probe = Command::new("python3")
            .args(["-c", "import numpy, safetensors"])
            .output();
        if !probe.map(|o| o.status.success()).unwrap_or(false) {
            eprintln!("SKIP: python3 with numpy + safetensors not available: numpy oracle not run");
            continue;
        }
        let o = Command::new("timeout")
            .args([
                "120",
                "python3",
                script.to_str().unwrap(),
                out.to_str().unwrap(),
                oracle.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{label}: oracle failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(&oracle).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (n, _, _) in &ls {
            let v = st.tensor(&format!("{n}.weight")).unwrap();
            let d: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let a = Array2::from_shape_vec((v.shape()[0], v.shape()[1]), d).unwrap();
            assert!(
                bit_equal(&a, &got[&format!("{n}.weight")]),
                "{label} {n}: numpy reader differs"
            );
        }
    }
}

#[test]
fn act_order_g_idx_round_trips_and_sets_desc_act() {
    let mut rng = StdRng::seed_from_u64(4);
    let w = random(&mut rng, 32, 64);
    let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
    // A permuted g_idx (act-order without static groups): groups by a column permutation.
    let perm: Vec<usize> = (0..64).map(|k| (k * 37) % 64).collect();
    let g_idx: Vec<u32> = (0..64)
        .map(|j| (perm.iter().position(|&p| p == j).unwrap() / 32) as u32)
        .collect();
    let q = QuantizedLinear::from_parts(
        q.spec.clone(),
        q.granularity,
        q.codes.clone(),
        q.scales.clone(),
        q.zeros.clone(),
        g_idx,
    )
    .unwrap();
    let mut ex = HfExport::new(serde_json::json!({}));
    ex.linears
        .push(("model.layers.0.mlp.up_proj".into(), q.clone()));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("act");
    write_hf_dir(&out, &ex, HfQuantFormat::Gptq(GptqFormat::V1)).unwrap();
    let (config, got) = read_quantized_dir(&out).unwrap();
    assert_eq!(config["quantization_config"]["desc_act"], true);
    assert!(bit_equal(&got[0].1, &expected_uniform(&q)));
}

#[test]
fn bitsandbytes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for (label, spec, dq) in [
        ("nf4", FormatSpec::Nf4, false),
        ("fp4", FormatSpec::Fp4, false),
        ("nf4-dq", FormatSpec::Nf4, true),
    ] {
        let mut ls = linears(&spec, Granularity::Group(64), 5);
        if dq {
            for l in ls.iter_mut() {
                l.1 =
                    l.1.clone()
                        .with_double_quant(DoubleQuant::default())
                        .unwrap();
            }
        }
        let out = dir.path().join(label);
        write_hf_dir(&out, &export(&ls), HfQuantFormat::Bnb4).unwrap();
        let (config, got) = read_quantized_dir(&out).unwrap();
        let qc = &config["quantization_config"];
        assert_eq!(qc["quant_method"], "bitsandbytes");
        assert_eq!(qc["load_in_4bit"], true);
        assert_eq!(
            qc["bnb_4bit_quant_type"],
            if label.starts_with("nf4") {
                "nf4"
            } else {
                "fp4"
            }
        );
        assert_eq!(qc["bnb_4bit_use_double_quant"], dq);
        let got = as_map(got);
        check_dense(&got);
        for (n, q, w) in &ls {
            let g = &got[&format!("{n}.weight")];
            // codebook value times (reconstructed) absmax: the same f32 product
            let d = q.dequantize();
            let worst = g
                .iter()
                .zip(d.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-7, "{label} {n}: {worst}");
            let err = g
                .iter()
                .zip(w.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 0.08, "{label} {n}: quantization error {err}");
        }
        // The keys transformers expects.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let p = "model.layers.0.mlp.up_proj.weight";
        assert_eq!(st.tensor(p).unwrap().shape(), &[128 * 64 / 2, 1]);
        let qs_name = format!("{p}.quant_state.bitsandbytes__{}", &label[..3]);
        let js: serde_json::Value =
            serde_json::from_slice(st.tensor(&qs_name).unwrap().data()).unwrap();
        assert_eq!(js["shape"], serde_json::json!([128, 64]));
        assert_eq!(js["blocksize"], 64);
        assert_eq!(st.names().iter().any(|n| n.ends_with("nested_absmax")), dq);
    }
    // LLM.int8
    let ls = linears(&FormatSpec::Int8, Granularity::PerChannel, 6);
    let out = dir.path().join("int8");
    write_hf_dir(&out, &export(&ls), HfQuantFormat::Int8).unwrap();
    let (config, got) = read_quantized_dir(&out).unwrap();
    assert_eq!(config["quantization_config"]["load_in_8bit"], true);
    let got = as_map(got);
    for (n, q, _) in &ls {
        let g = &got[&format!("{n}.weight")];
        // SCB * q / 127 by hand
        let want = Array2::from_shape_fn(q.shape(), |(r, k)| {
            (q.codes[[r, k]] as i8) as f32 * (q.scales[[r, 0]] / 127.0)
        });
        assert!(bit_equal(g, &want), "int8 {n}");
        let d = q.dequantize();
        assert!(g.iter().zip(d.iter()).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}

#[test]
fn shards_and_index() {
    let spec = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let ls = linears(&spec, Granularity::Group(32), 8);
    let mut ex = export(&ls);
    ex.max_shard_bytes = 4096;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sharded");
    write_hf_dir(&out, &ex, HfQuantFormat::Gptq(GptqFormat::V1)).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 2, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        assert!(out.join(f).is_file());
    }
    let total: u64 = files
        .iter()
        .map(|f| {
            let b = std::fs::read(out.join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&b).unwrap();
            st.tensors()
                .iter()
                .map(|(_, v)| v.data().len() as u64)
                .sum::<u64>()
        })
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert!(!out.join("model.safetensors").exists());
    let (_, got) = read_quantized_dir(&out).unwrap();
    let got = as_map(got);
    for (n, q, _) in &ls {
        assert!(bit_equal(
            &got[&format!("{n}.weight")],
            &expected_uniform(q)
        ));
    }
    // Re-exporting over it replaces the directory.
    ex.max_shard_bytes = 1 << 30;
    write_hf_dir(&out, &ex, HfQuantFormat::Gptq(GptqFormat::V1)).unwrap();
    assert!(
        out.join("model.safetensors").is_file()
            && !out.join("model.safetensors.index.json").exists()
    );
}

#[test]
fn shapes_a_format_cannot_hold_fail_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(10);
    let sym4 = FormatSpec::Uniform(UniformGrid::new(4, true).unwrap());
    let asym4 = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
    let good = quantize_rtn(
        "a",
        random(&mut rng, 32, 64).view(),
        &sym4,
        Granularity::Group(32),
    )
    .unwrap();
    // out = 20 is not a multiple of 32 (GPTQ) nor 8 (AWQ)
    let odd = quantize_rtn(
        "b",
        random(&mut rng, 20, 64).view(),
        &sym4,
        Granularity::Group(32),
    )
    .unwrap();
    // asymmetric with a real zero of 0 (all-positive rows): v1 cannot store it
    let pos = Array2::from_shape_fn((32, 64), |(r, k)| 0.1 + ((r + k) % 7) as f32 * 0.05);
    let zero0 = quantize_rtn("c", pos.view(), &asym4, Granularity::Group(32)).unwrap();
    let cases: Vec<(&str, QuantizedLinear, HfQuantFormat, &str)> = vec![
        (
            "model.layers.3.mlp.odd_proj",
            odd.clone(),
            HfQuantFormat::Gptq(GptqFormat::V1),
            "odd_proj",
        ),
        (
            "model.layers.3.mlp.odd_proj",
            odd,
            HfQuantFormat::Awq,
            "odd_proj",
        ),
        (
            "model.layers.3.mlp.zero_proj",
            zero0,
            HfQuantFormat::Gptq(GptqFormat::V1),
            "zero_proj",
        ),
        (
            "model.layers.3.mlp.nf_proj",
            good.clone(),
            HfQuantFormat::Bnb4,
            "nf_proj",
        ),
        (
            "model.layers.3.mlp.i8_proj",
            good.clone(),
            HfQuantFormat::Int8,
            "i8_proj",
        ),
    ];
    for (i, (name, q, fmt, needle)) in cases.into_iter().enumerate() {
        let mut ex = HfExport::new(serde_json::json!({}));
        ex.linears.push((name.into(), q));
        if i < 2 {
            ex.linears
                .push(("model.layers.0.mlp.up_proj".into(), good.clone()));
        }
        let out = dir.path().join(format!("bad{i}"));
        let e = write_hf_dir(&out, &ex, fmt).unwrap_err();
        assert!(e.to_string().contains(needle), "{fmt:?}: {e}");
        assert!(!out.exists(), "{fmt:?} left {out:?}");
        assert!(!dir.path().join(format!("bad{i}.tmp")).exists());
    }
    // Mixed settings between linears: one config per checkpoint.
    let mut ex = HfExport::new(serde_json::json!({}));
    ex.linears.push(("a".into(), good.clone()));
    let other = quantize_rtn(
        "b",
        random(&mut rng, 32, 64).view(),
        &sym4,
        Granularity::Group(64),
    )
    .unwrap();
    ex.linears.push(("model.layers.1.mlp.b_proj".into(), other));
    let e = write_hf_dir(
        &dir.path().join("mixed"),
        &ex,
        HfQuantFormat::Gptq(GptqFormat::V1),
    )
    .unwrap_err();
    assert!(e.to_string().contains("b_proj"), "{e}");
    // Reading a directory without config.json names the file.
    let e = read_quantized_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
}
