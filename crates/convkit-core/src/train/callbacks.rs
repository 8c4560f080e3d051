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
    /// The callback's name and the quantity it watches, if it watches one: a fit without
    /// validation data refuses a callback that watches `val_*` before the first epoch.
    fn monitors(&self) -> Option<(&'static str, Monitor)> {
        None
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
    /// Whether it is measured on validation data (`val_loss`, `val_accuracy`).
    pub fn needs_validation(&self) -> bool {
        matches!(self, Monitor::ValLoss | Monitor::ValAccuracy)
    }
    pub fn name(&self) -> &'static str {
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
    fn monitors(&self) -> Option<(&'static str, Monitor)> {
        Some(("EarlyStopping", self.watch.monitor))
    }
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
    fn monitors(&self) -> Option<(&'static str, Monitor)> {
        self.save_best_only
            .then_some(("ModelCheckpoint", self.watch.monitor))
    }
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
    fn backup(&self) -> Result<CallbackState> {
        (**self).backup()
    }
    fn restore(&mut self, state: CallbackState) -> Result<()> {
        (**self).restore(state)
    }
    fn monitors(&self) -> Option<(&'static str, Monitor)> {
        (**self).monitors()
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
    cooldown: usize,
    /// Epochs of cooldown still to run.
    cooldown_left: usize,
}

impl ReduceLrOnPlateau {
    /// Keras' defaults: factor 0.1, min_delta 1e-4, cooldown 0, min_lr 0.
    pub fn new(monitor: Monitor, patience: usize) -> Self {
        ReduceLrOnPlateau {
            watch: Watch::new(monitor, 1e-4),
            factor: 0.1,
            patience,
            min_lr: 0.0,
            cooldown: 0,
            cooldown_left: 0,
        }
    }
    pub fn min_delta(mut self, d: f64) -> Self {
        self.watch.min_delta = d;
        self
    }
    /// Epochs after each reduction during which plateaus are not counted.
    pub fn cooldown(mut self, epochs: usize) -> Self {
        self.cooldown = epochs;
        self
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
    fn monitors(&self) -> Option<(&'static str, Monitor)> {
        Some(("ReduceLROnPlateau", self.watch.monitor))
    }
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
        // Keras' order: a cooldown epoch clears the wait, and the wait does not grow while
        // the cooldown lasts.
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            self.watch.wait = 0;
        }
        if !self.watch.observe(history)? {
            if self.cooldown_left > 0 {
                self.watch.wait = 0;
            } else if self.watch.wait >= self.patience {
                let lr = (model.learning_rate() * self.factor).max(self.min_lr);
                model.set_learning_rate(lr);
                self.cooldown_left = self.cooldown;
                self.watch.wait = 0;
            }
        }
        Ok(Control::Continue)
    }

    fn backup(&self) -> Result<CallbackState> {
        let mut state = self.watch.state();
        state.json["cooldown_left"] = serde_json::json!(self.cooldown_left);
        Ok(state)
    }

    fn restore(&mut self, state: CallbackState) -> Result<()> {
        self.watch.restore(&state, "ReduceLROnPlateau")?;
        self.cooldown_left =
            backup_field::<Option<usize>>(&state, "ReduceLROnPlateau", "cooldown_left")?
                .unwrap_or(0);
        Ok(())
    }
}

/// `key=value,key=value` settings (Keras' argument names), each key at most once and one of
/// `keys`; `what` names the setting in errors.
fn settings<'t>(
    what: &'static str,
    text: &'t str,
    keys: &[&str],
) -> Result<Vec<(&'t str, &'t str)>> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| {
            Error::config(
                what,
                format!(
                    "expected KEY=VALUE (keys: {}), found `{part}`",
                    keys.join(", ")
                ),
            )
        })?;
        let key = key.trim();
        if !keys.contains(&key) {
            return Err(Error::config(
                what,
                format!("expected one of {}, found `{key}`", keys.join(", ")),
            ));
        }
        if seen.iter().any(|(k, _)| *k == key) {
            return Err(Error::config(what, format!("`{key}` is given twice")));
        }
        seen.push((key, value.trim()));
    }
    Ok(seen)
}

