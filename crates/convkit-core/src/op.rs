//! The operations a model is planned into, and their vocabulary: activations, pooling kinds and
//! weight roles. Shared by the spec (each layer's rules plan its operation), the plan, the
//! executor and the exporters; it depends on none of them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Element-wise activation applied after a Conv2D or Dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Linear,
    Relu,
    Sigmoid,
    Softmax,
    Tanh,
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).map_err(|_| {
            Error::config(
                "activation",
                format!("expected relu, sigmoid, softmax, tanh or linear, found `{s}`"),
            )
        })
    }
}

/// What a weight is for: it decides initialisation, training, regularisation and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A Conv2D kernel `[out, in, kh, kw]` or a Dense kernel `[out, in]`.
    Kernel,
    /// A Conv2D or Dense bias `[out]`.
    Bias,
    /// Batch normalisation scale `[channels]`.
    Gamma,
    /// Batch normalisation offset `[channels]`.
    Beta,
    /// Batch normalisation moving mean `[channels]`, updated by training steps, not the optimizer.
    MovingMean,
    /// Batch normalisation moving variance `[channels]`, as the moving mean.
    MovingVariance,
}

impl Role {
    /// The part of the weight's name after `{layer}.` (`conv2d.weight`, `dense.bias`, ...).
    pub fn suffix(self) -> &'static str {
        match self {
            Role::Kernel => "weight",
            Role::Bias => "bias",
            Role::Gamma => "gamma",
            Role::Beta => "beta",
            Role::MovingMean => "moving_mean",
            Role::MovingVariance => "moving_variance",
        }
    }

    /// Stepped by the optimizer (the moving statistics are not).
    pub fn is_optimized(self) -> bool {
        match self {
            Role::Kernel | Role::Bias | Role::Gamma | Role::Beta => true,
            Role::MovingMean | Role::MovingVariance => false,
        }
    }

    /// Penalised by its layer's kernel regulariser.
    pub fn is_regularised(self) -> bool {
        match self {
            Role::Kernel => true,
            Role::Bias | Role::Gamma | Role::Beta | Role::MovingMean | Role::MovingVariance => {
                false
            }
        }
    }
}

/// The batch normalisation roles, in the order their weights are listed.
pub const BATCH_NORM_ROLES: [Role; 4] = [
    Role::Gamma,
    Role::Beta,
    Role::MovingMean,
    Role::MovingVariance,
];

/// Max or average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// The window's maximum; the gradient goes to the first maximum of each window, as
    /// Keras' MaxPooling2D (TensorFlow) and PyTorch do.
    Max,
    /// The window's mean.
    Average,
}

/// One layer's operation, resolved from the spec: padding amounts, strides and weights are
/// computed, and the head's softmax/sigmoid is left out, because the executor produces logits
/// and applies the head in the loss and in `predict`. Weights are indices into
/// [`Plan::weights`](crate::plan::Plan::weights). Images are NCHW on the device.
#[derive(Debug, Clone, PartialEq)]
pub enum PlannedOp {
    Conv2D {
        kernel: usize,
        bias: usize,
        /// `[top, bottom, left, right]` zero padding.
        pad: [usize; 4],
        strides: [usize; 2],
        activation: Activation,
    },
    Pool2D {
        kind: PoolKind,
        size: [usize; 2],
        strides: [usize; 2],
    },
    /// One window over the whole `size = [H, W]` image, then `[n, channels]`.
    GlobalPool2D { kind: PoolKind, size: [usize; 2] },
    /// To `(H, W, C)` order, as Keras flattens.
    Flatten,
    Dense {
        kernel: usize,
        bias: usize,
        activation: Activation,
    },
    /// An element-wise activation on its own; softmax over axis 1.
    Activation(Activation),
    /// Active in training only.
    Dropout { rate: f32 },
    /// A `size = [h, w]` window of a `from = [H, W]` image: random in training, the centre at
    /// inference. Only as the first operation: core crops the host batch before the engine
    /// sees it, so engines never run it.
    Crop { from: [usize; 2], size: [usize; 2] },
    /// Normalises the channel axis (axis 1 of NCHW, or of `[n, features]`), see
    /// [`crate::BatchNormalization`].
    BatchNorm {
        gamma: usize,
        beta: usize,
        moving_mean: usize,
        moving_variance: usize,
        momentum: f64,
        epsilon: f64,
    },
}

impl PlannedOp {
    /// The weight indices of the moving mean and variance a training step updates, for a
    /// batch normalisation.
    pub fn moving_statistics(&self) -> Option<[usize; 2]> {
        match *self {
            PlannedOp::BatchNorm {
                moving_mean,
                moving_variance,
                ..
            } => Some([moving_mean, moving_variance]),
            PlannedOp::Conv2D { .. }
            | PlannedOp::Pool2D { .. }
            | PlannedOp::GlobalPool2D { .. }
            | PlannedOp::Flatten
            | PlannedOp::Dense { .. }
            | PlannedOp::Activation(_)
            | PlannedOp::Dropout { .. }
            | PlannedOp::Crop { .. } => None,
        }
    }

    /// The image's `[H, W]` and the window's `[h, w]` of a crop, whose windows core draws.
    pub fn crop(&self) -> Option<([usize; 2], [usize; 2])> {
        match *self {
            PlannedOp::Crop { from, size } => Some((from, size)),
            PlannedOp::Conv2D { .. }
            | PlannedOp::Pool2D { .. }
            | PlannedOp::GlobalPool2D { .. }
            | PlannedOp::Flatten
            | PlannedOp::Dense { .. }
            | PlannedOp::Activation(_)
            | PlannedOp::Dropout { .. }
            | PlannedOp::BatchNorm { .. } => None,
        }
    }

    /// The rate of a dropout, whose mask core draws.
    pub fn dropout_rate(&self) -> Option<f32> {
        match *self {
            PlannedOp::Dropout { rate } => Some(rate),
            PlannedOp::Conv2D { .. }
            | PlannedOp::Pool2D { .. }
            | PlannedOp::GlobalPool2D { .. }
            | PlannedOp::Flatten
            | PlannedOp::Dense { .. }
            | PlannedOp::Activation(_)
            | PlannedOp::BatchNorm { .. }
            | PlannedOp::Crop { .. } => None,
        }
    }
}
