//! CIFAR-10 binary batches (`data_batch_{1..5}.bin`, `test_batch.bin`): records of one label
//! byte followed by 3072 bytes, the red, green and blue 32×32 planes, converted to HWC.

use std::path::Path;

use super::{Dataset, ImageShape, CIFAR10_CLASSES};
use crate::{Error, Result};

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const RECORD: usize = 1 + 3 * PLANE;

/// Read and concatenate CIFAR-10 binary batch files.
pub fn read_cifar10_batches(paths: &[impl AsRef<Path>]) -> Result<Dataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let path = path.as_ref();
        // A batch file is 30,730,000 bytes.
        let bytes = crate::io::read_capped(path, 64 << 20)?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            let whole = bytes.len() / RECORD * RECORD;
            return Err(Error::format(
                path,
                whole as u64,
                format!(
                    "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records ({} record(s) then {} stray byte(s))",
                    bytes.len(),
                    bytes.len() / RECORD,
                    bytes.len() - whole
                ),
            ));
        }
        images.reserve(bytes.len());
        for (r, record) in bytes.chunks_exact(RECORD).enumerate() {
            let label = record[0];
            if label as usize >= CIFAR10_CLASSES.len() {
                return Err(Error::format(
                    path,
                    (r * RECORD) as u64,
                    format!("label {label} of record {r} is out of range: expected < 10"),
                ));
            }
            labels.push(label as u32);
            let planes = &record[1..];
            for p in 0..PLANE {
                images.extend_from_slice(&[planes[p], planes[PLANE + p], planes[2 * PLANE + p]]);
            }
        }
    }
    Dataset::new(
        images,
        ImageShape::new(SIDE, SIDE, 3),
        labels,
        CIFAR10_CLASSES.map(String::from).to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, r: u8, g: u8, b: u8) -> Vec<u8> {
        let mut v = vec![label];
        v.extend(std::iter::repeat_n(r, PLANE));
        v.extend(std::iter::repeat_n(g, PLANE));
        v.extend(std::iter::repeat_n(b, PLANE));
        v
    }

    #[test]
    fn reads_records_as_hwc() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        let mut bytes = record(3, 10, 20, 30);
        bytes.extend(record(9, 1, 2, 3));
        std::fs::write(&p, &bytes).unwrap();
        let ds = read_cifar10_batches(&[&p]).unwrap();
        assert_eq!(ds.labels, vec![3, 9]);
        assert_eq!(&ds.image(0)[..6], &[10, 20, 30, 10, 20, 30]);
        assert_eq!(ds.classes[3], "cat");
    }

    #[test]
    fn bad_batches_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bin");
        let mut bytes = record(1, 0, 0, 0);
        bytes.push(7);
        std::fs::write(&p, &bytes).unwrap();
        let err = read_cifar10_batches(&[&p]).unwrap_err().to_string();
        assert!(
            err.contains("byte offset 3073") && err.contains("1 record(s) then 1 stray byte(s)"),
            "{err}"
        );
        let mut bytes = record(1, 0, 0, 0);
        bytes.extend(record(10, 0, 0, 0));
        std::fs::write(&p, &bytes).unwrap();
        let err = read_cifar10_batches(&[&p]).unwrap_err().to_string();
        assert!(
            err.contains("byte offset 3073") && err.contains("label 10 of record 1"),
            "{err}"
        );
        std::fs::write(&p, []).unwrap();
        assert!(read_cifar10_batches(&[&p]).is_err());
    }
}
