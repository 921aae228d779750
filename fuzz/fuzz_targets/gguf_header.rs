//! The bounded GGUF header reader (`quantlab_checkpoints::gguf::GgufFile`) and the `inspect`
//! summary built on it: no panic on any input, and on success the invariants the reader
//! documents hold (extents inside the file, no overlap, element counts = product of dims).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantlab_checkpoints::gguf::GgufFile;
use quantlab_checkpoints::inspect::from_gguf;
use quantlab_fuzz::Trickle;

fuzz_target!(|data: &[u8]| {
    let parsed = GgufFile::parse(data, "<fuzz>");
    // The same bytes through a reader that returns one byte per call: same answer.
    let trickled = GgufFile::read(Trickle(data), data.len() as u64, "<fuzz>");
    match (&parsed, &trickled) {
        // Compared through Debug: NaN metadata values are not equal to themselves.
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parse and read disagree: {parsed:?} vs {trickled:?}"),
    }
    let Ok(f) = parsed else { return };
    assert!(f.version == 2 || f.version == 3);
    assert!(f.alignment.is_power_of_two());
    assert_eq!(f.data_offset % f.alignment, 0);
    let mut ranges = Vec::new();
    for t in &f.tensors {
        let n: u64 = t.dims.iter().product();
        assert_eq!(t.n_elements, n, "{}", t.name);
        assert_eq!(t.offset % f.alignment, 0);
        let r = f.tensor_range(t);
        assert!(r.end <= f.file_size, "{} ends past the file", t.name);
        if t.n_bytes > 0 {
            ranges.push(r);
        }
    }
    ranges.sort_by_key(|r| r.start);
    for w in ranges.windows(2) {
        assert!(w[0].end <= w[1].start, "overlap");
    }
    let ins = from_gguf("<fuzz>".into(), &f);
    assert!(ins.total_bytes <= f.file_size);
    serde_json::to_string(&ins).expect("an inspection serialises");
});
