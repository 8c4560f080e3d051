//! Seeded synthetic images, as the first tutorial's `np.random` data — with one twist: each
//! class shifts the mean brightness of its images, so a model can actually learn them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, ImageShape};
use crate::{Error, Result};

/// The pixel values of `n` images of `shape`, or an error (naming `what`) when they overflow.
fn pixel_count(what: &'static str, n: usize, shape: ImageShape) -> Result<usize> {
    n.checked_mul(shape.len()).ok_or_else(|| {
        Error::config(
            what,
            format!("{n} images of {shape} pixels do not fit in memory"),
        )
    })
}

/// `n` random images of `shape` with seeded random labels in `0..classes`.
pub fn synthetic(n: usize, shape: ImageShape, classes: usize, seed: u64) -> Result<Dataset> {
    if classes < 2 || u32::try_from(classes).is_err() {
        return Err(Error::config(
            "synthetic data",
            format!("need from 2 to {} classes, found {classes}", u32::MAX),
        ));
    }
    let pixels = pixel_count("synthetic data", n, shape)?;
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

/// The first tutorial's data as written: `X = np.random.rand(n, H, W, C)` (here u8 noise,
/// uniform in 0..=255, which [`super::Normalisation::Rescale`] brings to [0, 1] in steps of
/// 1/255) and `y = np.random.rand(n, 1)`, soft binary targets uniform in [0, 1]. Nothing links
/// images to targets: there is nothing to learn.
pub fn random_soft(n: usize, shape: ImageShape, seed: u64) -> Result<Dataset> {
    let pixels = pixel_count("random data", n, shape)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images = (0..pixels).map(|_| rng.random::<u8>()).collect();
    let targets: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    let classes = vec!["0".into(), "1".into()];
    Dataset::with_soft_targets(images, shape, Dataset::binary_targets(&targets), classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_soft_is_the_first_tutorials_data() {
        let shape = ImageShape::new(100, 100, 3);
        let data = random_soft(100, shape, 0).unwrap();
        assert_eq!((data.len(), data.images.len()), (100, 100 * shape.len()));
        let rows = data.soft_targets.as_ref().unwrap();
        assert_eq!(rows.dim(), (100, 2));
        let t: Vec<f32> = rows.column(1).to_vec();
        assert!(t.iter().all(|v| (0.0..1.0).contains(v)));
        // Uniform: spread over [0, 1], not 0/1 labels.
        assert!(t.iter().filter(|&&v| v > 0.05 && v < 0.95).count() > 80);
        let mean = t.iter().sum::<f32>() / 100.0;
        assert!((mean - 0.5).abs() < 0.1, "{mean}");
        for (row, &label) in rows.rows().into_iter().zip(&data.labels) {
            assert_eq!(label, u32::from(row[1] > 0.5));
            assert!((row[0] + row[1] - 1.0).abs() < 1e-6);
        }
        assert_eq!(data, random_soft(100, shape, 0).unwrap());
        // A sample keeps each image's targets.
        let few = data.select(&[3, 7]);
        assert_eq!(few.soft_targets.unwrap().row(1), rows.row(7));
    }

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
