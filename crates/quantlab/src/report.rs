//! Report tables that render as HTML in a notebook and as aligned text in a terminal.
//!
//! A [`Table`] has headers and rows of [`Cell`]s. In an evcxr notebook a table that ends a
//! cell is shown as an HTML table (evcxr calls [`Table::evcxr_display`]); `println!("{t}")`
//! prints the same table as aligned plain text (numbers right-aligned, text left-aligned).
//!
//! ```
//! use quantlab::cells;
//! use quantlab::report::Table;
//! let t = Table::new(["format", "MSE", "bits/weight"])
//!     .with_title("RTN on a 256 x 512 Gaussian")
//!     .row(cells!["int4 <sym>", 1.25e-5, 4.125])?
//!     .row(cells!["nf4", 9.5e-6, 4.5])?;
//! assert!(t.to_html().contains("<td>int4 &lt;sym&gt;</td>"));
//! let text = t.to_string();
//! assert!(text.lines().any(|l| l.starts_with("nf4 ") && l.ends_with("4.500")));
//! # Ok::<(), quantlab::Error>(())
//! ```

use crate::{Error, Result};
use std::fmt;

/// One cell of a [`Table`]: its text, and whether it is a number (numbers are
/// right-aligned).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    text: String,
    numeric: bool,
}

impl Cell {
    /// A text cell (left-aligned).
    pub fn text(s: impl Into<String>) -> Self {
        Self {
            text: s.into(),
            numeric: false,
        }
    }

    /// A number with the default formatting of [`format_number`].
    pub fn number(x: f64) -> Self {
        Self {
            text: format_number(x),
            numeric: true,
        }
    }

    /// A number with `decimals` digits after the point, e.g. `Cell::fixed(4.0, 2)` is `4.00`.
    pub fn fixed(x: f64, decimals: usize) -> Self {
        Self {
            text: format!("{x:.decimals$}"),
            numeric: true,
        }
    }

    /// A number in scientific notation with `digits` digits after the point, e.g.
    /// `Cell::sci(0.000123, 2)` is `1.23e-4`.
    pub fn sci(x: f64, digits: usize) -> Self {
        Self {
            text: format!("{x:.digits$e}"),
            numeric: true,
        }
    }

    /// The cell's text as shown.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the cell holds a number (right-aligned).
    pub fn is_numeric(&self) -> bool {
        self.numeric
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::text(s)
    }
}
impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::text(s)
    }
}
impl From<&String> for Cell {
    fn from(s: &String) -> Self {
        Cell::text(s.clone())
    }
}
impl From<f64> for Cell {
    fn from(x: f64) -> Self {
        Cell::number(x)
    }
}
impl From<f32> for Cell {
    fn from(x: f32) -> Self {
        Cell::number(x as f64)
    }
}
macro_rules! int_cell {
    ($($t:ty),*) => {$(
        impl From<$t> for Cell {
            fn from(x: $t) -> Self {
                Cell { text: x.to_string(), numeric: true }
            }
        }
    )*};
}
int_cell!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// Build a `Vec<Cell>` from values of mixed types: `cells!["nf4", 1.5e-5, 4.5]`.
#[macro_export]
macro_rules! cells {
    ($($x:expr),* $(,)?) => {
        vec![$($crate::report::Cell::from($x)),*]
    };
}

/// The default text of a number: integers as integers, four significant digits between
/// 1e-3 and 1e5, scientific notation (three decimals) outside that range.
///
/// ```
/// use quantlab::report::format_number;
/// assert_eq!(format_number(4.0), "4");
/// assert_eq!(format_number(4.125), "4.125");
/// assert_eq!(format_number(0.0123456), "0.01235");
/// assert_eq!(format_number(1.25e-5), "1.250e-5");
/// ```
pub fn format_number(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if x.fract() == 0.0 && a < 1e15 {
        return format!("{x:.0}");
    }
    if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        return format!("{x:.decimals$}");
    }
    format!("{x:.3e}")
}

