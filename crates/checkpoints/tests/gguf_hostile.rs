//! The GGUF reader on hostile and broken input: hand-built byte layouts (the oracle is the
//! GGUF spec, byte by byte), truncations at every cut point, corrupted bytes, random data.
//! Every case must return an error naming the field or tensor, quickly, without a panic.

use quantlab_checkpoints::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use quantlab_checkpoints::{inspect, CheckpointError};
use std::time::{Duration, Instant};

/// A little-endian GGUF byte builder.
#[derive(Clone, Default)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        let mut b = B::default();
        b.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn raw(&mut self, x: &[u8]) -> &mut Self {
        self.0.extend_from_slice(x);
        self
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.raw(&[x])
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A tensor info: name, dims, type id, offset.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, align: usize) -> &mut Self {
        while self.0.len() % align != 0 {
            self.0.push(0);
        }
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

fn parse(b: &[u8]) -> Result<GgufFile, CheckpointError> {
    GgufFile::parse(b, "hostile.gguf")
}

/// Asserts an error that names the file and contains every fragment, returned quickly.
#[track_caller]
fn expect_err(b: &[u8], fragments: &[&str]) {
    let t = Instant::now();
    let err = parse(b).expect_err("hostile input must be rejected");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
    let msg = err.to_string();
    assert!(msg.starts_with("hostile.gguf: "), "{msg}");
    for f in fragments {
        assert!(msg.contains(f), "{msg:?} lacks {f:?}");
    }
}

/// A valid file: two keys (one array), two tensors (F32 [4, 2] and Q8_0 [32, 1]).
fn valid() -> (B, usize) {
    let mut b = B::header(3, 2, 2);
    b.str("general.name").u32(8).str("tiny");
    b.str("ids").u32(9).u32(5).u64(3).u32(7).u32(8).u32(9); // array<i32>[3]
    b.tensor("a", &[4, 2], 0, 0);
    b.tensor("q", &[32, 1], 8, 32);
    b.pad_to(32);
    let data_start = b.0.len();
    b.zeros(32 + 34);
    (b, data_start)
}

#[test]
fn gguf_hand_built_file_reads_field_by_field() {
    let (b, data_start) = valid();
    let f = parse(&b.0).unwrap();
    assert_eq!((f.version, f.alignment), (3, 32));
    assert_eq!(f.data_offset as usize, data_start);
    // Header: 24; key "general.name" 8+12, type 4, "tiny" 8+4 = 36; "ids" 8+3, 4, 4+8+12 = 39;
    // tensor a: 8+1+4+16+4+8 = 41; tensor q: 41: 24+36+39+82 = 181, padded to 192.
    assert_eq!(data_start, 192);
    assert_eq!(f.get("general.name").unwrap().as_str(), Some("tiny"));
    assert_eq!(
        f.get("ids"),
        Some(&GgufValue::Array(GgufArray::I32(vec![7, 8, 9])))
    );
    let q = f.tensor("q").unwrap();
    assert_eq!(
        (q.ggml_type, q.n_elements, q.n_bytes, q.offset),
        (GgmlType::Q8_0, 32, 34, 32)
    );
    assert_eq!(f.tensor_range(q), 224..258);
    let a = f.tensor("a").unwrap();
    assert_eq!((a.dims.clone(), a.n_bytes), (vec![4, 2], 32));
    // Version 2 has the same layout.
    let mut v2 = b.clone();
    v2.0[4] = 2;
    assert_eq!(parse(&v2.0).unwrap().version, 2);
}

#[test]
fn gguf_truncated_at_every_cut_point_is_an_error() {
    let (b, _) = valid();
    for cut in 0..b.0.len() {
        let err = parse(&b.0[..cut]).expect_err("truncated");
        let msg = err.to_string();
        assert!(msg.starts_with("hostile.gguf: "), "cut {cut}: {msg}");
        assert!(
            msg.contains("left") || msg.contains("past the end") || msg.contains("cannot fit"),
            "cut {cut}: {msg}"
        );
    }
    // Exactly whole: fine.
    assert!(parse(&b.0).is_ok());
}

#[test]
fn gguf_huge_array_in_a_tiny_file_fails_at_once() {
    // 24 + 8 + 1 + 4 + 4 + 8 = 49 bytes claiming 2^60 elements.
    for elem in [0u32, 6, 8, 9, 12] {
        let mut b = B::header(3, 0, 1);
        b.str("k").u32(9).u32(elem).u64(1 << 60);
        expect_err(
            &b.0,
            &["metadata key \"k\"", "array of 1152921504606846976"],
        );
    }
    // A count whose byte size overflows u64.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(10).u64(u64::MAX / 2);
    expect_err(&b.0, &["cannot fit"]);
    // Huge string length, huge key length, huge counts.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(8).u64(u64::MAX);
    expect_err(
        &b.0,
        &["metadata key \"k\"", "needs 18446744073709551615 bytes"],
    );
    let mut b = B::header(3, 0, 1);
    b.u64(1 << 62).zeros(16);
    expect_err(&b.0, &["metadata pair 0 key"]);
    expect_err(&B::header(3, u64::MAX, 1).0, &["header counts"]);
    expect_err(&B::header(3, 0, 1 << 40).0, &["header counts"]);
    // Many small nested arrays: an array of 2^40 empty arrays cannot fit either.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(9).u64(1 << 40);
    expect_err(&b.0, &["cannot fit"]);
}

#[test]
fn gguf_bad_magic_version_and_types() {
    let (b, _) = valid();
    let mut m = b.clone();
    m.0[3] = b'G';
    expect_err(&m.0, &["magic", "47475547"]);
    let mut v = b.clone();
    v.0[4] = 1;
    expect_err(&v.0, &["version", "version 1"]);
    let mut v = b.clone();
    v.0[4..8].copy_from_slice(&3u32.to_be_bytes());
    expect_err(&v.0, &["big-endian"]);
    let mut v = b.clone();
    v.0[4] = 9;
    expect_err(&v.0, &["unsupported GGUF version 9"]);

    // Unknown value type, unknown array element type, non-0/1 bool.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(13).u32(0);
    expect_err(&b.0, &["metadata key \"k\"", "unknown value type 13"]);
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(77).u64(0);
    expect_err(&b.0, &["unknown array element type 77"]);
    let mut b = B::header(3, 0, 1);
    b.str("flag").u32(7).u8(2);
    expect_err(&b.0, &["metadata key \"flag\"", "not 0 or 1"]);
    let mut b = B::header(3, 0, 1);
    b.str("flags").u32(9).u32(7).u64(3).u8(1).u8(0).u8(5);
    expect_err(&b.0, &["metadata key \"flags\"[2]", "not 0 or 1"]);
    // Duplicate key.
    let mut b = B::header(3, 0, 2);
    b.str("k").u32(0).u8(1).str("k").u32(0).u8(2);
    expect_err(&b.0, &["duplicate key"]);
}

#[test]
fn gguf_nested_arrays_are_read_and_bounded_in_depth() {
    // array<array<u16>>: [[1, 2], []]
    let mut b = B::header(3, 0, 1);
    b.str("n").u32(9).u32(9).u64(2);
    b.u32(2)
        .u64(2)
        .raw(&1u16.to_le_bytes())
        .raw(&2u16.to_le_bytes());
    b.u32(2).u64(0);
    let f = parse(&b.0).unwrap();
    assert_eq!(
        f.get("n"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U16(vec![1, 2]),
            GgufArray::U16(vec![])
        ])))
    );
    // Depth 8 is accepted, depth 9 (and 100 000) is refused, without blowing the stack.
    for (depth, ok) in [(8usize, true), (9, false), (100_000, false)] {
        let mut b = B::header(3, 0, 1);
        b.str("deep").u32(9);
        for _ in 0..depth - 1 {
            b.u32(9).u64(1);
        }
        b.u32(0).u64(0);
        match parse(&b.0) {
            Ok(_) => assert!(ok, "depth {depth} accepted"),
            Err(e) => {
                assert!(!ok, "depth {depth}: {e}");
                assert!(e.to_string().contains("nested deeper than 8"), "{e}");
            }
        }
    }
}

