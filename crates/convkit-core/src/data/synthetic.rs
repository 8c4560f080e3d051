//! Seeded synthetic images, as the first tutorial's `np.random` data — with one twist: each
//! class shifts the mean brightness of its images, so a model can actually learn them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, ImageShape};
use crate::{Error, Result};

/// `n` random images of `shape` with seeded random labels in `0..classes`.
pub fn synthetic(n: usize, shape: ImageShape, classes: usize, seed: u64) -> Result<Dataset> {
    if classes < 2 || u32::try_from(classes).is_err() {
        return Err(Error::config(
            "synthetic data",
            format!("need from 2 to {} classes, found {classes}", u32::MAX),
        ));
    }
    let pixels = n.checked_mul(shape.len()).ok_or_else(|| {
        Error::config(
            "synthetic data",
            format!("{n} images of {shape} pixels do not fit in memory"),
        )
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(pixels);
    let mut labels = Vec::with_capacity(n);
    // Each class a brightness band of its own, from 0 up to 159, plus noise in 0..96; past
    // 160 classes the bands are one level wide and the last classes share the top one.
    let band = (160 / classes as u64).max(1);
    for _ in 0..n {
        let label = rng.random_range(0..classes as u32);
        let base = (u64::from(label) * band).min(159) as u32;
        images.extend((0..shape.len()).map(|_| (base + rng.random_range(0..96u32)) as u8));
        labels.push(label);
    }
    let names = (0..classes).map(|c| format!("class_{c}")).collect();
    Dataset::new(images, shape, labels, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_shaped() {
        let a = synthetic(10, ImageShape::new(4, 4, 3), 2, 1).unwrap();
        assert_eq!(a, synthetic(10, ImageShape::new(4, 4, 3), 2, 1).unwrap());
        assert_ne!(a, synthetic(10, ImageShape::new(4, 4, 3), 2, 2).unwrap());
        assert_eq!(a.images.len(), 10 * 48);
        assert!(synthetic(1, ImageShape::new(1, 1, 1), 1, 0).is_err());
    }

    /// Class counts that once divided by zero (a count cast to u32 wrapped to 0) or left every
    /// class the same band, and image counts whose size overflows.
    #[test]
    fn any_class_count_is_data_or_an_error() {
        let shape = ImageShape::new(2, 2, 1);
        let many = synthetic(50, shape, 1000, 0).unwrap();
        assert_eq!(many.classes.len(), 1000);
        assert!(many.labels.iter().all(|&l| l < 1000));
        if usize::BITS > 32 {
            let wraps = (u32::MAX as usize) + 1;
            let message = synthetic(1, shape, wraps, 0).unwrap_err().to_string();
            assert!(message.contains("need from 2 to"), "{message}");
        }
        let message = synthetic(usize::MAX, shape, 2, 0).unwrap_err().to_string();
        assert!(message.contains("do not fit in memory"), "{message}");
    }
}
