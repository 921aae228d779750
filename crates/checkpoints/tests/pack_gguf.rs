//! GGUF blocks against the `gguf` Python package (tests/oracles/pack_gguf.py): its
//! dequantizer must give exactly our values for every type, and its quantizer exactly our
//! bytes for the legacy types; plus hand-computed cases, byte round trips, error cases,
//! quality checks of the K-quant and importance searches.

use half::f16;
use proptest::prelude::*;
use quantlab_checkpoints::pack::gguf_blocks::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Rows of 512 values that exercise the edge cases of the rounding rules.
fn test_matrix(seed: u64) -> (usize, usize, Vec<f32>) {
    let (rows, cols) = (9, 512);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let v = match r {
                0 => gaussian(&mut rng),
                1 => {
                    // small weights with rare outliers
                    let g = 0.02 * gaussian(&mut rng);
                    if rng.random_range(0..64) == 0 {
                        g * 80.0
                    } else {
                        g
                    }
                }
                2 => {
                    if c < 256 {
                        0.0
                    } else {
                        0.3
                    }
                }
                3 => 1e-6 * gaussian(&mut rng), // scales become f16 subnormals
                4 => rng.random_range(0.5f32..2.0),
                5 => -rng.random_range(0.0f32..3.0),
                6 => 0.5 * rng.random_range(-4i32..=4) as f32, // exact ties and equal |max|
                7 => 1000.0 * gaussian(&mut rng),
                _ => (c as f32 * 0.37).sin() * (1.0 + (c / 64) as f32),
            };
            x.push(v);
        }
    }
    (rows, cols, x)
}

fn python_with(modules: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: python3 with {modules} is not available");
    }
    ok
}

#[test]
fn gguf_package_dequantizes_our_blocks_exactly_and_quantizes_legacy_types_to_our_bytes() {
    if !python_with("numpy, safetensors, gguf") {
        return;
    }
    let (rows, cols, x) = test_matrix(11);
    let mut rng = StdRng::seed_from_u64(5);
    let importance: Vec<f32> = x
        .iter()
        .map(|_| {
            if rng.random_range(0..8) == 0 {
                rng.random_range(10.0f32..100.0)
            } else {
                rng.random_range(0.0f32..1.0)
            }
        })
        .collect();
    // name -> (type, our bytes, weighted?)
    let mut cases: Vec<(String, GgmlType, Vec<u8>, bool)> = Vec::new();
    for ty in BLOCK_TYPES {
        let b = quantize("x", ty, &x, None).unwrap();
        cases.push((ty.name().to_string(), ty, b, false));
        let b = quantize("x", ty, &x, Some(&importance)).unwrap();
        cases.push((format!("{}w", ty.name()), ty, b, true));
    }
    let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::new();
    let mut meta = serde_json::Map::new();
    for (name, ty, bytes, _) in &cases {
        let row_bytes = cols / ty.block_size() as usize * ty.type_size() as usize;
        assert_eq!(bytes.len(), rows * row_bytes);
        views.push((
            format!("{name}.bytes"),
            TensorView::new(Dtype::U8, vec![rows, row_bytes], bytes).unwrap(),
        ));
        views.push((
            format!("{name}.x"),
            TensorView::new(Dtype::F32, vec![rows, cols], &xb).unwrap(),
        ));
        meta.insert(name.clone(), ty.name().into());
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("in.st"), dir.path().join("out.st"));
    let info = HashMap::from([("cases".into(), serde_json::Value::Object(meta).to_string())]);
    safetensors::serialize_to_file(views, Some(info), &src).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oracles/pack_gguf.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let buf = std::fs::read(&dst).unwrap();
    let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
    let mut pinned = Vec::new();
    for (name, ty, bytes, weighted) in &cases {
        let ours = dequantize(name, *ty, bytes).unwrap();
        let theirs: Vec<f32> = st
            .tensor(&format!("{name}.deq"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{name}: value {i}: ours {a} gguf {b}"
            );
        }
        if let (Ok(r), false) = (st.tensor(&format!("{name}.ref")), weighted) {
            let theirs = r.data();
            if let Some(i) = (0..bytes.len()).find(|&i| bytes[i] != theirs[i]) {
                panic!(
                    "{name}: byte {i} (block {}, offset {}): ours {:#04x} gguf {:#04x}",
                    i / ty.type_size() as usize,
                    i % ty.type_size() as usize,
                    bytes[i],
                    theirs[i]
                );
            }
            pinned.push(ty.name());
        }
    }
    eprintln!(
        "bit-exact dequantization for {} cases; quantizer bytes pinned for {pinned:?}",
        cases.len()
    );
    for t in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] {
        assert!(
            pinned.contains(&t),
            "gguf.quants could not quantize {t}: nothing pinned it"
        );
    }
}

