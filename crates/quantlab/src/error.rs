//! The error type of the facade: what a report or a plot can reject.

/// What can go wrong when building a report table or drawing a figure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table row whose number of cells differs from the number of headers.
    #[error("table `{table}`: row {row} has {got} cells, but the table has {expected} columns ({headers})")]
    RowLength {
        /// The table's title, or `untitled`.
        table: String,
        /// Index of the offending row (0-based, in insertion order).
        row: usize,
        /// Number of columns (headers).
        expected: usize,
        /// Number of cells given.
        got: usize,
        /// The headers, comma separated, to help find the missing cell.
        headers: String,
    },
    /// Data that a figure cannot show: empty, non-finite, or an invalid option.
    #[error("figure `{figure}`: {detail}")]
    BadData {
        /// The figure's title.
        figure: String,
        /// What is wrong, naming the series or option.
        detail: String,
    },
    /// The plotting backend failed.
    #[error("figure `{figure}`: drawing failed: {detail}")]
    Draw {
        /// The figure's title.
        figure: String,
        /// The backend's message.
        detail: String,
    },
    /// Writing a figure or table to a file failed.
    #[error("cannot write `{path}`: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result alias of the facade.
pub type Result<T, E = Error> = std::result::Result<T, E>;
