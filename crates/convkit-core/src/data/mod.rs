//! Datasets: NHWC u8 images with integer labels and class names, the readers for IDX
//! (MNIST, Fashion-MNIST), CIFAR-10 binary batches, image folders and synthetic data, and the
//! resolution/download logic that finds them.

mod cifar;
mod folder;
mod idx;
mod source;
mod splits;
mod synthetic;

pub use cifar::read_cifar10_batches;
pub use folder::load_image;
pub use folder::read_image_folder;
pub use idx::{read_idx_images, read_idx_labels};
pub use source::{download, Checksum, DatasetName, Locator, Resource, Split};
pub use splits::{open, open_splits, SplitOptions, Splits, Validation, VALIDATION_FOLDERS};

pub use synthetic::{random_soft, synthetic};

use ndarray::{Array2, ArrayViewMut4};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// MNIST's class names.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
/// Fashion-MNIST's class names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
/// CIFAR-10's class names.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// How u8 pixels become the f32 inputs of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Normalisation {
    /// Raw values 0..=255 as f32 (Keras without a normalisation step).
    #[default]
    None,
    /// `x / 255`, the tutorials' normalisation.
    Rescale,
    /// `(x / 255 − mean[c]) / std[c]` per channel.
    MeanStd { mean: Vec<f32>, std: Vec<f32> },
}

impl Normalisation {
    /// A lookup table `[channel][value] -> f32`, so batching does one load per pixel.
    /// Whether this normalisation fits images of `channels` channels: one mean and one
    /// positive std per channel.
    pub fn check(&self, channels: usize) -> Result<()> {
        if let Normalisation::MeanStd { mean, std } = self {
            if mean.len() != channels || std.len() != channels {
                return Err(Error::config(
                    "normalisation",
                    format!(
                        "mean/std need {channels} values (one per channel), found {} and {}",
                        mean.len(),
                        std.len()
                    ),
                ));
            }
            if let Some(s) = std.iter().find(|s| **s <= 0.0) {
                return Err(Error::config(
                    "normalisation",
                    format!("std must be positive, found {s}"),
                ));
            }
        }
        Ok(())
    }

    fn table(&self, channels: usize) -> Result<Vec<[f32; 256]>> {
        self.check(channels)?;
        Ok((0..channels)
            .map(|c| {
                let mut t = [0f32; 256];
                for (v, slot) in t.iter_mut().enumerate() {
                    *slot = match self {
                        Normalisation::None => v as f32,
                        Normalisation::Rescale => v as f32 / 255.0,
                        Normalisation::MeanStd { mean, std } => {
                            (v as f32 / 255.0 - mean[c]) / std[c]
                        }
                    };
                }
                t
            })
            .collect())
    }
}

/// Image size `height × width × channels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl ImageShape {
    pub fn new(height: usize, width: usize, channels: usize) -> Self {
        ImageShape {
            height,
            width,
            channels,
        }
    }
    /// Values per image.
    pub fn len(&self) -> usize {
        self.height * self.width * self.channels
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}×{}", self.height, self.width, self.channels)
    }
}

/// A labelled image dataset held in memory as NHWC u8 (Keras' channels-last view).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Pixel values, `len = n · shape.len()`, image-major then row, column, channel.
    pub images: Vec<u8>,
    pub shape: ImageShape,
    /// Class index of each image.
    pub labels: Vec<u32>,
    /// Class names; `labels[i] < classes.len()`.
    pub classes: Vec<String>,
    /// Soft targets (Keras' float `y`), `[n, classes]` rows of values in [0, 1], when the data
    /// has them; `labels` are then each row's most likely class (for two classes: the second
    /// when its value is above 0.5). `None`: the labels are the targets.
    pub soft_targets: Option<Array2<f32>>,
    /// Applied when batches are made.
    pub normalisation: Normalisation,
}

