//! GGUF K blocks (Q2_K .. Q6_K) from GPTQ- and RTN-placed K grids: the bytes decode (ours and
//! the `gguf` Python package's dequantizer) to exactly `QuantizedLinear::dequantize()`; the
//! reference K quantizer of `gguf_blocks` is the grid's RTN; what cannot be a K block is a
//! clear error naming the tensor.

use ndarray::Array2;
use quantlab_checkpoints::export::gguf::{
    blocks_from_quantized, grid_type, write_gguf_metadata, GgufTensor,
};
use quantlab_checkpoints::gguf::GgufValue;
use quantlab_checkpoints::pack::gguf_blocks;
use quantlab_grids::{quantize_rtn, FormatSpec, GgmlGrid, Granularity, QuantizedLinear};
use quantlab_solvers::gptq::{gptq, GptqParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the GGUF oracle under a time limit; `false` (after a SKIP line) without python/gguf.
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

/// Rows whose magnitudes vary by sub-block (what the integer sub-block scales are for), with
/// an offset in some rows (the mins of the affine types).
fn weights(rng: &mut StdRng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(r, k)| {
        let mag = 0.02 + ((k / 16 + r) % 5) as f32 * 0.05;
        let off = if r % 3 == 0 { 0.03 } else { 0.0 };
        off + mag * (rng.random::<f32>() * 2.0 - 1.0)
    })
}

fn hessian(rng: &mut StdRng, n: usize) -> Array2<f32> {
    let x = Array2::from_shape_fn((2 * n, n), |(_, k)| {
        (rng.random::<f32>() * 2.0 - 1.0) * if k % 7 == 0 { 4.0 } else { 1.0 }
    });
    x.t().dot(&x) / (2 * n) as f32
}

fn bitwise_equal(a: &[f32], b: &[f32]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
}

#[test]
fn k_grids_placed_by_gptq_and_rtn_write_blocks_the_gguf_package_decodes_exactly() {
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, cols) = (8, 512);
    let w = weights(&mut rng, rows, cols);
    let h = hessian(&mut rng, cols);
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, GgufTensor)> = Vec::new();
    let mut want: Vec<(String, Vec<f32>)> = Vec::new();
    for (gi, g) in GgmlGrid::K.into_iter().enumerate() {
        let spec = FormatSpec::Ggml(g);
        let ty = grid_type(g);
        let bt = ty;
        let gran = Granularity::Group(g.group_len());
        let base = GptqParams {
            granularity: gran,
            ..Default::default()
        };
        let (dynamic, _) = gptq(w.view(), h.view(), &spec, &base).unwrap();
        let (stat, _) = gptq(
            w.view(),
            h.view(),
            &spec,
            &GptqParams {
                static_groups: true,
                act_order: true,
                ..base.clone()
            },
        )
        .unwrap();
        let rtn = quantize_rtn("w", w.view(), &spec, gran).unwrap();
        for (label, q) in [("gptq", &dynamic), ("gptq-ao-static", &stat), ("rtn", &rtn)] {
            let name = format!("{g:?} {label}");
            let bytes = blocks_from_quantized(&name, q, ty).unwrap();
            assert_eq!(bytes.len(), rows * cols / 256 * ty.type_size() as usize);
            let back = gguf_blocks::dequantize(&name, bt, &bytes).unwrap();
            let ours: Vec<f32> = q.dequantize().iter().copied().collect();
            if let Some(i) = bitwise_equal(&back, &ours) {
                panic!(
                    "{name}: block bytes decode to {} vs {} at {i}",
                    back[i], ours[i]
                );
            }
            // one tensor per case in a GGUF file (GGUF names: written as given)
            let tname = format!("blk.{}.ffn_down.weight", gi * 3 + tensors.len() % 3);
            tensors.push((
                tname.clone(),
                GgufTensor {
                    ty,
                    shape: vec![rows, cols],
                    bytes,
                },
            ));
            want.push((tname, ours));
        }
        // the reference K quantizer of gguf_blocks is this grid's RTN (same super-block fit,
        // same nearest codes): the same values
        let flat: Vec<f32> = w.iter().copied().collect();
        let reference = gguf_blocks::quantize("w", bt, &flat, None).unwrap();
        let yr = gguf_blocks::dequantize("w", bt, &reference).unwrap();
        let yq: Vec<f32> = rtn.dequantize().iter().copied().collect();
        assert_eq!(
            bitwise_equal(&yr, &yq),
            None,
            "{g:?}: reference K quantizer"
        );
        // GPTQ changed codes (not vacuous)
        assert_ne!(dynamic.codes, rtn.codes, "{g:?}");
    }
    let file = dir.path().join("k.gguf");
    let meta = vec![(
        "general.architecture".to_string(),
        GgufValue::String("llama".into()),
    )];
    write_gguf_metadata(&file, &meta, &tensors).unwrap();
    let out = dir.path().join("k.safetensors");
    if !python_oracle(&file, &out) {
        return;
    }
    let theirs = read_f32_safetensors(&out);
    for (name, ours) in &want {
        let t = &theirs[name];
        if let Some(i) = bitwise_equal(t, ours) {
            panic!("{name}: gguf package {} vs ours {} at {i}", t[i], ours[i]);
        }
    }
}

#[test]
fn what_cannot_be_a_k_block_is_an_error_naming_the_tensor() {
    let mut rng = StdRng::seed_from_u64(9);
    let w = weights(&mut rng, 4, 512);
    let g = GgmlGrid::Q4_K;
    let ty = grid_type(g);
    let q = quantize_rtn("w", w.view(), &FormatSpec::Ggml(g), Granularity::Group(32)).unwrap();
    // parameters that are not one f16 times 6-bit integers per super-block
    let mut bad = q.clone();
    bad.scales[[1, 3]] *= 1.0 + 1e-3;
    let e = blocks_from_quantized("blk.0.ffn_down.weight", &bad, ty)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.ffn_down.weight") && e.contains("row 1"),
        "{e}"
    );
    // act-order g_idx
    let mut perm = q.clone();
    perm.g_idx.swap(0, 40);
    let e = blocks_from_quantized("blk.0.ffn_down.weight", &perm, ty)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.ffn_down.weight") && e.contains("act-order"),
        "{e}"
    );
    // another grid or granularity
    let legacy = quantize_rtn(
        "w",
        w.view(),
        &FormatSpec::Ggml(GgmlGrid::Q4_0),
        Granularity::Group(32),
    )
    .unwrap();
    let e = blocks_from_quantized("t", &legacy, ty)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Q4_K") && e.contains("`t`"), "{e}");
    let g16 = QuantizedLinear {
        granularity: Granularity::Group(16),
        ..q.clone()
    };
    let e = blocks_from_quantized("t", &g16, ty)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Group(32)"), "{e}");
}
