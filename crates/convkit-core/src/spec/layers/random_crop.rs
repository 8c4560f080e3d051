//! RandomCrop, the augmentation layer that runs on the host batch.

use serde::{Deserialize, Serialize};

use super::rules::{image, LayerRules, Shape};
use crate::op::{PlannedOp, Role};

/// Keras' `RandomCrop(height, width)`: in training, a `height×width` window at a random place
/// in each image (drawn by core, so every engine crops the same windows); at inference, the
/// centre window. (Keras resizes the image before its centre crop at inference, keeping the
/// largest window of the target's aspect ratio; convkit crops without resizing.) It must be
/// the model's first layer: convkit crops on the host, before the batch reaches the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomCrop {
    pub height: usize,
    pub width: usize,
}

impl RandomCrop {
    pub fn new(height: usize, width: usize) -> Self {
        RandomCrop { height, width }
    }
}

impl LayerRules for RandomCrop {
    fn type_name(&self) -> &'static str {
        "RandomCrop"
    }
    fn name_stem(&self) -> &'static str {
        "random_crop"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let (h, w, c) = image("RandomCrop", input)?;
        if self.height == 0 || self.width == 0 || self.height > h || self.width > w {
            return Err(format!(
                "RandomCrop takes a window of 1×1 up to the input's {h}×{w}, found {}×{}",
                self.height, self.width
            ));
        }
        Ok(Shape::Image {
            h: self.height,
            w: self.width,
            c,
        })
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// A copy, no arithmetic.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn first_only(&self) -> bool {
        true
    }
    fn op(&self, input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        let [h, w] = match input {
            Shape::Image { h, w, .. } => [h, w],
            Shape::Flat(n) => [n, 1],
        };
        PlannedOp::Crop {
            from: [h, w],
            size: [self.height, self.width],
        }
    }
}
