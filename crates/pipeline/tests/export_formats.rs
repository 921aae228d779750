//! `--format`: every checkpoint layout written through `run()` on a tiny random LLaMA, read
//! back by our loader (same perplexity as the in-memory quantized model), by the `gguf`
//! Python package (its dequantizer gives our values) and by the independent NumPy unpacker of
//! tests/oracles/export_hf.py (GPTQ v1/v2 at 2/3/4/8 bits, act-order, ragged last group; AWQ);
//! and the bad cases: a clear error before any work, naming the linear, and no output.

// `.err().expect(..)`: the Ok types (loaded models) are not Debug, so `expect_err` is unavailable.
#![allow(clippy::err_expect)]

mod support;

use std::path::{Path, PathBuf};

use quantlab_checkpoints::export::read::read_quantized_dir;
use quantlab_checkpoints::gguf::{GgmlType, GgufFile};
use quantlab_checkpoints::pack::gguf_blocks;
use quantlab_models::rotate::RotationKind;
use quantlab_models::{perplexity_of_file, LlamaTokenizer, PplParams};
use quantlab_pipeline::export::load_model;
use quantlab_pipeline::{
    prepare, run, Calibration, CodebookOptions, EvalSpec, ExportFormat, GptqOptions, Method,
    QuantizeConfig, QuantizeJob, QuantizeReport, Rotation,
};
use support::*;

/// MLP width: down_proj's rows (256) are whole K super-blocks, the other linears' (64) not.
const INTER: usize = 256;
const CTX: usize = 64;
const WINDOWS: usize = 4;

/// GPTQ with act-order (and static groups when asked).
fn gptq_ao(static_groups: bool) -> Method {
    Method::Gptq(GptqOptions {
        act_order: true,
        static_groups,
        ..Default::default()
    })
}

fn cfg(mut method: Method, format: &str) -> QuantizeConfig {
    if let Method::Awq(a) | Method::AwqGptq(a, _) = &mut method {
        a.samples = 4;
    }
    QuantizeConfig {
        method,
        format: ExportFormat::parse(format).unwrap(),
        nsamples: 8,
        seqlen: 48,
        batch_size: 4,
        ..Default::default()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    text: PathBuf,
}

fn fixture(tag: &str, kv: usize) -> Fixture {
    let tmp = tmpdir(tag);
    let root = tmp.path().to_path_buf();
    let model = root.join("tiny");
    write_tiny(&model, kv, INTER, 7);
    let text = root.join("eval.txt");
    std::fs::write(&text, prose().join("\n\n")).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        model,
        text,
    }
}

fn job(f: &Fixture, model: &Path, out: &Path, c: QuantizeConfig) -> QuantizeJob {
    let mut j = QuantizeJob::new(model, c);
    j.calibration = Calibration::Texts(prose());
    j.out = Some(out.to_path_buf());
    j.eval = Some(EvalSpec {
        text: f.text.clone(),
        field: None,
        ctx: CTX,
        max_windows: Some(WINDOWS),
    });
    j
}

