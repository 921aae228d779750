//! Issue 18 on the real model: GPTQ onto each ggml block grid against importance-weighted
//! RTN onto the same grid, on real layers with real inputs, scored on inputs neither saw.
//!
//! SmolLM2-135M-Instruct (the cached GGUF; the test says it skipped when the model is not in
//! the cache): the linears of block 8, 96 rows each (rows are independent in both
//! quantizers; fewer rows keep the test fast), inputs captured in full precision.
//! Both quantizers get the Hessian of 24 windows of 512 tokens of the shipped calibration
//! text (Austen's *Pride and Prejudice*). They are scored by the relative output error
//! `tr(D H D^T) / tr(W H W^T)` on three Hessians: the calibration one, 4 windows of the
//! shipped evaluation text (Austen's *Persuasion*, other prose) and 4 windows of this
//! repository's own documentation (`README.md` and `docs/*.md`: technical text, the kind of
//! shift that made GPTQ lose, issue 18).
//!
//! GPTQ runs as the pipeline runs it on `--format gguf:*`: each block's scale by the
//! importance-weighted search ([`GroupFit::HessianDiag`]) and the Hessian shrunk toward its
//! diagonal by [`default_ggml_hessian_shrink`] (0.5 on the legacy grids and IQ4_NL, 0.9 on
//! the K grids), act-order with static groups (the main job's flags; on the K grids the
//! natural order with groups fitted in the sweep, as the plan runs them). Asserted:
//! * on calibration inputs, per linear and per grid: GPTQ's error at most weighted RTN's;
//! * on each text not calibrated on, per grid, summed over the block: GPTQ below weighted RTN
//!   (the K grids on down_proj alone, the only linear whose rows hold whole super-blocks);
//! * the defect itself: GPTQ as it ran before (the plain fit, no shrinkage) is worse than
//!   weighted RTN on the documentation text on the Q4_0 grid, so this test fails on that
//!   behaviour.
#![allow(non_snake_case)]

use ndarray::{s, Array2};
use quantlab_grids::{FormatSpec, GgmlGrid, Granularity};
use quantlab_models::fetch::{cache_dir, model_path, KnownModel};
use quantlab_models::{LlamaModel, LlamaTokenizer, BLOCK_LINEARS};
use quantlab_pipeline::calib::{draw_windows, float_hessians};
use quantlab_pipeline::config::default_ggml_hessian_shrink;
use quantlab_solvers::gptq::{gptq, GptqParams, GroupFit};
use quantlab_solvers::rel_output_error;
use quantlab_solvers::rtn::rtn_imatrix;
use std::path::Path;

const BLOCK: usize = 8;
const ROWS: usize = 96;
fn name(suffix: &str) -> String {
    format!("model.layers.{BLOCK}.{suffix}")
}

fn consecutive(tokens: &[u32], n: usize) -> Vec<Vec<u32>> {
    let w: Vec<Vec<u32>> = tokens
        .chunks_exact(512)
        .take(n)
        .map(|c| c.to_vec())
        .collect();
    assert_eq!(w.len(), n, "text too short for {n} windows");
    w
}

