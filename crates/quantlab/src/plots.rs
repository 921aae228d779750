//! Plot helpers for notebooks, drawn with plotters into an inline SVG.
//!
//! Every helper returns a [`Figure`]; when a figure ends an evcxr cell it is shown inline
//! (as `text/html` holding the SVG, like plotters' own `evcxr_figure`). Bad data (empty,
//! NaN) is an [`Error`](crate::Error), never a panic, so a notebook kernel keeps its state.
//!
//! ```
//! use quantlab::plots::{histogram_with_levels, lines};
//! let fig = histogram_with_levels("weights", &[-0.5, 0.1, 0.2, 0.9], &[-1.0, 0.0, 1.0], 8)?;
//! assert!(fig.svg().starts_with("<svg"));
//! let fig = lines("error", "bits", "MSE", &[("rtn", vec![(2.0, 0.1), (4.0, 0.01)])])?;
//! assert_eq!(fig.svg().matches("<circle").count(), 2);
//! # Ok::<(), quantlab::Error>(())
//! ```

use crate::{Error, Result};
use plotters::prelude::*;

/// The colours of series, in order (Tableau 10, readable by colour-blind readers).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];

/// Fill colour of histogram bars.
pub const BAR_COLOR: RGBColor = PALETTE[0];
/// Stroke colour of the grid-level lines over a histogram.
pub const LEVEL_COLOR: RGBColor = PALETTE[2];

/// Default figure size in pixels.
pub const SIZE: (u32, u32) = (720, 360);

/// A drawn figure: an SVG document.
#[derive(Clone, PartialEq)]
pub struct Figure {
    title: String,
    svg: String,
}

/// Short on purpose: the title and the SVG's size, not the SVG itself.
impl std::fmt::Debug for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Figure {{ title: {:?}, svg: <{} bytes> }}",
            self.title,
            self.svg.len()
        )
    }
}

impl Figure {
    /// The SVG document.
    pub fn svg(&self) -> &str {
        &self.svg
    }

    /// The title the figure was drawn with.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// Write the SVG to `path`.
    pub fn save_svg(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, &self.svg).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Show the figure inline in an evcxr notebook (as `text/html`, the SVG in a `<div>`).
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/html\n<div>{}</div>\nEVCXR_END_CONTENT",
            self.svg
        );
    }
}

fn draw_err<E: std::fmt::Display>(title: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Draw {
        figure: title.to_string(),
        detail: e.to_string(),
    }
}

fn bad(title: &str, detail: String) -> Error {
    Error::BadData {
        figure: title.to_string(),
        detail,
    }
}

/// Count `values` into `bins` equal bins over `[lo, hi]`; a value equal to `hi` goes into the
/// last bin, values outside `[lo, hi]` are not counted.
///
/// ```
/// let c = quantlab::plots::histogram_counts(&[0.0, 0.1, 0.5, 1.0, 2.0], 0.0, 1.0, 2);
/// assert_eq!(c, vec![2, 2]);
/// ```
pub fn histogram_counts(values: &[f32], lo: f64, hi: f64, bins: usize) -> Vec<u64> {
    let mut counts = vec![0u64; bins];
    if bins == 0 || hi <= lo {
        return counts;
    }
    let w = (hi - lo) / bins as f64;
    for &v in values {
        let v = v as f64;
        if !(lo..=hi).contains(&v) {
            continue;
        }
        let b = (((v - lo) / w) as usize).min(bins - 1);
        counts[b] += 1;
    }
    counts
}

