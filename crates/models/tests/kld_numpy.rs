//! `kl_divergence` against a direct numpy computation on a small case: two tiny random
//! LLaMAs (the second one's weights rounded to a coarse grid, as a quantizer would), three
//! windows of 16 tokens. The logits of every window come from `LlamaModel::forward`; numpy
//! computes the log-softmax, the per-position KL divergence, its statistics, the top-1
//! agreement and both perplexities from them. Then the base stored by `save_base` (f16
//! log-probabilities) gives the same figures within f16's precision, and is refused for
//! another text or window length.
//!
//! Skips visibly (a `SKIPPED` line) when python3 has no numpy.

use std::process::Command;

use quantlab_models::{kl_divergence, save_base, KldBase, LlamaModel, PplParams, SavedBase};
use quantlab_testsupport::{std_rng_uniform, TinyLlama};

const NUMPY: &str = r#"
import json, sys
import numpy as np
req = json.load(open(sys.argv[1]))
V = req["vocab"]
def log_softmax(l):
    m = l.max(axis=1, keepdims=True)
    return l - m - np.log(np.exp(l - m).sum(axis=1, keepdims=True))
kld, same, nll, nll_b = [], [], [], []
for w in req["windows"]:
    lp = log_softmax(np.array(w["base"], dtype=np.float64).reshape(-1, V))
    lq = log_softmax(np.array(w["model"], dtype=np.float64).reshape(-1, V))
    t = np.array(w["targets"])
    kld.append((np.exp(lp) * (lp - lq)).sum(axis=1))
    same.append(lp.argmax(axis=1) == lq.argmax(axis=1))
    nll.append(-lq[np.arange(len(t)), t])
    nll_b.append(-lp[np.arange(len(t)), t])
k = np.concatenate(kld); s = np.concatenate(same); n = len(k)
d = np.concatenate(nll) - np.concatenate(nll_b)
srt = np.sort(k)
rank = lambda p: srt[min(max(int(np.ceil(p / 100 * n)), 1), n) - 1]
a = s.mean()
print(json.dumps({
    "kld_mean": k.mean(), "kld_err": k.std(ddof=1) / np.sqrt(n), "kld_median": float(np.median(k)),
    "kld_p90": float(rank(90)), "kld_p99": float(rank(99)), "kld_max": float(k.max()),
    "top1_agreement": float(a), "top1_err": float(np.sqrt(a * (1 - a) / n)),
    "ppl": float(np.exp(np.concatenate(nll).mean())), "ppl_base": float(np.exp(np.concatenate(nll_b).mean())),
    "ln_ppl_ratio": float(d.mean()), "ln_ppl_ratio_err": float(d.std(ddof=1) / np.sqrt(n)), "n": n,
}))
"#;

fn numpy_ok() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success())
}

/// The base and the "quantized" model: the same tiny LLaMA, its block weights rounded to
/// multiples of 1/16 in the second one.
fn models(dir: &std::path::Path) -> (LlamaModel, LlamaModel) {
    let spec = TinyLlama {
        kv_heads: 2,
        ..TinyLlama::default()
    };
    let t = spec.tensors(std_rng_uniform(11));
    spec.write_hf_dir(&dir.join("base"), &t);
    let q: Vec<_> = t
        .iter()
        .map(|(n, s, v)| {
            let v = if n.contains("_proj") {
                v.iter().map(|x| (x * 16.0).round() / 16.0).collect()
            } else {
                v.clone()
            };
            (n.clone(), s.clone(), v)
        })
        .collect();
    spec.write_hf_dir(&dir.join("q"), &q);
    (
        LlamaModel::load(dir.join("base")).unwrap(),
        LlamaModel::load(dir.join("q")).unwrap(),
    )
}

fn tokens(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut u = std_rng_uniform(seed);
    (0..n)
        .map(|_| (((u() + 1.0) * 0.5 * vocab as f32) as u32).min(vocab - 1))
        .collect()
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-12),
        "{what}: ours {got}, numpy {want}"
    );
}

