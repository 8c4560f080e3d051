//! Seeded synthetic images, as the first tutorial's `np.random` data — with one twist: each
//! class shifts the mean brightness of its images, so a model can actually learn them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, ImageShape};
use crate::{Error, Result};

/// `n` random images of `shape` with seeded random labels in `0..classes`.
pub fn synthetic(n: usize, shape: ImageShape, classes: usize, seed: u64) -> Result<Dataset> {
    if classes < 2 {
        return Err(Error::config(
            "synthetic data",
            format!("need at least 2 classes, found {classes}"),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(n * shape.len());
    let mut labels = Vec::with_capacity(n);
    let band = 160 / (classes as u32);
    for _ in 0..n {
        let label = rng.random_range(0..classes as u32);
        let base = label * band;
        images.extend((0..shape.len()).map(|_| (base + rng.random_range(0..96)) as u8));
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
}
