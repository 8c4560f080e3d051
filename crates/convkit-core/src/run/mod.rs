//! The run layer: what the `convkit` command line does, as typed requests that a program, a
//! notebook or a test makes the same way. Each request owns the files it writes.
//!
//! - [`TrainRequest`]: spec and its edits, data, compile, fit settings and callbacks, the run
//!   folder (its backup, `command.json`, model, metrics, plots); resumable.
//! - [`EvaluateRequest`]: one checkpoint or an ensemble, scored on a dataset's test split.
//! - [`PredictRequest`]: class probabilities for image files.
//! - [`SearchRequest`]: a hyper-parameter search's trials, logs, parts and table.
//! - [`ExportRequest`]: an ONNX inference graph of a checkpoint.
//!
//! The engine comes in as a [`Backend`](crate::Backend) (the `convkit` crate's
//! `convkit::backend(name)` starts one by name), and the processes of an MPI job as a
//! [`Group`].

mod evaluate;
mod export;
mod predict;
mod search;
mod train;

pub use evaluate::{EvaluateOutcome, EvaluateRequest};
pub use export::{ExportOutcome, ExportRequest};
pub use predict::{ImagePrediction, PredictRequest};
pub use search::{BestTrial, SearchOutcome, SearchRequest};
pub use train::{
    CommandRecord, Freeze, ModelSource, NewHead, SpecEdits, TrainOutcome, TrainRequest,
};

use std::ffi::OsString;
use std::rc::Rc;

use crate::collective::{Collective, Solo};
use crate::data::{self, ImageShape, Locator, Normalisation, Splits, Validation};
use crate::spec::Sequential;
use crate::{Error, Result};

/// The processes a request runs on: one ([`alone`]), or an MPI job's ranks.
pub type Group = Rc<dyn Collective>;

/// Run `command` in the group of processes the launcher (`mpirun`, `srun`) started this one
/// in, or alone. A rank that fails alone prints its error, naming itself, and stops every rank
/// at once, so that none waits for it. An error every rank met together (a non-finite loss,
/// which the ranks sum) ends them together, normally: rank 0 returns it to be reported, and
/// the other ranks return `Ok` so that it is reported once.
pub fn in_launched_group<E>(
    command: impl FnOnce(&Group) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<Error> + std::fmt::Display + AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    let group = crate::collective::from_environment()?;
    let result = command(&group);
    match &result {
        Err(err) if group.size() > 1 => {
            let met_by_every_rank = (err.as_ref().downcast_ref::<Error>())
                .is_some_and(|e| matches!(e, Error::NonFinite { .. }));
            if !met_by_every_rank {
                eprintln!("error: rank {} of {}: {err:#}", group.rank(), group.size());
                group.abort(1);
            } else if !group.is_root() {
                return Ok(());
            }
        }
        _ => {}
    }
    result
}

/// `work` on rank 0 first, then on the other ranks, which wait for it at an untimed barrier:
/// a dataset that rank 0 downloads is in the cache when the others read it, instead of every
/// rank fetching it at once. A rank 0 that fails stops them all ([`in_launched_group`]).
fn root_first<T>(group: &Group, work: impl FnOnce() -> Result<T>) -> Result<T> {
    if group.size() == 1 {
        return work();
    }
    if group.is_root() {
        let done = work()?;
        group.barrier()?;
        Ok(done)
    } else {
        group.barrier()?;
        work()
    }
}

/// A group of one process.
pub fn alone() -> Group {
    Rc::new(Solo)
}

/// `spec` with its classifier sized to the data's `classes` when `model` names a preset (the
/// tutorials write `Dense(num_classes)`), and a line saying so when it changed; a spec file or
/// a checkpoint keeps its own classifier, and a class count that differs is then an error.
fn preset_sized_for(
    model: &str,
    spec: Sequential,
    classes: usize,
) -> Result<(Sequential, Option<String>)> {
    if !crate::spec::PRESETS.contains(&model) {
        return Ok((spec, None));
    }
    let sized = spec.with_classes(classes)?;
    if sized == spec {
        return Ok((spec, None));
    }
    let line = format!(
        "{model}: its classifier takes the data's {classes} classes (was {}), as the tutorials' Dense(num_classes)",
        spec.class_count()?
    );
    Ok((sized, Some(line)))
}

/// The data a request reads: a dataset name or folder, split and sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct DataRequest {
    /// `mnist`, `fashion-mnist`, `cifar10`, `synthetic`, `random`, or an image folder (a path:
    /// any bytes on Unix).
    pub dataset: OsString,
    /// At most this many images of each split: a seeded class-balanced sample.
    pub limit: Option<usize>,
    /// Which data model selection looks at.
    pub validation: Validation,
    /// Seeds the hold-out, the samples, the weights and the batch order.
    pub seed: u64,
    /// Images per batch (training, and scoring for evaluate).
    pub batch_size: usize,
    /// `[height, width]`: resize the dataset's images to this on load (bilinear, as Keras'
    /// `image_size`); it must be the model's input size. Without it a named dataset of
    /// another size is an error (folders are always resized to the model's input).
    pub image_size: Option<[usize; 2]>,
}

impl DataRequest {
    /// `dataset` with Keras' defaults: the source's own validation data or a tenth held out,
    /// seed 42, batches of 32.
    pub fn new(dataset: impl Into<OsString>) -> Self {
        DataRequest {
            dataset: dataset.into(),
            limit: None,
            validation: Validation::Auto(0.1),
            seed: 42,
            batch_size: 32,
            image_size: None,
        }
    }

    /// The dataset as text, for messages and records (a path's bytes that are not UTF-8 as
    /// U+FFFD).
    pub fn dataset_shown(&self) -> String {
        std::path::Path::new(&self.dataset).display().to_string()
    }

    /// The training, validation and test data in `spec`'s input shape, normalised; a part that
    /// comes out empty is an error naming the sources.
    pub fn open(&self, spec: &Sequential, normalisation: &Normalisation) -> Result<Splits> {
        let [h, w, c] = spec.input_shape;
        if let Some([height, width]) = self.image_size {
            if [height, width] != [h, w] {
                return Err(Error::Shape {
                    expected: format!(
                        "--image-size {h} {w}: the input size of model `{}`",
                        spec.name
                    ),
                    found: format!("--image-size {height} {width}"),
                });
            }
        }
        let options = data::SplitOptions {
            validation: self.validation,
            limit: self.limit,
            seed: self.seed,
            resize: self.image_size.is_some(),
        };
        let mut splits = data::open_splits(
            &self.dataset,
            ImageShape::new(h, w, c),
            spec.class_count()?,
            options,
            &Locator::from_env(),
        )?;
        let parts = [
            Some(&mut splits.train),
            splits.validation.as_mut(),
            splits.test.as_mut(),
        ];
        for part in parts.into_iter().flatten() {
            if part.is_empty() {
                return Err(Error::config(
                    "data",
                    format!(
                        "`{}`: a part of the data is empty: {:?}",
                        self.dataset_shown(),
                        splits.sources
                    ),
                ));
            }
            part.normalisation = normalisation.clone();
        }
        Ok(splits)
    }
}
