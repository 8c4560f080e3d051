//! The seam between core and the engines. An engine does only what needs tensors: build a
//! network from a spec and weights, one training step, a forward pass, weights out and in,
//! and per-layer freezing. Everything else (data, loop, metrics, plots, files) is core's.

use ndarray::{Array2, ArrayView4};

use crate::compile::Compile;
use crate::optim::{OptimizerState, Slots, TensorMath, Training};
use crate::spec::Sequential;
use crate::weights::Weights;
use crate::Result;

/// Training targets for one batch; which variant follows from the loss.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices `[n]` (sparse categorical cross-entropy).
    Sparse(Vec<u32>),
    /// Probability rows `[n, classes]` (categorical cross-entropy; one-hot for hard labels).
    Dense(Array2<f32>),
    /// 0/1 targets `[n]` (binary cross-entropy).
    Binary(Vec<f32>),
}

impl Targets {
    pub fn len(&self) -> usize {
        match self {
            Targets::Sparse(v) => v.len(),
            Targets::Dense(a) => a.nrows(),
            Targets::Binary(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the batch (before the update).
    pub loss: f32,
    /// Correctly classified samples in the batch (before the update).
    pub correct: usize,
}

/// An engine: builds networks on one device. Object safe, so the CLI can pick one by name.
pub trait Backend: Send + Sync {
    /// The CLI name, e.g. `candle-cpu`.
    fn name(&self) -> &str;
    /// Human-readable device description.
    fn device(&self) -> String;
    /// Why a comparison leaves this engine out unless it is asked for by name (or with
    /// `--backends all`): a device that only emulates one in software, or a backend that takes
    /// far longer than the others here. `None` for an engine that belongs in every comparison.
    fn left_out_by_default(&self) -> Option<String> {
        None
    }
    /// Build `spec` with `weights` (canonical layout), ready to train with `compile`.
    fn build(
        &self,
        spec: &Sequential,
        compile: &Compile,
        weights: &Weights,
    ) -> Result<Box<dyn Network>>;
}

/// A built network on an engine's device.
pub trait Network {
    /// One optimizer step on a batch `x` (`[n, H, W, C]`, normalised). Dropout is active;
    /// trainable batch normalisations use the batch's statistics and update their moving ones.
    fn train_step(&mut self, x: ArrayView4<'_, f32>, y: &Targets) -> Result<StepStats>;
    /// Probabilities `[n, classes]` (`[n, 1]` for a sigmoid head) in inference mode.
    fn predict(&self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>>;
    /// Current weights, canonical layout.
    fn weights(&self) -> Result<Weights>;
    /// Replace the weights (canonical layout); optimizer state is kept.
    fn set_weights(&mut self, weights: &Weights) -> Result<()>;
    /// Freeze (`false`) or unfreeze a layer by index; frozen weights are not updated.
    fn set_trainable(&mut self, layer: usize, trainable: bool) -> Result<()>;
    /// Change the learning rate used from the next step on (schedules, ReduceLROnPlateau).
    fn set_learning_rate(&mut self, learning_rate: f64);
    /// Draw dropout masks from `seed`'s stream, `position` words in (see
    /// [`Training::dropout_masks`]); `fit` seeds it, so a seeded run drops the same units on
    /// every engine.
    fn set_dropout_stream(&mut self, seed: u64, position: u128);
    /// How far the dropout stream has come, for a backup.
    fn dropout_position(&mut self) -> u128;
    /// The optimizer's step count and slots, copied to the host (for a resumable backup).
    fn optimizer_state(&mut self) -> Result<OptimizerState>;
    /// Continue from `state` (from [`Network::optimizer_state`] on any engine): the step count
    /// and every slot are replaced; a slot of the wrong size is an error naming it.
    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// What an engine writes for its network, in its own error type. Core turns every
/// `EngineNetwork` into a [`Network`]: errors become [`crate::Error::Engine`] naming the engine,
/// and freezing and learning-rate changes go to the network's [`Training`].
pub trait EngineNetwork {
    type Error: std::fmt::Display;
    /// The engine's CLI name, e.g. `burn-flex`, for error messages.
    fn engine(&self) -> &str;
    /// The engine's device tensor, as core's optimizer rules see it.
    type Param: TensorMath;
    /// The optimizer bookkeeping the network steps with.
    fn training_mut(&mut self) -> &mut Training;
    /// Every variable the optimizer steps, by name, with its optimizer slots.
    fn slots(&self) -> Vec<(&str, &Slots<Self::Param>)>;
    /// The same slots, mutable, in the same order.
    fn slots_mut(&mut self) -> Vec<&mut Slots<Self::Param>>;
    /// A tensor laid out as `variable` is on the device, copied to the host in the canonical
    /// layout (as [`EngineNetwork::weights`] gives it).
    fn param_to_host(
        &self,
        variable: &str,
        param: &Self::Param,
    ) -> std::result::Result<crate::weights::Tensor, Self::Error>;
    /// A canonical host tensor of `variable`'s shape on the device, laid out as the variable
    /// is; a tensor of another shape is an error.
    fn param_from_host(
        &self,
        variable: &str,
        tensor: &crate::weights::Tensor,
    ) -> std::result::Result<Self::Param, Self::Error>;
    /// See [`Network::train_step`]; core has checked that `y` has one target per image.
    fn train_step(
        &mut self,
        x: ArrayView4<'_, f32>,
        y: &Targets,
    ) -> std::result::Result<StepStats, Self::Error>;
    /// See [`Network::predict`].
    fn predict(&self, x: ArrayView4<'_, f32>) -> std::result::Result<Array2<f32>, Self::Error>;
    /// See [`Network::weights`].
    fn weights(&self) -> std::result::Result<Weights, Self::Error>;
    /// See [`Network::set_weights`].
    fn set_weights(&mut self, weights: &Weights) -> std::result::Result<(), Self::Error>;
}

impl<N: EngineNetwork> Network for N {
    fn train_step(&mut self, x: ArrayView4<'_, f32>, y: &Targets) -> Result<StepStats> {
        if x.dim().0 != y.len() {
            return Err(crate::Error::Shape {
                expected: format!("one target per image ({} images)", x.dim().0),
                found: format!("{} targets", y.len()),
            });
        }
        EngineNetwork::train_step(self, x, y).map_err(|e| crate::Error::engine(self.engine(), e))
    }
    fn predict(&self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        EngineNetwork::predict(self, x).map_err(|e| crate::Error::engine(self.engine(), e))
    }
    fn weights(&self) -> Result<Weights> {
        EngineNetwork::weights(self).map_err(|e| crate::Error::engine(self.engine(), e))
    }
    fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        EngineNetwork::set_weights(self, weights)
            .map_err(|e| crate::Error::engine(self.engine(), e))
    }
    fn set_trainable(&mut self, layer: usize, trainable: bool) -> Result<()> {
        self.training_mut().set_trainable(layer, trainable)
    }
    fn set_learning_rate(&mut self, learning_rate: f64) {
        self.training_mut().set_learning_rate(learning_rate);
    }
    fn set_dropout_stream(&mut self, seed: u64, position: u128) {
        self.training_mut().set_dropout_stream(seed, position);
    }
    fn dropout_position(&mut self) -> u128 {
        self.training_mut().dropout_position()
    }
    fn optimizer_state(&mut self) -> Result<OptimizerState> {
        let mut slots = std::collections::BTreeMap::new();
        for (variable, variable_slots) in self.slots() {
            for (slot, param) in variable_slots.named() {
                if let Some(param) = param {
                    let tensor = self
                        .param_to_host(variable, param)
                        .map_err(|e| crate::Error::engine(self.engine(), e))?;
                    slots.insert(format!("{variable}/{slot}"), tensor);
                }
            }
        }
        let step = self.training_mut().step_count();
        Ok(OptimizerState { step, slots })
    }
    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        let mut restored = Vec::new();
        let mut known = std::collections::BTreeSet::new();
        for (variable, _) in self.slots() {
            let mut load = |slot: &str| -> Result<Option<N::Param>> {
                let key = format!("{variable}/{slot}");
                let param = match state.slots.get(&key) {
                    Some(t) => Some(self.param_from_host(variable, t).map_err(|e| {
                        crate::Error::Weights {
                            tensor: format!("optimizer/{key}"),
                            message: e.to_string(),
                        }
                    })?),
                    None => None,
                };
                known.insert(key);
                Ok(param)
            };
            restored.push(Slots {
                m: load("m")?,
                v: load("v")?,
                mg: load("mg")?,
            });
        }
        if let Some(unknown) = state.slots.keys().find(|k| !known.contains(*k)) {
            return Err(crate::Error::Weights {
                tensor: format!("optimizer/{unknown}"),
                message: "this model has no such optimizer slot (its trainable variables have m, v or mg)".into(),
            });
        }
        for (slots, new) in self.slots_mut().into_iter().zip(restored) {
            *slots = new;
        }
        self.training_mut().set_step_count(state.step);
        Ok(())
    }
}