#[test]
fn gguf_tensor_infos_are_validated() {
    let build = |tensors: &[(&str, &[u64], u32, u64)], data: usize, kv: Option<(u32, u32)>| {
        let mut b = B::header(3, tensors.len() as u64, kv.is_some() as u64);
        if let Some((ty, v)) = kv {
            b.str("general.alignment").u32(ty).u32(v);
        }
        for (n, d, t, o) in tensors {
            b.tensor(n, d, *t, *o);
        }
        b.pad_to(kv.map_or(32, |(_, v)| v.clamp(1, 4096) as usize));
        b.zeros(data);
        b.0
    };
    // Reference: fine.
    assert!(parse(&build(&[("w", &[32, 2], 2, 0)], 36, None)).is_ok());
    expect_err(
        &build(&[("w", &[32, 2], 4, 0)], 36, None),
        &["tensor \"w\"", "unknown or removed ggml type id 4"],
    );
    expect_err(
        &build(&[("w", &[33, 2], 2, 0)], 64, None),
        &["tensor \"w\"", "ne[0] = 33", "block size 32"],
    );
    expect_err(
        &build(&[("w", &[1, 1, 1, 1, 1], 0, 0)], 4, None),
        &["tensor \"w\"", "5 dimensions"],
    );
    expect_err(
        &build(&[("w", &[32, 2], 2, 0)], 35, None),
        &["tensor \"w\"", "past the end of the file"],
    );
    expect_err(
        &build(&[("w", &[8], 0, 4)], 64, None),
        &[
            "tensor \"w\"",
            "offset 4 is not a multiple of the alignment 32",
        ],
    );
    expect_err(
        &build(&[("a", &[16], 0, 0), ("b", &[8], 0, 32)], 96, None),
        &["tensor \"b\"", "overlaps tensor \"a\""],
    );
    expect_err(
        &build(&[("a", &[8], 0, 0), ("a", &[8], 0, 32)], 64, None),
        &["tensor \"a\"", "duplicate tensor name"],
    );
    expect_err(
        &build(&[("w", &[u64::MAX, 1], 0, 0)], 0, None),
        &["tensor \"w\" ne[0]", "exceeds i64::MAX"],
    );
    expect_err(
        &build(&[("w", &[1 << 40, 1 << 40], 0, 0)], 0, None),
        &["tensor \"w\"", "overflows"],
    );
    expect_err(
        &build(&[("w", &[1 << 40, 1 << 20], 0, 0)], 0, None),
        &["tensor \"w\"", "past the end"],
    );
    // Alignment: custom 64 honoured, 48 and a non-u32 type refused.
    let f = parse(&build(&[("w", &[8], 0, 0)], 32, Some((4, 64)))).unwrap();
    assert_eq!((f.alignment, f.data_offset % 64), (64, 0));
    expect_err(
        &build(&[("w", &[8], 0, 0)], 32, Some((4, 48))),
        &["general.alignment", "power of two"],
    );
    expect_err(
        &build(&[("w", &[8], 0, 0)], 32, Some((5, 64))),
        &["general.alignment", "power of two"],
    );
}

