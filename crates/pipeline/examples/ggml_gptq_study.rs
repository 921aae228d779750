//! Study (not a test): GPTQ against importance-weighted RTN on ggml's block grids, per layer,
//! on calibration inputs and on inputs the quantizers never saw (issue 18).
//!
//! ```text
//! cargo run --release -p quantlab-pipeline --example ggml_gptq_study -- \
//!     [--model GGUF] [--nsamples 128] [--blocks 0,5,10,15,20,25,29] [--grids q4_0,q4_1,...] \
//!     [--held FILE] [--windows 8]
//! ```
//!
//! Every block runs in full precision (no sequential re-run: both quantizers see the same
//! inputs), each linear's inputs are accumulated into three Hessians: `H_cal` from
//! `--nsamples` random windows of 512 tokens of the shipped calibration text, `H_eval` from
//! the first `--windows` windows of the shipped evaluation text and `H_held` from the first
//! `--windows` windows of `--held` (any text neither tuned nor calibrated on). Each method is
//! solved from `H_cal` alone and scored on all three by the relative output error
//! `tr(D H D^T) / tr(W H W^T)`, `D = W - Q`. Prints one row per (grid, method): the mean over
//! the linears of each score, and on how many linears the method beats `rtn-imatrix` on
//! held-out inputs.
use ndarray::Array2;
use quantlab_grids::{FormatSpec, GgmlGrid, Granularity};
use quantlab_models::{LlamaModel, LlamaTokenizer, BLOCK_LINEARS};
use quantlab_pipeline::calib::{draw_windows, float_hessians};
use quantlab_solvers::gptq::{gptq, GptqParams, GroupFit};
use quantlab_solvers::rel_output_error;
use quantlab_solvers::rtn::rtn_imatrix;
use std::collections::BTreeMap;
use std::path::PathBuf;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn grid_of(s: &str) -> Res<GgmlGrid> {
    let all = GgmlGrid::ALL
        .iter()
        .chain(GgmlGrid::K.iter())
        .chain([GgmlGrid::IQ4_NL].iter());
    for g in all {
        if g.ggml_name().eq_ignore_ascii_case(s) {
            return Ok(*g);
        }
    }
    Err(format!("unknown grid {s}").into())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_path = arg(&args, "--model").map(PathBuf::from).unwrap_or_else(|| {
        dirs_home().join(".cache/quantlab/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let nsamples: usize = arg(&args, "--nsamples").map_or(Ok(128), |s| s.parse())?;
    let nwin: usize = arg(&args, "--windows").map_or(Ok(8), |s| s.parse())?;
    let blocks: Vec<usize> = arg(&args, "--blocks")
        .unwrap_or_else(|| "0,5,10,15,20,25,29".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<std::result::Result<_, _>>()?;
    let grids: Vec<GgmlGrid> = arg(&args, "--grids")
        .unwrap_or_else(|| "q4_0,q4_1,q5_0,q5_1,q8_0".into())
        .split(',')
        .map(grid_of)
        .collect::<Res<_>>()?;
    let held = arg(&args, "--held");

    let model = LlamaModel::load(&model_path)?;
    let tok = LlamaTokenizer::load(&model_path)?;
    let calib = std::fs::read_to_string(quantlab_models::text::shipped_calibration())?;
    let eval = std::fs::read_to_string(quantlab_models::text::shipped_eval())?;
    let ct = tok.encode(&calib)?;
    let cal_w = draw_windows(&ct, nsamples, 512, 0, "calib")?;
    let consecutive = |t: &[u32]| -> Vec<Vec<u32>> {
        t.chunks_exact(512).take(nwin).map(|c| c.to_vec()).collect()
    };
    let eval_w = consecutive(&tok.encode(&eval)?);
    let held_w = match &held {
        Some(p) => consecutive(&tok.encode(&std::fs::read_to_string(p)?)?),
        None => Vec::new(),
    };
    let names: Vec<String> = blocks
        .iter()
        .flat_map(|b| {
            BLOCK_LINEARS
                .iter()
                .map(move |s| format!("model.layers.{b}.{s}"))
        })
        .collect();
    let t0 = std::time::Instant::now();
    let h_cal = float_hessians(&model, &cal_w, &names)?;
    let h_eval = float_hessians(&model, &eval_w, &names)?;
    let h_held = if held_w.is_empty() {
        BTreeMap::new()
    } else {
        float_hessians(&model, &held_w, &names)?
    };
    eprintln!(
        "hessians: {} calib, {} eval, {} held-out windows in {:.1} s",
        cal_w.len(),
        eval_w.len(),
        held_w.len(),
        t0.elapsed().as_secs_f64()
    );

    let shrinks: Vec<f64> = arg(&args, "--shrink")
        .unwrap_or_else(|| "0.5,0.75,0.9".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<std::result::Result<_, _>>()?;
    let mut methods: Vec<(String, Option<GptqParams>, f64)> =
        vec![("rtn-imatrix".into(), None, 0.0)];
    for (label, p) in [
        (
            "act+static hdiag",
            GptqParams {
                act_order: true,
                static_groups: true,
                group_fit: GroupFit::HessianDiag,
                ..Default::default()
            },
        ),
        (
            "hdiag",
            GptqParams {
                group_fit: GroupFit::HessianDiag,
                ..Default::default()
            },
        ),
    ] {
        for &a in &shrinks {
            methods.push((format!("gptq {label} shrink {a}"), Some(p.clone()), a));
        }
    }
    let base_methods: Vec<(&str, Option<GptqParams>)> = vec![
        (
            "gptq act+static plain",
            Some(GptqParams {
                act_order: true,
                static_groups: true,
                ..Default::default()
            }),
        ),
        ("gptq plain", Some(GptqParams::default())),
        (
            "gptq act+static hdiag",
            Some(GptqParams {
                act_order: true,
                static_groups: true,
                group_fit: GroupFit::HessianDiag,
                ..Default::default()
            }),
        ),
        (
            "gptq act+static gptq-w",
            Some(GptqParams {
                act_order: true,
                static_groups: true,
                group_fit: GroupFit::Gptq,
                ..Default::default()
            }),
        ),
        (
            "gptq hdiag",
            Some(GptqParams {
                group_fit: GroupFit::HessianDiag,
                ..Default::default()
            }),
        ),
        (
            "gptq gptq-w",
            Some(GptqParams {
                group_fit: GroupFit::Gptq,
                ..Default::default()
            }),
        ),
    ];
    methods.extend(
        base_methods
            .into_iter()
            .filter(|(_, p)| p.is_some())
            .map(|(l, p)| (l.to_string(), p, 0.0)),
    );
    println!("| grid | method | linears | rel err calib | rel err eval | rel err held | beats rtn-imatrix on held (eval) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &grid in &grids {
        let spec = FormatSpec::Ggml(grid);
        // per method: sums and per-linear held errors
        let mut rows: Vec<(f64, f64, f64, usize, Vec<f64>, Vec<f64>)> =
            vec![(0.0, 0.0, 0.0, 0, Vec::new(), Vec::new()); methods.len()];
        for name in &names {
            let w = quantlab_pipeline::tensors::to_array(&model.linear(name)?.weight()?)?;
            if w.ncols() % grid.span_len() != 0 {
                continue;
            }
            let hc = &h_cal[name];
            for (mi, (_, p, shrink)) in methods.iter().enumerate() {
                let hs;
                let hc_used = if *shrink > 0.0 {
                    hs = Array2::from_shape_fn(hc.dim(), |(i, j)| {
                        if i == j {
                            hc[[i, j]]
                        } else {
                            ((1.0 - shrink) * hc[[i, j]] as f64) as f32
                        }
                    });
                    &hs
                } else {
                    hc
                };
                let q = match p {
                    None => rtn_imatrix(w.view(), grid, Some(hc.view()))?.0,
                    Some(p) => {
                        let p = GptqParams {
                            granularity: Granularity::Group(grid.group_len()),
                            ..p.clone()
                        };
                        gptq(w.view(), hc_used.view(), &spec, &p)?.0
                    }
                }
                .dequantize();
                let e = |h: &Array2<f32>| rel_output_error(w.view(), q.view(), h.view());
                let r = &mut rows[mi];
                r.0 += e(hc)?;
                let ev = e(&h_eval[name])?;
                r.1 += ev;
                r.5.push(ev);
                if let Some(h) = h_held.get(name) {
                    let hv = e(h)?;
                    r.2 += hv;
                    r.4.push(hv);
                }
                r.3 += 1;
            }
        }
        let base_held = rows[0].4.clone();
        let base_eval = rows[0].5.clone();
        for (mi, (label, _, _)) in methods.iter().enumerate() {
            let r = &rows[mi];
            let n = r.3.max(1) as f64;
            let wins_h = r.4.iter().zip(&base_held).filter(|(a, b)| a < b).count();
            let wins_e = r.5.iter().zip(&base_eval).filter(|(a, b)| a < b).count();
            println!(
                "| {} | {label} | {} | {:.5} | {:.5} | {:.5} | {wins_h} ({wins_e}) |",
                grid.ggml_name(),
                r.3,
                r.0 / n,
                r.1 / n,
                r.2 / n,
            );
        }
    }
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
