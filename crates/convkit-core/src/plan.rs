//! The checked plan of a [`Sequential`]: what the executor runs and the ONNX export writes.
//! Every weight is described once ([`WeightSpec`]: name, layer, role, canonical shape), and
//! every step names its weights by index into that list, so nothing downstream matches on
//! weight-name strings.

use crate::compile::{Compile, Head};
pub use crate::op::{PlannedOp, PoolKind, Role, BATCH_NORM_ROLES};
use crate::spec::{Sequential, Shape};
use crate::Result;

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

/// A model checked once, linfa style: the spec, its compile settings, the head they give and
/// the plan. Made only by [`Compiled::new`]; what builds or trains a model (initialisation,
/// the weights check, [`crate::Backend::build`], the executor, the optimizer's bookkeeping)
/// takes it, so none of them checks or plans the spec again.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    spec: Sequential,
    compile: Compile,
    head: Head,
    plan: Plan,
}

impl Compiled {
    /// Check the compile settings, the spec's shapes and the loss against the last layer, and
    /// plan the spec.
    pub fn new(spec: Sequential, compile: Compile) -> Result<Self> {
        compile.optimizer.check()?;
        let plan = Plan::new(&spec)?;
        let head = compile.head_for(
            &spec,
            *plan.shapes.last().expect("a checked spec has layers"),
        )?;
        Ok(Compiled {
            spec,
            compile,
            head,
            plan,
        })
    }

    pub fn spec(&self) -> &Sequential {
        &self.spec
    }

    pub fn compile(&self) -> &Compile {
        &self.compile
    }

    /// How the logits become probabilities.
    pub fn head(&self) -> Head {
        self.head
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The spec and compile settings back.
    pub fn into_parts(self) -> (Sequential, Compile, Head) {
        (self.spec, self.compile, self.head)
    }
}

impl Sequential {
    /// The checked plan the executor runs: weights with their roles, one operation per layer.
    pub fn plan(&self) -> Result<Plan> {
        Plan::new(self)
    }
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
    use crate::spec::{Activation, Conv2D, Dense, Padding};

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
