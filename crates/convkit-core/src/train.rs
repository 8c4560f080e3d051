//! The one training loop every engine runs: `Model::fit` (seeded shuffle, batching,
//! validation, progress, callbacks, History), `evaluate` and `predict`, as in Keras.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{s, Array2, Array4};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::backend::{Backend, Network, Targets};
use crate::backup::{self, CallbackState, ExactF64};
use crate::compile::{Compile, Head, Loss};
use crate::data::Dataset;
use crate::metrics::ConfusionMatrix;
use crate::spec::Sequential;
use crate::weights::{Checkpoint, CheckpointMeta, Weights};
use crate::{Error, Result};

/// A compiled model on one engine: spec + compile settings + the engine's network.
pub struct Model {
    spec: Sequential,
    compile: Compile,
    head: Head,
    network: Box<dyn Network>,
    backend: String,
    learning_rate: f64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec.name)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Model {
    /// Build `spec` on `backend` with Keras' default initialisation from `seed`.
    pub fn new(
        spec: Sequential,
        compile: Compile,
        backend: &dyn Backend,
        seed: u64,
    ) -> Result<Self> {
        compile.check(&spec)?;
        let weights = crate::init::glorot_uniform(&spec, seed)?;
        Self::with_weights(spec, compile, backend, &weights)
    }

    /// Build `spec` on `backend` with the given weights (checked against the spec).
    pub fn with_weights(
        spec: Sequential,
        compile: Compile,
        backend: &dyn Backend,
        weights: &Weights,
    ) -> Result<Self> {
        let head = compile.check(&spec)?;
        weights.check(&spec)?;
        let mut network = backend.build(&spec, &compile, weights)?;
        for (i, layer) in spec.layers.iter().enumerate() {
            if !layer.trainable {
                network.set_trainable(i, false)?;
            }
        }
        Ok(Model {
            learning_rate: compile.optimizer.learning_rate(),
            spec,
            compile,
            head,
            network,
            backend: backend.name().to_string(),
        })
    }

    /// Rebuild a saved model on `backend`.
    pub fn from_checkpoint(checkpoint: &Checkpoint, backend: &dyn Backend) -> Result<Self> {
        Self::with_weights(
            checkpoint.spec.clone(),
            checkpoint.compile.clone(),
            backend,
            &checkpoint.weights,
        )
    }

    pub fn spec(&self) -> &Sequential {
        &self.spec
    }
    pub fn compile_settings(&self) -> &Compile {
        &self.compile
    }
    pub fn head(&self) -> Head {
        self.head
    }
    pub fn backend_name(&self) -> &str {
        &self.backend
    }
    /// The engine's network, for direct access (conformance tests, benchmarks).
    pub fn network_mut(&mut self) -> &mut dyn Network {
        self.network.as_mut()
    }
    /// The engine's network, read-only (direct predictions on raw batches).
    pub fn network(&self) -> &dyn Network {
        self.network.as_ref()
    }
    pub fn learning_rate(&self) -> f64 {
        self.learning_rate
    }
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
        self.network.set_learning_rate(learning_rate);
    }

    pub fn weights(&self) -> Result<Weights> {
        self.network.weights()
    }

    pub fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        weights.check(&self.spec)?;
        self.network.set_weights(weights)
    }

    /// Freeze or unfreeze layer `index`; recorded in the spec, so it survives save/load.
    pub fn set_trainable(&mut self, index: usize, trainable: bool) -> Result<()> {
        let n = self.spec.layers.len();
        let layer = self.spec.layers.get_mut(index).ok_or_else(|| {
            Error::config(
                "layer index",
                format!(
                    "the model has {n} layers (0..{}), found {index}",
                    n.saturating_sub(1)
                ),
            )
        })?;
        layer.trainable = trainable;
        self.network.set_trainable(index, trainable)
    }

    /// Keras-style summary.
    pub fn summary(&self) -> Result<String> {
        self.spec.summary()
    }

    /// A checkpoint of the current state.
    pub fn checkpoint(&self, meta: CheckpointMeta) -> Result<Checkpoint> {
        Ok(Checkpoint {
            spec: self.spec.clone(),
            compile: self.compile.clone(),
            weights: self.weights()?,
            meta,
        })
    }

    /// Start configuring a `fit` on `train`; finish with [`Fit::run`].
    pub fn fit<'a>(&'a mut self, train: &'a Dataset) -> Fit<'a> {
        Fit {
            model: self,
            train,
            validation: None,
            validation_split: None,
            epochs: 1,
            batch_size: 32,
            shuffle: true,
            seed: 0,
            verbosity: Verbosity::Auto,
            augment: crate::augment::Augment::default(),
            callbacks: Vec::new(),
            backup: None,
        }
    }

    fn check_data(&self, ds: &Dataset) -> Result<()> {
        let [h, w, c] = self.spec.input_shape;
        let s = ds.shape;
        if (s.height, s.width, s.channels) != (h, w, c) {
            return Err(Error::Shape {
                expected: format!("images of {h}×{w}×{c} (model `{}` input)", self.spec.name),
                found: format!("{s} images"),
            });
        }
        let outputs = self.spec.output_shape()?.numel();
        let ok = match self.head {
            Head::Softmax => outputs == ds.num_classes(),
            Head::Sigmoid => ds.num_classes() == 2,
        };
        if !ok {
            return Err(Error::Shape {
                expected: match self.head {
                    Head::Softmax => {
                        format!("a dataset with {outputs} classes (the model's output units)")
                    }
                    Head::Sigmoid => "a dataset with 2 classes (one sigmoid unit)".into(),
                },
                found: format!("{} classes", ds.num_classes()),
            });
        }
        Ok(())
    }

    /// Probabilities `[n, classes]` (`[n, 1]` for a sigmoid head), in batches of `batch_size`.
    pub fn predict(&self, ds: &Dataset, batch_size: usize) -> Result<Array2<f32>> {
        let [h, w, c] = self.spec.input_shape;
        if (ds.shape.height, ds.shape.width, ds.shape.channels) != (h, w, c) {
            self.check_data(ds)?;
        }
        let indices: Vec<usize> = (0..ds.len()).collect();
        self.predict_indices(ds, &indices, batch_size)
    }

    /// Probabilities `[n, classes]` for a batch of already normalised images `[n, H, W, C]`
    /// (Keras' `predict` on an array), in one engine call.
    pub fn predict_batch(&self, x: ndarray::ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let [h, w, c] = self.spec.input_shape;
        let (_, xh, xw, xc) = x.dim();
        if (xh, xw, xc) != (h, w, c) {
            return Err(Error::Shape {
                expected: format!("images of {h}×{w}×{c} (the model's input)"),
                found: format!("a batch of {xh}×{xw}×{xc} images"),
            });
        }
        self.network.predict(x)
    }

    fn predict_indices(
        &self,
        ds: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<Array2<f32>> {
        check_batch_size(batch_size)?;
        let [h, w, c] = self.spec.input_shape;
        let outputs = self.spec.output_shape()?.numel();
        let mut out = Array2::zeros((indices.len(), outputs));
        let mut buffer = Array4::zeros((batch_size.min(indices.len().max(1)), h, w, c));
        let batcher = ds.batcher()?;
        for (b, chunk) in indices.chunks(batch_size).enumerate() {
            let mut x = buffer.slice_mut(s![..chunk.len(), .., .., ..]);
            batcher.fill(chunk, x.view_mut())?;
            let p = self.network.predict(x.view())?;
            if p.dim() != (chunk.len(), outputs) {
                return Err(Error::engine(
                    &self.backend,
                    format!(
                        "predict returned {:?}, expected ({}, {outputs})",
                        p.dim(),
                        chunk.len()
                    ),
                ));
            }
            out.slice_mut(s![b * batch_size..b * batch_size + chunk.len(), ..])
                .assign(&p);
        }
        Ok(out)
    }

    /// Loss and accuracy on `ds` (one forward pass), keeping the probabilities.
    pub fn evaluate(&self, ds: &Dataset, batch_size: usize) -> Result<Evaluation> {
        self.check_data(ds)?;
        let indices: Vec<usize> = (0..ds.len()).collect();
        self.evaluate_indices(ds, &indices, batch_size)
    }

    fn evaluate_indices(
        &self,
        ds: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<Evaluation> {
        let probabilities = self.predict_indices(ds, indices, batch_size)?;
        let labels: Vec<u32> = indices.iter().map(|&i| ds.labels[i]).collect();
        let mut evaluation = Evaluation::new(
            self.compile.loss,
            self.head,
            probabilities,
            labels,
            ds.classes.clone(),
        )?;
        // Keras' evaluate reports the loss with the kernel regularisers' penalty added.
        if (0..self.spec.layers.len()).any(|i| self.spec.kernel_regularizer(i).is_some()) {
            evaluation.loss += self.spec.kernel_penalty(&self.weights()?)?;
        }
        Ok(evaluation)
    }
}

fn check_batch_size(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::config("batch size", "must be at least 1, found 0"));
    }
    Ok(())
}