impl Dataset {
    /// Build and check a dataset.
    pub fn new(
        images: Vec<u8>,
        shape: ImageShape,
        labels: Vec<u32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        if shape.is_empty() {
            return Err(Error::config(
                "dataset",
                format!("image shape {shape} is empty"),
            ));
        }
        if images.len() != labels.len() * shape.len() {
            return Err(Error::config(
                "dataset",
                format!(
                    "{} labels need {} pixel values of {shape}, found {}",
                    labels.len(),
                    labels.len() * shape.len(),
                    images.len()
                ),
            ));
        }
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= classes.len())
        {
            return Err(Error::config(
                "dataset",
                format!(
                    "label {l} of image {i} is out of range for {} classes",
                    classes.len()
                ),
            ));
        }
        Ok(Dataset {
            images,
            shape,
            labels,
            classes,
            soft_targets: None,
            normalisation: Normalisation::None,
        })
    }

    /// A dataset with soft targets `[n, classes]`, each value in [0, 1] (a two-class
    /// binary target `t` is the row `[1 − t, t]`, see [`Dataset::binary_targets`]); the labels
    /// are each row's most likely class.
    pub fn with_soft_targets(
        images: Vec<u8>,
        shape: ImageShape,
        targets: Array2<f32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        let labels = soft_labels(&targets, classes.len())?;
        if let Some(((i, c), v)) = targets
            .indexed_iter()
            .find(|(_, v)| !(0.0..=1.0).contains(*v))
        {
            return Err(Error::config(
                "dataset",
                format!("soft target {v} of image {i}, class {c}: expected a value in [0, 1]"),
            ));
        }
        let mut data = Dataset::new(images, shape, labels, classes)?;
        data.soft_targets = Some(targets);
        Ok(data)
    }

    /// Two-class soft targets from one value per image, the probability of the second class
    /// (a sigmoid unit's target): rows `[1 − t, t]`.
    pub fn binary_targets(targets: &[f32]) -> Array2<f32> {
        Array2::from_shape_fn((targets.len(), 2), |(i, c)| match c {
            0 => 1.0 - targets[i],
            _ => targets[i],
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The u8 pixels of image `i` (`H·W·C`).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.shape.len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Set how batches are normalised (`Normalisation::Rescale` is the tutorials' `/ 255`).
    pub fn normalise(mut self, normalisation: Normalisation) -> Self {
        self.normalisation = normalisation;
        self
    }

    /// Per-channel mean and standard deviation of `pixel / 255`, for `Normalisation::MeanStd`.
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let c = self.shape.channels;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for (i, &v) in self.images.iter().enumerate() {
            let x = v as f64 / 255.0;
            sum[i % c] += x;
            sq[i % c] += x * x;
        }
        let n = (self.images.len() / c).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| ((s / n - m * m).max(1e-12)).sqrt() as f32)
            .collect();
        (mean.into_iter().map(|m| m as f32).collect(), std)
    }

    /// Every image brought to `target`: resized with a triangle (bilinear) filter, as image
    /// folders' images are, where the size differs, then [`Dataset::to_channels`]. Labels,
    /// classes and normalisation are kept.
    pub fn fitted_to(&self, target: ImageShape) -> Result<Dataset> {
        use rayon::prelude::*;
        let ImageShape {
            height,
            width,
            channels,
        } = self.shape;
        if (height, width) == (target.height, target.width) {
            return self.to_channels(target.channels);
        }
        let (h, w) = (height as u32, width as u32);
        let (th, tw) = (target.height as u32, target.width as u32);
        let resize = |pixels: &[u8]| -> Option<Vec<u8>> {
            use image::imageops::{resize, FilterType::Triangle};
            Some(match channels {
                1 => resize(
                    &image::GrayImage::from_raw(w, h, pixels.to_vec())?,
                    tw,
                    th,
                    Triangle,
                )
                .into_raw(),
                3 => resize(
                    &image::RgbImage::from_raw(w, h, pixels.to_vec())?,
                    tw,
                    th,
                    Triangle,
                )
                .into_raw(),
                _ => return None,
            })
        };
        let images: Option<Vec<Vec<u8>>> = self
            .images
            .par_chunks(self.shape.len())
            .map(resize)
            .collect();
        let images = images.ok_or_else(|| {
            Error::config(
                "dataset",
                format!("images of {channels} channels cannot be resized; expected 1 or 3"),
            )
        })?;
        let resized = Dataset {
            images: images.concat(),
            shape: ImageShape::new(target.height, target.width, channels),
            labels: self.labels.clone(),
            classes: self.classes.clone(),
            soft_targets: self.soft_targets.clone(),
            normalisation: self.normalisation.clone(),
        };
        resized.to_channels(target.channels)
    }

    /// A seeded, class-balanced subset of `n` images (all of them if fewer), in dataset order:
    /// classes take turns, each giving a random image of its own until it runs out, so a
    /// class-sorted folder still yields every class. What the CLI's `--limit` does.
    pub fn sample(&self, n: usize, seed: u64) -> Self {
        if n >= self.len() {
            return self.clone();
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.num_classes()];
        for (i, &label) in self.labels.iter().enumerate() {
            by_class[label as usize].push(i);
        }
        for members in &mut by_class {
            members.shuffle(&mut rng);
        }
        let mut chosen = Vec::with_capacity(n);
        for round in 0.. {
            for members in &by_class {
                if chosen.len() < n && round < members.len() {
                    chosen.push(members[round]);
                }
            }
            if chosen.len() == n {
                break;
            }
        }
        chosen.sort_unstable();
        self.select(&chosen)
    }

    /// Hold out `fraction` of the images, chosen at random from `seed`, as validation data
    /// (Keras' `image_dataset_from_directory(validation_split=, seed=)`): returns
    /// `(train, validation)`, each in dataset order. [`Dataset::split`] takes the last part
    /// instead, as `fit(validation_split=)` does.
    pub fn holdout(&self, fraction: f32, seed: u64) -> Result<(Self, Self)> {
        let cut = holdout_cut(self.len(), fraction)?;
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let (train, val) = order.split_at_mut(cut);
        train.sort_unstable();
        val.sort_unstable();
        Ok((self.select(train), self.select(val)))
    }

    /// The first `n` images (all of them if fewer).
    pub fn limit(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.images.truncate(n * self.shape.len());
        self.labels.truncate(n);
        if let Some(rows) = &mut self.soft_targets {
            *rows = rows.slice(ndarray::s![..n, ..]).to_owned();
        }
        self
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let n = self.shape.len();
        let mut images = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            images,
            shape: self.shape,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            soft_targets: self
                .soft_targets
                .as_ref()
                .map(|rows| rows.select(ndarray::Axis(0), indices)),
            normalisation: self.normalisation.clone(),
        }
    }

    /// A seeded random permutation of the dataset.
    pub fn shuffled(&self, seed: u64) -> Self {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        self.select(&order)
    }

    /// Split off the last `fraction` as validation data, as Keras' `validation_split` does
    /// (no shuffling: shuffle first if the data is ordered).
    pub fn split(self, fraction: f32) -> Result<(Self, Self)> {
        let cut = holdout_cut(self.len(), fraction)?;
        let train: Vec<usize> = (0..cut).collect();
        let val: Vec<usize> = (cut..self.len()).collect();
        Ok((self.select(&train), self.select(&val)))
    }

    /// Convert to another number of channels (1 → 3 replicates grey; 3 → 1 uses ITU-R 601
    /// luma, as `image` does).
    pub fn to_channels(&self, channels: usize) -> Result<Self> {
        let from = self.shape.channels;
        if from == channels {
            return Ok(self.clone());
        }
        let pixels = self.images.chunks_exact(from);
        let images: Vec<u8> = match (from, channels) {
            (1, 3) => pixels.flat_map(|p| [p[0]; 3]).collect(),
            (3, 1) => pixels
                .map(|p| {
                    ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8
                })
                .collect(),
            _ => {
                return Err(Error::config(
                    "dataset",
                    format!("cannot convert {from}-channel images to {channels} channels"),
                ))
            }
        };
        let mut out = self.clone();
        out.images = images;
        out.shape.channels = channels;
        Ok(out)
    }

    /// Fill `out` (`[n, H, W, C]`, normalised f32) with the images at `indices`. For many
    /// batches, make a [`Batcher`] once instead: this builds the normalisation table each call.
    pub fn fill_batch(&self, indices: &[usize], out: ArrayViewMut4<'_, f32>) -> Result<()> {
        self.batcher()?.fill(indices, out)
    }

    /// Batches of this dataset, with the normalisation table built once.
    pub fn batcher(&self) -> Result<Batcher<'_>> {
        Ok(Batcher {
            data: self,
            table: self.normalisation.table(self.shape.channels)?,
        })
    }
}

