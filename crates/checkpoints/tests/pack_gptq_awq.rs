//! GPTQ and AWQ packers: an independent NumPy unpacker (tests/oracles/pack_gptq_awq.py,
//! written from docs/formats.md) must recover our dequantized weights exactly; hand-computed
//! bit layouts; error cases; round-trip proptests.

use half::f16;
use ndarray::Array2;
use proptest::prelude::*;
use quantlab_checkpoints::pack::awq::{awq_pack_word, awq_unpack_word};
use quantlab_checkpoints::pack::{pack_awq, pack_gptq, pack_lsb, unpack_lsb, AwqTensors};
use quantlab_checkpoints::pack::{GptqFormat, GptqTensors};
use quantlab_checkpoints::CheckpointError;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, QuantizedLinear, UniformGrid};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A random layer: codes over the whole range, zeros in `zlo..=zhi`, positive scales with
/// a few exact-f16 and a few not, and (with `act_order`) g_idx from a random column order.
fn random_layer(
    seed: u64,
    bits: u32,
    sym: bool,
    (out, inp, g): (usize, usize, usize),
    (zlo, zhi): (u32, u32),
    act_order: bool,
) -> QuantizedLinear {
    let mut rng = StdRng::seed_from_u64(seed);
    let groups = inp / g;
    let maxq = (1u32 << bits) - 1;
    let codes = Array2::from_shape_fn((out, inp), |_| rng.random_range(0..=maxq) as u8);
    let scales = Array2::from_shape_fn((out, groups), |_| rng.random_range(1e-3f32..0.5));
    let zeros = Array2::from_shape_fn((out, groups), |_| {
        if sym {
            (1u32 << (bits - 1)) as f32
        } else {
            rng.random_range(zlo..=zhi) as f32
        }
    });
    let g_idx: Vec<u32> = if act_order {
        let mut order: Vec<usize> = (0..inp).collect();
        order.shuffle(&mut rng);
        let mut pos = vec![0usize; inp];
        for (p, &j) in order.iter().enumerate() {
            pos[j] = p;
        }
        pos.iter().map(|&p| (p / g) as u32).collect()
    } else {
        (0..inp).map(|k| (k / g) as u32).collect()
    };
    let granularity = if groups == 1 {
        Granularity::PerChannel
    } else {
        Granularity::Group(g)
    };
    let spec = FormatSpec::Uniform(UniformGrid::new(bits, sym).unwrap());
    QuantizedLinear::from_parts(spec, granularity, codes, scales, zeros, g_idx).unwrap()
}

