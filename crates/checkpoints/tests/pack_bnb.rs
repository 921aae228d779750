//! bitsandbytes packers against hand-computed cases (nibble order, double quantization,
//! quant-state JSON, int8 rounding) and a brute-force nearest-code oracle.

// The NF4 values are written with their published decimals.
#![allow(clippy::excessive_precision)]

use ndarray::{array, Array2};
use proptest::prelude::*;
use quantlab_checkpoints::pack::bnb::*;
use quantlab_grids::double_quant::DoubleQuant;
use quantlab_grids::{quantize_rtn, FormatSpec, Granularity, UniformGrid, NF4_CODE};

#[test]
fn nf4_and_fp4_nibble_order_by_hand() {
    let w = array![[1.0f32, -1.0, 0.0, 0.5]];
    // NF4: 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626)
    let t = quantize_bnb4("m.nf4", w.view(), Bnb4Type::Nf4, 64, None, "float16").unwrap();
    assert_eq!(t.weight, vec![0xF0, 0x7C]);
    // FP4 table [0, .0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12: 1 -> 3, -1 -> 11, 0 -> 0, 0.5 -> 5
    let t = quantize_bnb4("m.fp4", w.view(), Bnb4Type::Fp4, 64, None, "bfloat16").unwrap();
    assert_eq!(t.weight, vec![0x3B, 0x05]);
    // odd count: the last low nibble is padding; stored as [ceil(n / 2), 1]
    let w3 = array![[1.0f32, -1.0, 1.0]];
    let t = quantize_bnb4("odd", w3.view(), Bnb4Type::Nf4, 64, None, "float32").unwrap();
    assert_eq!(t.weight, vec![0xF0, 0xF0]);
    let keys = t.tensors("odd");
    assert_eq!(keys[0].0, "odd.weight");
    assert_eq!(keys[0].1.shape, vec![2, 1]);
    assert_eq!(t.codes(), vec![15, 0, 15]);
}

#[test]
fn double_quant_by_hand() {
    // three blocks of 64 with absmax 1, 2, 3
    let w = Array2::from_shape_fn((3, 64), |(r, k)| {
        if k % 2 == 0 {
            (r + 1) as f32
        } else {
            -((r + 1) as f32) / 2.0
        }
    });
    let t = quantize_bnb4(
        "model.layers.0.mlp.up_proj",
        w.view(),
        Bnb4Type::Nf4,
        64,
        Some(DoubleQuant::default()),
        "float16",
    )
    .unwrap();
    // offset = mean = 2; centred [-1, 0, 1]; nested absmax 1; dynamic-map codes: -1 has no
    // code, the most negative is code 0 = -0.99296875; 0 is code 127; 1.0 is code 255
    let Bnb4Absmax::Nested(n) = &t.absmax else {
        panic!("not nested")
    };
    assert_eq!(n.offset, 2.0);
    assert_eq!(n.nested_absmax, vec![1.0]);
    assert_eq!(n.codes, vec![0, 127, 255]);
    assert_eq!(t.absmax_f32(), vec![2.0 - 0.99296875, 2.0, 3.0]);
    // row 0: +1 -> code 15 (1.0), -0.5 -> -0.5 / 1 nearest NF4 -0.5250730514526367 (code 2)
    let y = t.dequantize();
    assert_eq!(y[[0, 0]], 1.0 * (2.0 - 0.99296875));
    assert_eq!(y[[0, 1]], -0.5250730514526367 * (2.0 - 0.99296875));
    assert_eq!(y[[2, 0]], 3.0);

    let keys: Vec<String> = t
        .tensors("model.layers.0.mlp.up_proj")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let p = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(
        keys,
        vec![
            p.to_string(),
            format!("{p}.absmax"),
            format!("{p}.nested_absmax"),
            format!("{p}.nested_quant_map"),
            format!("{p}.quant_map"),
            format!("{p}.quant_state.bitsandbytes__nf4"),
        ]
    );
    let tensors = t.tensors("x");
    let find = |k: &str| tensors.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(find("x.weight.absmax").dtype, RawDtype::U8);
    assert_eq!(find("x.weight.absmax").data, vec![0, 127, 255]);
    assert_eq!(find("x.weight.nested_quant_map").shape, vec![256]);
    assert_eq!(find("x.weight.quant_map").data.len(), 64);
    let json = String::from_utf8(find("x.weight.quant_state.bitsandbytes__nf4").data).unwrap();
    assert_eq!(
        json,
        r#"{"quant_type":"nf4","blocksize":64,"dtype":"float16","shape":[3,64],"nested_blocksize":256,"nested_dtype":"float32","nested_offset":2.0}"#
    );
    let parsed = parse_quant_state("x", json.as_bytes()).unwrap();
    assert_eq!(parsed, t.quant_state());
    // bitsandbytes' Python writer uses ", " separators: the parser takes that too
    let py = br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 64]}"#;
    let s = parse_quant_state("py", py).unwrap();
    assert_eq!(
        (s.quant_type.as_str(), s.shape, s.nested_offset),
        ("fp4", vec![8, 64], None)
    );
    assert!(parse_quant_state("broken.weight", b"{")
        .unwrap_err()
        .to_string()
        .contains("`broken.weight`"));
}