/// Class predicted from one row of probabilities.
pub fn predicted_class(head: Head, probabilities: &[f32]) -> u32 {
    match head {
        Head::Sigmoid => u32::from(probabilities[0] > 0.5),
        Head::Softmax => {
            probabilities
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &p)| {
                    if p > best.1 {
                        (i, p)
                    } else {
                        best
                    }
                })
                .0 as u32
        }
    }
}

/// Keras clips probabilities to `[ε, 1−ε]` with ε = 1e-7 before taking logs.
const PROB_EPSILON: f64 = 1e-7;

/// Loss and accuracy of a model on a dataset, with its probabilities and predictions.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// `[n, outputs]`.
    pub probabilities: Array2<f32>,
    pub predicted: Vec<u32>,
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
}

impl Evaluation {
    /// Score `probabilities` against `labels` with `loss` (cross-entropy of clipped probabilities).
    pub fn new(
        loss: Loss,
        head: Head,
        probabilities: Array2<f32>,
        labels: Vec<u32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        if probabilities.nrows() != labels.len() {
            return Err(Error::Shape {
                expected: format!("{} rows of probabilities", labels.len()),
                found: format!("{}", probabilities.nrows()),
            });
        }
        let clip = |p: f32| (p as f64).clamp(PROB_EPSILON, 1.0 - PROB_EPSILON);
        let mut total = 0.0;
        let mut correct = 0usize;
        let mut predicted = Vec::with_capacity(labels.len());
        for (row, &label) in probabilities.rows().into_iter().zip(&labels) {
            let row = row.as_slice().expect("standard layout");
            total += match (loss, head) {
                (Loss::BinaryCrossentropy, _) | (_, Head::Sigmoid) => {
                    let p = clip(row[0]);
                    if label == 1 {
                        -p.ln()
                    } else {
                        -(1.0 - p).ln()
                    }
                }
                _ => -clip(row[label as usize]).ln(),
            };
            let class = predicted_class(head, row);
            correct += usize::from(class == label);
            predicted.push(class);
        }
        let n = labels.len().max(1) as f64;
        Ok(Evaluation {
            loss: total / n,
            accuracy: correct as f64 / n,
            probabilities,
            predicted,
            labels,
            classes,
        })
    }

