//! Keras' callbacks: EarlyStopping, ModelCheckpoint, CSVLogger, LearningRateScheduler and
//! ReduceLROnPlateau, with the monitor state three of them share.

use std::path::PathBuf;

use super::backup::{CallbackState, ExactF64};
use super::{EpochLog, History, Model};
use crate::checkpoint::CheckpointMeta;
use crate::weights::Weights;
use crate::{Error, Result};

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

/// What EarlyStopping, ReduceLROnPlateau and ModelCheckpoint share: the monitored
/// quantity's best value so far and how many epochs have passed without beating it by more
/// than `min_delta`; one implementation, backed up the same way.
#[derive(Debug, Clone)]
struct Watch {
    monitor: Monitor,
    min_delta: f64,
    best: Option<f64>,
    wait: usize,
}

impl Watch {
    fn new(monitor: Monitor, min_delta: f64) -> Self {
        Watch {
            monitor,
            min_delta,
            best: None,
            wait: 0,
        }
    }

    /// Take the last epoch's value: true when it improves on the best (which it becomes,
    /// and the wait restarts), false when it does not (the wait grows by one).
    fn observe(&mut self, history: &History) -> Result<bool> {
        let log = history.epochs.last().expect("called after an epoch");
        let value = self.monitor.value(log)?;
        if self.monitor.improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.wait = 0;
            Ok(true)
        } else {
            self.wait += 1;
            Ok(false)
        }
    }

    fn backup(&self) -> serde_json::Value {
        serde_json::json!({ "best": self.best.map(ExactF64), "wait": self.wait })
    }

    /// The backup of a callback whose only state is this monitor.
    fn state(&self) -> CallbackState {
        CallbackState {
            json: self.backup(),
            tensors: Weights::default(),
        }
    }

    fn restore(&mut self, state: &CallbackState, callback: &str) -> Result<()> {
        self.best = backup_field::<Option<ExactF64>>(state, callback, "best")?.map(|b| b.0);
        self.wait = backup_field::<Option<usize>>(state, callback, "wait")?.unwrap_or(0);
        Ok(())
    }
}

/// Stop when the monitored quantity has not improved for `patience` epochs; optionally
/// restore the best epoch's weights.
#[derive(Debug)]
pub struct EarlyStopping {
    watch: Watch,
    patience: usize,
    restore_best_weights: bool,
    /// Print Keras' lines when training stops early and when the best weights are restored.
    verbose: bool,
    /// The best epoch (1-based) and, with `restore_best_weights`, its weights.
    best_weights: Option<(usize, Weights)>,
    stopped_epoch: Option<usize>,
}

