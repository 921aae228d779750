//! GGUF IQ4_XS blocks (ggml type 23, `block_iq4_xs { f16 d; u16 scales_h; u8 scales_l[4];
//! u8 qs[128]; }` per 256 weights): the layout by hand (bytes built from the field formulas,
//! decoded by the formula), and every kind of block we write (hand-built, arbitrary bytes,
//! the reference and importance-weighted quantizer, GPTQ- and RTN-placed linears on the
//! IQ4_XS grid through `GgufTensor::from_quantized`) in one GGUF file, read back by the
//! `gguf` Python package (tests/oracles/export_gguf.py: GGUFReader and
//! `gguf.quants.dequantize`) and by our model loader (`quantlab_models::GgufWeights`, which
//! decodes IQ4_XS itself since candle cannot): both must give exactly our decoded values.
//!
//! The Python half skips visibly (a `SKIP` line) when python3 or the `gguf` package is
//! missing; the model-loader half runs regardless.

use half::f16;
use ndarray::Array2;
use quantlab_checkpoints::export::gguf::{write_gguf_metadata, GgufTensor};
use quantlab_checkpoints::gguf::{GgmlType, GgufValue};
use quantlab_checkpoints::pack::gguf_blocks::{self, scale_iq4_xs, BlockIQ4_XS, GgufBlock};
use quantlab_grids::ggml::IQ4_NL_LEVELS;
use quantlab_grids::ggml_k::KSuperParams;
use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity};
use quantlab_models::WeightSource;
use quantlab_solvers::gptq::{gptq, GptqParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One IQ4_XS block's bytes from its fields, written from the layout facts alone: `d`
/// (f16 LE), `scales_h` (u16 LE: bits `2 ib..2 ib + 2` = `ls[ib] >> 4`), `scales_l[i]` =
/// `ls[2i] & 0xF | (ls[2i + 1] & 0xF) << 4`, then the 128 `qs` bytes.
fn block_bytes(d: f16, ls: &[u8; 8], qs: &[u8; 128]) -> Vec<u8> {
    let mut b = d.to_le_bytes().to_vec();
    let h = (0..8).fold(0u16, |h, ib| h | (((ls[ib] >> 4) & 3) as u16) << (2 * ib));
    b.extend(h.to_le_bytes());
    b.extend((0..4).map(|i| (ls[2 * i] & 0xF) | (ls[2 * i + 1] & 0xF) << 4));
    b.extend_from_slice(qs);
    b
}

/// ggml's decode of one block by the formula: weight `32 ib + j` (`j < 16`) is
/// `d * (ls - 32) * kvalues[qs[16 ib + j] & 0xF]`, weight `32 ib + j + 16` the high nibble.
fn decode_by_formula(d: f16, ls: &[u8; 8], qs: &[u8; 128]) -> Vec<f32> {
    let mut y = vec![0.0f32; 256];
    for ib in 0..8 {
        let dl = d.to_f32() * (ls[ib] as i32 - 32) as f32;
        for j in 0..16 {
            let b = qs[16 * ib + j];
            y[32 * ib + j] = dl * IQ4_NL_LEVELS[(b & 0xF) as usize] as f32;
            y[32 * ib + j + 16] = dl * IQ4_NL_LEVELS[(b >> 4) as usize] as f32;
        }
    }
    y
}

/// Eight hand blocks (one per row): block `r` has `ls = 8 r + ib` (all 64 stored scales
/// over the eight), a different `d` each (both signs, an f16 subnormal, the largest f16, 0)
/// and `qs` cycling through the byte values.
fn hand_blocks() -> Vec<(f16, [u8; 8], [u8; 128])> {
    let ds = [
        1.0f32,
        -0.5,
        5.960_464_5e-8,
        65504.0,
        -3.0e-5,
        0.0,
        0.123,
        -7.25,
    ];
    (0..8)
        .map(|r| {
            let ls: [u8; 8] = std::array::from_fn(|ib| (8 * r + ib) as u8);
            let qs: [u8; 128] = std::array::from_fn(|k| ((37 * k + 101 * r) % 256) as u8);
            (f16::from_f32(ds[r]), ls, qs)
        })
        .collect()
}

fn bitwise_equal(a: &[f32], b: &[f32]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
}

#[test]
fn iq4_xs_layout_by_hand() {
    assert_eq!(
        (
            BlockIQ4_XS::TYPE_ID,
            BlockIQ4_XS::QK,
            BlockIQ4_XS::TYPE_SIZE
        ),
        (23, 256, 136)
    );
    assert_eq!(GgmlType::IQ4_XS.type_size(), 136);
    for (d, ls, qs) in hand_blocks() {
        let bytes = block_bytes(d, &ls, &qs);
        assert_eq!(bytes.len(), 136);
        // decode: our block type against the formula
        let ours = gguf_blocks::dequantize("hand", GgmlType::IQ4_XS, &bytes).unwrap();
        let want = decode_by_formula(d, &ls, &qs);
        assert_eq!(bitwise_equal(&ours, &want), None, "d {d}");
        let b = gguf_blocks::from_bytes::<BlockIQ4_XS>("hand", &bytes).unwrap()[0];
        for ib in 0..8 {
            assert_eq!(
                scale_iq4_xs(b.scales_h, &b.scales_l, ib),
                ls[ib] as i32 - 32
            );
        }
        // encode: from_parts packs the signed scales and codes into exactly these bytes
        let sp = KSuperParams {
            d: d.to_f32(),
            dmin: 0.0,
            sc: ls.iter().map(|&l| l as i32 - 32).collect(),
            m: vec![0; 8],
        };
        let codes: [u8; 256] = std::array::from_fn(|e| {
            let (ib, j) = (e / 32, e % 32);
            let byte = qs[16 * ib + j % 16];
            if j < 16 {
                byte & 0xF
            } else {
                byte >> 4
            }
        });
        let packed = gguf_blocks::k_block_bytes(GgmlGrid::IQ4_XS, &sp, &codes);
        assert_eq!(packed, bytes, "from_parts of d {d}");
    }
}

/// Runs export_gguf.py on `file` under a time limit; `false` (after a SKIP line) without
/// python3 / gguf / numpy / safetensors.
fn python_oracle(file: &Path, out: &Path) -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import gguf, numpy, safetensors"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        eprintln!("SKIP: python3 with gguf, numpy, safetensors is not available");
        return false;
    }
    let o = Command::new("timeout")
        .arg("120")
        .arg("python3")
        .arg(repo_root().join("tests/oracles/export_gguf.py"))
        .arg(file)
        .arg(out)
        .output()
        .expect("run python3");
    assert!(
        o.status.success(),
        "export_gguf.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("oracle JSON");
    for t in info["tensors"].as_array().unwrap() {
        if t["name"].as_str().unwrap().contains("ffn_down") {
            assert_eq!(t["type"], "IQ4_XS", "{t}");
        }
    }
    true
}

