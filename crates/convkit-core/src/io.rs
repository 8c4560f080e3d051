//! Atomic file output: everything convkit writes goes to a temporary file in the target's
//! folder and is renamed into place, so a crash never leaves a half-written file.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Write `path` atomically; `write` fills the temporary file.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&mut std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".convkit-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    {
        let mut out = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut out).map_err(|e| Error::io(path, e))?;
        out.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Write bytes to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// Read a text file of at most `limit` bytes; a larger one is an error before it is read.
pub fn read_to_string_capped(path: &Path, limit: u64) -> Result<String> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > limit {
        return Err(Error::data(
            path,
            format!("expected at most {limit} bytes, the file has {size}"),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}
