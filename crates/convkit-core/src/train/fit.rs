//! `model.fit(...)`: the one training loop every engine runs (seeded shuffle, batching,
//! augmentation, validation, progress, callbacks, backups).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use ndarray::{s, Array2, Array4};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::backup;
use super::{check_batch_size, Callback, Control, EpochLog, History, Model};
use crate::backend::Targets;
use crate::checkpoint::CheckpointMeta;
use crate::compile::Loss;
use crate::data::Dataset;
use crate::{Error, Result};

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

impl Model {
    /// Start configuring a `fit` on `train`; finish with [`Fit::run`].
    pub fn fit<'a>(&'a mut self, train: &'a Dataset) -> Fit<'a> {
        Fit::new(self, train)
    }
}

impl<'a> Fit<'a> {
    /// Keras' defaults: one epoch, batches of 32, shuffled from seed 0, no validation.
    pub(super) fn new(model: &'a mut Model, train: &'a Dataset) -> Self {
        Fit {
            model,
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
        let group = model.group.clone();
        let (rank, ranks) = (group.rank(), group.size());
        let verbosity = match self.verbosity {
            // Every rank knows the same numbers: rank 0 tells them.
            _ if !group.is_root() => Verbosity::Silent,
            Verbosity::Auto if std::io::stderr().is_terminal() => Verbosity::Bar,
            Verbosity::Auto => Verbosity::Lines,
            v => v,
        };
        if ranks > 1 {
            share_root_weights(model)?;
        }
        for cb in &mut self.callbacks {
            cb.on_train_begin(model)?;
        }
        let [h, w, c] = model.spec.input_shape;
        // A separate stream, so turning augmentation on leaves the batch order unchanged.
        // Each rank augments and drops out with streams of its own (rank 0's are those of one
        // process), so the ranks' slices do not repeat each other's draws.
        let mut augment_rng = rand_chacha::ChaCha8Rng::seed_from_u64(rank_seed(
            self.seed ^ 0xa5a5_5a5a_f00d_cafe,
            rank,
        ));
        let mut augment_scratch = Vec::new();
        // A third stream: dropout masks, drawn in core so every engine drops the same units.
        let dropout_seed = rank_seed(self.seed ^ 0x5eed_d20b_0a7c_0001, rank);
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
        // Rank 0 decides whether there is a backup to continue from; every rank then reads it.
        let restore = self.backup.as_deref().filter(|p| p.exists()).is_some();
        let restore = group_agrees(group.as_ref(), restore)?;
        if let Some(path) = self.backup.as_deref().filter(|_| restore) {
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
            let position = rank_position(
                path,
                &restored.record.augment_position,
                "augmentation",
                (rank, ranks),
            )?;
            augment_rng.set_word_pos(position);
            let dropout = rank_position(
                path,
                &restored.record.dropout_position,
                "dropout",
                (rank, ranks),
            )?;
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
            for global in order.chunks(self.batch_size) {
                // This rank's slice of the global batch (all of it for one process).
                let chunk = rank_slice(global, rank, ranks);
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
                // The step's stats are the global batch's.
                loss_sum += stats.loss as f64 * global.len() as f64;
                correct += stats.correct;
                seen += global.len();
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
            let mut seconds = start.elapsed().as_secs_f64();
            if ranks > 1 {
                // Rank 0's clock, so that every rank's History is the same.
                let mut bytes = seconds.to_le_bytes().to_vec();
                group.broadcast(&mut bytes, 0)?;
                seconds = f64::from_le_bytes(bytes.try_into().unwrap_or_default());
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let (val_loss, val_accuracy) = match &val_indices {
                Some(idx) => {
                    let e = model.evaluate_indices(
                        val_data,
                        rank_slice(idx, rank, ranks),
                        self.batch_size.max(256),
                    )?;
                    let e = GlobalScore::sum(group.as_ref(), &e)?;
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
                // Each rank's stream positions; rank 0 writes the one file.
                let positions = [augment_rng.get_word_pos(), model.network.dropout_position()];
                let [augment_position, dropout_position] =
                    positions_of_every_rank(group.as_ref(), positions)?;
                let record = backup::FitRecord {
                    epoch,
                    stopped: stop,
                    learning_rate: backup::ExactF64(model.learning_rate),
                    optimizer_step: 0, // filled in by `backup::save`
                    history: history.epochs.iter().map(Into::into).collect(),
                    augment_position,
                    dropout_position,
                    settings: settings.clone(),
                    callbacks: Vec::new(), // filled in by `backup::save`
                };
                let states = self
                    .callbacks
                    .iter()
                    .map(|cb| cb.backup())
                    .collect::<Result<_>>()?;
                if group.is_root() {
                    backup::save(path, model, backup_meta.clone(), record, states)?;
                }
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

/// `seed` for `rank`'s own random stream: `seed` itself for rank 0, so that one process and
/// rank 0 draw alike.
fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// `rank`'s share of `items` among `ranks`: contiguous, sizes differing by at most one (an
/// uneven last batch), possibly empty when there are fewer items than ranks.
fn rank_slice<T>(items: &[T], rank: usize, ranks: usize) -> &[T] {
    let n = items.len();
    &items[n * rank / ranks..n * (rank + 1) / ranks]
}

/// Every rank starts from rank 0's weights (as PyTorch's DistributedDataParallel does).
fn share_root_weights(model: &mut Model) -> Result<()> {
    let group = model.group.clone();
    let mut bytes = if group.is_root() {
        model.weights()?.to_safetensors(Default::default())?
    } else {
        Vec::new()
    };
    group.broadcast(&mut bytes, 0)?;
    if !group.is_root() {
        let (weights, _) =
            crate::Weights::from_safetensors(std::path::Path::new("<rank 0's weights>"), &bytes)?;
        model.set_weights(&weights)?;
    }
    Ok(())
}

/// A validation score summed over the ranks, each having scored its slice.
struct GlobalScore {
    loss: f64,
    accuracy: f64,
}

impl GlobalScore {
    fn sum(group: &dyn crate::collective::Collective, local: &super::Evaluation) -> Result<Self> {
        if group.size() == 1 {
            return Ok(GlobalScore {
                loss: local.loss,
                accuracy: local.accuracy,
            });
        }
        let n = local.labels.len() as f64;
        let mut sums = [local.loss * n, local.accuracy * n, n];
        group.all_reduce_f64(&mut sums)?;
        let [loss, correct, n] = sums;
        Ok(GlobalScore {
            loss: loss / n,
            accuracy: correct / n,
        })
    }
}

/// Rank 0's `flag`, on every rank.
fn group_agrees(group: &dyn crate::collective::Collective, flag: bool) -> Result<bool> {
    let mut bytes = vec![u8::from(flag)];
    group.broadcast(&mut bytes, 0)?;
    Ok(bytes == [1])
}

/// Each of `positions` (stream positions) of every rank, as a backup records them: decimal,
/// one per rank in rank order, separated by commas (one number for one process).
fn positions_of_every_rank(
    group: &dyn crate::collective::Collective,
    positions: [u128; 2],
) -> Result<[String; 2]> {
    let mine = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
    let all = group.all_gather(mine)?;
    let column = |k: usize| -> Result<String> {
        let mut column = Vec::with_capacity(all.len());
        for (rank, bytes) in all.iter().enumerate() {
            let word: [u8; 16] = bytes
                .get(16 * k..16 * (k + 1))
                .and_then(|w| w.try_into().ok())
                .ok_or_else(|| {
                    Error::config(
                        "backup",
                        format!(
                            "rank {rank} sent {} bytes of stream positions, expected 32",
                            bytes.len()
                        ),
                    )
                })?;
            column.push(u128::from_le_bytes(word).to_string());
        }
        Ok(column.join(","))
    };
    Ok([column(0)?, column(1)?])
}

/// This rank's position of the `stream` recorded in a backup as
/// [`positions_of_every_rank`] writes it.
fn rank_position(
    path: &std::path::Path,
    recorded: &str,
    stream: &str,
    (rank, ranks): (usize, usize),
) -> Result<u128> {
    let positions: Vec<&str> = recorded.split(',').collect();
    if positions.len() != ranks {
        return Err(Error::data(
            path,
            format!(
                "this backup was made by {} process{}, this fit runs on {ranks}: continue it with as many",
                positions.len(),
                if positions.len() == 1 { "" } else { "es" }
            ),
        ));
    }
    positions[rank].parse().map_err(|_| {
        Error::data(
            path,
            format!("the {stream} stream's position is not a number"),
        )
    })
}
