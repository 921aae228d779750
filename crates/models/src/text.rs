//! Text for calibration and evaluation: readers for `.txt`, `.jsonl` and `.parquet` files,
//! the prose shipped with this crate, and the sentence splitter of `eval embed`.
//!
//! The shipped texts (`crates/models/data/`, see its README.md) are public-domain novels by
//! Jane Austen: `calib.txt` is the first 25 chapters of *Pride and Prejudice* (about 250 KB),
//! `eval.txt` the first 6 chapters of *Persuasion* (about 92 KB).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::{ModelError, Result};

/// The calibration text shipped with the crate (*Pride and Prejudice*, chapters 1-25).
pub const CALIBRATION_TEXT: &str = include_str!("../data/calib.txt");
/// The evaluation text shipped with the crate (*Persuasion*, chapters 1-6).
pub const EVAL_TEXT: &str = include_str!("../data/eval.txt");

/// Path of the shipped calibration text in the source tree (`crates/models/data/calib.txt`).
/// The same text is compiled in as [`CALIBRATION_TEXT`], for builds that moved away from
/// their source tree.
///
/// ```
/// let p = quantlab_models::text::shipped_calibration();
/// let t = quantlab_models::text::read_text(&p, None).unwrap();
/// assert_eq!(t, quantlab_models::text::CALIBRATION_TEXT);
/// assert!(t.starts_with("PRIDE AND PREJUDICE"));
/// ```
pub fn shipped_calibration() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/calib.txt")
}

/// Path of the shipped evaluation text in the source tree (`crates/models/data/eval.txt`);
/// also compiled in as [`EVAL_TEXT`].
pub fn shipped_eval() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/eval.txt")
}

