//! What `model.compile(...)` takes in Keras: the optimizer, the loss and the metric
//! (accuracy), with Keras' defaults and checked hyper-parameters.

use serde::{Deserialize, Serialize};

use crate::spec::{Activation, Sequential, Shape};
use crate::{Error, Result};

/// An optimizer and its hyper-parameters. Defaults are Keras'; engines apply exactly these
/// values (never their own defaults) through the update rules in [`crate::optim`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Optimizer {
    /// `w ← w − lr·g`, or with momentum `v ← μ·v − lr·g; w ← w + v` (Nesterov:
    /// `w ← w + μ·v − lr·g`).
    Sgd {
        learning_rate: f64,
        momentum: f64,
        nesterov: bool,
    },
    /// Keras' Adam: `m ← m + (g−m)(1−β₁)`, `v ← v + (g²−v)(1−β₂)`,
    /// `w ← w − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)`.
    Adam {
        learning_rate: f64,
        beta_1: f64,
        beta_2: f64,
        epsilon: f64,
    },
    /// Keras' RMSprop: `s ← ρ·s + (1−ρ)·g²`, `Δ = lr·g / √(s + ε)` (centred: `s − ḡ²`),
    /// with optional momentum `μ·m + Δ`.
    Rmsprop {
        learning_rate: f64,
        rho: f64,
        momentum: f64,
        epsilon: f64,
        centered: bool,
    },
}

impl Optimizer {
    /// Every optimizer's name, as [`Optimizer::by_name`] takes them.
    pub const NAMES: [&'static str; 3] = ["sgd", "adam", "rmsprop"];

    /// SGD with Keras' defaults (lr 0.01, no momentum).
    pub fn sgd() -> Self {
        Optimizer::Sgd {
            learning_rate: 0.01,
            momentum: 0.0,
            nesterov: false,
        }
    }
    /// Adam with Keras' defaults (lr 1e-3, β 0.9 / 0.999, ε 1e-7).
    pub fn adam() -> Self {
        Optimizer::Adam {
            learning_rate: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
        }
    }
    /// RMSprop with Keras' defaults (lr 1e-3, ρ 0.9, ε 1e-7, no momentum, not centred).
    pub fn rmsprop() -> Self {
        Optimizer::Rmsprop {
            learning_rate: 1e-3,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: false,
        }
    }

    /// By Keras name: `sgd`, `adam` or `rmsprop`, with defaults.
    pub fn by_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sgd" => Ok(Self::sgd()),
            "adam" => Ok(Self::adam()),
            "rmsprop" => Ok(Self::rmsprop()),
            other => Err(Error::config(
                "optimizer",
                format!("expected sgd, adam or rmsprop, found `{other}`"),
            )),
        }
    }

    pub fn learning_rate(&self) -> f64 {
        match *self {
            Optimizer::Sgd { learning_rate, .. }
            | Optimizer::Adam { learning_rate, .. }
            | Optimizer::Rmsprop { learning_rate, .. } => learning_rate,
        }
    }

    pub fn with_learning_rate(mut self, lr: f64) -> Self {
        match &mut self {
            Optimizer::Sgd { learning_rate, .. }
            | Optimizer::Adam { learning_rate, .. }
            | Optimizer::Rmsprop { learning_rate, .. } => *learning_rate = lr,
        }
        self
    }

    /// SGD momentum (0 for the other optimizers is an error).
    pub fn with_momentum(mut self, value: f64) -> Result<Self> {
        match &mut self {
            Optimizer::Sgd { momentum, .. } | Optimizer::Rmsprop { momentum, .. } => {
                *momentum = value
            }
            Optimizer::Adam { .. } => {
                return Err(Error::config(
                    "optimizer",
                    "adam has no momentum parameter (use beta_1)",
                ))
            }
        }
        Ok(self)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Adam { .. } => "adam",
            Optimizer::Rmsprop { .. } => "rmsprop",
        }
    }

    /// Check every hyper-parameter's range.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config("optimizer", m));
        let unit = |name: &str, v: f64| -> Result<()> {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                bad(format!("{name} must be in [0, 1), found {v}"))
            }
        };
        // The engines compute in f32: 1e300 is finite as an f64 but infinite there, and 1e-50
        // is zero.
        let positive_f32 = |v: f64| (v as f32).is_finite() && (v as f32) > 0.0;
        let lr = self.learning_rate();
        if !positive_f32(lr) {
            return bad(format!(
                "learning_rate must be positive and finite in f32, found {lr}"
            ));
        }
        match *self {
            Optimizer::Sgd { momentum, .. } => unit("momentum", momentum),
            Optimizer::Adam {
                beta_1,
                beta_2,
                epsilon,
                ..
            } => {
                unit("beta_1", beta_1)?;
                unit("beta_2", beta_2)?;
                if positive_f32(epsilon) {
                    Ok(())
                } else {
                    bad(format!(
                        "epsilon must be positive and finite in f32, found {epsilon}"
                    ))
                }
            }
            Optimizer::Rmsprop {
                rho,
                momentum,
                epsilon,
                ..
            } => {
                unit("rho", rho)?;
                unit("momentum", momentum)?;
                if positive_f32(epsilon) {
                    Ok(())
                } else {
                    bad(format!(
                        "epsilon must be positive and finite in f32, found {epsilon}"
                    ))
                }
            }
        }
    }
}

/// Training loss. All are computed from the last layer's pre-activation (logits), stably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Integer class labels, softmax output.
    SparseCategoricalCrossentropy,
    /// One-hot (or soft) targets, softmax output.
    CategoricalCrossentropy,
    /// 0/1 targets, one sigmoid unit.
    BinaryCrossentropy,
}

