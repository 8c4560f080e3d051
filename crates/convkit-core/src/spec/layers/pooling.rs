//! MaxPooling2D and AveragePooling2D over windows; their global forms over the whole image.

use serde::{Deserialize, Serialize};

use super::rules::{image, window, LayerRules, Shape};
use crate::op::{PlannedOp, PoolKind, Role};

/// 2-D pooling window (`MaxPooling2D` / `AveragePooling2D`), valid padding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool2D {
    pub pool_size: [usize; 2],
    /// Defaults to `pool_size`, as in Keras.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strides: Option<[usize; 2]>,
}

impl Pool2D {
    pub fn new(size: usize) -> Self {
        Pool2D {
            pool_size: [size, size],
            strides: None,
        }
    }
    pub fn strides(&self) -> [usize; 2] {
        self.strides.unwrap_or(self.pool_size)
    }
}

/// MaxPooling2D and AveragePooling2D: one [`Pool2D`] window, two reductions.
pub(super) struct Pooling {
    pub(super) kind: PoolKind,
    pub(super) pool: Pool2D,
}

impl LayerRules for Pooling {
    fn type_name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "MaxPooling2D",
            PoolKind::Average => "AveragePooling2D",
        }
    }
    fn name_stem(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "max_pooling2d",
            PoolKind::Average => "average_pooling2d",
        }
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let what = self.type_name();
        let (h, w, c) = image(what, input)?;
        let [kh, kw] = self.pool.pool_size;
        let [sh, sw] = self.pool.strides();
        Ok(Shape::Image {
            h: window(what, h, kh, sh, "height")?,
            w: window(what, w, kw, sw, "width")?,
            c,
        })
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// Comparisons and additions, no multiply-accumulates.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Pool2D {
            kind: self.kind,
            size: self.pool.pool_size,
            strides: self.pool.strides(),
        }
    }
}

/// GlobalMaxPooling2D and GlobalAveragePooling2D: each channel reduced over the whole image.
pub(super) struct GlobalPooling(pub(super) PoolKind);

impl LayerRules for GlobalPooling {
    fn type_name(&self) -> &'static str {
        match self.0 {
            PoolKind::Max => "GlobalMaxPooling2D",
            PoolKind::Average => "GlobalAveragePooling2D",
        }
    }
    fn name_stem(&self) -> &'static str {
        match self.0 {
            PoolKind::Max => "global_max_pooling2d",
            PoolKind::Average => "global_average_pooling2d",
        }
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let (_, _, c) = image(self.type_name(), input)?;
        Ok(Shape::Flat(c))
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// Comparisons and additions, no multiply-accumulates.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        let size = match input {
            Shape::Image { h, w, .. } => [h, w],
            Shape::Flat(n) => [1, n],
        };
        PlannedOp::GlobalPool2D { kind: self.0, size }
    }
    fn flattens(&self) -> bool {
        true
    }
}