    pub fn confusion_matrix(&self) -> Result<ConfusionMatrix> {
        ConfusionMatrix::new(&self.labels, &self.predicted, self.classes.clone())
    }
}

/// How `fit` reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Nothing.
    Silent,
    /// Plain lines on stdout, as Keras prints them: one every [`PROGRESS_LINE_EVERY`] within
    /// an epoch and one at its end (what a log file or a notebook wants).
    Lines,
    /// A live progress bar per epoch on stderr, then the epoch's line.
    Bar,
    /// `Bar` on a terminal, `Lines` otherwise.
    Auto,
}

/// How often [`Verbosity::Lines`] reports within an epoch.
pub const PROGRESS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Verbosity {
    /// Print one progress line where this verbosity sends them.
    fn line(self, text: std::fmt::Arguments<'_>) {
        match self {
            Verbosity::Lines => println!("{text}"),
            Verbosity::Bar | Verbosity::Auto => eprintln!("{text}"),
            Verbosity::Silent => {}
        }
    }
}

/// Keras' per-epoch logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochLog {
    /// 1-based.
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// Wall-clock seconds of the epoch's training (validation excluded).
    pub seconds: f64,
    pub learning_rate: f64,
}

impl std::fmt::Display for EpochLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}s - loss: {:.4} - accuracy: {:.4}",
            self.seconds, self.loss, self.accuracy
        )?;
        if let (Some(l), Some(a)) = (self.val_loss, self.val_accuracy) {
            write!(f, " - val_loss: {l:.4} - val_accuracy: {a:.4}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for History {
    /// One line per epoch, as Keras prints them: `Epoch 1: 3.2s - loss: … - val_accuracy: …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, log) in self.epochs.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "Epoch {}: {log}", log.epoch)?;
        }
        Ok(())
    }
}

/// What `fit` returns: one [`EpochLog`] per epoch run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct History {
    pub epochs: Vec<EpochLog>,
}

impl History {
    /// A made-up history of `epochs` epochs with falling losses, for tests of what reads one.
    #[cfg(test)]
    pub(crate) fn for_tests(epochs: usize) -> Self {
        History {
            epochs: (1..=epochs)
                .map(|epoch| EpochLog {
                    epoch,
                    loss: 1.0 / epoch as f64,
                    accuracy: 0.5 + 0.1 * epoch as f64,
                    val_loss: Some(1.1 / epoch as f64),
                    val_accuracy: Some(0.5),
                    seconds: 1.0,
                    learning_rate: 1e-3,
                })
                .collect(),
        }
    }

    /// Columns epoch, loss, accuracy, val_loss, val_accuracy, seconds, learning_rate.
    pub fn to_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let e = &self.epochs;
        let col = |name: &str, v: Vec<f64>| Column::new(name.into(), v);
        let opt = |name: &str, v: Vec<Option<f64>>| Column::new(name.into(), v);
        DataFrame::new_infer_height(vec![
            Column::new(
                "epoch".into(),
                e.iter().map(|l| l.epoch as u32).collect::<Vec<_>>(),
            ),
            col("loss", e.iter().map(|l| l.loss).collect()),
            col("accuracy", e.iter().map(|l| l.accuracy).collect()),
            opt("val_loss", e.iter().map(|l| l.val_loss).collect()),
            opt("val_accuracy", e.iter().map(|l| l.val_accuracy).collect()),
            col("seconds", e.iter().map(|l| l.seconds).collect()),
            col("learning_rate", e.iter().map(|l| l.learning_rate).collect()),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }

    /// Write the history as CSV, atomically.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        crate::table::write_csv(&mut self.to_dataframe()?, path)
    }
}

