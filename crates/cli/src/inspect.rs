//! `quantlab inspect FILE [--json]`: list the tensors and metadata of a checkpoint file.

use anyhow::Result;
use clap::Args;
use quantlab::checkpoints::inspect::{
    summarize, FileFormat, Inspection, MetadataEntry, QuantSummary,
};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

/// Arguments of `quantlab inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A GGUF or safetensors file (the format is detected from its first bytes, not the
    /// name), or a checkpoint directory (GPTQ, AWQ, bitsandbytes, quantlab, plain): its
    /// format, bits, group size, bits per weight and size.
    pub file: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `quantlab inspect`.
pub fn run_inspect(args: InspectArgs) -> Result<()> {
    let text = if args.file.is_dir() {
        let q = summarize(&args.file)?;
        if args.json {
            serde_json::to_string_pretty(&q)? + "\n"
        } else {
            render_summary(&q)
        }
    } else {
        let ins = quantlab::checkpoints::inspect(&args.file)?;
        let q = match ins.format {
            FileFormat::Gguf => Some(summarize(&args.file)?),
            _ => None,
        };
        if args.json {
            let mut v = serde_json::to_value(&ins)?;
            if let (Some(o), Some(q)) = (v.as_object_mut(), &q) {
                o.insert("quantization".into(), serde_json::to_value(q)?);
            }
            serde_json::to_string_pretty(&v)? + "\n"
        } else {
            let mut t = render(&ins);
            if let Some(q) = &q {
                t.push('\n');
                t.push_str(&render_summary(q));
            }
            t
        }
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Left-aligned columns except those flagged numeric (right-aligned), two spaces apart.
fn table(out: &mut String, header: &[&str], numeric: &[bool], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        let mut s = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i] - c.chars().count();
            s.push(' ');
            if numeric[i] {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cells.len() {
                    s.extend(std::iter::repeat_n(' ', pad));
                }
            }
            s.push(' ');
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(
        out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for r in rows {
        line(out, r);
    }
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// A metadata value for the table: arrays as `[N elements]`, long strings cut, escaped.
fn value_cell(m: &MetadataEntry) -> String {
    if let Some(n) = m.len {
        return format!("[{n} element{}]", if n == 1 { "" } else { "s" });
    }
    let text = match &m.value {
        Some(serde_json::Value::String(s)) => s.escape_debug().to_string(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    const MAX: usize = 60;
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX - 3).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// The human-readable report.
fn render(ins: &Inspection) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "file    {}", ins.path);
    match (&ins.gguf, &ins.safetensors) {
        (Some(g), _) => {
            let _ = writeln!(
                out,
                "format  GGUF v{} (alignment {}, tensor data at offset {})",
                g.version, g.alignment, g.data_offset
            );
        }
        (None, Some(s)) => {
            let _ = writeln!(
                out,
                "format  safetensors (JSON header {} bytes, data at offset {})",
                s.header_size, s.data_offset
            );
        }
        _ => {
            let _ = writeln!(out, "format  {}", ins.format);
        }
    }
    let _ = writeln!(
        out,
        "size    {} bytes ({})",
        ins.file_size,
        human(ins.file_size)
    );

    if let Some(g) = &ins.gguf {
        let _ = writeln!(out, "\nmetadata ({} keys)", g.metadata.len());
        let rows: Vec<Vec<String>> = g
            .metadata
            .iter()
            .map(|m| {
                let ty = match &m.element_type {
                    Some(e) => format!("array<{e}>"),
                    None => m.value_type.clone(),
                };
                vec![m.key.clone(), ty, value_cell(m)]
            })
            .collect();
        table(
            &mut out,
            &["KEY", "TYPE", "VALUE"],
            &[false, false, false],
            &rows,
        );
    }
    if let Some(s) = &ins.safetensors {
        if !s.metadata.is_empty() {
            let _ = writeln!(out, "\nmetadata ({} keys)", s.metadata.len());
            let rows: Vec<Vec<String>> = s
                .metadata
                .iter()
                .map(|(k, v)| vec![k.clone(), v.escape_debug().to_string()])
                .collect();
            table(&mut out, &["KEY", "VALUE"], &[false, false], &rows);
        }
    }

    let _ = writeln!(out, "\ntensors ({})", ins.tensor_count);
    let shape_header = match ins.format {
        FileFormat::Gguf => "SHAPE (ne[0] first)",
        _ => "SHAPE",
    };
    let rows: Vec<Vec<String>> = ins
        .tensors
        .iter()
        .map(|t| {
            let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            vec![
                t.name.clone(),
                t.dtype.clone(),
                format!("[{}]", shape.join(", ")),
                t.n_elements.to_string(),
                t.bytes.to_string(),
                t.offset.to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["NAME", "DTYPE", shape_header, "ELEMENTS", "BYTES", "OFFSET"],
        &[false, false, false, true, true, true],
        &rows,
    );
    let bits = if ins.parameter_count > 0 {
        format!(
            ", {:.3} bits per parameter",
            8.0 * ins.total_bytes as f64 / ins.parameter_count as f64
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "\ntotal   {} tensors, {} parameters, {} bytes ({}){bits}",
        ins.tensor_count,
        ins.parameter_count,
        ins.total_bytes,
        human(ins.total_bytes)
    );
    out
}

/// The quantization summary of a GGUF file or a checkpoint directory.
fn render_summary(q: &QuantSummary) -> String {
    let mut out = String::new();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "checkpoint  {}", q.path);
    let _ = writeln!(out, "format      {}", q.format);
    let _ = writeln!(out, "bits        {}", opt(q.bits.map(|b| b.to_string())));
    let _ = writeln!(
        out,
        "group size  {}",
        opt(q.group_size.map(|g| g.to_string()))
    );
    let _ = writeln!(
        out,
        "bpw         {} ({} quantized linear weights)",
        opt(q.bits_per_weight.map(|b| format!("{b:.3}"))),
        q.quantized_tensors
    );
    let types: Vec<String> = q.types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
    let _ = writeln!(out, "types       {}", types.join(", "));
    let _ = writeln!(
        out,
        "size        {} bytes ({})",
        q.size_bytes,
        human(q.size_bytes)
    );
    out
}
