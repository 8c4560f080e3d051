//! The object-safe seam the CLI, the registry and the training loop use: a [`Backend`] builds
//! a [`Network`] by name. Engines get it by implementing [`crate::exec::Engine`] (their
//! [`crate::primitives::Ops`]): every network is core's executor, so what a network does is written
//! once; everything else (data, loop, metrics, plots, files) is core's too.

use ndarray::{Array2, ArrayView4};

use crate::optim::OptimizerState;
use crate::plan::Compiled;
use crate::weights::Weights;
use crate::Result;

/// Runs `f`, turning a panic into its message, with the panic hook silenced meanwhile. GPU
/// runtimes (cudarc, cubecl, wgpu) report a device or a driver library that is not there by
/// panicking; an engine's constructor calls its first device operations through this so that
/// the user gets an error instead. A runtime that starts its device on a thread of its own
/// panics there first, and `f` only with what follows (a closed channel): the message is the
/// first panic's, from whichever thread, while `f` ran.
pub fn without_panics<T>(
    f: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> std::result::Result<T, String> {
    let first = std::sync::Arc::new(std::sync::OnceLock::new());
    let record = std::sync::Arc::clone(&first);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = record.set(panic_text(info.payload()));
    }));
    let outcome = std::panic::catch_unwind(f);
    std::panic::set_hook(quiet);
    outcome.map_err(|panic| {
        let first = first.get().cloned();
        first.unwrap_or_else(|| panic_text(&*panic))
    })
}

/// A panic's message, when it has one.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown cause".into())
}

/// Training targets for one batch; which variant follows from the loss.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices `[n]` (sparse categorical cross-entropy).
    Sparse(Vec<u32>),
    /// Target rows `[n, classes]`, values in [0, 1] (categorical cross-entropy; one-hot for
    /// hard labels, any soft targets otherwise, as Keras takes them).
    Dense(Array2<f32>),
    /// Targets `[n]` in [0, 1] (binary cross-entropy; 0/1 for hard labels).
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
    /// `model` with `weights` (canonical layout) on this engine, ready to train.
    fn build(&self, model: &Compiled, weights: &Weights) -> Result<Box<dyn Network>>;
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
    /// Train data-parallel with the other ranks of `group` from the next step on: each step's
    /// gradients, batch-normalisation moving statistics, loss and accuracy are summed over the
    /// ranks, weighted by each rank's batch, before the update (see
    /// [`crate::Model::distribute`]). A rank's batch may then be empty.
    fn set_collective(&mut self, group: std::rc::Rc<dyn crate::collective::Collective>);
    /// Freeze (`false`) or unfreeze a layer by index; frozen weights are not updated.
    fn set_trainable(&mut self, layer: usize, trainable: bool) -> Result<()>;
    /// Change the learning rate used from the next step on (schedules, ReduceLROnPlateau).
    fn set_learning_rate(&mut self, learning_rate: f64);
    /// Draw dropout masks from `seed`'s stream, `position` words in (see
    /// [`crate::optim::Training::dropout_masks`]); `fit` seeds it, so a seeded run drops the same units on
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

#[cfg(test)]
mod panic_tests {
    use super::without_panics;

    #[test]
    fn a_panic_becomes_its_message_and_the_first_panic_names_the_cause() {
        assert_eq!(without_panics(|| 7), Ok(7));
        assert_eq!(
            without_panics(|| panic!("no device {}", 0)),
            Err::<(), _>("no device 0".to_string())
        );
        // As GPU runtimes fail: the device thread panics, the caller then finds its channel closed.
        let outcome = without_panics(|| {
            let (send, receive) = std::sync::mpsc::channel::<u32>();
            std::thread::spawn(move || {
                let _send = send;
                panic!("Unable to dynamically load the \"cuda\" shared library");
            });
            receive.recv().unwrap()
        });
        assert_eq!(
            outcome,
            Err("Unable to dynamically load the \"cuda\" shared library".to_string())
        );
    }
}