impl Loss {
    /// Every loss's name, as [`Loss::by_name`] takes them.
    pub const NAMES: [&'static str; 3] = [
        "sparse_categorical_crossentropy",
        "categorical_crossentropy",
        "binary_crossentropy",
    ];

    /// The loss a model is trained with when none is named: binary cross-entropy for one
    /// output unit, sparse categorical cross-entropy (integer labels) otherwise.
    pub fn default_for(spec: &Sequential) -> Result<Self> {
        Ok(if spec.output_shape()?.numel() == 1 {
            Loss::BinaryCrossentropy
        } else {
            Loss::SparseCategoricalCrossentropy
        })
    }

    pub fn by_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "sparse_categorical_crossentropy" | "sparse" => Ok(Loss::SparseCategoricalCrossentropy),
            "categorical_crossentropy" | "categorical" => Ok(Loss::CategoricalCrossentropy),
            "binary_crossentropy" | "binary" => Ok(Loss::BinaryCrossentropy),
            other => Err(Error::config(
                "loss",
                format!("expected sparse_categorical_crossentropy, categorical_crossentropy or binary_crossentropy, found `{other}`"),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Loss::SparseCategoricalCrossentropy => "sparse_categorical_crossentropy",
            Loss::CategoricalCrossentropy => "categorical_crossentropy",
            Loss::BinaryCrossentropy => "binary_crossentropy",
        }
    }
}

/// How the network's last layer turns logits into probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Softmax over the classes.
    Softmax,
    /// One sigmoid unit.
    Sigmoid,
}

/// Optimizer + loss (+ accuracy, always reported), as `model.compile(...)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compile {
    pub optimizer: Optimizer,
    pub loss: Loss,
}

impl Compile {
    pub fn new(optimizer: Optimizer, loss: Loss) -> Self {
        Compile { optimizer, loss }
    }

    /// Check the hyper-parameters and that the loss fits the model's last layer; returns the
    /// head engines must apply to the logits. A model that ends in a `linear` activation is
    /// treated as producing logits (Keras' `from_logits=True`).
    pub fn check(&self, spec: &Sequential) -> Result<Head> {
        self.optimizer.check()?;
        let output = spec.output_shape()?;
        self.head_for(spec, output)
    }

    /// The head of `spec` under this loss, for a spec whose shapes are checked and whose
    /// last layer gives `output`. The model must end in a layer that can end a classifier (a
    /// Dense, or an activation layer as in Keras' `Dense(10)` → `Activation("softmax")`) on a
    /// flat vector of class scores.
    pub(crate) fn head_for(&self, spec: &Sequential, output: Shape) -> Result<Head> {
        let last = spec.layers.len() - 1;
        let kind = &spec.layers[last].kind;
        let layer_err = |message: String| Error::Layer {
            index: last,
            name: spec.layer_names()[last].clone(),
            message,
        };
        let loss = self.loss.name();
        let Some(activation) = kind.classifier_activation() else {
            return Err(layer_err(format!(
                "{loss} needs a model that ends in a Dense or an activation layer, found {}",
                kind.type_name()
            )));
        };
        let Shape::Flat(units) = output else {
            return Err(layer_err(format!(
                "{loss} needs a flat vector of class scores at the end, found {output}; add a Flatten (or global pooling) and a Dense"
            )));
        };
        match (self.loss, activation) {
            (Loss::BinaryCrossentropy, Activation::Sigmoid | Activation::Linear) if units == 1 => Ok(Head::Sigmoid),
            (Loss::BinaryCrossentropy, _) => Err(layer_err(format!(
                "binary_crossentropy needs one unit with sigmoid (or linear) activation, found {units} unit(s) with {activation:?}"
            ))),
            (_, Activation::Softmax | Activation::Linear) if units >= 2 => Ok(Head::Softmax),
            (_, _) => Err(layer_err(format!(
                "{loss} needs at least 2 units with softmax (or linear) activation, found {units} unit(s) with {activation:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Dense;

    #[test]
    fn defaults_are_keras() {
        assert_eq!(
            Optimizer::adam(),
            Optimizer::Adam {
                learning_rate: 1e-3,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-7
            }
        );
        assert_eq!(Optimizer::by_name("RMSprop").unwrap().learning_rate(), 1e-3);
        assert_eq!(Optimizer::sgd().learning_rate(), 1e-2);
    }

    #[test]
    fn bad_hyper_parameters_are_rejected() {
        let err = Optimizer::adam()
            .with_learning_rate(-1.0)
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning_rate must be positive"), "{err}");
        // Finite as f64, but infinite or zero in the engines' f32.
        for lr in [1e300, 1e-50, f64::NAN] {
            let err = Optimizer::sgd()
                .with_learning_rate(lr)
                .check()
                .unwrap_err()
                .to_string();
            assert!(err.contains("finite in f32"), "{lr}: {err}");
        }
        let err = Optimizer::sgd()
            .with_momentum(1.5)
            .unwrap()
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("momentum must be in [0, 1), found 1.5"),
            "{err}"
        );
        assert!(Optimizer::by_name("adagrad").is_err());
    }

    #[test]
    fn loss_must_fit_the_head() {
        let spec = Sequential::preset("tutorial-mnist").unwrap();
        assert_eq!(
            Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy)
                .check(&spec)
                .unwrap(),
            Head::Softmax
        );
        let err = Compile::new(Optimizer::adam(), Loss::BinaryCrossentropy)
            .check(&spec)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer 6 (dense_1)"), "{err}");
        let spec = Sequential::new(4, 4, 1)
            .flatten()
            .add(Dense::new(1).activation(Activation::Sigmoid));
        assert_eq!(
            Compile::new(Optimizer::sgd(), Loss::BinaryCrossentropy)
                .check(&spec)
                .unwrap(),
            Head::Sigmoid
        );
    }
}
