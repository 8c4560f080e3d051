//! Dropout.

use serde::{Deserialize, Serialize};

use super::rules::{LayerRules, Shape};
use crate::op::{PlannedOp, Role};

/// Randomly zeroes a fraction `rate` of its inputs during training (inverted dropout);
/// the identity at inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dropout {
    pub rate: f32,
}

impl Dropout {
    pub fn new(rate: f32) -> Self {
        Dropout { rate }
    }
}

impl LayerRules for Dropout {
    fn type_name(&self) -> &'static str {
        "Dropout"
    }
    fn name_stem(&self) -> &'static str {
        "dropout"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(format!(
                "Dropout rate must be in [0, 1), found {}",
                self.rate
            ));
        }
        Ok(input)
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// The identity at inference.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Dropout { rate: self.rate }
    }
}
