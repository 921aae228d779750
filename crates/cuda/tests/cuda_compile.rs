//! Kernel compilation through NVRTC (no GPU needed) and error paths on machines without CUDA.
//! Skips visibly (a `SKIP` line on stderr, outside the harness's capture) when libnvrtc or
//! the `cuda` feature is absent.

use quantlab_cuda::{compile_kernels, open_first, probe_driver, probe_nvrtc, CudaError, KERNELS};
use std::io::Write;

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {why}");
}

#[test]
fn cuda_every_kernel_compiles_to_ptx_when_nvrtc_is_available() {
    if !cfg!(feature = "cuda") {
        assert!(matches!(compile_kernels(), Err(CudaError::CudaNotCompiled)));
        return skip("quantlab-cuda built without the `cuda` feature: kernels not compiled");
    }
    if let Err(e) = probe_nvrtc() {
        assert!(matches!(
            compile_kernels(),
            Err(CudaError::Unavailable { .. })
        ));
        return skip(&format!(
            "{e} (pip install nvidia-cuda-nvrtc-cu12 to compile the kernels)"
        ));
    }
    let ptx = compile_kernels().unwrap();
    assert_eq!(ptx.len(), KERNELS.len());
    for ((name, text), k) in ptx.iter().zip(KERNELS) {
        assert_eq!(name, k.name);
        assert!(
            text.contains(".version") && text.contains(".target"),
            "{name}"
        );
        for entry in k.entry_points {
            assert!(
                text.contains(&format!(".entry {entry}(")),
                "{name}: no .entry {entry} in PTX"
            );
        }
        // The f16 conversions went through PTX cvt, not a header.
        assert!(
            text.contains("cvt.f32.f16") && text.contains("cvt.rn.f16.f32"),
            "{name}"
        );
        let _ = writeln!(
            std::io::stderr(),
            "compiled {name}: {} bytes of PTX",
            text.len()
        );
    }
}

#[test]
fn cuda_entry_points_are_declared_in_the_sources() {
    for k in KERNELS {
        for entry in k.entry_points {
            assert!(
                k.source
                    .contains(&format!("extern \"C\" __global__ void {entry}(")),
                "{}: {entry}",
                k.file
            );
        }
    }
}

#[test]
fn cuda_missing_or_broken_libraries_are_errors_not_panics() {
    // A file with a library's name but garbage content.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("libquantlab-fake.so.12"),
        b"not an ELF file",
    )
    .unwrap();
    let e = open_first(&["libquantlab-fake.so.12"], &[dir.path().to_path_buf()]).unwrap_err();
    match &e {
        CudaError::Unavailable { library, detail } => {
            assert_eq!(library, "libquantlab-fake.so.12");
            assert!(
                detail.contains(&dir.path().display().to_string()),
                "{detail}"
            );
        }
        other => panic!("{other}"),
    }
    // Absent everywhere.
    let e = open_first(&["libquantlab-absent.so"], &[dir.path().to_path_buf()]).unwrap_err();
    assert!(e.to_string().contains("libquantlab-absent.so"), "{e}");

    // The driver: on a machine without a GPU an error naming libcuda.
    match probe_driver() {
        Ok(lib) => skip(&format!("a CUDA driver is present here ({lib})")),
        Err(e) => {
            assert!(matches!(e, CudaError::Unavailable { .. }));
            assert!(e.to_string().contains("libcuda.so"), "{e}");
        }
    }
    // Compiling: Ok where libnvrtc is present, a typed error otherwise; never a panic.
    let built_with_cuda = cfg!(feature = "cuda");
    match compile_kernels() {
        Ok(p) => assert_eq!(p.len(), KERNELS.len()),
        Err(CudaError::CudaNotCompiled) => assert!(!built_with_cuda),
        Err(CudaError::Unavailable { .. }) => assert!(built_with_cuda),
        Err(e) => panic!("{e}"),
    }
}