/// `q` with its scales rounded to f16, dequantized by the grids crate: `[out, in]`.
fn reference_dequant(q: &QuantizedLinear) -> Array2<f32> {
    let mut q16 = q.clone();
    q16.scales.mapv_inplace(|s| f16::from_f32(s).to_f32());
    q16.dequantize()
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

fn oracle(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/oracles")
        .join(script)
}

fn i32_bytes(a: &Array2<i32>) -> Vec<u8> {
    a.iter().flat_map(|v| v.to_le_bytes()).collect()
}
fn f16_bytes(a: &Array2<f16>) -> Vec<u8> {
    a.iter().flat_map(|v| v.to_le_bytes()).collect()
}

enum Packed {
    Gptq(GptqTensors, GptqFormat),
    Awq(AwqTensors),
}

#[test]
fn numpy_unpacker_recovers_gptq_and_awq_exactly() {
    if !python_with("numpy, safetensors") {
        return;
    }
    let mut cases: BTreeMap<String, (QuantizedLinear, Packed)> = BTreeMap::new();
    let mut seed = 1;
    for bits in [2u32, 3, 4, 8] {
        let maxq = (1u32 << bits) - 1;
        for act in [false, true] {
            seed += 1;
            // v1: asymmetric zeros in 1..=maxq (never 0), and a symmetric layer.
            let q = random_layer(seed, bits, false, (64, 128, 32), (1, maxq), act);
            let t = pack_gptq("v1", &q, GptqFormat::V1).unwrap();
            cases.insert(
                format!("g{bits}v1a{act}"),
                (q, Packed::Gptq(t, GptqFormat::V1)),
            );
            let q = random_layer(seed + 100, bits, true, (32, 64, 64), (0, 0), act);
            let t = pack_gptq("v1s", &q, GptqFormat::V1).unwrap();
            cases.insert(
                format!("g{bits}v1s{act}"),
                (q, Packed::Gptq(t, GptqFormat::V1)),
            );
            // v2: raw zeros including 0.
            let q = random_layer(seed + 200, bits, false, (96, 64, 16), (0, maxq), act);
            let t = pack_gptq("v2", &q, GptqFormat::V2).unwrap();
            cases.insert(
                format!("g{bits}v2{act}"),
                (q, Packed::Gptq(t, GptqFormat::V2)),
            );
        }
    }
    for (i, (out, inp, g)) in [(48, 64, 32), (8, 32, 32), (24, 96, 16)]
        .into_iter()
        .enumerate()
    {
        let q = random_layer(500 + i as u64, 4, false, (out, inp, g), (0, 15), false);
        let t = pack_awq("awq", &q).unwrap();
        cases.insert(format!("awq{i}"), (q, Packed::Awq(t)));
    }
    // One layer straight from the RTN quantizer.
    let w = Array2::from_shape_fn((64, 96), |(r, k)| {
        ((r * 31 + k * 17) % 29) as f32 / 7.0 - 2.0
    });
    let spec = FormatSpec::Uniform(UniformGrid::new(4, false).unwrap());
    let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(32)).unwrap();
    let t = pack_gptq("rtn", &q, GptqFormat::V2).unwrap();
    cases.insert("rtn".into(), (q.clone(), Packed::Gptq(t, GptqFormat::V2)));

    // Serialise every case.
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut meta = serde_json::Map::new();
    for (name, (_, p)) in &cases {
        match p {
            Packed::Gptq(t, f) => {
                let g: Vec<u8> = t.g_idx.iter().flat_map(|v| v.to_le_bytes()).collect();
                bufs.push((
                    format!("{name}.qweight"),
                    Dtype::I32,
                    t.qweight.shape().to_vec(),
                    i32_bytes(&t.qweight),
                ));
                bufs.push((
                    format!("{name}.qzeros"),
                    Dtype::I32,
                    t.qzeros.shape().to_vec(),
                    i32_bytes(&t.qzeros),
                ));
                bufs.push((
                    format!("{name}.scales"),
                    Dtype::F16,
                    t.scales.shape().to_vec(),
                    f16_bytes(&t.scales),
                ));
                bufs.push((format!("{name}.g_idx"), Dtype::I32, vec![t.g_idx.len()], g));
                let fmt = if *f == GptqFormat::V1 { "v1" } else { "v2" };
                meta.insert(
                    name.clone(),
                    serde_json::json!({"kind": "gptq", "format": fmt}),
                );
            }
            Packed::Awq(t) => {
                bufs.push((
                    format!("{name}.qweight"),
                    Dtype::I32,
                    t.qweight.shape().to_vec(),
                    i32_bytes(&t.qweight),
                ));
                bufs.push((
                    format!("{name}.qzeros"),
                    Dtype::I32,
                    t.qzeros.shape().to_vec(),
                    i32_bytes(&t.qzeros),
                ));
                bufs.push((
                    format!("{name}.scales"),
                    Dtype::F16,
                    t.scales.shape().to_vec(),
                    f16_bytes(&t.scales),
                ));
                meta.insert(name.clone(), serde_json::json!({"kind": "awq"}));
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("packed.safetensors");
    let dst = dir.path().join("dequant.safetensors");
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let info = HashMap::from([(
        "cases".to_string(),
        serde_json::Value::Object(meta).to_string(),
    )]);
    safetensors::serialize_to_file(views, Some(info), &src).unwrap();
    let out = Command::new("python3")
        .arg(oracle("pack_gptq_awq.py"))
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&dst).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, (q, p)) in &cases {
        let view = st.tensor(&format!("{name}.W")).unwrap();
        let (inp, out_f) = (view.shape()[0], view.shape()[1]);
        let w_np: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let ours = match p {
            Packed::Gptq(t, f) => t.dequantize(name, *f).unwrap(),
            Packed::Awq(t) => t.dequantize(name).unwrap(),
        };
        let reference = reference_dequant(q);
        assert_eq!(ours.dim(), (out_f, inp), "{name}");
        for n in 0..out_f {
            for k in 0..inp {
                let np = w_np[k * out_f + n];
                assert_eq!(
                    ours[[n, k]].to_bits(),
                    np.to_bits(),
                    "{name}: W[{k}, {n}] ours {} numpy {np}",
                    ours[[n, k]]
                );
                assert_eq!(
                    ours[[n, k]],
                    reference[[n, k]],
                    "{name} vs grids at [{n}, {k}]"
                );
            }
        }
    }
    eprintln!("numpy oracle agreed bit for bit on {} layers", cases.len());
}

#[test]
fn three_bit_layout_by_hand() {
    // Value 10 = 0b111 straddles words 0 and 1; value 21 = 0b101 straddles words 1 and 2.
    let mut v = vec![0u8; 32];
    v[10] = 0b111;
    v[21] = 0b101;
    v[0] = 0b011;
    v[31] = 0b110;
    let w = pack_lsb(&v, 3);
    // word0: value 0 at bits 0..2, low two bits of value 10 at bits 30..31
    assert_eq!(w[0], 0b011 | 0b11 << 30);
    // word1: bit 2 of value 10 at bit 0, bit 0 of value 21 at bit 31
    assert_eq!(w[1], 1 | 1 << 31);
    // word2: bits 1..2 of value 21 (0b10) at bits 0..1, value 31 at bit 3*9+2 = 29
    assert_eq!(w[2], 0b10 | 0b110 << 29);
    assert_eq!(unpack_lsb(&w, 3, 32), v);
}

#[test]
fn symmetric_four_bit_v1_zeros_are_0x77777777_and_large_words_are_negative() {
    let mut q = random_layer(7, 4, true, (32, 32, 32), (0, 0), false);
    q.codes.fill(0);
    q.codes.row_mut(0).fill(15);
    let t = pack_gptq("sym", &q, GptqFormat::V1).unwrap();
    assert!(t.qzeros.iter().all(|&z| z == 0x7777_7777));
    // column 0 holds codes 15 in every nibble: u32 0xFFFFFFFF is stored as i32 -1
    assert!(t.qweight.column(0).iter().all(|&w| w == -1));
    assert!(t.qweight.column(1).iter().all(|&w| w == 0));
    let t2 = pack_gptq("sym", &q, GptqFormat::V2).unwrap();
    assert!(t2.qzeros.iter().all(|&z| z == 0x8888_8888u32 as i32));
}

#[test]
fn awq_interleave_by_hand() {
    // columns 0..8 hold codes 0..8: nibble i holds column [0,2,4,6,1,3,5,7][i]
    let w = awq_pack_word(&[0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(w, 0x7531_6420);
    assert_eq!(awq_unpack_word(w), [0, 1, 2, 3, 4, 5, 6, 7]);
}

fn assert_pack_error(r: Result<impl std::fmt::Debug, CheckpointError>, tensor: &str, needle: &str) {
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`{tensor}`")) && msg.contains(needle),
        "error `{msg}` should name `{tensor}` and say `{needle}`"
    );
}

#[test]
fn shapes_and_values_the_formats_cannot_hold_are_named_errors() {
    // in not a multiple of 32
    let q = random_layer(1, 4, true, (32, 48, 16), (0, 0), false);
    assert_pack_error(
        pack_gptq("model.layers.0.mlp.down_proj", &q, GptqFormat::V1),
        "model.layers.0.mlp.down_proj",
        "multiples of 32",
    );
    // out not a multiple of 32 (3 bits)
    let q = random_layer(1, 3, true, (16, 64, 32), (0, 0), false);
    assert_pack_error(pack_gptq("q3", &q, GptqFormat::V2), "q3", "multiples of 32");
    // v1 underflow: a real zero of 0
    let mut q = random_layer(2, 4, false, (32, 64, 32), (1, 15), false);
    q.zeros[[3, 1]] = 0.0;
    assert_pack_error(
        pack_gptq("blk.k_proj", &q, GptqFormat::V1),
        "blk.k_proj",
        "gptq_v2",
    );
    assert!(pack_gptq("blk.k_proj", &q, GptqFormat::V2).is_ok());
    // non-integer zero, code too large
    q.zeros[[3, 1]] = 2.5;
    assert_pack_error(pack_gptq("z", &q, GptqFormat::V2), "z", "not an integer");
    let mut q = random_layer(3, 2, false, (32, 32, 32), (0, 3), false);
    q.codes[[0, 5]] = 4;
    assert_pack_error(
        pack_gptq("codes", &q, GptqFormat::V2),
        "codes",
        "does not fit in 2 bits",
    );
    // unsupported bits
    let q = random_layer(4, 5, true, (32, 32, 32), (0, 0), false);
    assert_pack_error(
        pack_gptq("five", &q, GptqFormat::V1),
        "five",
        "2, 3, 4 or 8",
    );
    // scale beyond f16
    let mut q = random_layer(5, 4, true, (32, 32, 32), (0, 0), false);
    q.scales[[0, 0]] = 1e6;
    assert_pack_error(pack_gptq("big", &q, GptqFormat::V1), "big", "f16");
    // AWQ: out % 8, act-order, 8 bits
    let q = random_layer(6, 4, false, (12, 32, 32), (0, 15), false);
    assert_pack_error(pack_awq("awq.o", &q), "awq.o", "out % 8");
    let q = random_layer(6, 4, false, (16, 64, 32), (0, 15), true);
    assert_pack_error(pack_awq("awq.act", &q), "awq.act", "act-order");
    let q = random_layer(6, 8, false, (16, 64, 32), (0, 15), false);
    assert_pack_error(pack_awq("awq.8", &q), "awq.8", "4 bits");
    // malformed packed tensors on the way back
    let q = random_layer(8, 4, true, (32, 64, 32), (0, 0), false);
    let mut t = pack_gptq("t", &q, GptqFormat::V1).unwrap();
    t.g_idx[3] = 9;
    assert_pack_error(
        t.unpack_codes("back.qweight"),
        "back.qweight",
        "g_idx[3] = 9",
    );
    t.g_idx.pop();
    assert_pack_error(
        t.dequantize("back2", GptqFormat::V1),
        "back2",
        "not 2, 3, 4 or 8 bits",
    );
}

fn layer_strategy() -> impl Strategy<Value = (u64, u32, bool, usize, usize, usize, bool)> {
    (
        any::<u64>(),
        prop::sample::select(vec![2u32, 3, 4, 8]),
        any::<bool>(),
        1usize..3,
        1usize..4,
        prop::sample::select(vec![16usize, 32, 64]),
        any::<bool>(),
    )
        .prop_map(|(seed, bits, sym, o, i, g, act)| (seed, bits, sym, 32 * o, 64 * i, g, act))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gptq_pack_unpack_is_identity((seed, bits, sym, out, inp, g, act) in layer_strategy(), v2 in any::<bool>()) {
        let maxq = (1u32 << bits) - 1;
        let (fmt, zlo) = if v2 { (GptqFormat::V2, 0) } else { (GptqFormat::V1, 1) };
        let q = random_layer(seed, bits, sym, (out, inp, g), (zlo, maxq), act);
        let t = pack_gptq("p", &q, fmt).unwrap();
        prop_assert_eq!(t.qweight.dim(), (inp * bits as usize / 32, out));
        prop_assert_eq!(t.qzeros.dim(), (inp / g, out * bits as usize / 32));
        let back = t.to_quantized("p", fmt, sym).unwrap();
        prop_assert_eq!(&back.codes, &q.codes);
        prop_assert_eq!(&back.zeros, &q.zeros);
        prop_assert_eq!(&back.g_idx, &q.g_idx);
        prop_assert_eq!(&back.scales, &q.scales.mapv(|s| f16::from_f32(s).to_f32()));
        prop_assert_eq!(pack_gptq("p", &back, fmt).unwrap(), t);
    }

    #[test]
    fn awq_pack_unpack_is_identity(seed in any::<u64>(), o in 1usize..6, i in 1usize..4, g in prop::sample::select(vec![16usize, 32])) {
        let q = random_layer(seed, 4, false, (8 * o, 32 * i, g), (0, 15), false);
        let t = pack_awq("a", &q).unwrap();
        let back = t.to_quantized("a", false).unwrap();
        prop_assert_eq!(&back.codes, &q.codes);
        prop_assert_eq!(&back.zeros, &q.zeros);
        prop_assert_eq!(&back.g_idx, &q.g_idx);
        prop_assert_eq!(pack_awq("a", &back).unwrap(), t);
    }

    #[test]
    fn lsb_stream_round_trips(bits in 1u32..=8, words in 1usize..6, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = words * (32 / gcd(32, bits) as usize);
        let v: Vec<u8> = (0..n).map(|_| rng.random_range(0..(1u32 << bits)) as u8).collect();
        let w = pack_lsb(&v, bits);
        prop_assert_eq!(unpack_lsb(&w, bits, v.len()), v);
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