/// Perplexity of the checkpoint at `path` as our loader reads it, tokenized by the source
/// model's tokenizer (so the numbers compare with the in-memory run).
fn ppl_of(f: &Fixture, path: &Path) -> f64 {
    let m = load_model(path).unwrap();
    let tok = LlamaTokenizer::load(&f.model).unwrap();
    let p = PplParams {
        ctx: CTX,
        max_windows: Some(WINDOWS),
    };
    perplexity_of_file(&m, &tok, &f.text, None, &p).unwrap().ppl
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Our dequantization of every tensor of a GGUF file (raw GGUF row order), by name.
fn our_gguf_values(path: &Path) -> Vec<(String, GgmlType, Vec<f32>)> {
    let f = GgufFile::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    f.tensors
        .iter()
        .map(|t| {
            let r = f.tensor_range(t);
            let b = &bytes[r.start as usize..r.end as usize];
            let v = match t.ggml_type {
                GgmlType::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                GgmlType::F16 => b
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                    .collect(),
                ty => {
                    let bt = ty;
                    gguf_blocks::dequantize(&t.name, bt, b).unwrap()
                }
            };
            (t.name.clone(), t.ggml_type, v)
        })
        .collect()
}

/// The `gguf` package reads the file; its dequantizer gives exactly our values; returns its
/// metadata fields (None after a SKIP line).
fn check_with_gguf_package(path: &Path) -> Option<serde_json::Value> {
    let out = path.with_extension("py.safetensors");
    let oracle = repo_root().join("tests/oracles/export_gguf.py");
    let j = python(
        "gguf, numpy, safetensors",
        &[
            oracle.to_str().unwrap(),
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    )?;
    let theirs = read_f32_safetensors(&out);
    let ours = our_gguf_values(path);
    assert_eq!(theirs.len(), ours.len(), "tensor count");
    for (name, ty, v) in &ours {
        let (_, t) = &theirs[name];
        assert_eq!(t.len(), v.len(), "{name}");
        let bad = v
            .iter()
            .zip(t)
            .position(|(a, b)| a.to_bits() != b.to_bits() && a != b);
        assert!(
            bad.is_none(),
            "{name} ({ty}): ours {} vs gguf {} at {}",
            v[bad.unwrap()],
            t[bad.unwrap()],
            bad.unwrap()
        );
    }
    Some(j["fields"].clone())
}

fn tensor_type(path: &Path, name: &str) -> GgmlType {
    GgufFile::open(path)
        .unwrap()
        .tensor(name)
        .unwrap()
        .ggml_type
}

/// Runs the driver in memory with the same calibration as `run()` and checks that every block
/// linear of the GGUF file, as our loader reads it (HF names, q/k rows un-permuted), equals
/// the driver's `QuantizedLinear::dequantize()`.
fn assert_blocks_equal_driver(model: &Path, file: &Path, c: &QuantizeConfig) {
    use quantlab_models::{GgufWeights, WeightSource};
    use quantlab_pipeline::driver::to_array;
    let o = quantize_in_memory(model, c, false).out;
    let g = GgufWeights::open(file).unwrap();
    for l in &o.layers {
        let want = l.linear.as_ref().expect("quantized").dequantize();
        let got = to_array(&g.load(&format!("{}.weight", l.name)).unwrap()).unwrap();
        assert_eq!(got.dim(), want.dim(), "{}", l.name);
        for (a, b) in got.iter().zip(want.iter()) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{}: file {a} vs driver {b}",
                l.name
            );
        }
    }
}

fn run_ok(j: &QuantizeJob) -> QuantizeReport {
    run(j, None).unwrap_or_else(|e| panic!("{}: {e}", j.config.format))
}

