//! Dense: a kernel and a bias over a flat vector.

use serde::{Deserialize, Serialize};

use super::rules::{unless_head, FeatureOrder, LayerRules, Regularizer, Shape, TorchPart};
use crate::op::{Activation, PlannedOp, Role};

/// Fully connected layer (`Dense`). Kernel stored canonically as `[units, in_features]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dense {
    pub units: usize,
    #[serde(default)]
    pub activation: Activation,
    /// Keras' `kernel_regularizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_regularizer: Option<Regularizer>,
}

impl Dense {
    pub fn new(units: usize) -> Self {
        Dense {
            units,
            activation: Activation::Linear,
            kernel_regularizer: None,
        }
    }
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
    /// Penalise the kernel: `Dense::new(64).kernel_regularizer(Regularizer::l1(1e-4))`.
    pub fn kernel_regularizer(mut self, regularizer: Regularizer) -> Self {
        self.kernel_regularizer = Some(regularizer);
        self
    }
}

impl LayerRules for Dense {
    fn type_name(&self) -> &'static str {
        "Dense"
    }
    fn name_stem(&self) -> &'static str {
        "dense"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if let Shape::Image { h, w, c } = input {
            return Err(format!(
                "Dense expects a flat input, found {h}×{w}×{c}; add a Flatten layer before it"
            ));
        }
        if self.units == 0 {
            return Err("Dense needs at least one unit".into());
        }
        Ok(Shape::Flat(self.units))
    }
    fn weights(&self, input: Shape) -> Vec<(Role, Vec<usize>)> {
        vec![
            (Role::Kernel, vec![self.units, input.numel()]),
            (Role::Bias, vec![self.units]),
        ]
    }
    fn flops(&self, input: Shape, _output: Shape) -> u64 {
        2 * (input.numel() * self.units) as u64
    }
    fn op(&self, _input: Shape, weights: &[usize], head: bool) -> PlannedOp {
        PlannedOp::Dense {
            kernel: weights[0],
            bias: weights[1],
            activation: unless_head(self.activation, head),
        }
    }
    fn classifier_activation(&self) -> Option<Activation> {
        Some(self.activation)
    }
    fn kernel_regularizer(&self) -> Option<Regularizer> {
        self.kernel_regularizer
    }
    /// The kernel's inputs are the features; after a Dense, they are its units.
    fn torch_parts(&self) -> &'static [TorchPart] {
        const PARTS: [TorchPart; 2] = [
            TorchPart::new("weight", "weight", true),
            TorchPart::new("bias", "bias", false),
        ];
        &PARTS
    }
    fn feature_order(&self) -> FeatureOrder {
        FeatureOrder::Mixes
    }
    fn normalised_by_default(&self) -> bool {
        true
    }
}
