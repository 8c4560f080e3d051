//! BatchNormalization over the last axis.

use serde::{Deserialize, Serialize};

use super::rules::{channels, LayerRules, Shape, TorchPart};
use crate::op::{PlannedOp, Role, BATCH_NORM_ROLES};

/// Keras' `BatchNormalization` over the last axis (channels of an image, features of a flat
/// vector): `γ·(x − μ)/√(σ² + ε) + β`. In training, μ and σ² are the batch's (σ² biased) and
/// the moving statistics become `moving·momentum + batch·(1 − momentum)`; at inference, and
/// whenever the layer is frozen (Keras' rule), the moving statistics are used. Its weights are
/// `gamma` and `beta` (trained) and `moving_mean` and `moving_variance` (never trained), each
/// `[channels]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchNormalization {
    #[serde(default = "default_bn_momentum")]
    pub momentum: f32,
    #[serde(default = "default_bn_epsilon")]
    pub epsilon: f32,
}

fn default_bn_momentum() -> f32 {
    0.99
}
fn default_bn_epsilon() -> f32 {
    1e-3
}

impl Default for BatchNormalization {
    fn default() -> Self {
        BatchNormalization::new()
    }
}

impl BatchNormalization {
    /// Keras' defaults: momentum 0.99, epsilon 0.001.
    pub fn new() -> Self {
        BatchNormalization {
            momentum: default_bn_momentum(),
            epsilon: default_bn_epsilon(),
        }
    }
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }
    pub fn epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }
}

impl LayerRules for BatchNormalization {
    fn type_name(&self) -> &'static str {
        "BatchNormalization"
    }
    fn name_stem(&self) -> &'static str {
        "batch_normalization"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(format!(
                "BatchNormalization momentum must be in [0, 1], found {}",
                self.momentum
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(format!(
                "BatchNormalization epsilon must be positive and finite, found {}",
                self.epsilon
            ));
        }
        Ok(input)
    }
    fn weights(&self, input: Shape) -> Vec<(Role, Vec<usize>)> {
        BATCH_NORM_ROLES
            .iter()
            .map(|&role| (role, vec![channels(input)]))
            .collect()
    }
    /// One multiply-add per value at inference.
    fn flops(&self, _input: Shape, output: Shape) -> u64 {
        2 * output.numel() as u64
    }
    fn op(&self, _input: Shape, weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::BatchNorm {
            gamma: weights[0],
            beta: weights[1],
            moving_mean: weights[2],
            moving_variance: weights[3],
            momentum: self.momentum as f64,
            epsilon: self.epsilon as f64,
        }
    }
    /// Every vector runs over the features (of a flat input) or channels.
    fn torch_parts(&self) -> &'static [TorchPart] {
        const PARTS: [TorchPart; 4] = [
            TorchPart::new("weight", "gamma", true),
            TorchPart::new("bias", "beta", true),
            TorchPart::new("running_mean", "moving_mean", true),
            TorchPart::new("running_var", "moving_variance", true),
        ];
        &PARTS
    }
}