#[test]
fn kld_equals_numpy_and_the_stored_base_agrees() {
    if !numpy_ok() {
        eprintln!("SKIPPED kld_numpy: python3 has no numpy (pip install numpy)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (base, q) = models(tmp.path());
    let ctx = 16;
    // three whole windows and a tail that is dropped
    let toks = tokens(3 * ctx + 5, 300, 3);
    let params = PplParams {
        ctx,
        max_windows: None,
    };
    let r = kl_divergence(KldBase::Model(&base), &q, &toks, &params).unwrap();
    assert_eq!((r.windows, r.tokens_scored), (3, 3 * 15));

    let windows: Vec<_> = (0..3)
        .map(|w| {
            let win = &toks[w * ctx..(w + 1) * ctx];
            let logits = |m: &LlamaModel| -> Vec<f32> {
                let l = m.forward(win).unwrap();
                l.narrow(0, 0, ctx - 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            serde_json::json!({"base": logits(&base), "model": logits(&q), "targets": &win[1..]})
        })
        .collect();
    let req = tmp.path().join("req.json");
    std::fs::write(
        &req,
        serde_json::json!({"vocab": 300, "windows": windows}).to_string(),
    )
    .unwrap();
    let script = tmp.path().join("kld.py");
    std::fs::write(&script, NUMPY).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(&req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "numpy script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let np: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = |k: &str| np[k].as_f64().unwrap();
    assert_eq!(np["n"], 45);
    // not a vacuous comparison: the rounding moves the distributions, but not entirely
    assert!(r.kld_mean > 1e-4 && r.top1_agreement > 0.3, "{r:?}");
    // the KL divergences are computed in f64 from the same f32 logits on both sides
    for (got, k) in [
        (r.kld_mean, "kld_mean"),
        (r.kld_err, "kld_err"),
        (r.kld_median, "kld_median"),
        (r.kld_p90, "kld_p90"),
        (r.kld_p99, "kld_p99"),
        (r.kld_max, "kld_max"),
        (r.top1_agreement, "top1_agreement"),
        (r.top1_err, "top1_err"),
    ] {
        close(got, f(k), 1e-9, k);
    }
    // perplexity() computes the NLL with its f32 exponential (relative error below 2e-7)
    close(r.ppl, f("ppl"), 1e-5, "ppl");
    close(r.ppl_base, f("ppl_base"), 1e-5, "ppl_base");
    close(r.ln_ppl_ratio, f("ln_ppl_ratio"), 1e-3, "ln_ppl_ratio");
    close(
        r.ln_ppl_ratio_err,
        f("ln_ppl_ratio_err"),
        1e-3,
        "ln_ppl_ratio_err",
    );
    // and the perplexities are exactly the ones `perplexity` reports
    assert_eq!(
        r.ppl,
        quantlab_models::perplexity(&q, &toks, &params).unwrap().ppl
    );
    assert_eq!(
        r.ppl_base,
        quantlab_models::perplexity(&base, &toks, &params)
            .unwrap()
            .ppl
    );

    // the stored base: f16 log-probabilities (|ln p| < 16 here: spacing at most 2^-7, error
    // at most 2^-8 per value), exact NLLs
    let file = tmp.path().join("base.kld");
    let facts = save_base(&base, &toks, &params, &file).unwrap();
    assert_eq!(facts.bytes, std::fs::metadata(&file).unwrap().len());
    assert!(!tmp
        .path()
        .join(format!("base.kld.tmp-{}", std::process::id()))
        .exists());
    let saved = SavedBase::open(&file).unwrap();
    assert_eq!((saved.windows(), saved.ctx()), (3, ctx));
    let s = kl_divergence(KldBase::Saved(&saved), &q, &toks, &params).unwrap();
    assert_eq!(s.ppl_base, r.ppl_base);
    assert_eq!(s.ppl, r.ppl);
    assert!(
        (s.kld_mean - r.kld_mean).abs() < 2e-3 * (1.0 + r.kld_max),
        "stored {} direct {}",
        s.kld_mean,
        r.kld_mean
    );
    assert_eq!(s.top1_agreement, r.top1_agreement);
    // fewer windows of the same text are fine; another text or window length is refused
    let two = PplParams {
        ctx,
        max_windows: Some(2),
    };
    assert_eq!(
        kl_divergence(KldBase::Saved(&saved), &q, &toks, &two)
            .unwrap()
            .windows,
        2
    );
    let other = tokens(3 * ctx, 300, 4);
    let e = kl_divergence(KldBase::Saved(&saved), &q, &other, &params).unwrap_err();
    assert!(e.to_string().contains("another text"), "{e}");
    let e = kl_divergence(
        KldBase::Saved(&saved),
        &q,
        &toks,
        &PplParams {
            ctx: 8,
            max_windows: None,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("windows of 16"), "{e}");
    // a file that is not a stored base is refused with its name
    let e = SavedBase::open(&tmp.path().join("q/model.safetensors"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}