/// Where a validation hold-out of `fraction` cuts `len` images: the training part is
/// `0..cut`. Errors when the fraction is outside (0, 1) or leaves either part empty.
pub(crate) fn holdout_cut(len: usize, fraction: f32) -> Result<usize> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::config(
            "validation split",
            format!("expected a fraction in (0, 1), found {fraction}"),
        ));
    }
    let n_val = ((len as f64) * fraction as f64).round() as usize;
    if n_val == 0 || n_val == len {
        return Err(Error::config(
            "validation split",
            format!("{fraction} of {len} images leaves an empty part"),
        ));
    }
    Ok(len - n_val)
}

/// Fills normalised f32 batches from a [`Dataset`], reusing the caller's buffer: no allocation
/// per batch or per image.
pub struct Batcher<'a> {
    data: &'a Dataset,
    /// `[channel][u8 value] -> f32`.
    table: Vec<[f32; 256]>,
}

impl Batcher<'_> {
    /// Fill `out` (`[n, H, W, C]`) with the images at `indices`.
    pub fn fill(&self, indices: &[usize], mut out: ArrayViewMut4<'_, f32>) -> Result<()> {
        let s = self.data.shape;
        if out.shape() != [indices.len(), s.height, s.width, s.channels] {
            return Err(Error::Shape {
                expected: format!(
                    "[{}, {}, {}, {}]",
                    indices.len(),
                    s.height,
                    s.width,
                    s.channels
                ),
                found: format!("{:?}", out.shape()),
            });
        }
        let dst = out
            .as_slice_mut()
            .expect("batch buffers are standard layout");
        for (chunk, &i) in dst.chunks_exact_mut(s.len()).zip(indices) {
            for (k, (d, &v)) in chunk.iter_mut().zip(self.data.image(i)).enumerate() {
                *d = self.table[k % s.channels][v as usize];
            }
        }
        Ok(())
    }
}

