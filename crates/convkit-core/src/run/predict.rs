//! [`PredictRequest`]: class probabilities for image files.

use std::path::PathBuf;

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::data::{self, Dataset, ImageShape};
use crate::spec::SizeLimits;
use crate::train::Model;
use crate::Result;

/// `convkit predict`: image files classified with saved weights.
#[derive(Debug, Clone)]
pub struct PredictRequest {
    /// A checkpoint file, or a run folder holding `model.safetensors`.
    pub weights: PathBuf,
    pub size_limits: SizeLimits,
    /// Image files (png, jpg), resized to the model's input.
    pub images: Vec<PathBuf>,
}

/// One image's classes, as [`PredictRequest::run`] gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePrediction {
    pub path: PathBuf,
    /// Every class with its probability, in the model's class order (a binary model's one
    /// sigmoid unit gives both classes: `1 − p` and `p`).
    pub scores: Vec<(String, f32)>,
}

impl ImagePrediction {
    /// The most probable class and its probability (the first of equals).
    pub fn top(&self) -> (&str, f32) {
        let mut best = (self.scores[0].0.as_str(), self.scores[0].1);
        for (name, p) in &self.scores[1..] {
            if *p > best.1 {
                best = (name, *p);
            }
        }
        best
    }
}

/// `PATH: TOP (P)`, then every class's probability on its own line.
impl std::fmt::Display for ImagePrediction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (top, p) = self.top();
        write!(f, "{}: {top} ({p:.4})", self.path.display())?;
        for (name, p) in &self.scores {
            write!(f, "\n    {name:<16} {p:.4}")?;
        }
        Ok(())
    }
}

impl PredictRequest {
    pub fn new(weights: impl Into<PathBuf>, images: Vec<PathBuf>) -> Self {
        PredictRequest {
            weights: weights.into(),
            size_limits: SizeLimits::default(),
            images,
        }
    }

    pub fn run(&self, backend: &dyn Backend) -> Result<Vec<ImagePrediction>> {
        let checkpoint = Checkpoint::load_within(&self.weights, &self.size_limits)?;
        let model = Model::from_checkpoint(&checkpoint, backend)?;
        let [h, w, c] = checkpoint.spec.input_shape;
        let shape = ImageShape::new(h, w, c);
        let mut pixels = Vec::with_capacity(self.images.len() * shape.len());
        for path in &self.images {
            pixels.extend(data::load_image(path, shape)?);
        }
        let classes = if checkpoint.meta.classes.is_empty() {
            (0..checkpoint.spec.class_count()?)
                .map(|c| c.to_string())
                .collect()
        } else {
            checkpoint.meta.classes.clone()
        };
        let images = Dataset::new(pixels, shape, vec![0; self.images.len()], classes.clone())?
            .normalise(checkpoint.meta.normalisation.clone());
        let probabilities = model.predict(&images, 64)?;
        let predictions = self.images.iter().zip(probabilities.rows());
        Ok(predictions
            .map(|(path, row)| ImagePrediction {
                path: path.clone(),
                scores: match row.len() {
                    1 => vec![
                        (classes[0].clone(), 1.0 - row[0]),
                        (classes[1].clone(), row[0]),
                    ],
                    _ => classes.iter().cloned().zip(row.iter().copied()).collect(),
                },
            })
            .collect())
    }
}
