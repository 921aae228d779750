//! # quantlab-cuda: GPU kernels loaded at run time
//!
//! Kernels live in `kernels/*.cu`, are embedded with `include_str!` ([`KERNELS`]) and are
//! compiled by NVRTC at run time through cudarc (feature `cuda`). Without the feature, or on
//! a machine without the CUDA libraries, every entry point returns an error instead of
//! panicking, so callers carry no `cfg`.
//!
//! cudarc panics when a library it needs is missing, so every cudarc call here is preceded
//! by a probe that opens the library with `libloading` first ([`probe_nvrtc`],
//! [`probe_driver`]).
//!
//! ```
//! use quantlab_cuda::{compile_kernels, CudaError};
//! match compile_kernels() {
//!     Ok(ptx) => assert!(ptx.iter().all(|(_, p)| p.contains(".entry"))),
//!     // No `cuda` feature, or no libnvrtc here: an error, never a panic.
//!     Err(CudaError::CudaNotCompiled | CudaError::Unavailable { .. }) => {}
//!     Err(e) => panic!("{e}"),
//! }
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What can go wrong on the GPU path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The crate was built without the `cuda` feature.
    #[error("quantlab was built without the `cuda` feature")]
    CudaNotCompiled,
    /// A CUDA library could not be opened on this machine.
    #[error("CUDA library {library} is not available: {detail}")]
    Unavailable { library: String, detail: String },
    /// NVRTC rejected a kernel source.
    #[error("kernel {kernel} failed to compile: {log}")]
    Compile {
        /// The kernel file's stem, e.g. `dequant_gptq4`.
        kernel: String,
        /// NVRTC's error and log.
        log: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Library names probed for the CUDA driver, in order.
pub const DRIVER_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// Whether the CUDA driver library can be opened here (never panics).
pub fn probe_driver() -> Result<String> {
    let mut last = String::new();
    for name in DRIVER_LIBRARIES {
        // SAFETY: opening a shared library runs its initialisers; libcuda's are benign.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok((*name).to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(CudaError::Unavailable {
        library: DRIVER_LIBRARIES.join(" or "),
        detail: last,
    })
}

/// A CUDA C++ source embedded in the crate.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file stem, e.g. `dequant_gptq4`.
    pub name: &'static str,
    /// The file, relative to the workspace root.
    pub file: &'static str,
    /// The source text.
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines.
    pub entry_points: &'static [&'static str],
}

/// Every kernel source of the workspace (`kernels/*.cu`).
pub const KERNELS: &[KernelSource] = &[KernelSource {
    name: "dequant_gptq4",
    file: "kernels/dequant_gptq4.cu",
    source: include_str!("../../../kernels/dequant_gptq4.cu"),
    entry_points: &["dequant_gptq4_f32", "dequant_gptq4_f16"],
}];

/// Library names probed for NVRTC, in order. cudarc (feature `cuda-12090`) itself loads
/// `libnvrtc.so` or `libnvrtc.so.12`.
pub const NVRTC_LIBRARIES: &[&str] = &["libnvrtc.so.12", "libnvrtc.so", "libnvrtc.so.13"];

/// Environment variable naming an extra folder to search for libnvrtc.
pub const NVRTC_DIR_ENV: &str = "QUANTLAB_NVRTC_DIR";

/// A shared library opened by [`open_first`]; it stays loaded while this value lives.
#[derive(Debug)]
pub struct LoadedLibrary {
    /// The name or path it was opened by.
    pub path: String,
    /// Companion libraries opened next to it (NVRTC's builtins).
    companions: Vec<libloading::Library>,
    _lib: libloading::Library,
}

/// Opens the first library of `names` found on the loader path, else in one of `dirs`.
///
/// Never panics: a missing or broken file becomes [`CudaError::Unavailable`] listing what
/// was tried.
///
/// ```
/// use quantlab_cuda::{open_first, CudaError};
/// let dir = std::env::temp_dir();
/// let e = open_first(&["libquantlab-no-such-library.so"], &[dir]).unwrap_err();
/// assert!(matches!(e, CudaError::Unavailable { .. }));
/// ```
pub fn open_first(names: &[&str], dirs: &[PathBuf]) -> Result<LoadedLibrary> {
    let mut tried = Vec::new();
    let candidates = names.iter().map(|n| PathBuf::from(*n)).chain(
        dirs.iter()
            .flat_map(|d| names.iter().map(move |n| d.join(n))),
    );
    for c in candidates {
        // A bare name goes through the loader's search; a path is opened only if it exists.
        if c.components().count() > 1 && !c.exists() {
            continue;
        }
        // SAFETY: opening a shared library runs its initialisers; the CUDA libraries'
        // initialisers are benign, and nothing is called through the handle here.
        match unsafe { libloading::Library::new(&c) } {
            Ok(lib) => {
                let companions = c.parent().map(open_companions).unwrap_or_default();
                return Ok(LoadedLibrary {
                    path: c.display().to_string(),
                    companions,
                    _lib: lib,
                });
            }
            Err(e) => tried.push(format!("{}: {e}", c.display())),
        }
    }
    Err(CudaError::Unavailable {
        library: names.join(" or "),
        detail: if tried.is_empty() {
            format!("not found in the loader path nor in {dirs:?}")
        } else {
            tried.join("; ")
        },
    })
}