/// What a callback tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Hooks into `fit`, as Keras callbacks.
pub trait Callback {
    fn on_train_begin(&mut self, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// Called before each epoch (1-based), e.g. to set its learning rate.
    fn on_epoch_begin(&mut self, _epoch: usize, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// Called after each training batch with its stats (Keras' `on_train_batch_end`).
    fn on_batch_end(&mut self, _batch: usize, _stats: &crate::backend::StepStats) -> Result<()> {
        Ok(())
    }
    /// Called after each epoch's validation; `history` includes this epoch.
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control>;
    fn on_train_end(&mut self, _history: &History, _model: &mut Model) -> Result<()> {
        Ok(())
    }
    /// What this callback must remember across an interrupted run ([`Fit::backup`]).
    fn backup(&self) -> Result<CallbackState> {
        Ok(CallbackState::default())
    }
    /// Continue from a [`Callback::backup`] (called after `on_train_begin`).
    fn restore(&mut self, _state: CallbackState) -> Result<()> {
        Ok(())
    }
}

/// A field of a callback's backup JSON; a missing or mistyped one is an error naming it.
fn backup_field<T: serde::de::DeserializeOwned>(
    state: &CallbackState,
    callback: &str,
    field: &str,
) -> Result<T> {
    serde_json::from_value(state.json.get(field).cloned().unwrap_or_default())
        .map_err(|e| Error::config("fit backup", format!("{callback}'s `{field}`: {e}")))
}

/// A quantity a callback watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Monitor {
    Loss,
    Accuracy,
    ValLoss,
    ValAccuracy,
}

impl Monitor {
    fn value(&self, log: &EpochLog) -> Result<f64> {
        match self {
            Monitor::Loss => Some(log.loss),
            Monitor::Accuracy => Some(log.accuracy),
            Monitor::ValLoss => log.val_loss,
            Monitor::ValAccuracy => log.val_accuracy,
        }
        .ok_or_else(|| {
            Error::config(
                "callback",
                format!(
                    "it monitors {}, but fit has no validation data",
                    self.name()
                ),
            )
        })
    }
    fn name(&self) -> &'static str {
        match self {
            Monitor::Loss => "loss",
            Monitor::Accuracy => "accuracy",
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
        }
    }
    /// Whether `value` beats `best` by more than `min_delta`.
    fn improves(&self, value: f64, best: Option<f64>, min_delta: f64) -> bool {
        match (best, self) {
            (None, _) => true,
            (Some(b), Monitor::Loss | Monitor::ValLoss) => value < b - min_delta,
            (Some(b), _) => value > b + min_delta,
        }
    }
}

impl std::str::FromStr for Monitor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "loss" => Ok(Monitor::Loss),
            "accuracy" => Ok(Monitor::Accuracy),
            "val_loss" => Ok(Monitor::ValLoss),
            "val_accuracy" => Ok(Monitor::ValAccuracy),
            o => Err(Error::config(
                "monitor",
                format!("expected loss, accuracy, val_loss or val_accuracy, found `{o}`"),
            )),
        }
    }
}

/// Stop when the monitored quantity has not improved for `patience` epochs; optionally
/// restore the best epoch's weights.
#[derive(Debug)]
pub struct EarlyStopping {
    pub monitor: Monitor,
    pub patience: usize,
    pub min_delta: f64,
    pub restore_best_weights: bool,
    /// Print Keras' lines when training stops early and when the best weights are restored.
    pub verbose: bool,
    best: Option<f64>,
    /// The best epoch (1-based) and, with `restore_best_weights`, its weights.
    best_weights: Option<(usize, Weights)>,
    wait: usize,
    /// The epoch (1-based) training stopped at, if it stopped early.
    pub stopped_epoch: Option<usize>,
}

impl EarlyStopping {
    pub fn new(monitor: Monitor, patience: usize) -> Self {
        EarlyStopping {
            monitor,
            patience,
            min_delta: 0.0,
            restore_best_weights: false,
            verbose: false,
            best: None,
            best_weights: None,
            wait: 0,
            stopped_epoch: None,
        }
    }
    pub fn min_delta(mut self, d: f64) -> Self {
        self.min_delta = d;
        self
    }
    pub fn restore_best_weights(mut self, yes: bool) -> Self {
        self.restore_best_weights = yes;
        self
    }
    pub fn verbose(mut self, yes: bool) -> Self {
        self.verbose = yes;
        self
    }
}

impl Callback for EarlyStopping {
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control> {
        let log = history.epochs.last().expect("called after an epoch");
        let value = self.monitor.value(log)?;
        if self.monitor.improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.wait = 0;
            if self.restore_best_weights {
                self.best_weights = Some((log.epoch, model.weights()?));
            }
            return Ok(Control::Continue);
        }
        // Keras stops once `patience` epochs in a row have not improved.
        self.wait += 1;
        if self.wait >= self.patience {
            self.stopped_epoch = Some(log.epoch);
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        Ok(CallbackState {
            json: serde_json::json!({
                "best": self.best.map(ExactF64),
                "wait": self.wait,
                "stopped_epoch": self.stopped_epoch,
                "best_epoch": self.best_weights.as_ref().map(|(epoch, _)| *epoch),
            }),
            tensors: self
                .best_weights
                .as_ref()
                .map(|(_, w)| w.clone())
                .unwrap_or_default(),
        })
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.best = backup_field::<Option<ExactF64>>(&state, "EarlyStopping", "best")?.map(|b| b.0);
        self.wait = backup_field(&state, "EarlyStopping", "wait")?;
        self.stopped_epoch = backup_field(&state, "EarlyStopping", "stopped_epoch")?;
        let best_epoch: Option<usize> = backup_field(&state, "EarlyStopping", "best_epoch")?;
        self.best_weights = best_epoch.map(|epoch| (epoch, state.tensors));
        Ok(())
    }

