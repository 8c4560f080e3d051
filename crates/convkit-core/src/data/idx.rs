//! IDX files (MNIST, Fashion-MNIST), gzip-compressed or raw.
//!
//! Read in core rather than with the `mnist` crate: that crate panics on a missing or
//! malformed file and reports no offsets, which misses convkit's error bar.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::{Error, Result};

/// Most data bytes convkit reads from one IDX file (60,000 MNIST images are 47 MB). A header
/// that promises more is an error before anything is read.
pub const MAX_IDX_BYTES: u64 = 512 << 20;

/// Read an IDX file with `magic` and `dims` dimensions: the dimensions and the data bytes.
/// gzip content (detected by its magic bytes) is decompressed as it is read, and never past
/// what the header promises, so a small file cannot inflate into gigabytes.
fn read_idx(
    path: &Path,
    magic: u32,
    dims: usize,
    labels_of: Option<LabelsOf<'_>>,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = crate::io::open_regular(path)?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let gz = reader
        .fill_buf()
        .map_err(|e| Error::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let mut input: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let corrupt = |e: std::io::Error, at: usize| {
        if gz {
            Error::format(
                path,
                at as u64,
                format!("corrupt gzip stream: {e} (after {at} decompressed bytes)"),
            )
        } else {
            Error::io(path, e)
        }
    };
    let need = 4 + 4 * dims;
    let mut head = Vec::with_capacity(need);
    (&mut input)
        .take(need as u64)
        .read_to_end(&mut head)
        .map_err(|e| corrupt(e, 0))?;
    let word = |i: usize| u32::from_be_bytes(head[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if head.len() >= 4 && word(0) != magic {
        return Err(Error::format(
            path,
            0,
            format!("wrong magic number: expected 0x{magic:08x} (IDX, u8, {dims} dimension(s)), found 0x{:08x}", word(0)),
        ));
    }
    if head.len() < need {
        return Err(Error::format(
            path,
            head.len() as u64,
            format!(
                "truncated header: expected {need} bytes, file has {}",
                head.len()
            ),
        ));
    }
    let dims: Vec<usize> = (1..=dims).map(|i| word(i) as usize).collect();
    // A count that disagrees with the other file is refused before anything is read.
    if let Some(LabelsOf { images, file }) = labels_of.filter(|l| l.images != dims[0]) {
        return Err(Error::format(
            path,
            4,
            format!(
                "counts disagree: {} has {images} images, this file's header declares {} labels",
                file.display(),
                dims[0]
            ),
        ));
    }
    let payload = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|p| *p <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            Error::format(
                path,
                4,
                format!("header promises {dims:?} data bytes, more than the {MAX_IDX_BYTES} convkit reads from an IDX file"),
            )
        })?;
    let size_error = |found: u64| {
        let kind = if found < payload {
            "truncated"
        } else {
            "trailing data"
        };
        Error::format(
            path,
            need as u64,
            format!("{kind}: header promises {payload} data bytes ({dims:?}), found {found}"),
        )
    };
    // The length from before the read: a file that changed meanwhile is caught below.
    let on_disk = file_len.saturating_sub(need as u64);
    if !gz && on_disk != payload {
        return Err(size_error(on_disk));
    }
    // Grows as data arrives, so memory follows what is there, not what the header claims.
    let mut data = Vec::new();
    (&mut input)
        .take(payload)
        .read_to_end(&mut data)
        .map_err(|e| corrupt(e, need))?;
    if (data.len() as u64) < payload {
        return Err(size_error(data.len() as u64));
    }
    let mut extra = [0u8; 1];
    if input
        .read(&mut extra)
        .map_err(|e| corrupt(e, need + data.len()))?
        > 0
    {
        return Err(size_error(payload + 1));
    }
    Ok((dims, data))
}

/// The image file a label file belongs to, and its count of images: the labels' header must
/// declare as many.
#[derive(Clone, Copy)]
pub(crate) struct LabelsOf<'a> {
    pub images: usize,
    pub file: &'a Path,
}

/// Read an IDX image file (`magic 0x00000803`): returns pixels (n·h·w, u8) and `(n, h, w)`.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, (usize, usize, usize))> {
    let (dims, pixels) = read_idx(path, 0x0000_0803, 3, None)?;
    Ok((pixels, (dims[0], dims[1], dims[2])))
}

/// Read an IDX label file (`magic 0x00000801`), checking each label is `< classes`.
pub fn read_idx_labels(path: &Path, classes: usize) -> Result<Vec<u32>> {
    read_idx_labels_for(path, classes, None)
}

/// [`read_idx_labels`] of the images `labels_of` names, whose count the header must declare
/// (checked before the labels are read, so a small gzip file declaring 2^29 labels costs
/// nothing).
pub(crate) fn read_idx_labels_for(
    path: &Path,
    classes: usize,
    labels_of: Option<LabelsOf<'_>>,
) -> Result<Vec<u32>> {
    let (_, bytes) = read_idx(path, 0x0000_0801, 1, labels_of)?;
    bytes
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

        // A header promising more than the cap, and a small gzip that would inflate far past
        // what its header promises: both stop early with an error.
        let huge: Vec<u8> = [0x803u32, 60_000, 3000, 3000]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        std::fs::write(&p, huge).unwrap();
        let err = read_idx_images(&p).unwrap_err().to_string();
        assert!(err.contains("more than the 536870912"), "{err}");
        let mut bomb = idx_labels(&[1, 2]);
        bomb.extend(std::iter::repeat_n(0u8, 50 << 20));
        let bomb = gz(&bomb);
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        std::fs::write(&p, &bomb).unwrap();
        let err = read_idx_labels(&p, 10).unwrap_err().to_string();
        assert!(
            err.contains("trailing data: header promises 2 data bytes"),
            "{err}"
        );

        // A label count that disagrees with the images' is refused from the header, before
        // 512 MiB of zeros are inflated.
        let mut declared = idx_labels(&[]);
        declared[4..8].copy_from_slice(&(1u32 << 29).to_be_bytes());
        declared.extend(std::iter::repeat_n(0u8, 1 << 20));
        std::fs::write(&p, gz(&declared)).unwrap();
        let images = dir.path().join("images.idx");
        let labels_of = LabelsOf {
            images: 60_000,
            file: &images,
        };
        let err = read_idx_labels_for(&p, 10, Some(labels_of))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 60000 images, this file's header declares 536870912 labels"),
            "{err}"
        );

        let err = read_idx_labels(&dir.path().join("missing"), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