/// A histogram of `values` in `bins` bars, with every value of `levels` (e.g. the grid
/// points of one group) drawn as a vertical line across it.
///
/// The x range covers both the values and the levels. Empty bins draw no bar.
///
/// ```
/// use quantlab::plots::{histogram_with_levels, BAR_COLOR};
/// let v = [0.1f32, 0.2, 0.2, 0.8];
/// let fig = histogram_with_levels("toy", &v, &[0.0, 0.5, 1.0], 4)?;
/// // bins of width 0.25 over [0, 1]: 0.1, 0.2, 0.2 | - | - | 0.8  -> two bars
/// assert_eq!(fig.svg().matches("fill=\"#4E79A7\"").count(), 2);
/// # Ok::<(), quantlab::Error>(())
/// ```
pub fn histogram_with_levels(
    title: &str,
    values: &[f32],
    levels: &[f32],
    bins: usize,
) -> Result<Figure> {
    if values.is_empty() {
        return Err(bad(title, "no values to draw".into()));
    }
    if bins == 0 {
        return Err(bad(title, "bins must be at least 1".into()));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(
            title,
            format!("value {i} is not finite ({})", values[i]),
        ));
    }
    if let Some(i) = levels.iter().position(|v| !v.is_finite()) {
        return Err(bad(
            title,
            format!("level {i} is not finite ({})", levels[i]),
        ));
    }
    let all = values.iter().chain(levels).map(|&v| v as f64);
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        lo -= 0.5;
        hi += 0.5;
    }
    let counts = histogram_counts(values, lo, hi, bins);
    let ymax = (*counts.iter().max().unwrap_or(&1)).max(1) as f64 * 1.05;
    let w = (hi - lo) / bins as f64;
    let pad = (hi - lo) * 0.02;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(title))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d((lo - pad)..(hi + pad), 0.0..ymax)
            .map_err(draw_err(title))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("value")
            .y_desc("count")
            .draw()
            .map_err(draw_err(title))?;
        chart
            .draw_series(
                counts
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(b, &c)| {
                        let x0 = lo + b as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w, c as f64)], BAR_COLOR.filled())
                    }),
            )
            .map_err(draw_err(title))?;
        chart
            .draw_series(levels.iter().map(|&l| {
                PathElement::new(
                    vec![(l as f64, 0.0), (l as f64, ymax)],
                    LEVEL_COLOR.stroke_width(1),
                )
            }))
            .map_err(draw_err(title))?;
        root.present().map_err(draw_err(title))?;
    }
    Ok(Figure {
        title: title.to_string(),
        svg,
    })
}