#[test]
fn gguf_legacy_types_equal_the_in_memory_model_and_the_gguf_package() {
    let f = fixture("gguf-legacy", 2);
    let cases = [
        (Method::gptq(), "gguf:q4_0", 2u32),
        (Method::Rtn, "gguf:q4_0", 2),
        (Method::gptq(), "gguf:q4_1", 3),
        (Method::gptq(), "gguf:q5_0", 8),
        (Method::gptq(), "gguf:q5_1", 9),
        (Method::gptq(), "gguf:q8_0", 7),
    ];
    let mut ppl = Vec::new();
    for (m, fmt, ftype) in cases {
        let out = f.root.join(format!("{m}-{}.gguf", &fmt[5..]));
        let r = run_ok(&job(&f, &f.model, &out, cfg(m, fmt)));
        assert!(out.is_file());
        assert_eq!(r.file_bytes, Some(std::fs::metadata(&out).unwrap().len()));
        let ty = ExportFormat::parse(fmt).unwrap().gguf_type().unwrap();
        for l in 0..2 {
            for t in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                assert_eq!(
                    tensor_type(&out, &format!("blk.{l}.{t}.weight")),
                    ty,
                    "{fmt} {t}"
                );
            }
            assert_eq!(
                tensor_type(&out, &format!("blk.{l}.attn_norm.weight")),
                GgmlType::F32
            );
        }
        // untied: output.weight Q6_K unless rows are not whole blocks (64 values: Q8_0)
        assert_eq!(tensor_type(&out, "output.weight"), GgmlType::Q8_0);
        assert_eq!(tensor_type(&out, "token_embd.weight"), ty);
        // the block linears read back are exactly the driver's quantized linears
        assert_blocks_equal_driver(&f.model, &out, &cfg(m, fmt));
        // the embeddings are quantized at export as llama.cpp does (token_embd in the file
        // type, output Q8_0 here), so the whole model differs a little from the in-memory one
        let after = r.ppl_after.unwrap();
        let back = ppl_of(&f, &out);
        assert!(
            rel(back, after) < 0.05,
            "{m} {fmt}: file ppl {back} vs in-memory {after}"
        );
        ppl.push((m, fmt, after, r.ppl_before.unwrap()));
        if let Some(fields) = check_with_gguf_package(&out) {
            assert_eq!(fields["general.architecture"], "llama");
            assert_eq!(fields["llama.block_count"], 2);
            assert_eq!(fields["llama.attention.head_count_kv"], 2);
            assert_eq!(fields["general.file_type"], ftype);
            assert_eq!(fields["tokenizer.ggml.tokens"]["len"], VOCAB);
            assert_eq!(fields["tokenizer.ggml.model"], "gpt2");
        }
    }
    eprintln!("{ppl:?}");
    // not vacuous: 4-bit changes the model
    assert!(ppl.iter().any(|(_, _, a, b)| (a - b).abs() > 1e-6));
}

#[test]
fn gguf_k_types_fall_back_on_short_rows_and_write_k_blocks_on_whole_super_blocks() {
    let f = fixture("gguf-k", 2);
    let ao = |fmt: &str| cfg(gptq_ao(true), fmt);
    for (fmt, fallback, ftype, c) in [
        (
            "gguf:q4_k",
            GgmlType::Q5_0,
            14u32,
            cfg(Method::gptq(), "gguf:q4_k"),
        ),
        (
            "gguf:q6_k",
            GgmlType::Q8_0,
            18,
            cfg(Method::gptq(), "gguf:q6_k"),
        ),
        (
            // --pure: llama.cpp's Q2_K mix would raise attn_v / attn_output / ffn_down to
            // Q3_K (tests/gguf_mixes.rs)
            "gguf:q2_k",
            GgmlType::IQ4_NL,
            10,
            QuantizeConfig {
                format: ExportFormat::parse("gguf:q2_k").unwrap().pure().unwrap(),
                ..cfg(Method::gptq(), "gguf:q2_k")
            },
        ),
        (
            "gguf:q3_k",
            GgmlType::IQ4_NL,
            11,
            cfg(Method::Rtn, "gguf:q3_k"),
        ),
        (
            // IQ4_XS: the IQ4_NL levels in super-blocks with 6-bit sub-block scales
            "gguf:iq4_xs",
            GgmlType::IQ4_NL,
            30,
            cfg(Method::gptq(), "gguf:iq4_xs"),
        ),
        (
            "gguf:q5_k",
            GgmlType::Q5_1,
            16,
            cfg(Method::gptq(), "gguf:q5_k"),
        ),
        ("gguf:q4_k", GgmlType::Q5_0, 14, ao("gguf:q4_k")),
        (
            "gguf:q6_k",
            GgmlType::Q8_0,
            18,
            cfg(Method::Rtn, "gguf:q6_k"),
        ),
    ] {
        let out = f.root.join(format!(
            "{}-{}{}.gguf",
            &fmt[5..],
            c.method,
            if c.method.gptq_options().is_some_and(|g| g.act_order) {
                "-ao"
            } else {
                ""
            }
        ));
        let r = run_ok(&job(&f, &f.model, &out, c.clone()));
        let ty = ExportFormat::parse(fmt).unwrap().gguf_type().unwrap();
        for l in 0..2 {
            for t in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
            ] {
                assert_eq!(
                    tensor_type(&out, &format!("blk.{l}.{t}.weight")),
                    fallback,
                    "{fmt} {t}"
                );
            }
            // rows of 256: K blocks
            assert_eq!(
                tensor_type(&out, &format!("blk.{l}.ffn_down.weight")),
                ty,
                "{fmt}"
            );
        }
        assert_eq!(tensor_type(&out, "token_embd.weight"), fallback);
        assert_eq!(tensor_type(&out, "output.weight"), GgmlType::Q8_0);
        assert!(r.notes.iter().any(|n| n.contains("256")), "{:?}", r.notes);
        // every block linear, the K ones included, is exactly the driver's quantized linear
        // (GPTQ or imatrix RTN on the K grid, written without re-quantization)
        assert_blocks_equal_driver(&f.model, &out, &c);
        let layers = r.layers.iter().filter(|l| l.name.contains("down_proj"));
        for l in layers {
            assert!(!l.skipped, "{fmt}: {} is quantized by the driver", l.name);
        }
        let back = ppl_of(&f, &out);
        assert!(back.is_finite() && rel(back, r.ppl_before.unwrap()) < 0.5);
        // the embeddings are quantized at export as llama.cpp does; the rest is the driver's
        let after = r.ppl_after.unwrap();
        assert!(
            rel(back, after) < 0.05,
            "{fmt}: file ppl {back} vs in-memory {after}"
        );
        if let Some(fields) = check_with_gguf_package(&out) {
            assert_eq!(fields["general.file_type"], ftype, "{fmt}");
        }
    }
}