/// xorshift64*: a fixed-seed generator for the corruption tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn gguf_corrupted_and_random_bytes_never_panic() {
    let (b, _) = valid();
    let t = Instant::now();
    let mut errors = 0;
    // Every header byte set to a few hostile values.
    for i in 0..192 {
        for v in [0x00u8, 0x01, 0x7f, 0x80, 0xff] {
            let mut c = b.0.clone();
            c[i] = v;
            errors += parse(&c).is_err() as usize;
        }
    }
    assert!(errors > 192, "{errors} corruptions rejected");
    // Random multi-byte corruptions and random tails after a valid prefix.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut c = b.0.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() as usize) % c.len();
            c[i] = rng.next() as u8;
        }
        let cut = (rng.next() as usize) % (c.len() + 1);
        let _ = parse(&c[..cut]);
        let mut r = b.0[..(rng.next() as usize) % 64].to_vec();
        for _ in 0..rng.next() % 256 {
            r.push(rng.next() as u8);
        }
        let _ = parse(&r);
    }
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn gguf_inspect_rejects_unknown_files_and_truncated_gguf_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"PK\x03\x04 not a checkpoint").unwrap();
    let e = inspect(&p).unwrap_err();
    assert!(matches!(e, CheckpointError::UnknownFormat { .. }), "{e}");
    assert!(e.to_string().contains("504b0304"), "{e}");
    std::fs::write(&p, b"").unwrap();
    assert!(inspect(&p).unwrap_err().to_string().contains("empty file"));
    let e = inspect(&dir.path().join("missing.gguf")).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
    assert!(e.to_string().contains("missing.gguf"), "{e}");

    // The huge-array file through the file path too.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(8).u64(1 << 60);
    std::fs::write(&p, &b.0).unwrap();
    let t = Instant::now();
    let e = inspect(&p).unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_millis(500));
    assert!(e.contains("x.gguf") && e.contains("\"k\""), "{e}");
    // Truncated on disk at a few cut points.
    let (v, _) = valid();
    for cut in [5, 30, 100, 181, 200, v.0.len() - 1] {
        std::fs::write(&p, &v.0[..cut]).unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{e}");
    }
}
