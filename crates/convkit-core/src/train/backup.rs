//! Keras' `BackupAndRestore` for [`crate::train::Fit::backup`]: after every epoch, everything
//! `fit` needs to continue, in one safetensors file written atomically; when `fit` starts and
//! the file is there, it continues from it.
//!
//! The file is a [`Checkpoint`] (so `evaluate` and `predict` read it as one) with, beside the
//! model's weights, tensors under [`FIT_PREFIX`] (the optimizer's slots, callbacks' tensors such
//! as EarlyStopping's best weights) and a `convkit.fit` metadata entry (epochs done, learning
//! rate, optimizer step, History, the positions of the augmentation and dropout streams, the
//! fit's settings and the callbacks' state). The shuffle order is not stored: it is replayed
//! from the seed. Core draws the dropout masks (`optim::Training::dropout_masks`), so a run
//! with Dropout also ends as an uninterrupted one would.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointMeta, FIT_PREFIX};
use crate::optim::OptimizerState;
use crate::spec::Sequential;
use crate::train::{EpochLog, History, Model};
use crate::weights::Weights;
use crate::{Error, Result, SizeLimits};

/// What a callback carries across an interrupted run: JSON, and tensors (canonical layout,
/// any names) for what is too large for JSON.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallbackState {
    pub json: serde_json::Value,
    pub tensors: Weights,
}

/// The fit settings that decide the batches; a backup made with others cannot continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FitSettings {
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub train_images: usize,
    pub validation_images: Option<usize>,
    /// `Augment`'s settings, as its Debug text.
    pub augment: String,
}

/// An `f64` in JSON as exact text: Rust's shortest round-trip form, read back with Rust's
/// correctly rounded parser (serde_json's own float parsing may be one unit in the last place
/// off, and a resumed run must continue from the exact values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactF64(pub f64);

impl Serialize for ExactF64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:?}", self.0))
    }
}

impl<'de> Deserialize<'de> for ExactF64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map(ExactF64)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a number")))
    }
}

/// One epoch of the History, exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EpochRecord {
    epoch: usize,
    loss: ExactF64,
    accuracy: ExactF64,
    val_loss: Option<ExactF64>,
    val_accuracy: Option<ExactF64>,
    seconds: ExactF64,
    learning_rate: ExactF64,
}

impl From<&EpochLog> for EpochRecord {
    fn from(e: &EpochLog) -> Self {
        EpochRecord {
            epoch: e.epoch,
            loss: ExactF64(e.loss),
            accuracy: ExactF64(e.accuracy),
            val_loss: e.val_loss.map(ExactF64),
            val_accuracy: e.val_accuracy.map(ExactF64),
            seconds: ExactF64(e.seconds),
            learning_rate: ExactF64(e.learning_rate),
        }
    }
}

impl From<&EpochRecord> for EpochLog {
    fn from(e: &EpochRecord) -> Self {
        EpochLog {
            epoch: e.epoch,
            loss: e.loss.0,
            accuracy: e.accuracy.0,
            val_loss: e.val_loss.map(|v| v.0),
            val_accuracy: e.val_accuracy.map(|v| v.0),
            seconds: e.seconds.0,
            learning_rate: e.learning_rate.0,
        }
    }
}

/// The `convkit.fit` metadata entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FitRecord {
    /// Epochs finished.
    pub epoch: usize,
    /// A callback stopped training after `epoch`.
    pub stopped: bool,
    pub learning_rate: ExactF64,
    pub optimizer_step: u64,
    pub history: Vec<EpochRecord>,
    /// The augmentation stream's position (ChaCha8 word position), as decimal text.
    pub augment_position: String,
    /// The dropout stream's position, as decimal text.
    pub dropout_position: String,
    pub settings: FitSettings,
    /// Each callback's JSON, in the order they were added.
    pub callbacks: Vec<serde_json::Value>,
}

const META_FIT: &str = "convkit.fit";

/// Tensor name of slot `key` (`conv2d.weight/m`) in the file.
fn optimizer_tensor(key: &str) -> String {
    format!("{FIT_PREFIX}optimizer/{key}")
}

/// Tensor name of callback `index`'s tensor `name`.
fn callback_tensor(index: usize, name: &str) -> String {
    format!("{FIT_PREFIX}callback{index}/{name}")
}

/// Write the backup of `model` after an epoch, atomically. `record`'s `optimizer_step` and
/// `callbacks` are filled in here, from the network and from `callbacks` (whose tensors go
/// beside the weights).
pub(crate) fn save(
    path: &Path,
    model: &mut Model,
    meta: CheckpointMeta,
    mut record: FitRecord,
    callbacks: Vec<CallbackState>,
) -> Result<()> {
    let checkpoint = model.checkpoint(meta)?;
    let state = model.network_mut().optimizer_state()?;
    record.optimizer_step = state.step;
    let mut extra = Weights::default();
    for (key, t) in state.slots {
        extra.insert(optimizer_tensor(&key), t);
    }
    for (i, cb) in callbacks.into_iter().enumerate() {
        for (name, t) in cb.tensors.tensors {
            extra.insert(callback_tensor(i, &name), t);
        }
        record.callbacks.push(cb.json);
    }
    let json = serde_json::to_string(&record).expect("serialisable");
    checkpoint.save_with(path, extra, HashMap::from([(META_FIT.to_string(), json)]))
}