#[test]
fn sizes_and_type_ids_match_ggml() {
    // (type, id, block, bytes) from ggml's type table
    let table = [
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q2_K, 10, 256, 84),
        (GgmlType::Q3_K, 11, 256, 110),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::IQ4_NL, 20, 32, 18),
        (GgmlType::IQ4_XS, 23, 256, 136),
    ];
    for (ty, id, qk, size) in table {
        assert_eq!(
            (ty.id(), ty.block_size(), ty.type_size()),
            (id, qk, size),
            "{ty:?}"
        );
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert!(has_blocks(ty), "{ty:?}");
        // the block struct behind the type writes exactly that many bytes per block
        let x = vec![0.5f32; 2 * qk as usize];
        assert_eq!(
            quantize("x", ty, &x, None).unwrap().len(),
            2 * size as usize,
            "{ty:?}"
        );
    }
    assert_eq!(std::mem::size_of::<BlockQ4_K>(), 144);
    assert_eq!(std::mem::size_of::<BlockQ6_K>(), 210);
    assert_eq!(std::mem::size_of::<BlockIQ4_XS>(), 136);
    // BF16 is a GGUF type, but not a block type: refused by name
    let bf16 = GgmlType::from_id(30).unwrap();
    assert!(!has_blocks(bf16));
    let e = quantize("x", bf16, &[0.0; 32], None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("BF16") && e.contains("no block quantizer"),
        "{e}"
    );
}

#[test]
fn q4_0_by_hand() {
    // x_j = (j - 16) / 4: largest |x| is -4 at j = 0, so d = -4 / -8 = 0.5 and
    // q_j = trunc((j - 16) / 2 + 8.5) = floor((j + 1) / 2), capped at 15.
    let x: Vec<f32> = (0..32).map(|j| (j as f32 - 16.0) / 4.0).collect();
    let bytes = quantize("hand", GgmlType::Q4_0, &x, None).unwrap();
    let q: Vec<u8> = (0..32).map(|j| ((j + 1) / 2).min(15) as u8).collect();
    let mut expect = vec![0x00, 0x38]; // f16 0.5 = 0x3800, little-endian
    expect.extend((0..16).map(|j| q[j] | q[j + 16] << 4));
    assert_eq!(bytes, expect);
    let y = dequantize("hand", GgmlType::Q4_0, &bytes).unwrap();
    for j in 0..32 {
        assert_eq!(y[j], (q[j] as f32 - 8.0) * 0.5);
    }
}

#[test]
fn q8_0_by_hand() {
    // amax 127 -> d = 1; x = k + 0.5 rounds half away from zero
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = -127.0;
    let bytes = quantize("q8", GgmlType::Q8_0, &x, None).unwrap();
    assert_eq!(&bytes[..2], &f16::ONE.to_le_bytes());
    assert_eq!(&bytes[2..6], &[127u8, 3, (-3i8) as u8, (-127i8) as u8]);
}

