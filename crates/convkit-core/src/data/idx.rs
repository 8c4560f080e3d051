//! IDX files (MNIST, Fashion-MNIST), gzip-compressed or raw.
//!
//! Read in core rather than with the `mnist` crate: that crate panics on a missing or
//! malformed file and reports no offsets, which misses convkit's error bar.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Read a whole file, transparently gunzipping `.gz` content (detected by its magic bytes).
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| {
                Error::format(
                    path,
                    0,
                    format!(
                        "corrupt gzip stream: {e} (after {} decompressed bytes)",
                        out.len()
                    ),
                )
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn header(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>> {
    let need = 4 + 4 * dims;
    let word = |i: usize| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    if bytes.len() < need && (bytes.len() < 4 || word(0) == magic) {
        return Err(Error::format(
            path,
            bytes.len() as u64,
            format!(
                "truncated header: expected {need} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let found = word(0);
    if found != magic {
        return Err(Error::format(
            path,
            0,
            format!("wrong magic number: expected 0x{magic:08x} (IDX, u8, {dims} dimension(s)), found 0x{found:08x}"),
        ));
    }
    let dims: Vec<usize> = (1..=dims).map(|i| word(i) as usize).collect();
    let payload: usize = dims.iter().product();
    if bytes.len() - need != payload {
        return Err(Error::format(
            path,
            need as u64,
            format!(
                "{}: header promises {payload} data bytes ({dims:?}), found {}",
                if bytes.len() - need < payload {
                    "truncated"
                } else {
                    "trailing data"
                },
                bytes.len() - need
            ),
        ));
    }
    Ok(dims)
}

/// Read an IDX image file (`magic 0x00000803`): returns pixels (n·h·w, u8) and `(n, h, w)`.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, (usize, usize, usize))> {
    let bytes = read_maybe_gz(path)?;
    let dims = header(path, &bytes, 0x0000_0803, 3)?;
    Ok((bytes[16..].to_vec(), (dims[0], dims[1], dims[2])))
}

/// Read an IDX label file (`magic 0x00000801`), checking each label is `< classes`.
pub fn read_idx_labels(path: &Path, classes: usize) -> Result<Vec<u32>> {
    let bytes = read_maybe_gz(path)?;
    header(path, &bytes, 0x0000_0801, 1)?;
    bytes[8..]
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if (l as usize) < classes {
                Ok(l as u32)
            } else {
                Err(Error::format(
                    path,
                    8 + i as u64,
                    format!("label {l} of item {i} is out of range: expected < {classes}"),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// An IDX image file's bytes.
    pub fn idx_images(n: u32, h: u32, w: u32, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [0x803u32, n, h, w] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend((0..(n * h * w) as usize).map(fill));
        b
    }

    pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x801u32.to_be_bytes());
        b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        b.extend_from_slice(labels);
        b
    }

    pub fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_raw_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("img");
        std::fs::write(&raw, idx_images(2, 3, 4, |i| i as u8)).unwrap();
        let (px, dims) = read_idx_images(&raw).unwrap();
        assert_eq!(dims, (2, 3, 4));
        assert_eq!(px[23], 23);
        let gzp = dir.path().join("img.gz");
        std::fs::write(&gzp, gz(&idx_images(2, 3, 4, |i| i as u8))).unwrap();
        assert_eq!(read_idx_images(&gzp).unwrap().0, px);
        let lab = dir.path().join("lab.gz");
        std::fs::write(&lab, gz(&idx_labels(&[1, 9]))).unwrap();
        assert_eq!(read_idx_labels(&lab, 10).unwrap(), vec![1, 9]);
    }

    #[test]
    fn bad_files_name_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, idx_labels(&[1, 2])).unwrap();
        let err = read_idx_images(&p).unwrap_err().to_string();
        assert!(
            err.contains("byte offset 0")
                && err.contains("wrong magic number: expected 0x00000803")
                && err.contains("found 0x00000801"),
            "{err}"
        );

        let mut trunc = idx_images(3, 2, 2, |_| 7);
        trunc.truncate(20);
        std::fs::write(&p, &trunc).unwrap();
        let err = read_idx_images(&p).unwrap_err().to_string();
        assert!(
            err.contains("offset 16")
                && err.contains("truncated: header promises 12 data bytes")
                && err.contains("found 4"),
            "{err}"
        );

        std::fs::write(&p, [0u8, 0, 8]).unwrap();
        assert!(read_idx_images(&p)
            .unwrap_err()
            .to_string()
            .contains("truncated header"));

        std::fs::write(&p, idx_labels(&[1, 12, 3])).unwrap();
        let err = read_idx_labels(&p, 10).unwrap_err().to_string();
        assert!(
            err.contains("byte offset 9") && err.contains("label 12 of item 1"),
            "{err}"
        );

        // A gzip stream cut short: flate2 may stop at the cut without an error, so the
        // reader's length checks must catch it either way.
        let mut corrupt = gz(&idx_labels(&[1; 100]));
        let n = corrupt.len();
        corrupt.truncate(n - 12);
        std::fs::write(&p, &corrupt).unwrap();
        let err = read_idx_labels(&p, 10).unwrap_err().to_string();
        assert!(
            err.contains("corrupt gzip stream") || err.contains("truncated"),
            "{err}"
        );
        corrupt[12] ^= 0xff;
        std::fs::write(&p, &corrupt).unwrap();
        assert!(read_idx_labels(&p, 10).is_err());

        let err = read_idx_labels(&dir.path().join("missing"), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
