//! Text readers on small files written by the test (txt, jsonl, parquet via the parquet
//! crate's own writer, and via pyarrow when installed), the shipped texts, and the sentence
//! splitter on hand-checked passages.

use std::path::Path;
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use quantlab_models::text::{
    read_text, shipped_calibration, shipped_eval, split_sentences, CALIBRATION_TEXT, EVAL_TEXT,
};
use quantlab_models::ModelError;

fn write_parquet(path: &Path, texts: &[Option<&str>], ids: &[i32]) {
    let schema = Arc::new(
        parse_message_type(
            "message schema { OPTIONAL BYTE_ARRAY text (UTF8); REQUIRED INT32 id; }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().build());
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    // Column 0: text (optional: definition level 1 = present, 0 = null).
    let values: Vec<ByteArray> = texts
        .iter()
        .flatten()
        .map(|s| ByteArray::from(*s))
        .collect();
    let def: Vec<i16> = texts.iter().map(|t| t.is_some() as i16).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&values, Some(&def), None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int32Type>()
        .write_batch(ids, None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn txt_is_read_verbatim_and_non_utf8_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.txt");
    std::fs::write(&p, "héllo\n\nworld\n").unwrap();
    assert_eq!(read_text(&p, None).unwrap(), "héllo\n\nworld\n");
    std::fs::write(&p, [b'a', 0xff, b'b']).unwrap();
    let e = read_text(&p, None).unwrap_err();
    assert!(
        e.to_string().contains("a.txt") && e.to_string().contains("UTF-8"),
        "{e}"
    );
    let e = read_text(&d.path().join("missing.txt"), None).unwrap_err();
    assert!(e.to_string().contains("missing.txt"), "{e}");
}

#[test]
fn jsonl_reads_the_named_field_and_names_bad_lines() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"first\", \"body\": \"x\"}\n\n{\"text\": \"se\\ncond\", \"body\": \"y\"}\n",
    )
    .unwrap();
    assert_eq!(read_text(&p, None).unwrap(), "first\n\nse\ncond");
    assert_eq!(read_text(&p, Some("body")).unwrap(), "x\n\ny");
    let e = read_text(&p, Some("title")).unwrap_err();
    assert!(matches!(e, ModelError::Text { .. }));
    let s = e.to_string();
    assert!(
        s.contains("c.jsonl") && s.contains("line 1") && s.contains("title"),
        "{s}"
    );

    std::fs::write(&p, "{\"text\": \"ok\"}\n{\"text\": 3}\n").unwrap();
    let s = read_text(&p, None).unwrap_err().to_string();
    assert!(s.contains("line 2") && s.contains("not a string"), "{s}");
    std::fs::write(&p, "{\"text\": \"ok\"}\n{broken\n").unwrap();
    let s = read_text(&p, None).unwrap_err().to_string();
    assert!(s.contains("line 2") && s.contains("invalid JSON"), "{s}");
}

#[test]
fn parquet_reads_the_named_column_and_skips_nulls() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.parquet");
    write_parquet(&p, &[Some("alpha"), None, Some("gamma é")], &[1, 2, 3]);
    assert_eq!(read_text(&p, None).unwrap(), "alpha\n\ngamma é");
    let s = read_text(&p, Some("body")).unwrap_err().to_string();
    assert!(
        s.contains("t.parquet") && s.contains("body") && s.contains("text, id"),
        "{s}"
    );
    let s = read_text(&p, Some("id")).unwrap_err().to_string();
    assert!(s.contains("`id`") && s.contains("not a string"), "{s}");
    std::fs::write(&p, b"PAR1 not really").unwrap();
    let s = read_text(&p, None).unwrap_err().to_string();
    assert!(s.contains("t.parquet"), "{s}");
}

#[test]
fn parquet_written_by_pyarrow_when_installed() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("py.parquet");
    let script = format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({{'content': ['one', 'two', None, 'three'], 'n': [1, 2, 3, 4]}}), r'{}')",
        p.display()
    );
    match std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
    {
        Ok(o) if o.status.success() => {
            assert_eq!(
                read_text(&p, Some("content")).unwrap(),
                "one\n\ntwo\n\nthree"
            );
        }
        _ => println!("SKIPPED parquet_written_by_pyarrow: python3 with pyarrow not available"),
    }
}

#[test]
fn shipped_texts_are_distinct_prose_of_the_promised_size() {
    let c = read_text(&shipped_calibration(), None).unwrap();
    let e = read_text(&shipped_eval(), None).unwrap();
    assert_eq!(c, CALIBRATION_TEXT);
    assert_eq!(e, EVAL_TEXT);
    assert!((200_000..=300_000).contains(&c.len()), "{}", c.len());
    assert!((80_000..=120_000).contains(&e.len()), "{}", e.len());
    assert!(c.starts_with("PRIDE AND PREJUDICE"));
    assert!(e.starts_with("Persuasion"));
    // No shared paragraph of any length between the two.
    let paras = |t: &str| -> std::collections::HashSet<String> {
        t.split("\n\n")
            .map(|p| p.trim().to_string())
            .filter(|p| p.len() > 80)
            .collect()
    };
    assert!(paras(&c).is_disjoint(&paras(&e)));
    let n = split_sentences(&c).len();
    assert!(n > 1500, "{n} sentences");
}

#[test]
fn sentence_splitter_follows_its_documented_rule() {
    let t = "It is a truth universally acknowledged, that a single man in possession\n\
             of a good fortune, must be in want of a wife.\n\n\
             \"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that\n\
             Netherfield Park is let at last?\"\n\n\
             Mr. Bennet replied that he had not. \"But it is,\" returned she! Dr. J. Smith came.\n\n\
             Chapter 2\n";
    let s = split_sentences(t);
    assert_eq!(
        s,
        vec![
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
            "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let at last?\"",
            "Mr. Bennet replied that he had not.",
            "\"But it is,\" returned she!",
            "Dr. J. Smith came.",
            "Chapter 2",
        ]
    );
    assert!(split_sentences("\n\n  \n").is_empty());
}