    fn on_train_end(&mut self, _history: &History, model: &mut Model) -> Result<()> {
        if let (Some(epoch), true) = (self.stopped_epoch, self.verbose) {
            println!("Epoch {epoch}: early stopping");
        }
        if let Some((epoch, w)) = self.best_weights.take() {
            if self.verbose {
                println!("Restoring model weights from the end of the best epoch: {epoch}.");
            }
            model.set_weights(&w)?;
        }
        Ok(())
    }
}

/// Save a checkpoint after each epoch (or only when the monitored quantity improves).
#[derive(Debug)]
pub struct ModelCheckpoint {
    pub path: PathBuf,
    pub monitor: Monitor,
    pub save_best_only: bool,
    pub meta: CheckpointMeta,
    best: Option<f64>,
}

impl ModelCheckpoint {
    pub fn new(path: impl Into<PathBuf>, meta: CheckpointMeta) -> Self {
        ModelCheckpoint {
            path: path.into(),
            monitor: Monitor::ValLoss,
            save_best_only: false,
            meta,
            best: None,
        }
    }
    pub fn save_best_only(mut self, monitor: Monitor) -> Self {
        self.save_best_only = true;
        self.monitor = monitor;
        self
    }
}

impl Callback for ModelCheckpoint {
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control> {
        let log = history.epochs.last().expect("called after an epoch");
        if self.save_best_only {
            let value = self.monitor.value(log)?;
            if !self.monitor.improves(value, self.best, 0.0) {
                return Ok(Control::Continue);
            }
            self.best = Some(value);
        }
        model.checkpoint(self.meta.clone())?.save(&self.path)?;
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        Ok(CallbackState {
            json: serde_json::json!({ "best": self.best.map(ExactF64) }),
            tensors: Weights::default(),
        })
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.best =
            backup_field::<Option<ExactF64>>(&state, "ModelCheckpoint", "best")?.map(|b| b.0);
        Ok(())
    }
}

/// Write the history so far to a CSV file after every epoch (Keras' `CSVLogger`).
#[derive(Debug)]
pub struct CsvLogger {
    pub path: PathBuf,
}

impl CsvLogger {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CsvLogger { path: path.into() }
    }
}

impl Callback for CsvLogger {
    fn on_epoch_end(&mut self, history: &History, _model: &mut Model) -> Result<Control> {
        history.write_csv(&self.path)?;
        Ok(Control::Continue)
    }
}

/// The order `fit` visits training images in, epoch after epoch: the indices it was given,
/// shuffled every epoch from a ChaCha8 stream seeded with the fit's seed (Keras'
/// `shuffle=True`), or as given. Every engine, and compare's PyTorch row, get the same order.
pub struct BatchOrder {
    order: Vec<usize>,
    rng: rand_chacha::ChaCha8Rng,
    shuffle: bool,
}

impl BatchOrder {
    pub fn new(indices: Vec<usize>, seed: u64, shuffle: bool) -> Self {
        BatchOrder {
            order: indices,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            shuffle,
        }
    }

    /// The next epoch's order.
    pub fn next_epoch(&mut self) -> &[usize] {
        if self.shuffle {
            self.order.shuffle(&mut self.rng);
        }
        &self.order
    }
}

/// `model.fit(...)` settings; see [`Model::fit`].
pub struct Fit<'a> {
    model: &'a mut Model,
    train: &'a Dataset,
    validation: Option<&'a Dataset>,
    validation_split: Option<f32>,
    epochs: usize,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    verbosity: Verbosity,
    augment: crate::augment::Augment,
    callbacks: Vec<Box<dyn Callback + 'a>>,
    backup: Option<PathBuf>,
}