/// Escape text for HTML element content and attribute values (`& < > " '`).
///
/// ```
/// assert_eq!(quantlab::report::escape_html("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
/// ```
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A report table: headers, rows of cells, an optional title.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    title: Option<String>,
    headers: Vec<String>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            title: None,
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// The same table with a title (an HTML caption, the first line of the text form).
    pub fn with_title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Append a row; it must have one cell per header.
    pub fn row<I, C>(mut self, cells: I) -> Result<Self>
    where
        I: IntoIterator<Item = C>,
        C: Into<Cell>,
    {
        self.push_row(cells)?;
        Ok(self)
    }

    /// Append a row in place; it must have one cell per header.
    pub fn push_row<I, C>(&mut self, cells: I) -> Result<&mut Self>
    where
        I: IntoIterator<Item = C>,
        C: Into<Cell>,
    {
        let cells: Vec<Cell> = cells.into_iter().map(Into::into).collect();
        if cells.len() != self.headers.len() {
            return Err(Error::RowLength {
                table: self.title.clone().unwrap_or_else(|| "untitled".into()),
                row: self.rows.len(),
                expected: self.headers.len(),
                got: cells.len(),
                headers: self.headers.join(", "),
            });
        }
        self.rows.push(cells);
        Ok(self)
    }

    /// The title, if any.
    pub fn title(&self) -> Option<&str> {
        self.title.as_deref()
    }

    /// The column headers.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    /// The rows, in insertion order.
    pub fn rows(&self) -> &[Vec<Cell>] {
        &self.rows
    }

    /// The table as an HTML `<table>` (text escaped, numbers right-aligned).
    pub fn to_html(&self) -> String {
        let mut h = String::from(
            "<table class=\"quantlab-report\" style=\"border-collapse:collapse;font-variant-numeric:tabular-nums\">\n",
        );
        if let Some(t) = &self.title {
            h.push_str(&format!(
                "<caption style=\"font-weight:bold;text-align:left\">{}</caption>\n",
                escape_html(t)
            ));
        }
        h.push_str("<thead><tr>");
        for (c, head) in self.headers.iter().enumerate() {
            let numeric = !self.rows.is_empty() && self.rows.iter().all(|r| r[c].numeric);
            if numeric {
                h.push_str("<th style=\"text-align:right\">");
            } else {
                h.push_str("<th style=\"text-align:left\">");
            }
            h.push_str(&escape_html(head));
            h.push_str("</th>");
        }
        h.push_str("</tr></thead>\n<tbody>\n");
        for row in &self.rows {
            h.push_str("<tr>");
            for cell in row {
                if cell.numeric {
                    h.push_str("<td style=\"text-align:right\">");
                } else {
                    h.push_str("<td>");
                }
                h.push_str(&escape_html(&cell.text));
                h.push_str("</td>");
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody>\n</table>");
        h
    }

    /// The table as aligned plain text (the same as its `Display`).
    pub fn to_text(&self) -> String {
        self.to_string()
    }

    /// Show the table in an evcxr notebook: an HTML table, with the plain text as a
    /// fallback for front ends without HTML. evcxr calls this when a table ends a cell.
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/plain\n{}\nEVCXR_END_CONTENT",
            self.to_text()
        );
        println!(
            "EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT",
            self.to_html()
        );
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.headers.len();
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (c, cell) in row.iter().enumerate() {
                widths[c] = widths[c].max(width(&cell.text));
            }
        }
        let numeric: Vec<bool> = (0..n)
            .map(|c| !self.rows.is_empty() && self.rows.iter().all(|r| r[c].numeric))
            .collect();
        let line = |cells: Vec<(&str, bool)>| -> String {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, &(s, right))| {
                    let pad = " ".repeat(widths[c] - width(s));
                    if right {
                        format!("{pad}{s}")
                    } else {
                        format!("{s}{pad}")
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        if let Some(t) = &self.title {
            writeln!(f, "{t}")?;
        }
        writeln!(
            f,
            "{}",
            line(
                self.headers
                    .iter()
                    .enumerate()
                    .map(|(c, h)| (h.as_str(), numeric[c]))
                    .collect()
            )
        )?;
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        write!(f, "{}", rule.join("  "))?;
        for row in &self.rows {
            writeln!(f)?;
            write!(
                f,
                "{}",
                line(row.iter().map(|c| (c.text.as_str(), c.numeric)).collect())
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_every_special_character_in_headers_cells_and_title() {
        let t = Table::new(["a<b", "x&y"])
            .with_title("\"T\" <1>")
            .row(cells!["<script>alert('x')</script>", 1.5])
            .unwrap();
        let h = t.to_html();
        assert!(h.contains("<th style=\"text-align:left\">a&lt;b</th>"));
        assert!(h.contains("<th style=\"text-align:right\">x&amp;y</th>"));
        assert!(h.contains("&quot;T&quot; &lt;1&gt;"));
        assert!(h.contains("<td>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</td>"));
        assert!(!h.contains("<script>"));
        // one <tr> for the header, one per row
        assert_eq!(h.matches("<tr>").count(), 2);
        assert_eq!(h.matches("<td").count(), 2);
    }

    #[test]
    fn text_form_is_aligned_by_hand() {
        let t = Table::new(["format", "bits"])
            .row(cells!["int4", 4.125])
            .unwrap()
            .row(cells!["fp8-e4m3", 8u32])
            .unwrap();
        // hand-written: widths 8 and 5, numbers right-aligned, two spaces between columns
        let expected = "format     bits\n--------  -----\nint4      4.125\nfp8-e4m3      8";
        assert_eq!(t.to_string(), expected);
    }

    #[test]
    fn a_row_of_the_wrong_length_is_an_error_naming_the_table() {
        let err = Table::new(["a", "b", "c"])
            .with_title("mse")
            .row(cells![1.0, 2.0])
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`mse`") && msg.contains("2 cells") && msg.contains("3 columns"));
    }

    #[test]
    fn number_formats_match_hand_written_strings() {
        assert_eq!(format_number(0.0), "0");
        assert_eq!(format_number(-3.0), "-3");
        assert_eq!(format_number(12.3456), "12.35");
        assert_eq!(format_number(0.5), "0.5000");
        assert_eq!(format_number(123456.7), "1.235e5");
        assert_eq!(format_number(f64::NAN), "NaN");
        assert_eq!(Cell::fixed(2.0, 2).as_str(), "2.00");
        assert_eq!(Cell::sci(0.000123, 2).as_str(), "1.23e-4");
    }
}
