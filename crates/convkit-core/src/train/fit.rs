//! `model.fit(...)`: the one training loop every engine runs (seeded shuffle, batching,
//! augmentation, validation, progress, callbacks, backups).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use ndarray::{s, Array2, Array4};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::backup;
use super::{check_batch_size, Callback, Control, EpochLog, History, Model};
use crate::backend::Targets;
use crate::checkpoint::CheckpointMeta;
use crate::compile::Loss;
use crate::data::Dataset;
use crate::weights::Weights;
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
        let (order, val_indices) = self.orders()?;
        let mut state = self.start(order, val_indices)?;
        let mut history = History::default();
        let (first_epoch, finished) = self.restore(&mut state, &mut history)?;
        for epoch in (first_epoch..=self.epochs).take_while(|_| !finished) {
            // What TerminateOnNaN falls back to: a step with a NaN loss has already moved
            // the weights, so the last weights known to be finite are this epoch's start.
            let epoch_start = self.model.weights()?;
            for cb in &mut self.callbacks {
                cb.on_epoch_begin(epoch, self.model)?;
            }
            let (loss, accuracy, seconds) = self.train_epoch(&mut state, epoch, &epoch_start)?;
            let (val_loss, val_accuracy) = self.validate(&state, epoch, &epoch_start)?;
            let log = EpochLog {
                epoch,
                loss,
                accuracy,
                val_loss,
                val_accuracy,
                seconds,
                learning_rate: self.model.learning_rate,
            };
            let (epochs, batches) = (self.epochs, state.batches);
            let line = format_args!("Epoch {epoch}/{epochs} - {batches}/{batches} - {log}");
            state.verbosity.line(line);
            history.epochs.push(log);
            let mut stop = false;
            for cb in &mut self.callbacks {
                stop |= cb.on_epoch_end(&history, self.model)? == Control::Stop;
            }
            self.save_backup(&state, &history, epoch, stop)?;
            if stop {
                break;
            }
        }
        for cb in &mut self.callbacks {
            cb.on_train_end(&history, self.model)?;
        }
        Ok(history)
    }

    /// The settings checked, and the training order with the validation indices, if any.
    fn orders(&self) -> Result<(Vec<usize>, Option<Vec<usize>>)> {
        let train = self.train;
        self.model.check_data(train)?;
        check_batch_size(self.batch_size)?;
        if self.epochs == 0 {
            return Err(Error::config("epochs", "must be at least 1, found 0"));
        }
        if let Some(v) = self.validation {
            self.model.check_data(v)?;
        }
        let (order, val_indices): (Vec<usize>, _) = match (self.validation, self.validation_split) {
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
        // Refused now rather than after the first epoch, when it would first look.
        let watches_validation = (self.callbacks.iter())
            .filter_map(|cb| cb.monitors())
            .find(|(_, monitor)| monitor.needs_validation());
        if let (None, Some((callback, monitor))) = (&val_indices, watches_validation) {
            return Err(Error::config(
                "callback",
                format!(
                    "{callback} monitors {}, but this fit has no validation data: give it validation data or a validation split, or monitor {} instead",
                    monitor.name(),
                    monitor.name().trim_start_matches("val_")
                ),
            ));
        }
        Ok((order, val_indices))
    }

    /// Everything the epochs share: the ranks, the streams, the batch buffer, the backup's
    /// settings; the ranks start from rank 0's weights and the callbacks are told.
    fn start(&mut self, order: Vec<usize>, val_indices: Option<Vec<usize>>) -> Result<Run<'a>> {
        let (model, train) = (&mut *self.model, self.train);
        let group = model.group.clone();
        let (rank, ranks) = (group.rank(), group.size());
        let verbosity = match self.verbosity {
            // Every rank knows the same numbers: rank 0 tells them.
            _ if !group.is_root() => Verbosity::Silent,
            Verbosity::Auto if std::io::stderr().is_terminal() => Verbosity::Bar,
            Verbosity::Auto => Verbosity::Lines,
            v => v,
        };
        let settings = backup::FitSettings {
            batch_size: self.batch_size,
            seed: self.seed,
            shuffle: self.shuffle,
            train_images: order.len(),
            validation_images: val_indices.as_ref().map(Vec::len),
            augment: format!("{:?}", self.augment),
        };
        if ranks > 1 {
            let mine = fingerprint(model, &settings, (train, self.validation), self.epochs)?;
            ranks_agree(group.as_ref(), mine)?;
            share_root_weights(model)?;
        }
        for cb in &mut self.callbacks {
            cb.on_train_begin(model)?;
        }
        // A third stream: dropout masks, drawn in core so every engine drops the same units.
        let dropout_seed = rank_seed(self.seed ^ 0x5eed_d20b_0a7c_0001, rank);
        model.network.set_dropout_stream(dropout_seed, 0);
        let [h, w, c] = model.spec.input_shape;
        let targets = match model.compile.loss {
            Loss::SparseCategoricalCrossentropy if train.soft_targets.is_some() => {
                return Err(Error::config(
                    "loss",
                    "sparse_categorical_crossentropy takes class indices, and this data has soft targets: use binary_crossentropy (one sigmoid unit) or categorical_crossentropy",
                ))
            }
            Loss::SparseCategoricalCrossentropy => {
                Targets::Sparse(Vec::with_capacity(self.batch_size))
            }
            Loss::CategoricalCrossentropy => {
                Targets::Dense(Array2::zeros((0, train.num_classes())))
            }
            Loss::BinaryCrossentropy => Targets::Binary(Vec::with_capacity(self.batch_size)),
        };
        Ok(Run {
            settings,
            backup_meta: CheckpointMeta {
                classes: train.classes.clone(),
                normalisation: train.normalisation.clone(),
                backend: model.backend.clone(),
            },
            batches: order.len().div_ceil(self.batch_size),
            buffer: Array4::zeros((self.batch_size.min(order.len()), h, w, c)),
            batch_order: BatchOrder::new(order, self.seed, self.shuffle),
            batcher: train.batcher()?,
            targets,
            val_indices,
            rank,
            group,
            verbosity,
            // A separate stream, so turning augmentation on leaves the batch order unchanged.
            // Each rank augments and drops out with streams of its own (rank 0's are those of
            // one process), so the ranks' slices do not repeat each other's draws.
            augment_rng: ChaCha8Rng::seed_from_u64(rank_seed(
                self.seed ^ 0xa5a5_5a5a_f00d_cafe,
                rank,
            )),
            augment_scratch: Vec::new(),
            dropout_seed,
        })
    }

    /// Continue from the backup when there is one (rank 0 decides, every rank reads it):
    /// the History, the streams' positions, the shuffles replayed, the callbacks' state.
    /// Returns the first epoch to run and whether a callback had stopped the run.
    fn restore(&mut self, state: &mut Run<'a>, history: &mut History) -> Result<(usize, bool)> {
        let there = self.backup.as_deref().filter(|p| p.exists()).is_some();
        let restore = group_agrees(state.group.as_ref(), there)?;
        let Some(path) = self.backup.as_deref().filter(|_| restore) else {
            return Ok((1, false));
        };
        // Rank 0 reads the backup and sends it, so every rank continues from the same state
        // whatever copy its own node holds.
        let mut bytes = if state.group.is_root() {
            crate::io::read_capped(path, u64::MAX)?
        } else {
            Vec::new()
        };
        state.group.broadcast(&mut bytes, 0)?;
        let (settings, meta) = (&state.settings, &state.backup_meta);
        let restored = backup::restore((path, &bytes), self.model, settings, meta)?;
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
        *history = History::from(&restored);
        let done = restored.record.epoch;
        let ranks = (state.rank, state.group.size());
        let record = &restored.record;
        let augment = rank_position(path, &record.augment_position, "augmentation", ranks)?;
        state.augment_rng.set_word_pos(augment);
        let dropout = rank_position(path, &record.dropout_position, "dropout", ranks)?;
        self.model
            .network
            .set_dropout_stream(state.dropout_seed, dropout);
        // Replays the shuffles of the epochs done, so order and stream are where they were.
        for _ in 0..done {
            state.batch_order.next_epoch();
        }
        let stopped = restored.record.stopped;
        for (cb, saved) in self.callbacks.iter_mut().zip(restored.callbacks) {
            cb.restore(saved)?;
        }
        let how = if stopped {
            ", stopped by a callback"
        } else {
            ""
        };
        state.verbosity.line(format_args!(
            "Restored from {}: {done} of {} epochs done{how}",
            path.display(),
            self.epochs,
        ));
        Ok((done + 1, stopped))
    }

    /// One epoch's steps, with progress; the mean loss and accuracy over its images and its
    /// seconds (rank 0's clock). A non-finite loss restores `epoch_start` and is the error.
    fn train_epoch(
        &mut self,
        state: &mut Run<'a>,
        epoch: usize,
        epoch_start: &Weights,
    ) -> Result<(f64, f64, f64)> {
        let (model, batches, ranks) = (&mut *self.model, state.batches, state.group.size());
        let bar = progress_bar(state.verbosity, epoch, self.epochs, batches);
        let start = Instant::now();
        let mut last_line = start;
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        for global in state.batch_order.next_epoch().chunks(self.batch_size) {
            // This rank's slice of the global batch (all of it for one process).
            let chunk = rank_slice(global, state.rank, ranks);
            let mut x = state.buffer.slice_mut(s![..chunk.len(), .., .., ..]);
            state.batcher.fill(chunk, x.view_mut())?;
            let (rng, scratch) = (&mut state.augment_rng, &mut state.augment_scratch);
            self.augment.apply(x.view_mut(), rng, scratch);
            fill_targets(&mut state.targets, self.train, chunk);
            let stats = model.network.train_step(x.view(), &state.targets)?;
            let batch = seen / self.batch_size;
            if !stats.loss.is_finite() {
                model.set_weights(epoch_start)?;
                return Err(Error::NonFinite {
                    what: "training loss",
                    value: stats.loss as f64,
                    at: format!("epoch {epoch}, batch {} of {batches}", batch + 1),
                    kept: format!("the weights from the start of epoch {epoch}"),
                });
            }
            for cb in &mut self.callbacks {
                cb.on_batch_end(batch, &stats)?;
            }
            // The step's stats are the global batch's.
            loss_sum += stats.loss as f64 * global.len() as f64;
            correct += stats.correct;
            seen += global.len();
            let (loss, accuracy) = (loss_sum / seen as f64, correct as f64 / seen as f64);
            if let Some(bar) = &bar {
                bar.set_message(format!("loss: {loss:.4} - accuracy: {accuracy:.4}"));
                bar.inc(1);
            } else if state.verbosity == Verbosity::Lines
                && last_line.elapsed() >= PROGRESS_LINE_EVERY
            {
                last_line = Instant::now();
                state.verbosity.line(format_args!(
                    "Epoch {epoch}/{} - {}/{batches} - {:.0}s - loss: {loss:.4} - accuracy: {accuracy:.4}",
                    self.epochs,
                    seen.div_ceil(self.batch_size),
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let mut seconds = start.elapsed().as_secs_f64();
        if ranks > 1 {
            // Rank 0's clock, so that every rank's History is the same.
            let mut bytes = seconds.to_le_bytes().to_vec();
            state.group.broadcast(&mut bytes, 0)?;
            seconds = f64::from_le_bytes(bytes.try_into().unwrap_or_default());
        }
        Ok((
            loss_sum / seen as f64,
            correct as f64 / seen as f64,
            seconds,
        ))
    }

    /// The validation loss and accuracy after `epoch`, summed over the ranks; a non-finite
    /// loss is the error, the model keeping the last finite weights.
    fn validate(
        &mut self,
        state: &Run<'a>,
        epoch: usize,
        epoch_start: &Weights,
    ) -> Result<(Option<f64>, Option<f64>)> {
        let Some(indices) = &state.val_indices else {
            return Ok((None, None));
        };
        let model = &mut *self.model;
        let data = self.validation.unwrap_or(self.train);
        let mine = rank_slice(indices, state.rank, state.group.size());
        let local = model.evaluate_indices(data, mine, self.batch_size.max(256))?;
        let e = GlobalScore::sum(state.group.as_ref(), &local)?;
        if !e.loss.is_finite() {
            // The epoch's last step may have left non-finite weights behind.
            let kept = if model.weights()?.check(&model.spec).is_ok() {
                format!("the weights from the end of epoch {epoch}")
            } else {
                model.set_weights(epoch_start)?;
                format!("the weights from the start of epoch {epoch}")
            };
            return Err(Error::NonFinite {
                what: "validation loss",
                value: e.loss,
                at: format!("the end of epoch {epoch}"),
                kept,
            });
        }
        Ok((Some(e.loss), Some(e.accuracy)))
    }

    /// The backup after `epoch`, when one is asked for: each rank's stream positions, and
    /// rank 0 writes the one file.
    fn save_backup(
        &mut self,
        state: &Run<'a>,
        history: &History,
        epoch: usize,
        stop: bool,
    ) -> Result<()> {
        let Some(path) = &self.backup else {
            return Ok(());
        };
        let model = &mut *self.model;
        let positions = [
            state.augment_rng.get_word_pos(),
            model.network.dropout_position(),
        ];
        let [augment_position, dropout_position] =
            positions_of_every_rank(state.group.as_ref(), positions)?;
        let record = backup::FitRecord {
            epoch,
            stopped: stop,
            learning_rate: backup::ExactF64(model.learning_rate),
            optimizer_step: 0, // filled in by `backup::save`
            history: history.epochs.iter().map(Into::into).collect(),
            augment_position,
            dropout_position,
            settings: state.settings.clone(),
            callbacks: Vec::new(), // filled in by `backup::save`
        };
        let states = (self.callbacks.iter())
            .map(|cb| cb.backup())
            .collect::<Result<_>>()?;
        if state.group.is_root() {
            backup::save(path, model, state.backup_meta.clone(), record, states)?;
        }
        Ok(())
    }
}

/// What the epochs of one [`Fit::run`] share.
struct Run<'a> {
    group: std::rc::Rc<dyn crate::collective::Collective>,
    rank: usize,
    verbosity: Verbosity,
    batch_order: BatchOrder,
    /// Steps per epoch.
    batches: usize,
    batcher: crate::data::Batcher<'a>,
    /// One batch of images, `[batch, H, W, C]`, reused.
    buffer: Array4<f32>,
    targets: Targets,
    /// The validation images' indices (into the validation data, or the held-out tail).
    val_indices: Option<Vec<usize>>,
    augment_rng: ChaCha8Rng,
    augment_scratch: Vec<f32>,
    dropout_seed: u64,
    settings: backup::FitSettings,
    backup_meta: CheckpointMeta,
}

fn fill_targets(targets: &mut Targets, ds: &Dataset, chunk: &[usize]) {
    match targets {
        Targets::Sparse(v) => {
            v.clear();
            v.extend(chunk.iter().map(|&i| ds.labels[i]));
        }
        Targets::Binary(v) => {
            v.clear();
            v.extend(chunk.iter().map(|&i| match &ds.soft_targets {
                Some(rows) => rows[[i, 1]],
                None => ds.labels[i] as f32,
            }));
        }
        Targets::Dense(a) => {
            if a.nrows() != chunk.len() {
                *a = Array2::zeros((chunk.len(), ds.num_classes()));
            }
            match &ds.soft_targets {
                Some(rows) => {
                    for (r, &i) in chunk.iter().enumerate() {
                        a.row_mut(r).assign(&rows.row(i));
                    }
                }
                None => {
                    a.fill(0.0);
                    for (r, &i) in chunk.iter().enumerate() {
                        a[[r, ds.labels[i] as usize]] = 1.0;
                    }
                }
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

/// What the ranks of one fit must share, field by field: convkit's version, the engine, the
/// model, its compile settings and learning rate, the data (length, a SHA-256 of images and
/// targets, classes, normalisation) and the fit's settings. The model is hashed.
fn fingerprint(
    model: &Model,
    settings: &backup::FitSettings,
    (train, validation): (&Dataset, Option<&Dataset>),
    epochs: usize,
) -> Result<Vec<(&'static str, String)>> {
    use sha2::{Digest, Sha256};
    fn json<T: serde::Serialize>(value: &T) -> Result<String> {
        serde_json::to_string(value)
            .map_err(|e| Error::config("ranks", format!("the fit's fingerprint: {e}")))
    }
    // The first 8 bytes: enough to tell data apart in a message.
    let hex = |hash: Sha256| crate::io::hex(&hash.finalize()[..8]);
    let data = |ds: &Dataset| {
        let mut hash = Sha256::new();
        hash.update(&ds.images);
        ds.labels.iter().for_each(|l| hash.update(l.to_le_bytes()));
        if let Some(rows) = &ds.soft_targets {
            rows.iter().for_each(|v| hash.update(v.to_le_bytes()));
        }
        format!(
            "{} images of {}, SHA-256 {}…",
            ds.len(),
            ds.shape,
            hex(hash)
        )
    };
    let spec = model.spec();
    let described = format!(
        "`{}`, {} layers, SHA-256 {}…",
        spec.name,
        spec.layers.len(),
        hex(Sha256::new_with_prefix(json(spec)?))
    );
    let mut fields = vec![
        ("convkit version", env!("CARGO_PKG_VERSION").to_string()),
        ("engine", model.backend.clone()),
        ("model", described),
        ("compile settings", json(model.compile_settings())?),
        ("learning rate", format!("{:?}", model.learning_rate)),
        ("training data", data(train)),
        ("class names", train.classes.join(", ")),
        ("normalisation", format!("{:?}", train.normalisation)),
        (
            "fit settings",
            format!("{} epochs, {}", epochs, json(settings)?),
        ),
    ];
    if let Some(v) = validation {
        fields.push(("validation data", data(v)));
    }
    Ok(fields)
}

/// Every rank's [`fingerprint`] compared with rank 0's: the first field that differs is the
/// error, on every rank, naming the rank and the field (before any collective call whose
/// length depends on them could wait for ever).
fn ranks_agree(
    group: &dyn crate::collective::Collective,
    mine: Vec<(&'static str, String)>,
) -> Result<()> {
    let encode = |fields: &[(&str, String)]| -> Vec<u8> {
        let values: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
        serde_json::to_vec(&values).expect("strings serialise")
    };
    let all = group.all_gather(encode(&mine))?;
    let decode = |rank: usize| -> Result<Vec<String>> {
        serde_json::from_slice(&all[rank]).map_err(|e| {
            Error::config(
                "ranks",
                format!("rank {rank} sent an unreadable fingerprint: {e}"),
            )
        })
    };
    let short = |text: &str| -> String {
        match text.char_indices().nth(120) {
            Some((at, _)) => format!("{}…", &text[..at]),
            None => text.to_string(),
        }
    };
    let root = decode(0)?;
    for rank in 1..all.len() {
        let theirs = decode(rank)?;
        let differs = (mine.iter().map(|(name, _)| *name))
            .zip(root.iter().zip(&theirs))
            .find(|(_, (a, b))| a != b);
        if let Some((field, (ours, other))) = differs {
            return Err(Error::config(
                "ranks",
                format!(
                    "rank {rank} has other {field} than rank 0: {} there, {} on rank 0; every rank must train the same model on the same data",
                    short(other),
                    short(ours)
                ),
            ));
        }
        if theirs.len() != root.len() {
            return Err(Error::config(
                "ranks",
                format!(
                    "rank {rank} has validation data and rank 0 has not, or the other way round"
                ),
            ));
        }
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