/// Where two specs differ, in words: the input, the number of layers, or the first layer
/// that is not the same; `None` when they are equal.
fn spec_difference(then: &Sequential, now: &Sequential) -> Option<String> {
    if then == now {
        return None;
    }
    if then.input_shape != now.input_shape {
        return Some(format!(
            "input {:?} then, {:?} now",
            then.input_shape, now.input_shape
        ));
    }
    let names = now.layer_names();
    let layer = (then.layers.iter().zip(&now.layers)).position(|(a, b)| a != b);
    Some(match layer {
        Some(i) => format!(
            "layer {i} ({}): {:?} then, {:?} now",
            names[i], then.layers[i], now.layers[i]
        ),
        None if then.layers.len() != now.layers.len() => format!(
            "{} layers then, {} now",
            then.layers.len(),
            now.layers.len()
        ),
        None => format!("the name: `{}` then, `{}` now", then.name, now.name),
    })
}

/// A backup read back: the model's weights and optimizer state are already loaded.
pub(crate) struct Restored {
    pub record: FitRecord,
    pub callbacks: Vec<CallbackState>,
}

/// Load the backup at `path` (its `bytes`, which rank 0 read and sent every rank) into `model`, after checking it was made by the same model,
/// compile settings, fit settings, class names and normalisation (`meta`, the data's); a
/// difference is an error that names it, then and now.
pub(crate) fn restore(
    (path, bytes): (&Path, &[u8]),
    model: &mut Model,
    settings: &FitSettings,
    meta: &CheckpointMeta,
) -> Result<Restored> {
    let (checkpoint, extra, metadata) =
        Checkpoint::from_bytes_with_extras(path, bytes, &SizeLimits::NONE)?;
    let another = |what: &str| {
        Error::data(
            path,
            format!("this backup is of another run ({what}); delete it to start over, or back up elsewhere"),
        )
    };
    if let Some(difference) = spec_difference(&checkpoint.spec, model.spec()) {
        return Err(another(&format!("the model differs: {difference}")));
    }
    if checkpoint.compile != *model.compile_settings() {
        return Err(another(&format!(
            "the optimizer or loss differs: {:?} then, {:?} now",
            checkpoint.compile,
            model.compile_settings()
        )));
    }
    if checkpoint.meta.classes != meta.classes {
        return Err(another(&format!(
            "the class names differ: {:?} then, {:?} now; the labels would not mean what they meant",
            checkpoint.meta.classes, meta.classes
        )));
    }
    if checkpoint.meta.normalisation != meta.normalisation {
        return Err(another(&format!(
            "the normalisation differs: {:?} then, {:?} now",
            checkpoint.meta.normalisation, meta.normalisation
        )));
    }
    let text = metadata.get(META_FIT).ok_or_else(|| {
        Error::data(
            path,
            format!("no `{META_FIT}` metadata: a checkpoint, not a fit backup"),
        )
    })?;
    let mut record: FitRecord = serde_json::from_str(text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("metadata `{META_FIT}`: {e}"),
    })?;
    if record.settings != *settings {
        return Err(another(&format!(
            "the fit settings differ: {:?} then, {settings:?} now",
            record.settings
        )));
    }
    let mut slots = std::collections::BTreeMap::new();
    let mut per_callback: Vec<Weights> = vec![Weights::default(); record.callbacks.len()];
    for (name, t) in extra.tensors {
        let rest = &name[FIT_PREFIX.len()..];
        if let Some(key) = rest.strip_prefix("optimizer/") {
            slots.insert(key.to_string(), t);
            continue;
        }
        let callback = rest
            .strip_prefix("callback")
            .and_then(|r| r.split_once('/'))
            .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n)))
            .filter(|(i, _)| *i < per_callback.len());
        match callback {
            Some((i, n)) => per_callback[i].insert(n, t),
            None => {
                return Err(Error::Weights {
                    tensor: name.clone(),
                    message: format!("not a tensor a fit backup holds (in {})", path.display()),
                })
            }
        }
    }
    model.set_weights(&checkpoint.weights)?;
    model.network_mut().set_optimizer_state(&OptimizerState {
        step: record.optimizer_step,
        slots,
    })?;
    model.set_learning_rate(record.learning_rate.0);
    let callbacks = std::mem::take(&mut record.callbacks)
        .into_iter()
        .zip(per_callback)
        .map(|(json, tensors)| CallbackState { json, tensors })
        .collect();
    Ok(Restored { record, callbacks })
}

impl From<&Restored> for History {
    fn from(r: &Restored) -> Self {
        History {
            epochs: r.record.history.iter().map(EpochLog::from).collect(),
        }
    }
}
