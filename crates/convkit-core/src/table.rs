//! polars helpers: tables are DataFrames, written as CSV atomically.

use std::path::Path;

use polars::prelude::{CsvWriter, DataFrame, SerWriter};

use crate::{Error, Result};

/// Write `df` as CSV with a header row, atomically.
pub fn write_csv(df: &mut DataFrame, path: &Path) -> Result<()> {
    crate::io::write_atomic(path, |w| {
        CsvWriter::new(w)
            .include_header(true)
            .finish(df)
            .map_err(std::io::Error::other)
    })
    .map_err(|e| match e {
        Error::Io { path, error } => Error::Table(format!("{}: {error}", path.display())),
        other => other,
    })
}