/// The labels of soft targets `[n, classes]`: each row's most likely class; an error when the
/// rows are not one value per class.
pub(crate) fn soft_labels(targets: &Array2<f32>, classes: usize) -> Result<Vec<u32>> {
    if targets.ncols() != classes {
        return Err(Error::Shape {
            expected: format!("soft targets of {classes} columns (one per class)"),
            found: format!("{} columns", targets.ncols()),
        });
    }
    Ok(targets.rows().into_iter().map(most_likely).collect())
}

/// The class a row of probabilities or targets gives most weight to (the first of equals):
/// for `[1 − t, t]`, the second exactly when `t` > 0.5, as Keras' `binary_accuracy` thresholds.
pub(crate) fn most_likely<'a>(row: impl IntoIterator<Item = &'a f32>) -> u32 {
    row.into_iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0 as u32
}

/// One-hot encode class indices: `[n, classes]`, 1.0 at each label.
pub fn one_hot(labels: &[u32], classes: usize) -> Result<Array2<f32>> {
    let mut out = Array2::zeros((labels.len(), classes));
    for (i, &l) in labels.iter().enumerate() {
        if l as usize >= classes {
            return Err(Error::config(
                "one_hot",
                format!("label {l} at index {i} is out of range for {classes} classes"),
            ));
        }
        out[[i, l as usize]] = 1.0;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let images = (0..4 * 2 * 2 * 3).map(|v| (v * 5) as u8).collect();
        Dataset::new(
            images,
            ImageShape::new(2, 2, 3),
            vec![0, 1, 2, 1],
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap()
    }

    #[test]
    fn batches_are_normalised_nhwc() {
        let ds = tiny().normalise(Normalisation::Rescale);
        let mut buf = ndarray::Array4::zeros((2, 2, 2, 3));
        ds.fill_batch(&[3, 0], buf.view_mut()).unwrap();
        assert_eq!(buf[[0, 0, 0, 0]], (36 * 5) as f32 / 255.0);
        assert_eq!(buf[[1, 1, 1, 2]], (11 * 5) as f32 / 255.0);
        let ds = tiny().normalise(Normalisation::MeanStd {
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        });
        ds.fill_batch(&[0, 0], buf.view_mut()).unwrap();
        assert!((buf[[0, 0, 0, 1]] - (5.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        let bad = tiny().normalise(Normalisation::MeanStd {
            mean: vec![0.5],
            std: vec![0.25],
        });
        assert!(bad
            .fill_batch(&[0, 0], buf.view_mut())
            .unwrap_err()
            .to_string()
            .contains("3 values"));
    }

    #[test]
    fn split_limit_one_hot() {
        let (train, val) = tiny().split(0.25).unwrap();
        assert_eq!((train.len(), val.len()), (3, 1));
        assert_eq!(val.labels, vec![1]);
        assert_eq!(tiny().limit(2).labels, vec![0, 1]);
        assert!(tiny().split(1.0).is_err());
        let oh = one_hot(&[2, 0], 3).unwrap();
        assert_eq!(oh, ndarray::arr2(&[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]));
        assert!(one_hot(&[3], 3)
            .unwrap_err()
            .to_string()
            .contains("label 3 at index 0"));
    }

    #[test]
    fn bad_construction_is_an_error() {
        let err = Dataset::new(
            vec![0; 4],
            ImageShape::new(2, 2, 1),
            vec![5],
            vec!["a".into()],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("label 5 of image 0 is out of range"),
            "{err}"
        );
        assert!(Dataset::new(
            vec![0; 3],
            ImageShape::new(2, 2, 1),
            vec![0],
            vec!["a".into()]
        )
        .is_err());
    }

    #[test]
    fn channel_conversion() {
        let grey = Dataset::new(
            vec![10, 20],
            ImageShape::new(1, 2, 1),
            vec![0],
            vec!["a".into()],
        )
        .unwrap();
        let rgb = grey.to_channels(3).unwrap();
        assert_eq!(rgb.images, vec![10, 10, 10, 20, 20, 20]);
        assert_eq!(rgb.to_channels(1).unwrap().images, vec![10, 20]);
    }
}