#[test]
fn int8_rounds_half_to_even_by_hand() {
    // SCB 127: q = round(x * 127 / 127) = round(x), ties to even
    let w = array![[127.0f32, -3.5, 2.5, 0.0], [0.0, 0.0, 0.0, 0.0]];
    let t = quantize_int8("lin8", w.view()).unwrap();
    assert_eq!(t.scb, vec![127.0, 0.0]);
    assert_eq!(t.weight, array![[127i8, -4, 2, 0], [0, 0, 0, 0]]);
    assert_eq!(t.dequantize()[[0, 1]], -4.0);
    let keys = t.tensors("lin8");
    assert_eq!(
        (keys[0].0.as_str(), keys[1].0.as_str()),
        ("lin8.weight", "lin8.SCB")
    );
    assert_eq!(keys[0].1.data[1], (-4i8) as u8);
    let e = quantize_int8("nan8", array![[f32::NAN]].view()).unwrap_err();
    assert!(e.to_string().contains("`nan8`"), "{e}");
    // the same through the hand-off type
    let q = quantize_rtn("w", w.view(), &FormatSpec::Int8, Granularity::PerChannel).unwrap();
    assert_eq!(pack_int8("lin8", &q).unwrap(), t);
}

#[test]
fn hand_off_type_and_direct_route_agree() {
    let w = Array2::from_shape_fn((8, 128), |(r, k)| {
        ((r * 13 + k * 7) % 23) as f32 / 11.0 - 1.0
    });
    for (spec, ty) in [
        (FormatSpec::Nf4, Bnb4Type::Nf4),
        (FormatSpec::Fp4, Bnb4Type::Fp4),
    ] {
        let q = quantize_rtn("w", w.view(), &spec, Granularity::Group(64)).unwrap();
        let a = pack_bnb4("w", &q, Some(DoubleQuant::default()), "float16").unwrap();
        let b = quantize_bnb4(
            "w",
            w.view(),
            ty,
            64,
            Some(DoubleQuant::default()),
            "float16",
        )
        .unwrap();
        assert_eq!(a, b);
        let plain = pack_bnb4("w", &q, None, "float16").unwrap();
        assert_eq!(plain.dequantize(), q.dequantize());
    }
    let q = quantize_rtn(
        "w",
        w.view(),
        &FormatSpec::Uniform(UniformGrid::new(4, true).unwrap()),
        Granularity::Group(64),
    )
    .unwrap();
    let e = pack_bnb4("model.q_proj", &q, None, "float16").unwrap_err();
    assert!(
        e.to_string().contains("`model.q_proj`") && e.to_string().contains("NF4"),
        "{e}"
    );
    let e = quantize_bnb4("bad.bs", w.view(), Bnb4Type::Nf4, 0, None, "float16").unwrap_err();
    assert!(e.to_string().contains("`bad.bs`"), "{e}");
    let e = quantize_bnb4("bad.dtype", w.view(), Bnb4Type::Nf4, 64, None, "half").unwrap_err();
    assert!(e.to_string().contains("`bad.dtype`"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn nibbles_round_trip(codes in prop::collection::vec(0u8..16, 0..200)) {
        let b = pack_nibbles_high_first(&codes);
        prop_assert_eq!(b.len(), codes.len().div_ceil(2));
        prop_assert_eq!(unpack_nibbles_high_first(&b, codes.len()), codes);
    }

    /// Brute force: each NF4 code is a nearest code of x / absmax, absmax is the block max.
    #[test]
    fn nf4_codes_are_nearest(vals in prop::collection::vec(-10.0f32..10.0, 1..300), bs in prop::sample::select(vec![16usize, 64, 128])) {
        let n = vals.len();
        let w = Array2::from_shape_vec((1, n), vals.clone()).unwrap();
        let t = quantize_bnb4("p", w.view(), Bnb4Type::Nf4, bs, None, "float16").unwrap();
        let codes = t.codes();
        let absmax = t.absmax_f32();
        prop_assert_eq!(absmax.len(), n.div_ceil(bs));
        for (i, &x) in vals.iter().enumerate() {
            let a = absmax[i / bs];
            let block = &vals[(i / bs) * bs..((i / bs + 1) * bs).min(n)];
            prop_assert_eq!(a, block.iter().fold(0.0f32, |m, v| m.max(v.abs())));
            if a == 0.0 { continue; }
            let y = (x / a) as f64;
            let best = NF4_CODE.iter().map(|&c| (y - c as f64).abs()).fold(f64::INFINITY, f64::min);
            let got = (y - NF4_CODE[codes[i] as usize] as f64).abs();
            prop_assert!(got <= best + 1e-6, "x {} absmax {} code {} err {} best {}", x, a, codes[i], got, best);
        }
    }
}
