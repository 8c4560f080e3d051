//! Keras' `Activation` layer: an element-wise activation on its own, as after a
//! BatchNormalization (`Conv2D` → `BatchNormalization` → `Activation("relu")`).

use serde::{Deserialize, Serialize};

use super::rules::{unless_head, LayerRules, Shape};
use crate::op::{Activation, PlannedOp, Role};

/// `activation` applied to every value (`softmax` over the last axis: an image's channels, a
/// flat vector's features). Its spec form is `{"type": "Activation", "activation": "relu"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    fn classifier_activation(&self) -> Option<Activation> {
        Some(self.activation)
    }
}

/// Keras' `ReLU` layer, `max(x, 0)`: its defaults only (`max_value=None`,
/// `negative_slope=0`, `threshold=0`); other settings are an error, not ignored. Spec form
/// `{"type": "ReLU"}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReLU {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value: Option<f32>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub negative_slope: f32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub threshold: f32,
}

impl ReLU {
    pub fn new() -> Self {
        ReLU::default()
    }
}

impl LayerRules for ReLU {
    fn type_name(&self) -> &'static str {
        "ReLU"
    }
    fn name_stem(&self) -> &'static str {
        "re_lu"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if self.max_value.is_some() || self.negative_slope != 0.0 || self.threshold != 0.0 {
            return Err(format!(
                "ReLU supports max(x, 0) only (no max_value, negative_slope 0, threshold 0), found {self:?}"
            ));
        }
        Ok(input)
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Activation(Activation::Relu)
    }
    fn classifier_activation(&self) -> Option<Activation> {
        Some(Activation::Relu)
    }
}

/// Keras' `Softmax` layer over the last axis (`axis=-1`, its default): an image's channels, a
/// flat vector's features. As a model's last layer it is the head, so the loss and `predict`
/// apply it, as after a `Dense(10)` with logits. Spec form `{"type": "Softmax"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Softmax {
    /// `-1` only: the last axis of Keras' channels-last shapes.
    #[serde(default = "last_axis")]
    pub axis: i64,
}

impl Default for Softmax {
    fn default() -> Self {
        Softmax { axis: last_axis() }
    }
}

impl Softmax {
    pub fn new() -> Self {
        Softmax::default()
    }
}

impl LayerRules for Softmax {
    fn type_name(&self) -> &'static str {
        "Softmax"
    }
    fn name_stem(&self) -> &'static str {
        "softmax"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if self.axis != -1 {
            return Err(format!(
                "Softmax runs over the last axis only (axis -1), found axis {}",
                self.axis
            ));
        }
        Ok(input)
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], head: bool) -> PlannedOp {
        PlannedOp::Activation(unless_head(Activation::Softmax, head))
    }
    fn classifier_activation(&self) -> Option<Activation> {
        Some(Activation::Softmax)
    }
}

fn last_axis() -> i64 {
    -1
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}