impl EarlyStopping {
    pub fn new(monitor: Monitor, patience: usize) -> Self {
        EarlyStopping {
            watch: Watch::new(monitor, 0.0),
            patience,
            restore_best_weights: false,
            verbose: false,
            best_weights: None,
            stopped_epoch: None,
        }
    }
    pub fn min_delta(mut self, d: f64) -> Self {
        self.watch.min_delta = d;
        self
    }
    /// The epoch (1-based) training stopped at, if it stopped early.
    pub fn stopped_epoch(&self) -> Option<usize> {
        self.stopped_epoch
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
        let epoch = history.epochs.last().expect("called after an epoch").epoch;
        if self.watch.observe(history)? {
            if self.restore_best_weights {
                self.best_weights = Some((epoch, model.weights()?));
            }
            return Ok(Control::Continue);
        }
        // Keras stops once `patience` epochs in a row have not improved.
        if self.watch.wait >= self.patience {
            self.stopped_epoch = Some(epoch);
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        let mut json = self.watch.backup();
        json["stopped_epoch"] = serde_json::json!(self.stopped_epoch);
        json["best_epoch"] = serde_json::json!(self.best_weights.as_ref().map(|(epoch, _)| *epoch));
        Ok(CallbackState {
            json,
            tensors: self
                .best_weights
                .as_ref()
                .map(|(_, w)| w.clone())
                .unwrap_or_default(),
        })
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.watch.restore(&state, "EarlyStopping")?;
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
    path: PathBuf,
    /// Watched only with `save_best_only`.
    watch: Watch,
    save_best_only: bool,
    meta: CheckpointMeta,
}

impl ModelCheckpoint {
    pub fn new(path: impl Into<PathBuf>, meta: CheckpointMeta) -> Self {
        ModelCheckpoint {
            path: path.into(),
            watch: Watch::new(Monitor::ValLoss, 0.0),
            save_best_only: false,
            meta,
        }
    }
    pub fn save_best_only(mut self, monitor: Monitor) -> Self {
        self.save_best_only = true;
        self.watch = Watch::new(monitor, 0.0);
        self
    }
}

impl Callback for ModelCheckpoint {
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control> {
        if self.save_best_only && !self.watch.observe(history)? {
            return Ok(Control::Continue);
        }
        // Under data-parallel training every rank holds the same model: rank 0 writes it.
        if model.collective().is_root() {
            model.checkpoint(self.meta.clone())?.save(&self.path)?;
        }
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        Ok(self.watch.state())
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.watch.restore(&state, "ModelCheckpoint")
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
    fn on_epoch_end(&mut self, history: &History, model: &mut Model) -> Result<Control> {
        // Every rank has the same History: rank 0 writes it.
        if model.collective().is_root() {
            history.write_csv(&self.path)?;
        }
        Ok(Control::Continue)
    }
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

/// A [`Schedule`] before its initial rate is known (the optimizer's): what
/// `--lr-schedule` gives, `step=FACTOR/EVERY` or `exp=RATE`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleRule {
    /// ×`factor` every `every` epochs.
    Step { factor: f64, every: usize },
    /// ×`rate` every epoch.
    Exponential { rate: f64 },
}

impl ScheduleRule {
    /// The schedule that starts at `initial`.
    pub fn starting_at(self, initial: f64) -> Schedule {
        match self {
            ScheduleRule::Step { factor, every } => Schedule::Step {
                initial,
                factor,
                every,
            },
            ScheduleRule::Exponential { rate } => Schedule::Exponential { initial, rate },
        }
    }
}

impl std::str::FromStr for ScheduleRule {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "learning-rate schedule",
                format!("expected step=FACTOR/EVERY or exp=RATE, found `{text}`"),
            )
        };
        let (kind, value) = text.split_once('=').ok_or_else(bad)?;
        match kind {
            "step" => {
                let (factor, every) = value.split_once('/').ok_or_else(bad)?;
                let factor: f64 = factor.parse().map_err(|_| bad())?;
                let every: usize = every.parse().map_err(|_| bad())?;
                if factor.is_nan() || factor <= 0.0 || every == 0 {
                    return Err(bad());
                }
                Ok(ScheduleRule::Step { factor, every })
            }
            "exp" => match value.parse::<f64>() {
                Ok(rate) if rate > 0.0 => Ok(ScheduleRule::Exponential { rate }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
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
    watch: Watch,
    factor: f64,
    patience: usize,
    min_lr: f64,
}

impl ReduceLrOnPlateau {
    /// Keras' defaults: factor 0.1, min_delta 1e-4, min_lr 0.
    pub fn new(monitor: Monitor, patience: usize) -> Self {
        ReduceLrOnPlateau {
            watch: Watch::new(monitor, 1e-4),
            factor: 0.1,
            patience,
            min_lr: 0.0,
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
        if !self.watch.observe(history)? && self.watch.wait >= self.patience {
            let lr = (model.learning_rate() * self.factor).max(self.min_lr);
            model.set_learning_rate(lr);
            self.watch.wait = 0;
        }
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        Ok(self.watch.state())
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.watch.restore(&state, "ReduceLROnPlateau")
    }
}