fn read_f32_safetensors(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, d)
        })
        .collect()
}

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[test]
fn iq4_xs_blocks_decode_in_the_gguf_package_and_our_model_loader_to_our_values() {
    let mut rng = StdRng::seed_from_u64(12);
    // name -> (tensor, our decoded values)
    let mut cases: Vec<(String, GgufTensor, Vec<f32>)> = Vec::new();
    let push = |name: String, t: GgufTensor, cases: &mut Vec<(String, GgufTensor, Vec<f32>)>| {
        let ours = gguf_blocks::dequantize(&name, t.ty, &t.bytes).unwrap();
        cases.push((name, t, ours));
    };
    let xs = |shape: [usize; 2], bytes: Vec<u8>| GgufTensor {
        ty: GgmlType::IQ4_XS,
        shape: shape.to_vec(),
        bytes,
    };

    // 1. the hand blocks (every stored scale, both signs of d, subnormal and extreme d)
    let hand: Vec<u8> = hand_blocks()
        .iter()
        .flat_map(|(d, ls, qs)| block_bytes(*d, ls, qs))
        .collect();
    push(
        "blk.0.ffn_down.weight".into(),
        xs([8, 256], hand),
        &mut cases,
    );

    // 2. arbitrary bytes (any bytes are a block; d kept finite: exponent bits not all ones)
    let mut raw: Vec<u8> = (0..6 * 136).map(|_| rng.random()).collect();
    for b in raw.chunks_exact_mut(136) {
        b[1] &= 0xBB; // clears bit 14 and bit 10 of d: never the f16 inf / NaN exponent
    }
    push(
        "blk.1.ffn_down.weight".into(),
        xs([3, 512], raw),
        &mut cases,
    );

    // 3. the reference and the importance-weighted block quantizer on awkward rows
    let (rows, cols) = (6, 512);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| match i / cols {
            0 => gaussian(&mut rng),
            1 => 1e-6 * gaussian(&mut rng), // scales in f16 subnormals
            2 => 1000.0 * gaussian(&mut rng),
            3 => {
                if i % cols < 256 {
                    0.0
                } else {
                    0.3
                }
            }
            4 => 0.5 * rng.random_range(-4i32..=4) as f32,
            _ => ((i % cols) as f32 * 0.37).sin() * (1.0 + (i % cols / 32) as f32),
        })
        .collect();
    let imp: Vec<f32> = (0..x.len())
        .map(|i| if i % 7 == 0 { 50.0 } else { 0.5 })
        .collect();
    for (k, w) in [(2, None), (3, Some(&imp[..]))] {
        let bytes = gguf_blocks::quantize("x", GgmlType::IQ4_XS, &x, w).unwrap();
        push(
            format!("blk.{k}.ffn_down.weight"),
            xs([rows, cols], bytes),
            &mut cases,
        );
    }

    // 4. GPTQ (natural order as the pipeline runs super-block grids, and act-order with
    // static groups) and RTN on the IQ4_XS grid, written by GgufTensor::from_quantized
    let (out, n) = (8, 768);
    let w = Array2::from_shape_fn((out, n), |(r, k)| {
        (0.02 + ((k / 32 + r) % 5) as f32 * 0.04) * gaussian(&mut rng)
    });
    let xin = Array2::from_shape_fn((2 * n, n), |(_, k)| {
        gaussian(&mut rng) * if k % 7 == 0 { 4.0 } else { 1.0 }
    });
    let h = xin.t().dot(&xin) / (2 * n) as f32;
    let spec = FormatSpec::Ggml(GgmlGrid::IQ4_XS);
    let base = GptqParams {
        granularity: Granularity::Group(32),
        ..Default::default()
    };
    let (natural, _) = gptq(w.view(), h.view(), &spec, &base).unwrap();
    let static_ao = GptqParams {
        act_order: true,
        static_groups: true,
        ..base
    };
    let (ao, _) = gptq(w.view(), h.view(), &spec, &static_ao).unwrap();
    let rtn = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
    assert_ne!(natural.codes, rtn.codes, "GPTQ moved codes");
    for (k, q) in [(4, &natural), (5, &ao), (6, &rtn)] {
        let name = format!("blk.{k}.ffn_down.weight");
        let t = GgufTensor::from_quantized(&name, q).unwrap();
        assert_eq!(t.ty, GgmlType::IQ4_XS);
        assert_eq!(t.bytes.len(), out * n / 256 * 136);
        // exactly the codes and parameters GPTQ chose
        let want: Vec<f32> = q.dequantize().iter().copied().collect();
        let ours = gguf_blocks::dequantize(&name, t.ty, &t.bytes).unwrap();
        assert_eq!(bitwise_equal(&ours, &want), None, "{name}");
        push(name, t, &mut cases);
    }

    // neighbours of other types, so the loader's offsets between stand-in and real types
    // are exercised: IQ4_NL (also decoded by the loader itself) and Q8_0 (by candle)
    let wf: Vec<f32> = w.iter().copied().collect();
    for (name, ty) in [
        ("blk.7.ffn_up.weight", GgmlType::IQ4_NL),
        ("blk.7.ffn_gate.weight", GgmlType::Q8_0),
    ] {
        let bytes = gguf_blocks::quantize(name, ty, &wf, None).unwrap();
        let t = GgufTensor {
            ty,
            shape: vec![out, n],
            bytes,
        };
        push(name.into(), t, &mut cases);
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("iq4_xs.gguf");
    let meta = vec![(
        "general.architecture".to_string(),
        GgufValue::String("llama".into()),
    )];
    let tensors: Vec<(String, GgufTensor)> = cases
        .iter()
        .map(|(n, t, _)| (n.clone(), t.clone()))
        .collect();
    write_gguf_metadata(&file, &meta, &tensors).unwrap();

    // our model loader (candle cannot read IQ4_XS: the loader decodes it)
    let src = quantlab_models::GgufWeights::open(&file).unwrap();
    for (name, t, ours) in &cases {
        let got = src.load_raw(name).unwrap();
        assert_eq!(got.dims(), &t.shape[..], "{name}");
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        if let Some(i) = bitwise_equal(&got, ours) {
            panic!("{name}: model loader {} vs ours {} at {i}", got[i], ours[i]);
        }
    }
    // through the Hugging Face name as the model reads it
    let hf = src.load("model.layers.4.mlp.down_proj.weight").unwrap();
    let hf: Vec<f32> = hf.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = natural.dequantize().iter().copied().collect();
    assert_eq!(bitwise_equal(&hf, &want), None, "HF name");

    // the peer: the gguf package's reader and dequantizer
    let out_st = dir.path().join("deq.safetensors");
    if !python_oracle(&file, &out_st) {
        return;
    }
    let theirs = read_f32_safetensors(&out_st);
    for (name, _, ours) in &cases {
        let t = &theirs[name];
        if let Some(i) = bitwise_equal(t, ours) {
            panic!("{name}: gguf package {} vs ours {} at {i}", t[i], ours[i]);
        }
    }
    eprintln!(
        "{} tensors: the gguf package and our model loader decode exactly our values",
        cases.len()
    );
}
