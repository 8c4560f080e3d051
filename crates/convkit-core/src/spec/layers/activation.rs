//! Keras' `Activation` layer: an element-wise activation on its own, as after a
//! BatchNormalization (`Conv2D` → `BatchNormalization` → `Activation("relu")`).

use serde::{Deserialize, Serialize};

use super::rules::{unless_head, LayerRules, Shape};
use crate::op::{Activation, PlannedOp, Role};

/// `activation` applied to every value (`softmax` over the last axis: an image's channels, a
/// flat vector's features). Its spec form is `{"type": "Activation", "activation": "relu"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationLayer {
    pub activation: Activation,
}

impl ActivationLayer {
    pub fn new(activation: Activation) -> Self {
        ActivationLayer { activation }
    }
}

impl LayerRules for ActivationLayer {
    fn type_name(&self) -> &'static str {
        "Activation"
    }
    fn name_stem(&self) -> &'static str {
        "activation"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        Ok(input)
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// As a Conv2D's or Dense's own activation, not counted.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], head: bool) -> PlannedOp {
        PlannedOp::Activation(unless_head(self.activation, head))
    }
}