#[test]
fn k_quant_layouts_by_hand() {
    // A Q6_K block that holds code u = e % 64 at weight e, scale 1, d = 1: y_e = (e % 64) - 32.
    let mut b = BlockQ6_K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [1; 16],
        d: f16::ONE,
    };
    for e in 0..256 {
        let u = (e % 64) as u8;
        let (h, r) = (e / 128, e % 128);
        b.ql[64 * h + r % 64] |= (u & 0xF) << (4 * (r / 64));
        b.qh[32 * h + r % 32] |= (u >> 4) << (2 * (r / 32));
    }
    let mut y = [0.0f32; 256];
    BlockQ6_K::dequantize(&[b], &mut y);
    for e in 0..256 {
        assert_eq!(y[e], (e % 64) as f32 - 32.0, "weight {e}");
    }
    // Q4_K scale packing: sub-block j gets scale j + 40 (6 bits, uses the high bits) and min
    // 63 - j.
    let sc: Vec<u8> = (0..8).map(|j| j + 40).collect();
    let m: Vec<u8> = (0..8).map(|j| 63 - j).collect();
    let mut scales = [0u8; 12];
    // ggml's layout: bytes 0..4 low 6 bits of sc[0..4] with sc[4..8] >> 4 in bits 6..7,
    // bytes 4..8 likewise for the mins, bytes 8..12 low nibbles of sc[4..8] | m[4..8] << 4.
    for j in 0..4 {
        scales[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        scales[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
        scales[j + 8] = (sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4;
    }
    for j in 0..8 {
        assert_eq!(scale_min_k4(&scales, j), (sc[j], m[j]), "sub-block {j}");
    }
}

/// Root-mean-square error of quantizing `x` as `ty`.
fn rmse(ty: GgmlType, x: &[f32], w: Option<&[f32]>) -> f64 {
    let y = dequantize("x", ty, &quantize("x", ty, x, w).unwrap()).unwrap();
    let e: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    (e / x.len() as f64).sqrt()
}

#[test]
fn k_quants_order_by_bits_and_beat_plain_min_max_rounding() {
    let mut rng = StdRng::seed_from_u64(3);
    let x: Vec<f32> = (0..256 * 64).map(|_| gaussian(&mut rng)).collect();
    let e: HashMap<&str, f64> = BLOCK_TYPES
        .iter()
        .map(|&t| (t.name(), rmse(t, &x, None)))
        .collect();
    eprintln!("rmse on N(0,1): {e:?}");
    assert!(e["Q2_K"] > e["Q3_K"] && e["Q3_K"] > e["Q4_K"]);
    assert!(e["Q4_K"] > e["Q5_K"] && e["Q5_K"] > e["Q6_K"]);
    // Q4_K (4.5 bits) must beat Q4_0 (4.5 bits) and plain per-32 min-max rounding with exact
    // f32 scale and min (the search pays for the 6-bit scales).
    let minmax: f64 = {
        let mut s = 0.0;
        for b in x.chunks(32) {
            let lo = b.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
            let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (hi - lo) / 15.0;
            for &v in b {
                let q = ((v - lo) / d).round().clamp(0.0, 15.0);
                s += ((v - (q * d + lo)) as f64).powi(2);
            }
        }
        (s / x.len() as f64).sqrt()
    };
    eprintln!("plain min-max (min <= 0) per 32: {minmax}");
    assert!(e["Q4_K"] < e["Q4_0"], "{} vs {}", e["Q4_K"], e["Q4_0"]);
    assert!(e["Q4_K"] < minmax, "{} vs {minmax}", e["Q4_K"]);
    assert!(e["Q5_K"] < e["Q5_0"] && e["Q6_K"] < e["Q8_0"] * 4.0);
}

#[test]
fn importance_weighting_lowers_the_weighted_error() {
    let mut rng = StdRng::seed_from_u64(9);
    let x: Vec<f32> = (0..256 * 32).map(|_| gaussian(&mut rng)).collect();
    // a few weights per block matter 100 times more
    let w: Vec<f32> = (0..x.len())
        .map(|_| {
            if rng.random_range(0..16) == 0 {
                100.0
            } else {
                1.0
            }
        })
        .collect();
    let werr = |ty: GgmlType, imp: Option<&[f32]>| -> f64 {
        let y = dequantize("x", ty, &quantize("x", ty, &x, imp).unwrap()).unwrap();
        x.iter()
            .zip(&y)
            .zip(&w)
            .map(|((a, b), wi)| *wi as f64 * ((a - b) as f64).powi(2))
            .sum()
    };
    for ty in BLOCK_TYPES {
        let (plain, weighted) = (werr(ty, None), werr(ty, Some(&w)));
        eprintln!(
            "{}: weighted objective {plain:.4} -> {weighted:.4} ({:.2})",
            ty.name(),
            weighted / plain
        );
        assert!(
            weighted <= plain * 1.0001,
            "{}: {weighted} > {plain}",
            ty.name()
        );
        if matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_K
        ) {
            assert!(
                weighted < 0.9 * plain,
                "{}: {weighted} vs {plain}",
                ty.name()
            );
        }
    }
}

#[test]
fn bad_input_is_a_named_error() {
    let e = quantize("blk.3.attn_v.weight", GgmlType::Q4_K, &[0.0; 576], None).unwrap_err();
    assert!(
        e.to_string().contains("`blk.3.attn_v.weight`") && e.to_string().contains("256"),
        "{e}"
    );
    let mut x = vec![0.0f32; 64];
    x[40] = f32::NAN;
    let e = quantize("nan.weight", GgmlType::Q8_0, &x, None).unwrap_err();
    assert!(
        e.to_string().contains("`nan.weight`") && e.to_string().contains("index 40"),
        "{e}"
    );
    let e = quantize("imp", GgmlType::Q4_0, &[1.0; 32], Some(&[1.0; 31])).unwrap_err();
    assert!(e.to_string().contains("`imp`"), "{e}");
    let e = quantize("neg", GgmlType::Q4_0, &[1.0; 32], Some(&[-1.0; 32])).unwrap_err();
    assert!(e.to_string().contains("`neg`"), "{e}");
    let e = dequantize("short.weight", GgmlType::Q6_K, &[0u8; 209]).unwrap_err();
    assert!(
        e.to_string().contains("`short.weight`") && e.to_string().contains("210"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any bytes are some block: reading then writing gives the same bytes.
    #[test]
    fn bytes_round_trip(ty_i in 0usize..12, n in 1usize..4, seed in any::<u64>()) {
        let ty = BLOCK_TYPES[ty_i];
        let mut rng = StdRng::seed_from_u64(seed);
        let bytes: Vec<u8> = (0..n * ty.type_size() as usize).map(|_| rng.random()).collect();
        macro_rules! check { ($B:ty) => {{
            let blocks = from_bytes::<$B>("p", &bytes).unwrap();
            prop_assert_eq!(blocks.len(), n);
            prop_assert_eq!(to_bytes(&blocks), bytes.clone());
        }}}
        match ty {
            GgmlType::Q4_0 => check!(BlockQ4_0),
            GgmlType::Q4_1 => check!(BlockQ4_1),
            GgmlType::Q5_0 => check!(BlockQ5_0),
            GgmlType::Q5_1 => check!(BlockQ5_1),
            GgmlType::Q8_0 => check!(BlockQ8_0),
            GgmlType::Q2_K => check!(BlockQ2_K),
            GgmlType::Q3_K => check!(BlockQ3_K),
            GgmlType::Q4_K => check!(BlockQ4_K),
            GgmlType::Q5_K => check!(BlockQ5_K),
            GgmlType::Q6_K => check!(BlockQ6_K),
            GgmlType::IQ4_NL => check!(BlockIQ4_NL),
            GgmlType::IQ4_XS => check!(BlockIQ4_XS),
            other => unreachable!("{other:?} is not in BLOCK_TYPES"),
        }
    }

    /// Quantizing an already-quantized row again gives the same values (the grid point
    /// reproduces itself) for the legacy types.
    #[test]
    fn requantizing_is_stable(ty_i in 0usize..5, seed in any::<u64>()) {
        let ty = BLOCK_TYPES[ty_i];
        let mut rng = StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..64).map(|_| gaussian(&mut rng)).collect();
        let y = dequantize("p", ty, &quantize("p", ty, &x, None).unwrap()).unwrap();
        let y2 = dequantize("p", ty, &quantize("p", ty, &y, None).unwrap()).unwrap();
        for (a, b) in y.iter().zip(&y2) {
            prop_assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{} {} {}", ty.name(), a, b);
        }
    }
}

/// One fitter per legacy type: with importance, each block is the grid's own weighted fit
/// (`quantlab_grids::quantize_ggml_weighted`, the search the grid's RTN and GPTQ use) where
/// that beats ggml's reference block under the weighted error, else the reference block.
#[test]
fn weighted_legacy_blocks_are_the_grids_own_fit() {
    use quantlab_checkpoints::pack::gguf_blocks::{dequantize, quantize, GgmlType};
    use quantlab_grids::ggml::quantize_ggml_weighted;
    use quantlab_grids::GgmlGrid;
    let n = 32 * 64;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.377).sin() * 2.0 + (i % 11) as f32 * 0.05).powi(3))
        .collect();
    let w: Vec<f32> = (0..n).map(|i| 0.1 + ((i * 7919) % 97) as f32).collect();
    let err = |y: &[f32], r: std::ops::Range<usize>| -> f64 {
        r.map(|i| w[i] as f64 * (x[i] - y[i]) as f64 * (x[i] - y[i]) as f64)
            .sum()
    };
    for (ty, grid) in [
        (GgmlType::Q4_0, GgmlGrid::Q4_0),
        (GgmlType::Q4_1, GgmlGrid::Q4_1),
        (GgmlType::Q5_0, GgmlGrid::Q5_0),
        (GgmlType::Q5_1, GgmlGrid::Q5_1),
        (GgmlType::Q8_0, GgmlGrid::Q8_0),
    ] {
        let ours = dequantize("w", ty, &quantize("w", ty, &x, Some(&w)).unwrap()).unwrap();
        let reference = dequantize("w", ty, &quantize("w", ty, &x, None).unwrap()).unwrap();
        let xs = ndarray::ArrayView2::from_shape((1, n), &x).unwrap();
        let grid_fit = quantize_ggml_weighted("w", xs, grid, Some(&w))
            .unwrap()
            .dequantize();
        let grid_fit = grid_fit.as_slice().unwrap();
        let mut from_grid = 0;
        for b in 0..n / 32 {
            let r = b * 32..(b + 1) * 32;
            let want = if err(grid_fit, r.clone()) < err(&reference, r.clone()) {
                from_grid += 1;
                &grid_fit[r.clone()]
            } else {
                &reference[r.clone()]
            };
            assert_eq!(&ours[r.clone()], want, "{ty:?} block {b}");
        }
        // the search wins on most blocks of these weights
        assert!(
            from_grid > n / 32 / 2,
            "{ty:?}: {from_grid} blocks from the grid's fit"
        );
    }
}
