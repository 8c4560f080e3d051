//! Flatten.

use super::rules::{FeatureOrder, LayerRules, Shape};
use crate::op::{PlannedOp, Role};

/// Flatten, in Keras' `(H, W, C)` order.
pub(super) struct Flattening;

impl LayerRules for Flattening {
    fn type_name(&self) -> &'static str {
        "Flatten"
    }
    fn name_stem(&self) -> &'static str {
        "flatten"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        Ok(Shape::Flat(input.numel()))
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Flatten
    }
    fn feature_order(&self) -> FeatureOrder {
        FeatureOrder::Flattens
    }
    fn flattens(&self) -> bool {
        true
    }
}
