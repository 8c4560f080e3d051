//! The checked plan of a [`Sequential`]: what the executor runs and the ONNX export writes.
//! Every weight is described once ([`WeightSpec`]: name, layer, role, canonical shape), and
//! every step names its weights by index into that list, so nothing downstream matches on
//! weight-name strings.

use crate::spec::{Activation, Sequential, Shape};
use crate::Result;

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

/// One weight tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpec {
    /// `{layer name}.{role suffix}`, the key in [`crate::Weights`] and checkpoints.
    pub name: String,
    /// Index of the layer it belongs to.
    pub layer: usize,
    pub role: Role,
    /// Canonical shape: conv kernel `[out, in, kh, kw]`, dense kernel `[out, in]`, the rest
    /// `[channels]` or `[out]`.
    pub shape: Vec<usize>,
}

impl WeightSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

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
/// [`Plan::weights`]. Images are NCHW on the device.
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
    /// Active in training only.
    Dropout { rate: f32 },
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

/// The checked plan of a model: its weights and one operation per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Every weight, in layer order (kernel then bias; γ, β, moving mean, moving variance).
    pub weights: Vec<WeightSpec>,
    /// One operation per layer of the spec, in order.
    pub ops: Vec<PlannedOp>,
    /// Each layer's output shape.
    pub shapes: Vec<Shape>,
}

impl Plan {
    /// The plan of `spec`, after checking that every layer fits its input: each layer's
    /// weights and operation, as the layer's rules declare them.
    pub fn new(spec: &Sequential) -> Result<Plan> {
        let shapes = spec.output_shapes()?;
        let names = spec.layer_names();
        let last = spec.layers.len() - 1;
        let mut input = spec.input();
        let mut weights = Vec::new();
        let mut ops = Vec::with_capacity(spec.layers.len());
        for (i, layer) in spec.layers.iter().enumerate() {
            let rules = layer.kind.rules();
            let ids: Vec<usize> = (rules.weights(input).into_iter())
                .map(|(role, shape)| {
                    weights.push(WeightSpec {
                        name: format!("{}.{}", names[i], role.suffix()),
                        layer: i,
                        role,
                        shape,
                    });
                    weights.len() - 1
                })
                .collect();
            ops.push(rules.op(input, &ids, i == last));
            input = shapes[i];
        }
        Ok(Plan {
            weights,
            ops,
            shapes,
        })
    }

    /// The number of values of each layer's weights.
    pub fn param_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.ops.len()];
        for w in &self.weights {
            counts[w.layer] += w.numel();
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Conv2D, Dense, Padding};

    #[test]
    fn plan_resolves_padding_weights_and_leaves_the_head_to_the_loss() {
        let spec = Sequential::new(6, 5, 1)
            .add(
                Conv2D::new(2, 3)
                    .padding(Padding::Same)
                    .strides(2, 2)
                    .activation(Activation::Relu),
            )
            .flatten()
            .add(Dense::new(3).activation(Activation::Softmax));
        let plan = Plan::new(&spec).unwrap();
        assert_eq!(
            plan.ops[0],
            PlannedOp::Conv2D {
                kernel: 0,
                bias: 1,
                pad: [0, 1, 1, 1],
                strides: [2, 2],
                activation: Activation::Relu
            }
        );
        assert_eq!(plan.ops[1], PlannedOp::Flatten);
        assert_eq!(
            plan.ops[2],
            PlannedOp::Dense {
                kernel: 2,
                bias: 3,
                activation: Activation::Linear
            }
        );
        let names: Vec<_> = plan.weights.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            ["conv2d.weight", "conv2d.bias", "dense.weight", "dense.bias"]
        );
        assert_eq!(plan.weights[2].shape, vec![3, 2 * 3 * 3]);
        assert_eq!(plan.weights[2].role, Role::Kernel);
        assert_eq!(plan.param_counts(), spec.param_counts().unwrap());
    }

    #[test]
    fn every_preset_declares_the_weights_its_parameter_counts_promise() {
        for name in crate::spec::PRESETS {
            let spec = Sequential::preset(name).unwrap().with_batch_normalization();
            let plan = Plan::new(&spec).unwrap();
            assert_eq!(plan.param_counts(), spec.param_counts().unwrap(), "{name}");
        }
    }
}