impl<'a> Fit<'a> {
    /// Keras' `BackupAndRestore`: after every epoch, write everything needed to continue to
    /// `path` (a checkpoint with the optimizer's state, the History, the callbacks' state and
    /// the random streams' positions), atomically. When `path` exists as `fit` starts, training
    /// continues after its last epoch and ends as an uninterrupted run would (see
    /// [`crate::backup`]); a backup of another model or other fit settings is an error. The
    /// file is kept at the end, and loads as a [`Checkpoint`].
    pub fn backup(mut self, path: impl Into<PathBuf>) -> Self {
        self.backup = Some(path.into());
        self
    }
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    /// Shuffle the training order every epoch (default on), from `seed`.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }
    /// Seed of the shuffle: the same seed gives the same batches on every engine.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn validation_data(mut self, validation: &'a Dataset) -> Self {
        self.validation = Some(validation);
        self
    }
    /// Hold out the last `fraction` of the training data (before shuffling), as Keras.
    pub fn validation_split(mut self, fraction: f32) -> Self {
        self.validation_split = Some(fraction);
        self
    }
    pub fn verbosity(mut self, verbosity: Verbosity) -> Self {
        self.verbosity = verbosity;
        self
    }
    /// Augment every training batch on the fly (seeded from the fit's seed).
    pub fn augment(mut self, augment: crate::augment::Augment) -> Self {
        self.augment = augment;
        self
    }
    pub fn callback(mut self, callback: impl Callback + 'a) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }

    /// Train; returns the History.
    pub fn run(mut self) -> Result<History> {
        let model = &mut *self.model;
        let train = self.train;
        model.check_data(train)?;
        check_batch_size(self.batch_size)?;
        if self.epochs == 0 {
            return Err(Error::config("epochs", "must be at least 1, found 0"));
        }
        if let Some(v) = self.validation {
            model.check_data(v)?;
        }
        let (order, val_indices): (Vec<usize>, Option<Vec<usize>>) =
            match (self.validation, self.validation_split) {
                (Some(_), Some(_)) => {
                    return Err(Error::config(
                        "fit",
                        "give validation data or a validation split, not both",
                    ))
                }
                (None, Some(fraction)) => {
                    let cut = crate::data::holdout_cut(train.len(), fraction)?;
                    ((0..cut).collect(), Some((cut..train.len()).collect()))
                }
                (Some(v), None) => ((0..train.len()).collect(), Some((0..v.len()).collect())),
                (None, None) => ((0..train.len()).collect(), None),
            };
        if order.is_empty() {
            return Err(Error::config("fit", "the training data is empty"));
        }
        let val_data = self.validation.unwrap_or(train);
        let verbosity = match self.verbosity {
            Verbosity::Auto if std::io::stderr().is_terminal() => Verbosity::Bar,
            Verbosity::Auto => Verbosity::Lines,
            v => v,
        };
        for cb in &mut self.callbacks {
            cb.on_train_begin(model)?;
        }
        let [h, w, c] = model.spec.input_shape;
        // A separate stream, so turning augmentation on leaves the batch order unchanged.
        let mut augment_rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0xa5a5_5a5a_f00d_cafe);
        let mut augment_scratch = Vec::new();
        // A third stream: dropout masks, drawn in core so every engine drops the same units.
        let dropout_seed = self.seed ^ 0x5eed_d20b_0a7c_0001;
        model.network.set_dropout_stream(dropout_seed, 0);
        let mut buffer = Array4::<f32>::zeros((self.batch_size.min(order.len()), h, w, c));
        let mut targets = match model.compile.loss {
            Loss::SparseCategoricalCrossentropy => {
                Targets::Sparse(Vec::with_capacity(self.batch_size))
            }
            Loss::CategoricalCrossentropy => {
                Targets::Dense(Array2::zeros((0, train.num_classes())))
            }
            Loss::BinaryCrossentropy => Targets::Binary(Vec::with_capacity(self.batch_size)),
        };
        let batcher = train.batcher()?;
        let mut history = History::default();
        let batches = order.len().div_ceil(self.batch_size);
        let settings = backup::FitSettings {
            batch_size: self.batch_size,
            seed: self.seed,
            shuffle: self.shuffle,
            train_images: order.len(),
            validation_images: val_indices.as_ref().map(Vec::len),
            augment: format!("{:?}", self.augment),
        };
        let backup_meta = CheckpointMeta {
            classes: train.classes.clone(),
            normalisation: train.normalisation.clone(),
            backend: model.backend.clone(),
        };
        let mut batch_order = BatchOrder::new(order, self.seed, self.shuffle);
        let (mut first_epoch, mut finished) = (1, false);
        if let Some(path) = self.backup.as_deref().filter(|p| p.exists()) {
            let restored = backup::restore(path, model, &settings)?;
            if restored.callbacks.len() != self.callbacks.len() {
                return Err(Error::data(
                    path,
                    format!(
                        "this backup was made with {} callbacks, this fit has {}",
                        restored.callbacks.len(),
                        self.callbacks.len()
                    ),
                ));
            }
            history = History::from(&restored);
            let done = restored.record.epoch;
            let position: u128 = restored.record.augment_position.parse().map_err(|_| {
                Error::data(path, "the augmentation stream's position is not a number")
            })?;
            augment_rng.set_word_pos(position);
            let dropout: u128 =
                restored.record.dropout_position.parse().map_err(|_| {
                    Error::data(path, "the dropout stream's position is not a number")
                })?;
            model.network.set_dropout_stream(dropout_seed, dropout);
            // Replays the shuffles of the epochs done, so order and stream are where they were.
            for _ in 0..done {
                batch_order.next_epoch();
            }
            for (cb, state) in self.callbacks.iter_mut().zip(restored.callbacks) {
                cb.restore(state)?;
            }
            (first_epoch, finished) = (done + 1, restored.record.stopped);
            verbosity.line(format_args!(
                "Restored from {}: {done} of {} epochs done{}",
                path.display(),
                self.epochs,
                if finished {
                    ", stopped by a callback"
                } else {
                    ""
                }
            ));
        }
        for epoch in first_epoch..=self.epochs {
            if finished {
                break;
            }
            let order = batch_order.next_epoch();
            // What TerminateOnNaN falls back to: a step with a NaN loss has already moved
            // the weights, so the last weights known to be finite are this epoch's start.
            let epoch_start = model.weights()?;
            for cb in &mut self.callbacks {
                cb.on_epoch_begin(epoch, model)?;
            }
            let bar = progress_bar(verbosity, epoch, self.epochs, batches);
            let start = Instant::now();
            let mut last_line = start;
            let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
            for chunk in order.chunks(self.batch_size) {
                let mut x = buffer.slice_mut(s![..chunk.len(), .., .., ..]);
                batcher.fill(chunk, x.view_mut())?;
                self.augment
                    .apply(x.view_mut(), &mut augment_rng, &mut augment_scratch);
                fill_targets(&mut targets, train, chunk);
                let stats = model.network.train_step(x.view(), &targets)?;
                if !stats.loss.is_finite() {
                    model.set_weights(&epoch_start)?;
                    return Err(Error::NonFinite {
                        what: "training loss",
                        value: stats.loss as f64,
                        at: format!(
                            "epoch {epoch}, batch {} of {batches}",
                            seen / self.batch_size + 1
                        ),
                        kept: format!("the weights from the start of epoch {epoch}"),
                    });
                }
                for cb in &mut self.callbacks {
                    cb.on_batch_end(seen / self.batch_size, &stats)?;
                }
                loss_sum += stats.loss as f64 * chunk.len() as f64;
                correct += stats.correct;
                seen += chunk.len();
                let (loss, accuracy) = (loss_sum / seen as f64, correct as f64 / seen as f64);
                if let Some(bar) = &bar {
                    bar.set_message(format!("loss: {loss:.4} - accuracy: {accuracy:.4}"));
                    bar.inc(1);
                } else if verbosity == Verbosity::Lines
                    && last_line.elapsed() >= PROGRESS_LINE_EVERY
                {
                    last_line = Instant::now();
                    verbosity.line(format_args!(
                        "Epoch {epoch}/{} - {}/{batches} - {:.0}s - loss: {loss:.4} - accuracy: {accuracy:.4}",
                        self.epochs,
                        seen.div_ceil(self.batch_size),
                        start.elapsed().as_secs_f64()
                    ));
                }
            }
            let seconds = start.elapsed().as_secs_f64();
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let (val_loss, val_accuracy) = match &val_indices {
                Some(idx) => {
                    let e = model.evaluate_indices(val_data, idx, self.batch_size.max(256))?;
                    if !e.loss.is_finite() {
                        // The epoch's last step may have left non-finite weights behind.
                        let kept = if model.weights()?.check(&model.spec).is_ok() {
                            format!("the weights from the end of epoch {epoch}")
                        } else {
                            model.set_weights(&epoch_start)?;
                            format!("the weights from the start of epoch {epoch}")
                        };
                        return Err(Error::NonFinite {
                            what: "validation loss",
                            value: e.loss,
                            at: format!("the end of epoch {epoch}"),
                            kept,
                        });
                    }
                    (Some(e.loss), Some(e.accuracy))
                }
                None => (None, None),
            };
            let log = EpochLog {
                epoch,
                loss: loss_sum / seen as f64,
                accuracy: correct as f64 / seen as f64,
                val_loss,
                val_accuracy,
                seconds,
                learning_rate: model.learning_rate,
            };
            verbosity.line(format_args!(
                "Epoch {epoch}/{} - {batches}/{batches} - {log}",
                self.epochs
            ));
            history.epochs.push(log);
            let mut stop = false;
            for cb in &mut self.callbacks {
                stop |= cb.on_epoch_end(&history, model)? == Control::Stop;
            }
            if let Some(path) = &self.backup {
                let record = backup::FitRecord {
                    epoch,
                    stopped: stop,
                    learning_rate: backup::ExactF64(model.learning_rate),
                    optimizer_step: 0, // filled in by `backup::save`
                    history: history.epochs.iter().map(Into::into).collect(),
                    augment_position: augment_rng.get_word_pos().to_string(),
                    dropout_position: model.network.dropout_position().to_string(),
                    settings: settings.clone(),
                    callbacks: Vec::new(), // filled in by `backup::save`
                };
                let states = self
                    .callbacks
                    .iter()
                    .map(|cb| cb.backup())
                    .collect::<Result<_>>()?;
                backup::save(path, model, backup_meta.clone(), record, states)?;
            }
            if stop {
                break;
            }
        }
        for cb in &mut self.callbacks {
            cb.on_train_end(&history, model)?;
        }
        Ok(history)
    }
}

