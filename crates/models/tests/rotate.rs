//! Rotations fused into a LLaMA ([`quantlab_models::rotate`]): the matrices are orthogonal
//! (checked entry by entry against the identity), and the folded, residual-rotated and
//! head-rotated models give the original model's logits (tiny random LLaMAs, grouped-query
//! and tied ones included) while their weights change; a planted outlier channel is spread
//! out by the rotation (what it is for); misuse is refused with an error.

use candle_core::{DType, Tensor};
use quantlab_models::rotate::{
    hadamard, random_hadamard, random_orthogonal, rotate_model, RotationKind,
};
use quantlab_models::LlamaModel;
use quantlab_testsupport::{std_rng_uniform, NamedF32, TinyLlama};

fn load(spec: &TinyLlama, t: &NamedF32, dir: &std::path::Path) -> LlamaModel {
    spec.write_hf_dir(dir, t);
    LlamaModel::load(dir).unwrap()
}

fn logits(m: &LlamaModel) -> Vec<f32> {
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 300).collect();
    m.forward(&tokens)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |a|.
fn rel_max(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let m = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / m
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |Q Q^T - I| over the entries.
fn orthogonality_error(q: &[f64], n: usize) -> f64 {
    let mut e = 0f64;
    for i in 0..n {
        for j in 0..n {
            let dot: f64 = (0..n).map(|k| q[i * n + k] * q[j * n + k]).sum();
            e = e.max((dot - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    e
}

#[test]
fn hadamard_matrices_are_exact_where_they_exist() {
    let mut built = Vec::new();
    for n in 1..=200 {
        let Some(h) = hadamard(n) else {
            // none exists for odd n > 1 or n = 2 mod 4
            continue;
        };
        assert!(n == 1 || n == 2 || n % 4 == 0, "{n}");
        assert!(h.iter().all(|&v| v == 1.0 || v == -1.0));
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                assert_eq!(dot, if i == j { n as f64 } else { 0.0 }, "order {n}");
            }
        }
        built.push(n);
    }
    for n in [3, 5, 6, 10, 14, 18] {
        assert!(hadamard(n).is_none(), "{n}");
    }
    // every power of two, the Paley orders and their doublings among them
    for n in [
        1, 2, 4, 8, 12, 16, 20, 24, 32, 44, 48, 64, 72, 128, 144, 192,
    ] {
        assert!(built.contains(&n), "{n}");
    }
    // the real models' sizes: SmolLM2 (576, head 64), MiniLM (384), 1B-class (2048)
    for n in [576, 384, 2048] {
        let q = values(&random_hadamard(n, 3).unwrap());
        if n <= 576 {
            assert!(orthogonality_error(&q, n) < 1e-12, "{n}");
        }
        let s = 1.0 / (n as f64).sqrt();
        assert!(q.iter().all(|v| (v.abs() - s).abs() < 1e-15));
    }
    // the signs depend on the seed
    assert_ne!(
        values(&random_hadamard(64, 1).unwrap()),
        values(&random_hadamard(64, 2).unwrap())
    );
    assert!(random_hadamard(28, 0).is_err()); // exists, but needs Paley II
    let q = values(&random_orthogonal(40, 7).unwrap());
    assert!(orthogonality_error(&q, 40) < 1e-13);
}

#[test]
fn rotated_models_give_the_original_logits() {
    let cases = [
        ("mha", TinyLlama::default(), RotationKind::Hadamard),
        (
            "gqa",
            TinyLlama {
                kv_heads: 2,
                ..TinyLlama::default()
            },
            RotationKind::Hadamard,
        ),
        (
            "tied",
            TinyLlama {
                tied: true,
                kv_heads: 1,
                ..TinyLlama::default()
            },
            RotationKind::Hadamard,
        ),
        (
            // head_dim 10, hidden 40: no Hadamard matrix; random orthogonal
            "random",
            TinyLlama {
                hidden: 40,
                kv_heads: 2,
                ..TinyLlama::default()
            },
            RotationKind::Random,
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (label, spec, kind) in cases {
        let t = spec.tensors(std_rng_uniform(21));
        let dir = tmp.path().join(label);
        let base = load(&spec, &t, &dir);
        let want = logits(&base);
        let q_before = values(
            &base
                .linear("model.layers.1.self_attn.q_proj")
                .unwrap()
                .weight()
                .unwrap(),
        );

        // each step alone keeps the function
        let mut m = load(&spec, &t, &dir);
        m.fold_norms().unwrap();
        assert!(m.norms_are_folded() && !m.config().tie_word_embeddings);
        let e_fold = rel_max(&want, &logits(&m));
        assert!(e_fold < 1e-5, "{label}: fold {e_fold}");

        let mut m = load(&spec, &t, &dir);
        let hd = m.config().head_dim;
        let r2 = quantlab_models::rotate::rotation_matrix(kind, hd, 9).unwrap();
        m.rotate_heads_vo(&r2).unwrap();
        let e_r2 = rel_max(&want, &logits(&m));
        assert!(e_r2 < 1e-5, "{label}: R2 {e_r2}");

        // all together
        let mut m = load(&spec, &t, &dir);
        let facts = rotate_model(&mut m, kind, 5).unwrap();
        assert_eq!((facts.residual, facts.head), (spec.hidden, hd));
        let got = logits(&m);
        let e = rel_max(&want, &got);
        assert!(e < 1e-5, "{label}: rotated {e}");
        // not vacuous: the weights did change
        let q_after = values(
            &m.linear("model.layers.1.self_attn.q_proj")
                .unwrap()
                .weight()
                .unwrap(),
        );
        let moved = q_before
            .iter()
            .zip(&q_after)
            .fold(0f64, |d, (a, b)| d.max((a - b).abs()));
        assert!(moved > 0.05, "{label}: q_proj moved by {moved}");
        let norms = m.norm_weights();
        assert_eq!(norms.len(), 2 * spec.layers + 1);
        assert!(norms.iter().all(|(_, v)| v.iter().all(|&x| x == 1.0)));
    }
}

#[test]
fn the_residual_rotation_spreads_an_outlier_channel() {
    let spec = TinyLlama::default();
    let mut t = spec.tensors(std_rng_uniform(4));
    // channel 7 of the embedding 30x the others, as the massive activations of real LLMs
    let d = spec.hidden;
    let e = t
        .iter_mut()
        .find(|x| x.0 == "model.embed_tokens.weight")
        .unwrap();
    for r in 0..spec.vocab {
        e.2[r * d + 7] *= 30.0;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load(&spec, &t, tmp.path());
    // max |x| / rms over the embedding rows
    let peak = |m: &LlamaModel| {
        let v = values(m.embed_weight());
        let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
        v.iter().fold(0f64, |a, x| a.max(x.abs())) / rms
    };
    let before = peak(&m);
    rotate_model(&mut m, RotationKind::Hadamard, 0).unwrap();
    let after = peak(&m);
    assert!(before > 6.0 && after < before / 2.0, "{before} -> {after}");
}

#[test]
fn misuse_is_refused() {
    let spec = TinyLlama::default();
    let t = spec.tensors(std_rng_uniform(2));
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load(&spec, &t, tmp.path());
    let q = random_hadamard(64, 0).unwrap();
    let e = m.rotate_residual(&q).unwrap_err().to_string();
    assert!(e.contains("fold_norms"), "{e}");
    m.fold_norms().unwrap();
    let e = m
        .rotate_residual(&random_hadamard(32, 0).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden size is 64"), "{e}");
    let e = m.rotate_heads_vo(&q).unwrap_err().to_string();
    assert!(e.contains("head dimension is 16"), "{e}");
    let mut odd = load(
        &TinyLlama {
            hidden: 40,
            ..TinyLlama::default()
        },
        &TinyLlama {
            hidden: 40,
            ..TinyLlama::default()
        }
        .tensors(std_rng_uniform(2)),
        &tmp.path().join("odd"),
    );
    let e = rotate_model(&mut odd, RotationKind::Hadamard, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("order 10"), "{e}"); // hidden 40 = 2 x 20 has one, head 10 none
}
