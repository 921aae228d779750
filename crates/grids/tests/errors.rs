//! Bad input gives a clear `GridError`, never a panic.

use ndarray::Array2;
use quantlab_grids::{
    quantize_rtn, FormatSpec, Granularity, GridError, QuantizedLinear, UniformGrid,
};

fn spec4() -> FormatSpec {
    FormatSpec::Uniform(UniformGrid::new(4, true).unwrap())
}

#[test]
fn nan_tensor_is_named() {
    let mut w = Array2::<f32>::zeros((4, 256));
    w[[2, 3]] = f32::NAN;
    let e = quantize_rtn(
        "model.layers.0.self_attn.q_proj",
        w.view(),
        &spec4(),
        Granularity::Group(128),
    )
    .unwrap_err();
    match &e {
        GridError::NonFinite {
            tensor,
            index,
            value,
        } => {
            assert_eq!(tensor, "model.layers.0.self_attn.q_proj");
            assert_eq!(*index, 2 * 256 + 3);
            assert!(value.is_nan());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("model.layers.0.self_attn.q_proj"));
    w[[2, 3]] = f32::NEG_INFINITY;
    for spec in [FormatSpec::Nf4, FormatSpec::Int8] {
        assert!(matches!(
            quantize_rtn("w", w.view(), &spec, Granularity::PerChannel),
            Err(GridError::NonFinite { index: 515, .. })
        ));
    }
}

#[test]
fn bits_outside_2_to_8_refused() {
    for bits in [0, 1, 9, 16, 40] {
        match UniformGrid::new(bits, true) {
            Err(GridError::UnsupportedBits { bits: b, .. }) => assert_eq!(b, bits),
            other => panic!("bits {bits}: {other:?}"),
        }
    }
    let e = UniformGrid::new(9, false).unwrap_err();
    assert!(e.to_string().contains("bits = 9"), "{e}");
    // a grid built by hand (or deserialized) bypasses `new`: quantize_rtn still refuses it
    let hand = FormatSpec::Uniform(UniformGrid {
        bits: 9,
        sym: true,
        clip: None,
    });
    let w = Array2::<f32>::ones((2, 8));
    assert!(matches!(
        quantize_rtn("w", w.view(), &hand, Granularity::PerChannel),
        Err(GridError::UnsupportedBits { bits: 9, .. })
    ));
}

#[test]
fn group_size_zero_refused_ragged_accepted() {
    let w = Array2::<f32>::ones((4, 256));
    match quantize_rtn("blk.0.ffn_up", w.view(), &spec4(), Granularity::Group(0)) {
        Err(e @ GridError::GroupSize { .. }) => {
            let GridError::GroupSize {
                ref tensor,
                group_size,
                columns,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(
                (tensor.as_str(), group_size, columns),
                ("blk.0.ffn_up", 0, 256)
            );
            assert!(e.to_string().contains("blk.0.ffn_up"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // a group size that does not divide the width: a short last group (256 = 2 x 100 + 56)
    let q = quantize_rtn("w", w.view(), &spec4(), Granularity::Group(100)).unwrap();
    assert_eq!(q.n_groups(), 3);
    assert!(Granularity::from_group_size(0).is_err());
    assert_eq!(
        Granularity::from_group_size(-1).unwrap(),
        Granularity::PerChannel
    );
    assert_eq!(
        Granularity::from_group_size(128).unwrap(),
        Granularity::Group(128)
    );
}

#[test]
fn other_bad_input() {
    let empty = Array2::<f32>::zeros((0, 64));
    assert!(matches!(
        quantize_rtn("w", empty.view(), &spec4(), Granularity::PerChannel),
        Err(GridError::Shape { .. })
    ));
    // codes that do not fit the format's bits
    let mut codes = Array2::<u8>::zeros((2, 4));
    codes[[1, 1]] = 16;
    let r = QuantizedLinear::from_parts(
        FormatSpec::Nf4,
        Granularity::PerChannel,
        codes,
        Array2::ones((2, 1)),
        Array2::zeros((2, 1)),
        vec![0; 4],
    );
    assert!(matches!(r, Err(GridError::InvalidOption { .. })));
    // g_idx naming a missing group
    let r = QuantizedLinear::from_parts(
        FormatSpec::Nf4,
        Granularity::Group(2),
        Array2::zeros((2, 4)),
        Array2::ones((2, 2)),
        Array2::zeros((2, 2)),
        vec![0, 0, 1, 2],
    );
    assert!(matches!(r, Err(GridError::Shape { .. })));
}