#[test]
fn gguf_from_a_gguf_source_keeps_its_metadata_and_tokenizer() {
    let f = fixture("gguf-src", 2);
    // an F32 GGUF written by our writer from the HF directory (nothing quantized)
    let f32_file = f.root.join("tiny-f32.gguf");
    let r = run_ok(&job(&f, &f.model, &f32_file, cfg(Method::Rtn, "gguf:f32")));
    assert!((r.ppl_after.unwrap() - r.ppl_before.unwrap()).abs() < 1e-9);
    assert!(rel(ppl_of(&f, &f32_file), r.ppl_before.unwrap()) < 1e-5);
    // its tokenizer (built from our GGUF metadata) encodes like the source's
    let text = prose().join("\n\n");
    let a = LlamaTokenizer::load(&f.model)
        .unwrap()
        .encode(&text)
        .unwrap();
    let b = LlamaTokenizer::load(&f32_file)
        .unwrap()
        .encode(&text)
        .unwrap();
    assert_eq!(a, b);
    // quantize that file: metadata copied from the source GGUF
    let out = f.root.join("from-gguf-q4_0.gguf");
    let r = run_ok(&job(&f, &f32_file, &out, cfg(Method::gptq(), "gguf:q4_0")));
    assert!(rel(ppl_of(&f, &out), r.ppl_after.unwrap()) < 0.05);
    assert_blocks_equal_driver(&f32_file, &out, &cfg(Method::gptq(), "gguf:q4_0"));
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get("general.file_type").unwrap().as_integer(), Some(2));
    assert_eq!(
        g.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        VOCAB
    );
    check_with_gguf_package(&out);
}

