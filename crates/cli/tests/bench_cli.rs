//! `quantlab bench quantize` from the command line: a synthetic model written once, the JSON
//! fields users' scripts read, and clear errors for a bad synthetic shape.

use std::process::Command;

fn quantlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(args)
        .output()
        .expect("run quantlab");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bench_quantize_json_on_a_synthetic_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for method in ["gptq", "rtn"] {
        let (ok, out, err) = quantlab(&[
            "bench",
            "quantize",
            "--model",
            "synthetic:64,128,2,4,2",
            "--method",
            method,
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--batch-size",
            "2",
            "--group-size",
            "32",
            "--synthetic-dir",
            d,
            "--json",
        ]);
        assert!(ok, "{method}: {err}");
        let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        for k in [
            "load",
            "forward",
            "hessian",
            "solve",
            "save",
            "total_seconds",
            "peak_rss_mb",
            "gemm_gflops",
        ] {
            assert!(j[k].as_f64().is_some(), "{method}: {k} in {j}");
        }
        assert_eq!(j["method"], method);
        // gptq calibrates on the shipped prose (64 tokens here); rtn runs data-free
        let tokens = if method == "gptq" { 64 } else { 0 };
        assert_eq!(j["calibration_tokens"], tokens, "{j}");
        assert_eq!(
            j["forward"].as_f64().unwrap() > 0.0,
            method == "gptq",
            "{j}"
        );
    }
    // the model was written once, under the named directory
    let written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(written.len(), 1);
    assert!(written[0].path().join("model.safetensors").is_file());

    let (ok, _, err) = quantlab(&[
        "bench",
        "quantize",
        "--model",
        "synthetic:63,128,2,4,2",
        "--method",
        "rtn",
        "--synthetic-dir",
        d,
    ]);
    assert!(!ok);
    assert!(
        err.contains("synthetic:63,128,2,4,2") && err.contains("multiple of heads"),
        "{err}"
    );
}