/// One setting's value parsed, or an error naming the setting, the key and the value.
fn setting<T: std::str::FromStr>(
    what: &'static str,
    key: &str,
    value: &str,
    expected: &str,
) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::config(what, format!("`{key}` expects {expected}, found `{value}`")))
}

fn non_negative(what: &'static str, key: &str, value: &str) -> Result<f64> {
    match setting::<f64>(what, key, value, "a number ≥ 0")? {
        v if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(Error::config(
            what,
            format!("`{key}` expects a number ≥ 0, found `{value}`"),
        )),
    }
}

fn boolean(what: &'static str, key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(Error::config(
            what,
            format!("`{key}` expects true or false, found `{value}`"),
        )),
    }
}

/// EarlyStopping's settings, as `--early-stopping` gives them: a patience (`3`) or Keras'
/// arguments (`monitor=val_accuracy,patience=3,min_delta=0.001,restore_best_weights=false`).
/// Defaults: monitor val_loss, patience 0, min_delta 0 and, unlike Keras, the best weights
/// restored, since the run folder's model is the one that is scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStoppingRule {
    pub monitor: Monitor,
    pub patience: usize,
    pub min_delta: f64,
    pub restore_best_weights: bool,
}

impl Default for EarlyStoppingRule {
    fn default() -> Self {
        EarlyStoppingRule {
            monitor: Monitor::ValLoss,
            patience: 0,
            min_delta: 0.0,
            restore_best_weights: true,
        }
    }
}

impl EarlyStoppingRule {
    /// The callback; `verbose` prints Keras' lines when it stops and restores.
    pub fn callback(&self, verbose: bool) -> EarlyStopping {
        EarlyStopping::new(self.monitor, self.patience)
            .min_delta(self.min_delta)
            .restore_best_weights(self.restore_best_weights)
            .verbose(verbose)
    }
}

impl std::str::FromStr for EarlyStoppingRule {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        const WHAT: &str = "--early-stopping";
        let mut rule = EarlyStoppingRule::default();
        if let Ok(patience) = text.trim().parse() {
            rule.patience = patience;
            return Ok(rule);
        }
        let keys = [
            "monitor",
            "patience",
            "min_delta",
            "restore_best_weights",
            "restore_best",
        ];
        for (key, value) in settings(WHAT, text, &keys)? {
            match key {
                "monitor" => rule.monitor = value.parse()?,
                "patience" => {
                    rule.patience = setting(WHAT, key, value, "a whole number of epochs")?
                }
                "min_delta" => rule.min_delta = non_negative(WHAT, key, value)?,
                _ => rule.restore_best_weights = boolean(WHAT, key, value)?,
            }
        }
        Ok(rule)
    }
}

/// ReduceLROnPlateau's settings, as `--reduce-lr` gives them: a patience (`2`) or Keras'
/// arguments (`monitor=val_accuracy,factor=0.5,patience=2,min_delta=0.0001,cooldown=1,
/// min_lr=1e-5`), with Keras' defaults (val_loss, 0.1, 10, 1e-4, 0, 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlateauRule {
    pub monitor: Monitor,
    pub factor: f64,
    pub patience: usize,
    pub min_delta: f64,
    /// Epochs after a reduction during which no wait is counted.
    pub cooldown: usize,
    pub min_lr: f64,
}

impl Default for PlateauRule {
    fn default() -> Self {
        PlateauRule {
            monitor: Monitor::ValLoss,
            factor: 0.1,
            patience: 10,
            min_delta: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
        }
    }
}

