//! OBQ investigation: the greedy OBQ of `quantlab_solvers::obq` against variants written here
//! from the public pieces (`obs::saliency`, `obs::update`, `obq::downdate`): without the
//! outlier rule, and in fixed orders (natural, act-order) which are GPTQ's. Per-channel grids.
#![allow(non_snake_case)]
use ndarray::{Array1, Array2};
use quantlab_grids::{Format, Granularity, GroupParams, UniformGrid};
use quantlab_solvers::gptq::{gptq_with_format, GptqParams};
use quantlab_solvers::obq::downdate;
use quantlab_solvers::obs::{saliency, update};
use quantlab_solvers::synth::{correlated_inputs, random_weight};
use quantlab_solvers::{hessian::Hessian, rel_output_error};

/// mode 0: greedy least saliency, no outlier rule; 1: fixed order `order`.
fn row_variant(
    w0: &Array1<f64>,
    Hinv0: &Array2<f64>,
    f: &dyn Format,
    p: GroupParams,
    order: Option<&[usize]>,
) -> Array1<f64> {
    let d = w0.len();
    let mut w = w0.clone();
    let mut Hinv = Hinv0.clone();
    let mut free = vec![true; d];
    for step in 0..d {
        let t = Array1::from_shape_fn(d, |q| f.quantize(w[q] as f32, p) as f64);
        let q = match order {
            Some(o) => o[step],
            None => {
                let s = saliency(w.view(), t.view(), Hinv.view());
                (0..d)
                    .filter(|&q| free[q])
                    .min_by(|&a, &b| s[a].total_cmp(&s[b]))
                    .unwrap()
            }
        };
        let dw = update(w.view(), q, t[q], Hinv.view());
        for i in 0..d {
            if free[i] {
                w[i] += dw[i];
            }
        }
        w[q] = t[q];
        free[q] = false;
        downdate(&mut Hinv, q);
    }
    w
}

fn main() {
    let (out, n) = (16usize, 96usize);
    for outliers in [0usize, 4] {
        for seed in 0..3u64 {
            let X = correlated_inputs(4 * n, n, seed, outliers);
            let mut h = Hessian::new(n);
            h.add_batch(X.view(), 1).unwrap();
            let H = h.finish();
            let W = random_weight(out, n, seed + 1);
            let grid = UniformGrid::new(4, true).unwrap();
            let mean = (0..n).map(|i| H[[i, i]] as f64).sum::<f64>() / n as f64;
            let mut Hd = H.mapv(|v| v as f64);
            for i in 0..n {
                Hd[[i, i]] += 0.01 * mean;
            }
            let Hinv = quantlab_solvers::linalg::spd_inverse_ref(Hd.view()).unwrap();
            let mut act: Vec<usize> = (0..n).collect();
            act.sort_by(|&a, &b| H[[b, b]].total_cmp(&H[[a, a]]));
            let nat: Vec<usize> = (0..n).collect();
            let mut res = vec![Array2::<f32>::zeros((out, n)); 3];
            for r in 0..out {
                let wr = W.row(r).mapv(|v| v as f64);
                let p = grid.fit(W.row(r).as_slice().unwrap());
                for (vi, o) in [None, Some(&nat[..]), Some(&act[..])]
                    .into_iter()
                    .enumerate()
                {
                    let q = row_variant(&wr, &Hinv, &grid, p, o);
                    for k in 0..n {
                        res[vi][[r, k]] = q[k] as f32;
                    }
                }
            }
            let e = |q: &Array2<f32>| rel_output_error(W.view(), q.view(), H.view()).unwrap();
            let obq = quantlab_solvers::obq::obq_with_format(
                W.view(),
                H.view(),
                &grid,
                &quantlab_solvers::obq::ObqParams {
                    granularity: Granularity::PerChannel,
                    ..Default::default()
                },
            )
            .unwrap();
            let gp = GptqParams {
                granularity: Granularity::PerChannel,
                ..Default::default()
            };
            let g = gptq_with_format(W.view(), H.view(), &grid, &gp).unwrap();
            println!(
                "outliers {outliers} seed {seed}: obq(lib) {:.5} greedy-no-outlier-rule {:.5} fixed-natural {:.5} fixed-act {:.5} | gptq {:.5}",
                e(&obq.q),
                e(&res[0]),
                e(&res[1]),
                e(&res[2]),
                e(&g.q)
            );
        }
    }
}
