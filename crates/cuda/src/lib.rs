//! # quantlab-cuda: GPU kernels loaded at run time
//!
//! Kernels live in `kernels/*.cu` and are compiled by NVRTC at run time through cudarc
//! (feature `cuda`). Without the feature, or on a machine without the CUDA libraries, every
//! entry point returns an error instead of panicking, so callers carry no `cfg`.

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
