//! The bounded safetensors header reader (`quantlab_checkpoints::safetensors_header`): no panic
//! on any input; on success the documented invariants hold, and the `safetensors` crate's own
//! parser (an independent implementation of the same format) accepts the file too and agrees
//! on every tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quantlab_checkpoints::inspect::from_safetensors;
use quantlab_checkpoints::safetensors_header::SafetensorsHeader;
use quantlab_fuzz::Trickle;

fuzz_target!(|data: &[u8]| {
    let parsed = SafetensorsHeader::parse(data, "<fuzz>");
    let trickled = SafetensorsHeader::read(Trickle(data), data.len() as u64, "<fuzz>");
    match (&parsed, &trickled) {
        // Compared through Debug: NaN metadata values are not equal to themselves.
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parse and read disagree: {parsed:?} vs {trickled:?}"),
    }
    let Ok(h) = parsed else { return };
    assert_eq!(h.data_offset, 8 + h.header_size);
    let mut at = 0;
    for t in &h.tensors {
        assert_eq!(t.data_offsets.0, at, "{} not contiguous", t.name);
        at = t.data_offsets.1;
        let n: u64 = t.shape.iter().product();
        assert_eq!(t.n_elements, n);
    }
    assert_eq!(h.data_offset + at, h.file_size);
    let ins = from_safetensors("<fuzz>".into(), &h);
    assert_eq!(ins.total_bytes, at);
    serde_json::to_string(&ins).expect("an inspection serialises");

    // The peer parser: whatever we accept, it accepts, with the same tensors.
    let peer = safetensors::SafeTensors::deserialize(data)
        .unwrap_or_else(|e| panic!("we accept, the safetensors crate rejects: {e}"));
    assert_eq!(peer.len(), h.tensors.len());
    for t in &h.tensors {
        let v = peer.tensor(&t.name).expect("same names");
        assert_eq!(v.dtype(), t.dtype);
        let shape: Vec<u64> = v.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(shape, t.shape);
        assert_eq!(v.data().len() as u64, t.n_bytes());
    }
});