fn fill_targets(targets: &mut Targets, ds: &Dataset, chunk: &[usize]) {
    match targets {
        Targets::Sparse(v) => {
            v.clear();
            v.extend(chunk.iter().map(|&i| ds.labels[i]));
        }
        Targets::Binary(v) => {
            v.clear();
            v.extend(chunk.iter().map(|&i| ds.labels[i] as f32));
        }
        Targets::Dense(a) => {
            if a.nrows() != chunk.len() {
                *a = Array2::zeros((chunk.len(), ds.num_classes()));
            } else {
                a.fill(0.0);
            }
            for (r, &i) in chunk.iter().enumerate() {
                a[[r, ds.labels[i] as usize]] = 1.0;
            }
        }
    }
}

/// convkit's progress bars (epochs, downloads): Keras' `[=====>    ]` look on `template`.
pub(crate) fn bar_style(template: &'static str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}

fn progress_bar(
    verbosity: Verbosity,
    epoch: usize,
    epochs: usize,
    batches: usize,
) -> Option<indicatif::ProgressBar> {
    (verbosity == Verbosity::Bar).then(|| {
        let bar = indicatif::ProgressBar::new(batches as u64);
        bar.set_style(bar_style(
            "Epoch {prefix} [{bar:30}] {pos}/{len} - ETA {eta} - {msg}",
        ));
        bar.set_prefix(format!("{epoch}/{epochs}"));
        bar
    })
}

/// A borrowed callback, so its state can be read after `fit`.
impl<C: Callback + ?Sized> Callback for &mut C {
    fn on_train_begin(&mut self, model: &mut Model) -> Result<()> {
        (**self).on_train_begin(model)
    }
    fn on_batch_end(&mut self, batch: usize, stats: &crate::backend::StepStats) -> Result<()> {
        (**self).on_batch_end(batch, stats)
    }
    fn on_epoch_begin(&mut self, epoch: usize, model: &mut Model) -> Result<()> {
        (**self).on_epoch_begin(epoch, model)
    }
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control> {
        (**self).on_epoch_end(history, model)
    }
    fn on_train_end(&mut self, history: &History, model: &mut Model) -> Result<()> {
        (**self).on_train_end(history, model)
    }
}

/// A learning rate per epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `initial · factor^⌊(epoch − 1) / every⌋`.
    Step {
        initial: f64,
        factor: f64,
        every: usize,
    },
    /// `initial · rate^(epoch − 1)`.
    Exponential { initial: f64, rate: f64 },
}

