//! Absmax int8 and LLM.int8(): brute force and an independent plain int8 product.

use ndarray::{array, Array2};
use proptest::prelude::*;
use quantlab_grids::int8::{int8_rowwise, llm_int8_matmul};
use quantlab_grids::{quantize_rtn, Format, FormatSpec, Granularity, GroupParams, Int8Absmax};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

#[test]
fn rowwise_by_hand() {
    let (q, scb) = int8_rowwise(array![[1.0f32, -0.5, 0.25, 0.0], [-2.0, 1.0, 0.02, 0.03]].view());
    assert_eq!(scb, vec![1.0, 2.0]);
    // 127 * [1, -0.5, 0.25] = 127, -63.5 (-> -64, even), 31.75 (-> 32)
    // 63.5 * [-2, 1, 0.02, 0.03] = -127, 63.5 (-> 64), 1.27 (-> 1), 1.905 (-> 2)
    assert_eq!(q, array![[127i8, -64, 32, 0], [-127, 64, 1, 2]]);
}

#[test]
fn int8_format_equals_brute_force_and_rtn_stores_scb() {
    let mut rng = StdRng::seed_from_u64(41);
    let f = Int8Absmax;
    for _ in 0..200 {
        let scb = rng.random_range(0.01f32..10.0);
        let p = GroupParams::scale_only(scb);
        for _ in 0..50 {
            let x = rng.random_range(-scb..scb);
            // brute force over -127..=127: nearest level q * scb / 127 in units of the step
            let t = (x * (127.0 / scb)) as f64;
            let best = (-127i32..=127)
                .min_by(|&a, &b| (t - a as f64).abs().total_cmp(&(t - b as f64).abs()))
                .unwrap();
            assert_eq!(f.encode(x, p) as i8 as i32, best, "x {x} scb {scb}");
            assert_eq!(f.quantize(x, p), best as f32 * (scb / 127.0));
        }
    }
    let w = Array2::from_shape_fn((3, 40), |_| rng.random_range(-1.0f32..1.0));
    let q = quantize_rtn("w", w.view(), &FormatSpec::Int8, Granularity::PerChannel).unwrap();
    let (qi, scb) = int8_rowwise(w.view());
    assert_eq!(q.scales.column(0).to_vec(), scb);
    assert!(q.codes.iter().zip(qi.iter()).all(|(&c, &i)| c as i8 == i));
    assert_eq!(q.bits_per_weight(), 8.0 + 32.0 / 40.0);
}

/// Independent plain vector-wise int8 product: both operands quantized per row with their
/// absmax (round half even), i64 accumulation, rescale by sx * sw / 127^2, in f64.
fn plain_int8(x: &Array2<f32>, w: &Array2<f32>, skip: &[bool]) -> Array2<f64> {
    let q = |v: f32, s: f32| -> i64 {
        if s == 0.0 {
            0
        } else {
            (v * (127.0 / s)).round_ties_even() as i64
        }
    };
    let (n, inp) = x.dim();
    let out = w.nrows();
    let sx: Vec<f32> = (0..n)
        .map(|i| {
            (0..inp)
                .filter(|&k| !skip[k])
                .fold(0.0f32, |m, k| m.max(x[[i, k]].abs()))
        })
        .collect();
    let sw: Vec<f32> = (0..out)
        .map(|o| w.row(o).iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect();
    Array2::from_shape_fn((n, out), |(i, o)| {
        let acc: i64 = (0..inp)
            .filter(|&k| !skip[k])
            .map(|k| q(x[[i, k]], sx[i]) * q(w[[o, k]], sw[o]))
            .sum();
        acc as f64 * sx[i] as f64 * sw[o] as f64 / (127.0 * 127.0)
    })
}

fn f64_matmul(x: &Array2<f32>, w: &Array2<f32>, cols: &[bool]) -> Array2<f64> {
    Array2::from_shape_fn((x.nrows(), w.nrows()), |(i, o)| {
        (0..x.ncols())
            .filter(|&k| cols[k])
            .map(|k| x[[i, k]] as f64 * w[[o, k]] as f64)
            .sum()
    })
}

fn data(seed: u64, outliers: &[usize]) -> (Array2<f32>, Array2<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let nx = Normal::new(0.0f32, 1.0).unwrap();
    let nw = Normal::new(0.0f32, 0.05).unwrap();
    let mut x = Array2::from_shape_fn((24, 256), |_| nx.sample(&mut rng).clamp(-4.0, 4.0));
    for &k in outliers {
        x.column_mut(k).mapv_inplace(|v| v * 40.0); // up to |x| ~ 160, well above 6
    }
    let w = Array2::from_shape_fn((48, 256), |_| nw.sample(&mut rng));
    (x, w)
}

fn max_rel(a: &Array2<f32>, b: &Array2<f64>) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b.iter())
        .fold(0.0f64, |m, (&p, &q)| m.max((p as f64 - q).abs()))
        / scale
}

#[test]
fn infinite_threshold_is_plain_int8() {
    let (x, w) = data(42, &[3, 100]);
    let got = llm_int8_matmul(x.view(), w.view(), f32::INFINITY);
    let want = plain_int8(&x, &w, &vec![false; 256]);
    assert!(max_rel(&got, &want) < 1e-6, "{}", max_rel(&got, &want));
}

#[test]
fn outlier_columns_in_full_precision() {
    let outliers = [3usize, 100, 201];
    let (x, w) = data(43, &outliers);
    let is_out: Vec<bool> = (0..256).map(|k| outliers.contains(&k)).collect();
    // independent decomposition: f64 product over outlier columns + plain int8 over the rest
    let mut want = f64_matmul(&x, &w, &is_out);
    want += &plain_int8(&x, &w, &is_out);
    let mixed = llm_int8_matmul(x.view(), w.view(), 6.0);
    assert!(max_rel(&mixed, &want) < 1e-6, "{}", max_rel(&mixed, &want));

    // against the exact product, the decomposition beats plain int8 by a wide margin
    let exact = f64_matmul(&x, &w, &vec![true; 256]);
    let plain = llm_int8_matmul(x.view(), w.view(), f32::INFINITY);
    let (e_mixed, e_plain) = (max_rel(&mixed, &exact), max_rel(&plain, &exact));
    println!("max relative error vs f64: LLM.int8 {e_mixed:.3e}, plain int8 {e_plain:.3e}");
    assert!(e_mixed * 4.0 < e_plain, "mixed {e_mixed} plain {e_plain}");
    // without outliers the threshold changes nothing
    let (x0, w0) = data(44, &[]);
    assert_eq!(
        llm_int8_matmul(x0.view(), w0.view(), 6.0),
        llm_int8_matmul(x0.view(), w0.view(), f32::INFINITY)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn int8_round_trips(w in prop::collection::vec(-5.0f32..5.0, 1..30), x in -5.0f32..5.0) {
        let f = Int8Absmax;
        let p = f.fit(&w);
        let q = f.quantize(x, p);
        prop_assert_eq!(f.quantize(q, p), q);
        if p.scale > 0.0 && x.abs() <= p.scale {
            prop_assert!((x - q).abs() <= p.scale / 127.0 / 2.0 * (1.0 + 1e-5));
        }
        for c in -127i8..=127 {
            let l = f.decode(c as u8, p);
            if p.scale > 0.0 {
                prop_assert_eq!(f.encode(l, p) as i8, c);
            }
        }
    }
}