/// Line plot of several named series of `(x, y)` points, each a line with a marker per
/// point and a legend entry, coloured in [`PALETTE`] order.
///
/// ```
/// use quantlab::plots::lines;
/// let fig = lines("toy", "x", "y", &[("a", vec![(0.0, 1.0), (1.0, 2.0), (2.0, 0.5)])])?;
/// assert_eq!(fig.svg().matches("<circle").count(), 3);
/// # Ok::<(), quantlab::Error>(())
/// ```
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<Figure> {
    if series.iter().all(|(_, pts)| pts.is_empty()) {
        return Err(bad(title, "no points to draw".into()));
    }
    for (name, pts) in series {
        if let Some(i) = pts
            .iter()
            .position(|(x, y)| !x.is_finite() || !y.is_finite())
        {
            return Err(bad(
                title,
                format!("series `{name}`: point {i} is not finite ({:?})", pts[i]),
            ));
        }
    }
    let pts = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let widen = |a: f64, b: f64| {
        let span = b - a;
        if span <= f64::EPSILON * a.abs().max(1.0) {
            (a - 0.5, b + 0.5)
        } else {
            (a - 0.05 * span, b + 0.05 * span)
        }
    };
    let (x0, x1) = widen(x0, x1);
    let (y0, y1) = widen(y0, y1);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(title))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err(title))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(draw_err(title))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(draw_err(title))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_err(title))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err(title))?;
        root.present().map_err(draw_err(title))?;
    }
    Ok(Figure {
        title: title.to_string(),
        svg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    /// Elements of the SVG whose `attr` is `color`.
    fn count(svg: &str, tag: &str, attr: &str, color: RGBColor) -> usize {
        svg.lines()
            .filter(|l| l.starts_with(&format!("<{tag} ")))
            .filter(|l| l.contains(&format!("{attr}=\"{}\"", hex(color))))
            .count()
    }

    #[test]
    fn histogram_counts_match_brute_force() {
        // xorshift values in [-1, 1); brute force: for each bin test membership directly
        let mut s = 0x2545F4914F6CDD1Du64;
        let v: Vec<f32> = (0..1000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        let (lo, hi, bins) = (-1.0, 1.0, 7);
        let c = histogram_counts(&v, lo, hi, bins);
        let w = (hi - lo) / bins as f64;
        for b in 0..bins {
            let a = lo + b as f64 * w;
            let brute = v
                .iter()
                .filter(|&&x| {
                    let x = x as f64;
                    x >= a && (x < a + w || (b == bins - 1 && x <= hi))
                })
                .count() as u64;
            assert_eq!(c[b], brute, "bin {b}");
        }
        assert_eq!(c.iter().sum::<u64>(), 1000);
    }

    #[test]
    fn histogram_has_one_bar_per_nonempty_bin_and_one_line_per_level() {
        // values at the centres of bins 0, 1, 3 and 9 of 10 bins over [0, 10] (levels 0 and 10
        // fix the range): 4 bars; 11 levels: 11 lines.
        let values = [0.5f32, 1.5, 1.5, 3.5, 9.5, 9.5, 9.5];
        let levels: Vec<f32> = (0..=10).map(|i| i as f32).collect();
        let fig = histogram_with_levels("bars", &values, &levels, 10).unwrap();
        let svg = fig.svg();
        assert_eq!(count(svg, "rect", "fill", BAR_COLOR), 4);
        assert_eq!(count(svg, "polyline", "stroke", LEVEL_COLOR), 11);
        assert!(svg.contains("\nbars\n</text>"), "title missing");
    }

    #[test]
    fn histogram_bar_heights_are_proportional_to_counts() {
        // counts 1, 2 and 4 in three bins: bar heights in pixels in ratio 1 : 2 : 4
        let values = [0.5f32, 1.5, 1.5, 2.5, 2.5, 2.5, 2.5];
        let fig = histogram_with_levels("h", &values, &[0.0, 3.0], 3).unwrap();
        let mut heights: Vec<f64> = fig
            .svg()
            .lines()
            .filter(|l| l.starts_with("<rect ") && l.contains(&hex(BAR_COLOR)))
            .map(|l| {
                let h = l.split("height=\"").nth(1).unwrap();
                h[..h.find('"').unwrap()].parse::<f64>().unwrap()
            })
            .collect();
        heights.sort_by(f64::total_cmp);
        assert_eq!(heights.len(), 3);
        assert!((heights[1] / heights[0] - 2.0).abs() < 0.05, "{heights:?}");
        assert!((heights[2] / heights[0] - 4.0).abs() < 0.05, "{heights:?}");
    }

    #[test]
    fn lines_draw_one_marker_per_point_and_a_line_per_series() {
        let s = vec![
            ("a", vec![(1.0, 1.0), (2.0, 4.0), (3.0, 9.0)]),
            ("b", vec![(1.0, 2.0), (2.0, 3.0)]),
        ];
        let fig = lines("two", "x", "y", &s).unwrap();
        let svg = fig.svg();
        assert_eq!(count(svg, "circle", "fill", PALETTE[0]), 3);
        assert_eq!(count(svg, "circle", "fill", PALETTE[1]), 2);
        // the series' polyline plus its legend sample
        assert_eq!(count(svg, "polyline", "stroke", PALETTE[0]), 2);
        assert_eq!(count(svg, "polyline", "stroke", PALETTE[1]), 2);
        assert!(svg.contains("\na\n</text>"), "legend label missing");
    }

    #[test]
    fn debug_names_the_title_and_size_not_the_svg() {
        let fig = histogram_with_levels("t", &[0.0, 1.0], &[], 2).unwrap();
        let d = format!("{fig:?}");
        assert_eq!(
            d,
            format!(
                "Figure {{ title: \"t\", svg: <{} bytes> }}",
                fig.svg().len()
            )
        );
    }

    #[test]
    fn bad_data_is_an_error_naming_the_figure_and_series() {
        let e = histogram_with_levels("w", &[], &[0.0], 4).unwrap_err();
        assert!(e.to_string().contains("`w`"));
        let e = histogram_with_levels("w", &[1.0, f32::NAN], &[0.0], 4).unwrap_err();
        assert!(e.to_string().contains("value 1"));
        let e = lines("l", "x", "y", &[("s", vec![(0.0, f64::INFINITY)])]).unwrap_err();
        assert!(e.to_string().contains("`s`") && e.to_string().contains("`l`"));
    }
}