fn repo_docs(root: &Path) -> String {
    let mut files: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    let mut text = std::fs::read_to_string(root.join("README.md")).unwrap();
    for f in files {
        text.push_str("\n\n");
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    text
}

#[test]
fn gptq_on_ggml_grids_beats_weighted_rtn_on_inputs_not_calibrated_on() {
    let path = match cache_dir() {
        Ok(c) => model_path(KnownModel::SmolLM2, &c),
        Err(e) => {
            eprintln!("SKIP: no model cache ({e})");
            return;
        }
    };
    if !path.is_file() {
        eprintln!(
            "SKIP: {} is not in the cache (run `quantlab fetch smollm2`)",
            path.display()
        );
        return;
    }
    let model = LlamaModel::load(&path).unwrap();
    let tok = LlamaTokenizer::load(&path).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let read = |p: std::path::PathBuf| tok.encode(&std::fs::read_to_string(p).unwrap()).unwrap();
    let cal_w = draw_windows(
        &read(quantlab_models::text::shipped_calibration()),
        24,
        512,
        0,
        "calib",
    )
    .unwrap();
    let eval_w = consecutive(&read(quantlab_models::text::shipped_eval()), 4);
    let docs_w = consecutive(&tok.encode(&repo_docs(&root)).unwrap(), 4);
    let names: Vec<String> = BLOCK_LINEARS.iter().map(|s| name(s)).collect();
    let hessians = |w: &[Vec<u32>]| float_hessians(&model, w, &names).unwrap();
    let h_cal = hessians(&cal_w);
    let others = [
        ("eval prose", hessians(&eval_w)),
        ("docs", hessians(&docs_w)),
    ];

    let legacy = [
        GgmlGrid::Q4_0,
        GgmlGrid::Q4_1,
        GgmlGrid::Q5_0,
        GgmlGrid::Q5_1,
        GgmlGrid::Q8_0,
        GgmlGrid::IQ4_NL,
    ];
    let mut cases: Vec<(GgmlGrid, Vec<&str>)> = legacy
        .iter()
        .map(|&g| (g, BLOCK_LINEARS.to_vec()))
        .collect();
    // the K super-blocks need rows of 256 columns: only down_proj (1536) has them here
    for g in GgmlGrid::K {
        cases.push((g, vec![BLOCK_LINEARS[6]]));
    }
    let mut failures = Vec::new();
    let mut old_q4_0 = (0.0f64, 0.0f64);
    for (grid, linears) in &cases {
        let grid = *grid;
        let spec = FormatSpec::Ggml(grid);
        // the main job's act-order + static groups, except on the K grids, where the plan
        // runs GPTQ in the natural order with groups fitted in the sweep
        // (`ExportFormat::fit_layer`)
        let ordered = !grid.is_k();
        let params = |fit: GroupFit, shrink: f64| GptqParams {
            act_order: ordered,
            static_groups: ordered,
            granularity: Granularity::Group(grid.group_len()),
            group_fit: fit,
            hessian_shrink: shrink,
            ..Default::default()
        };
        // per text: (gptq, rtn) summed over the linears
        let mut sums = vec![(0.0f64, 0.0f64); others.len()];
        for lin in linears {
            let W_full = quantlab_pipeline::tensors::to_array(
                &model.linear(&name(lin)).unwrap().weight().unwrap(),
            )
            .unwrap();
            let W = W_full.slice(s![..ROWS, ..]).to_owned();
            let Hc = &h_cal[&name(lin)];
            let (rtn, _) = rtn_imatrix(W.view(), grid, Some(Hc.view())).unwrap();
            let (new, _) = gptq(
                W.view(),
                Hc.view(),
                &spec,
                &params(GroupFit::HessianDiag, default_ggml_hessian_shrink(grid)),
            )
            .unwrap();
            let (rtn, new) = (rtn.dequantize(), new.dequantize());
            let e = |Q: &Array2<f32>, H: &Array2<f32>| {
                rel_output_error(W.view(), Q.view(), H.view()).unwrap()
            };
            let (ec_new, ec_rtn) = (e(&new, Hc), e(&rtn, Hc));
            eprintln!(
                "{} {lin}: calibration gptq {ec_new:.3e} rtn {ec_rtn:.3e}",
                grid.ggml_name()
            );
            if ec_new > ec_rtn * (1.0 + 1e-6) + 1e-12 {
                failures.push(format!(
                    "{} {lin}: on calibration inputs GPTQ {ec_new:.4e} > weighted RTN {ec_rtn:.4e}",
                    grid.ggml_name()
                ));
            }
            for (t, (_, hs)) in others.iter().enumerate() {
                let H = &hs[&name(lin)];
                sums[t].0 += e(&new, H);
                sums[t].1 += e(&rtn, H);
            }
            if grid == GgmlGrid::Q4_0 {
                let (old, _) =
                    gptq(W.view(), Hc.view(), &spec, &params(GroupFit::Plain, 0.0)).unwrap();
                let H = &others[1].1[&name(lin)];
                old_q4_0.0 += e(&old.dequantize(), H);
                old_q4_0.1 += e(&rtn, H);
            }
        }
        for (t, (label, _)) in others.iter().enumerate() {
            let (g, r) = sums[t];
            eprintln!(
                "{} on {label}: gptq {g:.4e} rtn {r:.4e} ({:+.1}%)",
                grid.ggml_name(),
                100.0 * (g / r - 1.0)
            );
            // Q4_1 / Q5_1 hold this model's Q4_1 weights almost exactly: both errors ~ 0
            let exact = r < 1e-9;
            if !(g < r || (exact && g <= 1e-9)) {
                failures.push(format!(
                    "{} on {label}: GPTQ {g:.4e} is not below weighted RTN {r:.4e}",
                    grid.ggml_name()
                ));
            }
        }
    }
    eprintln!(
        "Q4_0 on docs, GPTQ as before (plain fit, no shrinkage): {:.4e} vs weighted RTN {:.4e}",
        old_q4_0.0, old_q4_0.1
    );
    assert!(
        old_q4_0.0 > old_q4_0.1,
        "the defect of issue 18 no longer shows on this block: {old_q4_0:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