impl PlateauRule {
    pub fn callback(&self) -> ReduceLrOnPlateau {
        ReduceLrOnPlateau::new(self.monitor, self.patience)
            .factor(self.factor)
            .min_delta(self.min_delta)
            .cooldown(self.cooldown)
            .min_lr(self.min_lr)
    }
}

impl std::str::FromStr for PlateauRule {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        const WHAT: &str = "--reduce-lr";
        let mut rule = PlateauRule::default();
        if let Ok(patience) = text.trim().parse() {
            rule.patience = patience;
            return Ok(rule);
        }
        let keys = [
            "monitor",
            "factor",
            "patience",
            "min_delta",
            "cooldown",
            "min_lr",
        ];
        for (key, value) in settings(WHAT, text, &keys)? {
            match key {
                "monitor" => rule.monitor = value.parse()?,
                "factor" => {
                    rule.factor = setting(WHAT, key, value, "a number in (0, 1)")?;
                    if !(rule.factor > 0.0 && rule.factor < 1.0) {
                        return Err(Error::config(
                            WHAT,
                            format!("`factor` expects a number in (0, 1), found `{value}`"),
                        ));
                    }
                }
                "patience" => {
                    rule.patience = setting(WHAT, key, value, "a whole number of epochs")?
                }
                "cooldown" => {
                    rule.cooldown = setting(WHAT, key, value, "a whole number of epochs")?
                }
                "min_delta" => rule.min_delta = non_negative(WHAT, key, value)?,
                _ => rule.min_lr = non_negative(WHAT, key, value)?,
            }
        }
        Ok(rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_reads_a_patience_or_keras_arguments() {
        let bare: EarlyStoppingRule = "3".parse().unwrap();
        assert_eq!(
            bare,
            EarlyStoppingRule {
                patience: 3,
                ..Default::default()
            }
        );
        let full: EarlyStoppingRule =
            "monitor=val_accuracy, patience=4,min_delta=0.01,restore_best_weights=false"
                .parse()
                .unwrap();
        assert_eq!(
            full,
            EarlyStoppingRule {
                monitor: Monitor::ValAccuracy,
                patience: 4,
                min_delta: 0.01,
                restore_best_weights: false,
            }
        );
        let short: EarlyStoppingRule = "restore_best=true,monitor=loss".parse().unwrap();
        assert!(short.restore_best_weights && short.monitor == Monitor::Loss);
        for (bad, says) in [
            (
                "patience=x",
                "`patience` expects a whole number of epochs, found `x`",
            ),
            ("monitor=val_acc", "found `val_acc`"),
            ("factor=0.5", "expected one of monitor, patience"),
            ("patience=1,patience=2", "`patience` is given twice"),
            ("min_delta=-1", "`min_delta` expects a number ≥ 0"),
            ("restore_best=maybe", "expects true or false, found `maybe`"),
            ("val_loss", "expected KEY=VALUE"),
        ] {
            let err = bad.parse::<EarlyStoppingRule>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn reduce_lr_reads_a_patience_or_keras_arguments() {
        let bare: PlateauRule = "2".parse().unwrap();
        assert_eq!(
            bare,
            PlateauRule {
                patience: 2,
                ..Default::default()
            }
        );
        let full: PlateauRule =
            "monitor=val_accuracy,factor=0.5,patience=1,min_delta=0,cooldown=2,min_lr=1e-5"
                .parse()
                .unwrap();
        assert_eq!(
            full,
            PlateauRule {
                monitor: Monitor::ValAccuracy,
                factor: 0.5,
                patience: 1,
                min_delta: 0.0,
                cooldown: 2,
                min_lr: 1e-5,
            }
        );
        for (bad, says) in [
            ("factor=1", "`factor` expects a number in (0, 1), found `1`"),
            ("factor=nan", "`factor` expects a number in (0, 1)"),
            ("min_lr=inf", "`min_lr` expects a number ≥ 0"),
            (
                "restore_best_weights=true",
                "expected one of monitor, factor",
            ),
        ] {
            let err = bad.parse::<PlateauRule>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