fn text_err(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Text {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// Read a text by its extension:
/// - `.txt` (or any other extension): the whole file as UTF-8;
/// - `.jsonl`: one JSON object per line, the string `field` of each (default `"text"`),
///   joined with blank lines (`"\n\n"`); blank lines in the file are skipped;
/// - `.parquet`: the string column `field` (default `"text"`) of every row, joined the same
///   way; null values are skipped.
///
/// Errors name the file and, where it applies, the line, field or column at fault.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("a.jsonl");
/// std::fs::write(&p, "{\"text\": \"one\"}\n{\"text\": \"two\", \"id\": 2}\n").unwrap();
/// let t = quantlab_models::text::read_text(&p, None).unwrap();
/// assert_eq!(t, "one\n\ntwo");
/// ```
pub fn read_text(path: &Path, field: Option<&str>) -> Result<String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jsonl") => read_jsonl(path, field.unwrap_or("text")),
        Some("parquet") => read_parquet(path, field.unwrap_or("text")),
        _ => {
            let bytes = fs::read(path).map_err(|e| ModelError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
            String::from_utf8(bytes).map_err(|e| {
                text_err(
                    path,
                    format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
                )
            })
        }
    }
}

fn read_jsonl(path: &Path, field: &str) -> Result<String> {
    let f = fs::File::open(path).map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut parts = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| text_err(path, format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| text_err(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        match v.get(field) {
            Some(serde_json::Value::String(s)) => parts.push(s.clone()),
            Some(other) => {
                return Err(text_err(
                    path,
                    format!(
                        "line {}: field `{field}` is not a string (it is {})",
                        i + 1,
                        json_kind(other)
                    ),
                ))
            }
            None => {
                return Err(text_err(
                    path,
                    format!("line {}: no field `{field}`", i + 1),
                ))
            }
        }
    }
    Ok(parts.join("\n\n"))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(path: &Path, column: &str) -> Result<String> {
    let f = fs::File::open(path).map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let reader = SerializedFileReader::new(f)
        .map_err(|e| text_err(path, format!("not a readable parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let Some(idx) = names.iter().position(|n| n == column) else {
        return Err(text_err(
            path,
            format!("no column `{column}` (columns: {})", names.join(", ")),
        ));
    };
    // Project onto the one column so other (possibly huge) columns are not decoded.
    let field = schema.root_schema().get_fields()[idx].clone();
    let projection = parquet::schema::types::Type::group_type_builder("schema")
        .with_fields(vec![field])
        .build()
        .map_err(|e| text_err(path, format!("column `{column}`: {e}")))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| text_err(path, format!("column `{column}`: {e}")))?;
    let mut parts = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| text_err(path, format!("row {i}: {e}")))?;
        for (_, value) in row.get_column_iter() {
            match value {
                Field::Str(s) => parts.push(s.clone()),
                Field::Null => {}
                Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                    Ok(s) => parts.push(s.to_string()),
                    Err(_) => {
                        return Err(text_err(
                            path,
                            format!("row {i}: column `{column}` holds bytes that are not UTF-8"),
                        ))
                    }
                },
                other => {
                    return Err(text_err(
                        path,
                        format!("row {i}: column `{column}` is not a string column ({other})"),
                    ))
                }
            }
        }
    }
    Ok(parts.join("\n\n"))
}

/// Split prose into sentences for `eval embed`.
///
/// The rule: paragraphs are separated by blank lines; inside a paragraph, line breaks and
/// runs of white space become one space; a sentence ends after `.`, `!` or `?` (with any
/// closing quotes or brackets right after it) when white space follows and the next
/// character is not lower-case, except after the abbreviations `Mr.`, `Mrs.`, `Dr.`, `St.`,
/// `Esq.`, `Ms.`, `Col.`, `Capt.`, `Rev.`, `Sir.` and single capital initials (`J.`). Lines
/// that carry no letter (e.g. chapter separators) are kept if non-empty; empty pieces are
/// dropped. A file that is one sentence per line (no terminal punctuation) therefore becomes
/// one sentence per paragraph: separate such lines with blank lines.
///
/// ```
/// let s = quantlab_models::text::split_sentences("Mr. Bennet came.  \"Is it?\" said she.\n\nNo! yes.");
/// assert_eq!(s, vec!["Mr. Bennet came.", "\"Is it?\" said she.", "No! yes."]);
/// ```
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut para = String::new();
    let flush = |para: &mut String, out: &mut Vec<String>| {
        if !para.is_empty() {
            split_paragraph(para, out);
            para.clear();
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut para, &mut out);
        } else {
            for w in line.split_whitespace() {
                if !para.is_empty() {
                    para.push(' ');
                }
                para.push_str(w);
            }
        }
    }
    flush(&mut para, &mut out);
    out
}

const ABBREVIATIONS: [&str; 10] = [
    "Mr", "Mrs", "Dr", "St", "Esq", "Ms", "Col", "Capt", "Rev", "Sir",
];

fn split_paragraph(p: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = p.chars().collect();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '.' | '!' | '?') {
            let mut end = i + 1;
            while end < chars.len() && matches!(chars[end], '"' | '\'' | ')' | ']' | '\u{201d}') {
                end += 1;
            }
            let at_space = end < chars.len() && chars[end] == ' ';
            let next_ok = end + 1 < chars.len() && !chars[end + 1].is_lowercase();
            let abbrev = c == '.' && {
                let word: String = chars[start..i]
                    .iter()
                    .rev()
                    .take_while(|ch| ch.is_alphabetic())
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                ABBREVIATIONS.contains(&word.as_str())
                    || (word.chars().count() == 1 && word.chars().all(|ch| ch.is_uppercase()))
            };
            if at_space && next_ok && !abbrev {
                let s: String = chars[start..end].iter().collect();
                let s = s.trim();
                if !s.is_empty() {
                    out.push(s.to_string());
                }
                start = end + 1;
                i = end + 1;
                continue;
            }
            i = end;
            continue;
        }
        i += 1;
    }
    let s: String = chars[start.min(chars.len())..].iter().collect();
    let s = s.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
}