impl Schedule {
    /// The rate for `epoch` (1-based).
    pub fn rate(&self, epoch: usize) -> f64 {
        match *self {
            Schedule::Step {
                initial,
                factor,
                every,
            } => initial * factor.powi(((epoch - 1) / every.max(1)) as i32),
            Schedule::Exponential { initial, rate } => initial * rate.powi(epoch as i32 - 1),
        }
    }
}

/// Sets each epoch's learning rate from a [`Schedule`] (Keras' `LearningRateScheduler`).
#[derive(Debug, Clone)]
pub struct LearningRateScheduler(pub Schedule);

impl Callback for LearningRateScheduler {
    fn on_epoch_begin(&mut self, epoch: usize, model: &mut Model) -> Result<()> {
        let rate = self.0.rate(epoch);
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::config(
                "learning-rate schedule",
                format!("gives {rate} for epoch {epoch}; expected a positive rate"),
            ));
        }
        model.set_learning_rate(rate);
        Ok(())
    }
    fn on_epoch_end(&mut self, _history: &History, _model: &mut Model) -> Result<Control> {
        Ok(Control::Continue)
    }
}

/// Multiply the learning rate by `factor` once the monitored quantity has not improved by
/// `min_delta` for `patience` epochs, never below `min_lr` (Keras' `ReduceLROnPlateau`).
#[derive(Debug, Clone)]
pub struct ReduceLrOnPlateau {
    pub monitor: Monitor,
    pub factor: f64,
    pub patience: usize,
    pub min_delta: f64,
    pub min_lr: f64,
    best: Option<f64>,
    wait: usize,
}

impl ReduceLrOnPlateau {
    /// Keras' defaults: factor 0.1, min_delta 1e-4, min_lr 0.
    pub fn new(monitor: Monitor, patience: usize) -> Self {
        ReduceLrOnPlateau {
            monitor,
            factor: 0.1,
            patience,
            min_delta: 1e-4,
            min_lr: 0.0,
            best: None,
            wait: 0,
        }
    }
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }
    pub fn min_lr(mut self, min_lr: f64) -> Self {
        self.min_lr = min_lr;
        self
    }
}

impl Callback for ReduceLrOnPlateau {
    fn on_train_begin(&mut self, _model: &mut Model) -> Result<()> {
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(Error::config(
                "ReduceLROnPlateau",
                format!("factor must be in (0, 1), found {}", self.factor),
            ));
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control> {
        let log = history.epochs.last().expect("called after an epoch");
        let value = self.monitor.value(log)?;
        if self.monitor.improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.wait = 0;
        } else {
            self.wait += 1;
            if self.wait >= self.patience {
                let lr = (model.learning_rate() * self.factor).max(self.min_lr);
                model.set_learning_rate(lr);
                self.wait = 0;
            }
        }
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        Ok(CallbackState {
            json: serde_json::json!({ "best": self.best.map(ExactF64), "wait": self.wait }),
            tensors: Weights::default(),
        })
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.best =
            backup_field::<Option<ExactF64>>(&state, "ReduceLROnPlateau", "best")?.map(|b| b.0);
        self.wait = backup_field(&state, "ReduceLROnPlateau", "wait")?;
        Ok(())
    }
}