/// NumPy's unpacking (tests/oracles/export_hf.py) equals our reader's, value for value.
fn check_with_numpy_unpacker(dir: &Path) {
    let out = dir.with_extension("np.safetensors");
    let oracle = repo_root().join("tests/oracles/export_hf.py");
    let Some(_) = python(
        "numpy, safetensors",
        &[
            oracle.to_str().unwrap(),
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    ) else {
        return;
    };
    let theirs = read_f32_safetensors(&out);
    let (_, ours) = read_quantized_dir(dir).unwrap();
    assert_eq!(theirs.len(), 14, "one weight per quantized linear");
    for (name, (shape, v)) in &theirs {
        let (_, w) = ours.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(shape, &vec![w.nrows(), w.ncols()], "{name}");
        for (a, b) in w.iter().zip(v) {
            assert!(
                a == b || (a - b).abs() <= 1e-6 * b.abs(),
                "{name}: ours {a} vs numpy {b}"
            );
        }
    }
}

#[test]
fn hf_formats_read_back_like_the_in_memory_model_and_the_numpy_unpacker() {
    let f = fixture("hf", 2);
    struct Case {
        method: Method,
        format: &'static str,
        bits: Option<u32>,
        group: Option<i64>,
        sym: bool,
        act_order: bool,
        double_quant: bool,
        numpy: bool,
    }
    let c = |method, format, bits, group, numpy| Case {
        method,
        format,
        bits,
        group,
        sym: true,
        act_order: false,
        double_quant: false,
        numpy,
    };
    let cases = vec![
        c(Method::gptq(), "gptq", Some(4), Some(32), true),
        Case {
            act_order: true,
            ..c(Method::gptq(), "gptq", Some(3), Some(32), true)
        },
        c(Method::gptq(), "gptq", Some(2), Some(32), true),
        c(Method::gptq(), "gptq", Some(8), Some(-1), true),
        // ragged last group: 64 = 48 + 16, 256 = 5 * 48 + 16
        c(Method::gptq(), "gptq", Some(4), Some(48), true),
        Case {
            sym: false,
            ..c(Method::Rtn, "gptq_v2", Some(4), Some(32), true)
        },
        Case {
            sym: false,
            ..c(Method::gptq(), "gptq_v2", Some(3), Some(64), true)
        },
        c(Method::awq(), "awq", Some(4), Some(32), true),
        Case {
            sym: false,
            ..c(Method::gptq(), "awq", Some(4), Some(64), true)
        },
        Case {
            double_quant: true,
            ..c(Method::nf4(), "bnb-nf4", None, None, false)
        },
        c(Method::fp4(), "bnb-fp4", None, None, false),
        c(Method::gptq(), "bnb-nf4", None, None, false),
        c(Method::int8(), "bnb-int8", None, None, false),
    ];
    for (i, k) in cases.iter().enumerate() {
        let out = f.root.join(format!("hf-{i}-{}", k.format));
        let method = match k.method {
            Method::Gptq(g) => Method::Gptq(GptqOptions {
                act_order: k.act_order,
                ..g
            }),
            Method::Nf4(_) => Method::Nf4(CodebookOptions {
                double_quant: k.double_quant,
            }),
            m => m,
        };
        let conf = QuantizeConfig {
            bits: k.bits,
            group_size: k.group,
            sym: k.sym,
            ..cfg(method, k.format)
        };
        let r = run_ok(&job(&f, &f.model, &out, conf));
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "generation_config.json",
        ] {
            assert!(out.join(file).is_file(), "{}: {file}", k.format);
        }
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        let qc = &config["quantization_config"];
        match k.format {
            "gptq" | "gptq_v2" => {
                assert_eq!(qc["quant_method"], "gptq");
                assert_eq!(qc["checkpoint_format"], k.format);
                assert_eq!(qc["bits"], k.bits.unwrap());
                assert_eq!(qc["group_size"], k.group.unwrap());
                assert_eq!(qc["desc_act"], k.act_order);
                assert!(out.join("quantize_config.json").is_file());
            }
            "awq" => {
                assert_eq!(qc["quant_method"], "awq");
                assert!(out.join("quant_config.json").is_file());
            }
            _ => assert_eq!(qc["quant_method"], "bitsandbytes"),
        }
        let after = r.ppl_after.unwrap();
        let back = ppl_of(&f, &out);
        // f16 scales and f16 embeddings / norms in the checkpoint
        assert!(
            rel(back, after) < 5e-3,
            "{} {}: read back {back} vs in memory {after}",
            k.method,
            k.format
        );
        if k.numpy {
            check_with_numpy_unpacker(&out);
        }
    }
}