/// NVRTC loads `libnvrtc-builtins.so.*` at compile time; opening it by path from the same
/// folder makes it resolvable when that folder is not on the loader path.
fn open_companions(dir: &Path) -> Vec<libloading::Library> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut libs = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so.") {
            // SAFETY: as in `open_first`.
            if let Ok(lib) = unsafe { libloading::Library::new(e.path()) } {
                libs.push(lib);
            }
        }
    }
    libs
}

/// Folders searched for libnvrtc after the loader path: `$QUANTLAB_NVRTC_DIR`, the entries of
/// `LD_LIBRARY_PATH`, and pip's `site-packages/nvidia/cuda_nvrtc/lib` (`nvidia/cu13/lib`)
/// under the folders `python3` reports.
pub fn nvrtc_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(NVRTC_DIR_ENV) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    let script =
        "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let sp = Path::new(line.trim());
            dirs.push(sp.join("nvidia/cuda_nvrtc/lib"));
            dirs.push(sp.join("nvidia/cu13/lib"));
        }
    }
    dirs
}

static NVRTC: OnceLock<std::result::Result<LoadedLibrary, String>> = OnceLock::new();

/// Opens libnvrtc ([`NVRTC_LIBRARIES`] on the loader path, then [`nvrtc_search_dirs`]) and
/// keeps it loaded for the life of the process; returns the path it was found at.
///
/// Once a library is loaded by path, later `dlopen` calls by its soname (as cudarc makes)
/// resolve to it, so pip's NVRTC works without `LD_LIBRARY_PATH`.
pub fn probe_nvrtc() -> Result<String> {
    let r = NVRTC.get_or_init(|| {
        open_first(NVRTC_LIBRARIES, &nvrtc_search_dirs()).map_err(|e| match e {
            CudaError::Unavailable { detail, .. } => detail,
            other => other.to_string(),
        })
    });
    match r {
        Ok(lib) => Ok(lib.path.clone()),
        Err(detail) => Err(CudaError::Unavailable {
            library: NVRTC_LIBRARIES.join(" or "),
            detail: detail.clone(),
        }),
    }
}

/// Compiles every kernel of [`KERNELS`] to PTX with NVRTC: `(kernel name, PTX text)`.
///
/// Needs the `cuda` feature ([`CudaError::CudaNotCompiled`] otherwise) and a libnvrtc
/// ([`CudaError::Unavailable`] otherwise); no GPU is needed.
#[cfg(feature = "cuda")]
pub fn compile_kernels() -> Result<Vec<(String, String)>> {
    let path = probe_nvrtc()?;
    // cudarc opens libnvrtc by its own list of names and panics if none loads: check first.
    // SAFETY: only opens and closes libraries.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable {
            library: "libnvrtc.so or libnvrtc.so.12".into(),
            detail: format!(
                "found {path}, but cudarc (cuda-12090) loads only libnvrtc.so / libnvrtc.so.12 \
                 names: add a libnvrtc.so link to its folder on LD_LIBRARY_PATH"
            ),
        });
    }
    let mut out = Vec::with_capacity(KERNELS.len());
    for k in KERNELS {
        let opts = cudarc::nvrtc::CompileOptions {
            name: Some(k.file.to_string()),
            ..Default::default()
        };
        // Belt and braces: a panic inside cudarc becomes an error, not a crash.
        let compiled = std::panic::catch_unwind(|| {
            cudarc::nvrtc::compile_ptx_with_opts(k.source, opts).map(|p| p.to_src())
        });
        match compiled {
            Ok(Ok(ptx)) => out.push((k.name.to_string(), ptx)),
            Ok(Err(e)) => {
                let log = match &e {
                    cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
                        format!("{nvrtc:?}: {}", log.to_string_lossy())
                    }
                    other => format!("{other:?}"),
                };
                return Err(CudaError::Compile {
                    kernel: k.name.to_string(),
                    log,
                });
            }
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "cudarc panicked".into());
                return Err(CudaError::Unavailable {
                    library: "libnvrtc".into(),
                    detail,
                });
            }
        }
    }
    Ok(out)
}

/// Without the `cuda` feature: always [`CudaError::CudaNotCompiled`].
#[cfg(not(feature = "cuda"))]
pub fn compile_kernels() -> Result<Vec<(String, String)>> {
    Err(CudaError::CudaNotCompiled)
}

impl LoadedLibrary {
    /// Number of companion libraries (NVRTC builtins) opened beside it.
    pub fn companion_count(&self) -> usize {
        self.companions.len()
    }
}