fn err_of(j: &QuantizeJob) -> String {
    let e = prepare(j).err().map(|e| e.to_string());
    let e = e.unwrap_or_else(|| panic!("{} accepted", j.config.format));
    // run() refuses the same way and writes nothing
    assert!(run(j, None).is_err());
    assert!(!j.out.as_ref().unwrap().exists());
    e
}

#[test]
fn formats_that_cannot_hold_the_model_fail_before_work_and_write_nothing() {
    let f = fixture("bad", 2);
    let out = f.root.join("out");
    let j = |c: QuantizeConfig| job(&f, &f.model, &out, c);
    let e = err_of(&j(QuantizeConfig {
        sym: false,
        ..cfg(Method::gptq(), "gptq")
    }));
    assert!(e.contains("gptq_v2"), "{e}");
    let e = err_of(&j(cfg(gptq_ao(false), "awq")));
    assert!(e.contains("act-order"), "{e}");
    let e = err_of(&j(cfg(Method::Rtn, "bnb-nf4")));
    assert!(e.contains("--method nf4"), "{e}");
    let e = err_of(&j(QuantizeConfig {
        bits: Some(5),
        ..cfg(Method::gptq(), "gguf:q4_0")
    }));
    assert!(e.contains("bits"), "{e}");
    let e = err_of(&j(cfg(Method::awq(), "gguf:q4_0")));
    assert!(e.contains("rtn"), "{e}");
    let e = err_of(&j(QuantizeConfig {
        group_size: Some(64),
        ..cfg(Method::gptq(), "gguf:q8_0")
    }));
    assert!(e.contains("32"), "{e}");
    let e = err_of(&j(cfg(gptq_ao(false), "gguf:q4_0")));
    assert!(e.contains("static-groups"), "{e}");
    let e = err_of(&j(QuantizeConfig {
        bits: Some(5),
        ..cfg(Method::gptq(), "gptq")
    }));
    assert!(e.contains("2, 3, 4 or 8"), "{e}");
    let e = err_of(&j(QuantizeConfig {
        group_size: Some(48),
        ..cfg(Method::awq(), "awq")
    }));
    assert!(e.contains("q_proj") && e.contains("group"), "{e}");
    assert!(ExportFormat::parse("gguf:q9_0")
        .unwrap_err()
        .to_string()
        .contains("q4_k"));
    assert!(ExportFormat::parse("exl2").is_err());

    // one KV head: k_proj / v_proj have 16 rows, which GPTQ kernels cannot take
    let g = fixture("bad-kv1", 1);
    let out = g.root.join("out");
    let e = err_of(&job(&g, &g.model, &out, cfg(Method::gptq(), "gptq")));
    assert!(e.contains("k_proj") && e.contains("32"), "{e}");
}

#[test]
fn truncated_files_and_wrong_dtypes_give_errors_naming_the_file_and_tensor() {
    let f = fixture("broken", 2);
    let gguf = f.root.join("q.gguf");
    run_ok(&job(&f, &f.model, &gguf, cfg(Method::Rtn, "gguf:q4_0")));
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = f.root.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model(&cut)
        .err()
        .expect("truncated file accepted")
        .to_string();
    assert!(e.contains("cut.gguf"), "{e}");
    let e = quantlab_checkpoints::inspect::summarize(&cut)
        .err()
        .expect("truncated header accepted")
        .to_string();
    assert!(e.contains("cut.gguf"), "{e}");

    // a GPTQ directory whose qweight is float32
    let dir = f.root.join("gptq");
    run_ok(&job(&f, &f.model, &dir, cfg(Method::gptq(), "gptq")));
    let p = dir.join("model.safetensors");
    let raw = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let target = "model.layers.1.mlp.up_proj.qweight";
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let dt = if n == target {
                safetensors::Dtype::F32
            } else {
                v.dtype()
            };
            (n, dt, v.shape().to_vec(), v.data().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = load_model(&dir)
        .err()
        .expect("wrong dtype accepted")
        .to_string();
    assert!(e.contains(target) && e.contains("F32"), "{e}");
}

#[test]
fn gguf_q4_k_m_writes_llama_cpps_per_tensor_types_each_from_gptq_on_its_own_grid() {
    let f = fixture("gguf-mix", 2);
    let out = f.root.join("q4_k_m.gguf");
    // case-insensitive, as llama-quantize's type names
    let c = cfg(Method::gptq(), "gguf:Q4_K_M");
    let r = run_ok(&job(&f, &f.model, &out, c.clone()));
    // 2 blocks: use_more_bits(1, 2) raises block 1's attn_v (Q6_K, rows of 64 -> Q8_0) and
    // ffn_down (Q6_K, rows of 256); everything else is Q4_K, on rows of 64 its fallback Q5_0
    for (l, v, down) in [
        (0, GgmlType::Q5_0, GgmlType::Q4_K),
        (1, GgmlType::Q8_0, GgmlType::Q6_K),
    ] {
        assert_eq!(tensor_type(&out, &format!("blk.{l}.attn_v.weight")), v);
        assert_eq!(tensor_type(&out, &format!("blk.{l}.ffn_down.weight")), down);
        for t in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(
                tensor_type(&out, &format!("blk.{l}.{t}.weight")),
                GgmlType::Q5_0,
                "{t}"
            );
        }
    }
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("llama.cpp's per-tensor rule for Q4_K_M")),
        "{:?}",
        r.notes
    );
    // each linear is the driver's GPTQ result on that linear's own grid, written as it is
    assert_blocks_equal_driver(&f.model, &out, &c);
    let back = ppl_of(&f, &out);
    assert!(rel(back, r.ppl_after.unwrap()) < 0.05);
    if let Some(fields) = check_with_gguf_package(&out) {
        assert_eq!(fields["general.file_type"], 15u32);
    }
}

/// `rotate` (`--rotate`, issue 15 item 4): the rotated model is written as a plain LLaMA
/// (norms folded, its output head untied) that our loader reads like any other. Unquantized
/// (`gguf:f32`) it has the source's perplexity; quantized (GPTQ into the GPTQ checkpoint and
/// into our own format), each file reads back as the in-memory model. Hadamard (64 = 2^6)
/// and random orthogonal.
#[test]
fn rotated_models_are_written_as_plain_llamas_that_compute_the_same_function() {
    let f = fixture("rotate", 2);
    for kind in [RotationKind::Hadamard, RotationKind::Random] {
        let rotate = Some(Rotation { kind, seed: 5 });
        let out = f.root.join(format!("{}-f32.gguf", kind.name()));
        let c = QuantizeConfig {
            rotate,
            ..cfg(Method::Rtn, "gguf:f32")
        };
        let r = run_ok(&job(&f, &f.model, &out, c));
        let (src, back) = (r.ppl_before.unwrap(), ppl_of(&f, &out));
        assert!(
            rel(back, src) < 1e-5,
            "{kind:?}: rotated f32 file ppl {back} vs source {src}"
        );
        for fmt in ["gptq", "quantlab"] {
            let out = f.root.join(format!("{}-{fmt}", kind.name()));
            let c = QuantizeConfig {
                rotate,
                ..cfg(Method::gptq(), fmt)
            };
            let r = run_ok(&job(&f, &f.model, &out, c));
            let (after, back) = (r.ppl_after.unwrap(), ppl_of(&f, &out));
            // f16 scales (and f16 embeddings in the GPTQ checkpoint)
            assert!(
                rel(back, after) < 5e-3,
                "{kind:?} {fmt}: read back {back} vs in memory {after}"
            );
        }
    }
}
