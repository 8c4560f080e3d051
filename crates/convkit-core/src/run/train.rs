//! [`TrainRequest`]: train a model, score it and write its run folder, resumably.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DataRequest, Group};
use crate::artifacts::Scored;
use crate::augment::Augment;
use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::compile::{Compile, Loss, Optimizer};
use crate::data::{Dataset, Normalisation, Splits};
use crate::io::FolderLock;
use crate::plot::{ConfusionHeatmap, Figure, SampleGrid, TrainingCurves};
use crate::pytorch::FlattenOrder;
use crate::spec::{LayerKind, Regularizer, Sequential, SizeLimits};
use crate::train::{
    CsvLogger, EarlyStoppingRule, Fit, History, LearningRateScheduler, Model, ModelCheckpoint,
    Monitor, PlateauRule, ScheduleRule, Verbosity,
};
use crate::weights::Weights;
use crate::{Error, Result};

/// The resumable state of a run, written to its folder after every epoch.
pub const LAST: &str = "last.safetensors";

/// Where a run's model and first weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A preset (`tutorial-mnist`, ...) or a spec `.json`, with fresh Glorot-uniform weights.
    Spec(String),
    /// A trained checkpoint: its model, weights and normalisation (fine-tuning).
    Checkpoint(PathBuf),
    /// A PyTorch `torch.nn.Sequential`'s state dict saved with safetensors, whose layers match
    /// the preset or spec `spec` (matched by position, shapes checked).
    PyTorch {
        spec: String,
        state_dict: PathBuf,
        /// How that model flattened images before its first `Linear`.
        flatten: FlattenOrder,
    },
}

/// A new classifier for a model (fine-tuning, transfer).
#[derive(Debug, Clone, PartialEq)]
pub enum NewHead {
    /// Replace the last Dense layer by a fresh one with this many outputs.
    Units(usize),
    /// Remove the last `remove` layers (by default the fully connected ones,
    /// [`Sequential::classifier_len`]) and append `layers`, fresh: the guide's "remove the last
    /// fully connected layers … add new fully connected layers".
    Layers {
        remove: Option<usize>,
        layers: Vec<LayerKind>,
    },
}

impl NewHead {
    /// This head removing `count` layers from the end when given (only a head of layers).
    pub fn removing(self, count: Option<usize>) -> Result<Self> {
        match (self, count) {
            (NewHead::Layers { layers, .. }, Some(n)) => Ok(NewHead::Layers {
                remove: Some(n),
                layers,
            }),
            (NewHead::Units(_), Some(_)) => Err(Error::config(
                "new head",
                "a head of K units replaces the last Dense layer; removing layers goes with a head of layers",
            )),
            (head, None) => Ok(head),
        }
    }

    fn apply(&self, spec: &Sequential) -> Result<Sequential> {
        match self {
            NewHead::Units(units) => spec.with_new_head(*units),
            NewHead::Layers { remove, layers } => {
                spec.with_head(remove.unwrap_or_else(|| spec.classifier_len()), layers)
            }
        }
    }
}

impl std::str::FromStr for NewHead {
    type Err = Error;
    /// `K` (units), a stack of layers ([`LayerKind::parse_stack`]), or a `.json` file holding
    /// a JSON array of layers.
    fn from_str(text: &str) -> Result<Self> {
        if let Ok(units) = text.trim().parse() {
            return Ok(NewHead::Units(units));
        }
        let layers = if text.trim_end().ends_with(".json") {
            let path = Path::new(text.trim());
            LayerKind::parse_stack(&crate::io::read_to_string_capped(path, 1 << 20)?)
                .map_err(|e| Error::data(path, e.to_string()))?
        } else {
            LayerKind::parse_stack(text)?
        };
        Ok(NewHead::Layers {
            remove: None,
            layers,
        })
    }
}

/// Which layers to freeze: the first N, or every layer up to and including a named one.
#[derive(Debug, Clone, PartialEq)]
pub enum Freeze {
    First(usize),
    UpTo(String),
}

impl Freeze {
    fn apply(&self, spec: &mut Sequential) -> Result<()> {
        let count = match self {
            Freeze::First(n) => *n,
            Freeze::UpTo(name) => {
                let names = spec.layer_names();
                1 + names.iter().position(|n| n == name).ok_or_else(|| {
                    Error::config(
                        "freeze",
                        format!("no layer `{name}`; the layers are {}", names.join(", ")),
                    )
                })?
            }
        };
        spec.freeze_first(count)
    }
}

impl std::str::FromStr for Freeze {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Ok(match text.trim().parse() {
            Ok(n) => Freeze::First(n),
            Err(_) => Freeze::UpTo(text.trim().to_string()),
        })
    }
}

/// Changes made to the model before training, in this order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecEdits {
    /// `[height, width]`: a RandomCrop to this size as the first layer (Keras' RandomCrop:
    /// random windows in training, the centre at inference).
    pub random_crop: Option<[usize; 2]>,
    /// A new classifier head.
    pub new_head: Option<NewHead>,
    /// Penalise every Conv2D and Dense kernel.
    pub kernel_regularizer: Option<Regularizer>,
    /// A BatchNormalization after every Conv2D and every Dense but the last.
    pub batch_norm: bool,
    /// Freeze layers (counted after the edits above).
    pub freeze: Option<Freeze>,
}

impl SpecEdits {
    fn apply(&self, mut spec: Sequential) -> Result<Sequential> {
        if let Some([height, width]) = self.random_crop {
            spec = spec.with_random_crop(height, width)?;
        }
        if let Some(head) = &self.new_head {
            spec = head.apply(&spec)?;
        }
        if let Some(regularizer) = self.kernel_regularizer {
            spec = spec.with_kernel_regularizer(regularizer);
        }
        if self.batch_norm {
            spec = spec.with_batch_normalization();
        }
        if let Some(freeze) = &self.freeze {
            freeze.apply(&mut spec)?;
        }
        Ok(spec)
    }
}

/// How a run was started, saved as `command.json` in its folder so that it can be started
/// again the same way (`convkit train --resume RUN_DIR`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// The working directory relative paths in `args` refer to.
    #[serde(with = "crate::io::os_text")]
    pub cwd: PathBuf,
    /// The command line, program name first; every byte kept ([`crate::io::os_text`]).
    #[serde(with = "crate::io::os_text::list")]
    pub args: Vec<std::ffi::OsString>,
}

impl CommandRecord {
    /// The file a run folder keeps it in.
    pub const FILE: &'static str = "command.json";

    /// This process's command line and working directory.
    pub fn current() -> Result<Self> {
        Ok(CommandRecord {
            cwd: std::env::current_dir().map_err(|e| Error::io(".", e))?,
            args: std::env::args_os().collect(),
        })
    }

    /// The record in run folder `run`.
    pub fn load(run: &Path) -> Result<Self> {
        let path = run.join(Self::FILE);
        let text = crate::io::read_to_string_capped(&path, 1 << 20)?;
        serde_json::from_str(&text).map_err(|e| Error::Json {
            path,
            message: format!("not a convkit command record: {e}"),
        })
    }

    /// What `train --resume RUN [--epochs N]` continues: the record saved in `run`, its
    /// arguments ending in `--epochs N` where `given` (the arguments after the subcommand)
    /// names a new length, and whether it does (a run trained further is resumed with its new
    /// length from then on, so the record is written again). Any argument but those two is
    /// an error: a resumed run takes the arguments it was started with.
    pub fn resumed(run: &Path, given: &[OsString]) -> Result<(Self, bool)> {
        let (epochs, others) = more_epochs(given);
        let resume_only = matches!(&others[..], [flag, _] if flag == "--resume")
            || matches!(&others[..], [flag] if flag.as_encoded_bytes().starts_with(b"--resume="));
        if !resume_only {
            return Err(Error::config(
                "--resume",
                format!(
                    "it continues a run with the arguments it was started with (saved in {}); give no other argument but --epochs, found {given:?}",
                    run.join(Self::FILE).display()
                ),
            ));
        }
        let mut saved = Self::load(run)?;
        if let Some(epochs) = &epochs {
            saved.args.extend(["--epochs".into(), epochs.clone()]);
        }
        Ok((saved, epochs.is_some()))
    }

    /// Makes the record's working directory this process's, so that its relative paths mean
    /// what they meant; `run` is the folder it came from, for the error.
    pub fn enter_cwd(&self, run: &Path) -> Result<()> {
        std::env::set_current_dir(&self.cwd).map_err(|e| {
            Error::io(
                run.join(Self::FILE),
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "the run was started in {}, which is not there: {e}",
                        self.cwd.display()
                    ),
                ),
            )
        })
    }

    fn save(&self, run: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("a command record serialises");
        crate::io::write_bytes_atomic(&run.join(Self::FILE), json.as_bytes())
    }
}

/// The `--epochs` value among `given` arguments (`--epochs N` or `--epochs=N`), and the
/// arguments without it.
fn more_epochs(given: &[OsString]) -> (Option<OsString>, Vec<OsString>) {
    let (mut epochs, mut others) = (None, Vec::new());
    let mut rest = given.iter();
    while let Some(arg) = rest.next() {
        match arg.to_str().and_then(|a| a.strip_prefix("--epochs")) {
            Some("") => epochs = rest.next().cloned(),
            Some(value) if value.starts_with('=') => epochs = Some(value[1..].into()),
            Some(_) | None => others.push(arg.clone()),
        }
    }
    (epochs, others)
}

/// `convkit train`: a model trained on a dataset and scored on its test split (or validation
/// data), with everything written to [`out`](TrainRequest::out): `last.safetensors` after every
/// epoch (to resume), `best.safetensors`, `model.safetensors`, `model.json`, `history.csv`,
/// `metrics.json`, `predictions.csv`, `report.txt`, curves, confusion matrices and samples as
/// PNG and SVG, and `command.json` when [`command`](TrainRequest::command) is given.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub model: ModelSource,
    pub edits: SpecEdits,
    /// Caps on a model read from a file.
    pub size_limits: SizeLimits,
    pub data: DataRequest,
    pub optimizer: Optimizer,
    /// `None`: [`Loss::default_for`] the model.
    pub loss: Option<Loss>,
    pub epochs: usize,
    /// Augment training batches on the fly; also writes `augmented.png`.
    pub augment: Option<Augment>,
    /// Stop when the monitored quantity stops improving (Keras' EarlyStopping).
    pub early_stopping: Option<EarlyStoppingRule>,
    /// Lower the learning rate when the monitored quantity stops improving (Keras'
    /// ReduceLROnPlateau).
    pub reduce_lr_on_plateau: Option<PlateauRule>,
    /// The learning rate per epoch, from the optimizer's.
    pub lr_schedule: Option<ScheduleRule>,
    /// The run folder.
    pub out: PathBuf,
    /// No progress output.
    pub quiet: bool,
    /// Written to the run folder (on a fresh start, or when a resume changes the command),
    /// so that the run can be resumed.
    pub command: Option<CommandRecord>,
    /// Continue from the run folder's `last.safetensors` (an error when it is missing), to
    /// [`epochs`](TrainRequest::epochs) in all: more than the run had extends it.
    pub resume: bool,
    /// Start afresh in a folder that holds another run, replacing its backup; without it,
    /// such a folder is refused and nothing in it is touched.
    pub overwrite: bool,
}

/// What a [`TrainRequest`] gave.
#[derive(Debug)]
pub struct TrainOutcome {
    pub history: History,
    /// The finished model scored, and on what (`test` or `validation`); `None` on the ranks of
    /// an MPI job other than 0, which leave the scoring and the files to rank 0.
    pub scored: Option<(Scored, &'static str)>,
}

impl TrainRequest {
    /// Ten epochs of adam on `data`, the run written to `out`, nothing else set.
    pub fn new(model: ModelSource, data: DataRequest, out: impl Into<PathBuf>) -> Self {
        TrainRequest {
            model,
            edits: SpecEdits::default(),
            size_limits: SizeLimits::default(),
            data,
            optimizer: Optimizer::adam(),
            loss: None,
            epochs: 10,
            augment: None,
            early_stopping: None,
            reduce_lr_on_plateau: None,
            lr_schedule: None,
            out: out.into(),
            quiet: false,
            command: None,
            resume: false,
            overwrite: false,
        }
    }

    /// What `convkit train` prints of `outcome`: the scores and the folder written; nothing on
    /// the ranks that leave them to rank 0.
    pub fn report(&self, outcome: &TrainOutcome) -> Option<String> {
        let (scored, part) = outcome.scored.as_ref()?;
        Some(format!(
            "scored on the {part} data:\n{}\nwrote {}",
            scored.text(),
            self.out.display()
        ))
    }

    /// Train on `backend`. Under an MPI job every rank of `group` trains its slice of each
    /// batch ([`Model::distribute`]) and rank 0 alone prints, scores and writes the files.
    pub fn run(&self, backend: &dyn Backend, group: &Group) -> Result<TrainOutcome> {
        if self.resume && !self.out.join(LAST).exists() {
            return Err(Error::data(
                &self.out,
                format!("no {LAST}: the run did not finish an epoch; start it again"),
            ));
        }

        let (base, start, normalisation) = self.starting_point()?;
        let splits = super::root_first(group, || self.data.open(&base, &normalisation))?;
        let (base, resized_head) = match (&self.model, &self.edits.new_head) {
            (ModelSource::Spec(name), None) => {
                super::preset_sized_for(name, base, splits.train.classes.len())?
            }
            _ => (base, None),
        };
        let spec = self.edits.apply(base)?;
        let compile = Compile::new(
            self.optimizer.clone(),
            self.loss.map_or_else(|| Loss::default_for(&spec), Ok)?,
        );
        compile.check(&spec)?;
        let (scored_on, scored_name) = splits.evaluation_or_training();
        let root = group.is_root();
        if !self.quiet && root {
            self.announce(&spec, backend, &splits, group.size())?;
            if let Some(line) = resized_head {
                println!("{line}");
            }
        }
        let weights = match &start {
            Some(trained) => crate::init::transfer(&spec, trained, self.data.seed)?,
            None => crate::init::glorot_uniform(&spec, self.data.seed)?,
        };
        let mut model = Model::with_weights(spec, compile, backend, &weights)?;
        model.distribute(group.clone());
        // Held until the run returns: no other process writes this folder meanwhile.
        let _lock = self.prepare_folder(root)?;
        let meta = CheckpointMeta {
            classes: splits.train.classes.clone(),
            normalisation,
            backend: backend.name().into(),
        };
        if let (Some(augment), true) = (self.augment, root) {
            self.save_augmented_preview(augment, &splits.train)?;
        }
        let fit = self.fit(&mut model, &splits, meta.clone());
        let history = match fit.run() {
            // As Keras' TerminateOnNaN: stop, and keep the last weights known to be finite.
            // Every rank met the same loss (it is summed over them), so they stop together,
            // once rank 0 has saved.
            Err(err @ Error::NonFinite { .. }) => {
                if root {
                    let path = self.out.join("model.safetensors");
                    model.checkpoint(meta)?.save(&path)?;
                    model.spec().save_json(&self.out.join("model.json"))?;
                    eprintln!("saved the last finite weights to {}", path.display());
                }
                group.barrier()?;
                return Err(err);
            }
            other => other?,
        };
        if !root {
            return Ok(TrainOutcome {
                history,
                scored: None,
            });
        }
        let scored = Scored::new(model.evaluate(scored_on, 256)?)?;
        self.write_outputs(&model, meta, &history, &scored, &splits)?;
        Ok(TrainOutcome {
            history,
            scored: Some((scored, scored_name)),
        })
    }

    /// The spec before [`SpecEdits`], the trained weights it starts from (if any), and the
    /// normalisation its inputs get.
    fn starting_point(&self) -> Result<(Sequential, Option<Weights>, Normalisation)> {
        let spec_named =
            |name: &str| Sequential::from_preset_or_file_within(name, &self.size_limits);
        let (spec, start, normalisation) = match &self.model {
            ModelSource::Spec(name) => (spec_named(name)?, None, Normalisation::Rescale),
            ModelSource::Checkpoint(path) => {
                let checkpoint = Checkpoint::load_within(path, &self.size_limits)?;
                let normalisation = checkpoint.meta.normalisation;
                (checkpoint.spec, Some(checkpoint.weights), normalisation)
            }
            ModelSource::PyTorch {
                spec,
                state_dict,
                flatten,
            } => {
                let spec = spec_named(spec)?;
                let weights = crate::pytorch::weights_from_state_dict(state_dict, &spec, *flatten)?;
                (spec, Some(weights), Normalisation::Rescale)
            }
        };
        Ok((spec, start, normalisation))
    }

    /// The model's summary, the engine, and where each part of the data comes from.
    fn announce(
        &self,
        spec: &Sequential,
        backend: &dyn Backend,
        splits: &Splits,
        processes: usize,
    ) -> Result<()> {
        println!(
            "training on {} ({}); threads: {}",
            backend.name(),
            backend.device(),
            crate::threads::chosen().why
        );
        println!("{}", spec.summary()?);
        println!("images of {}", splits.train.shape);
        for line in &splits.sources {
            println!("  {line}");
        }
        if processes > 1 {
            println!(
                "data-parallel on {processes} processes: each takes its share of every batch of {}",
                self.data.batch_size
            );
        }
        Ok(())
    }

    /// The run folder, made and, on rank 0, locked for the run ([`FolderLock`]); a folder
    /// holding another run refused unless asked to overwrite it; on rank 0, temporary files
    /// a killed write left removed, the backup removed when overwriting, and the command
    /// recorded.
    fn prepare_folder(&self, root: bool) -> Result<Option<FolderLock>> {
        let lock = match root {
            true => Some(FolderLock::acquire(&self.out)?),
            false => None,
        };
        let last = self.out.join(LAST);
        if !self.resume && !self.overwrite && last.exists() {
            return Err(Error::data(
                &self.out,
                format!("holds a run ({LAST}): continue it with `convkit train --resume {0}` (with --epochs N to train it further), start over in it with --overwrite, or give another --out", self.out.display()),
            ));
        }
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        if !root {
            return Ok(lock);
        }
        let stale = crate::io::remove_stale_temporaries(&self.out)?;
        if stale > 0 && !self.quiet {
            eprintln!(
                "removed {stale} temporary file(s) an interrupted write left in {}",
                self.out.display()
            );
        }
        if self.overwrite && !self.resume && last.exists() {
            std::fs::remove_file(&last).map_err(|e| Error::io(&last, e))?;
        }
        if let Some(command) = &self.command {
            command.save(&self.out)?;
        }
        Ok(lock)
    }

    /// Eight training images, each followed by three augmented copies, as `augmented.png`.
    fn save_augmented_preview(&self, augment: Augment, train: &Dataset) -> Result<()> {
        let preview = augment.preview(train, 8, 3, self.data.seed)?;
        let captions = (0..preview.len())
            .map(|i| match i % 4 {
                0 => format!("original: {}", preview.classes[preview.labels[i] as usize]),
                _ => "augmented".to_string(),
            })
            .collect();
        SampleGrid::new(&preview, preview.len(), None)
            .columns(4)
            .captions(captions)
            .save(&self.out.join("augmented.png"))
    }

    /// The fit this request asks for, with the run folder's backup and callbacks.
    fn fit<'a>(&self, model: &'a mut Model, splits: &'a Splits, meta: CheckpointMeta) -> Fit<'a> {
        let best_by = if splits.validation.is_some() {
            Monitor::ValLoss
        } else {
            Monitor::Loss
        };
        let initial_rate = model.compile_settings().optimizer.learning_rate();
        let mut fit = model
            .fit(&splits.train)
            .epochs(self.epochs)
            .batch_size(self.data.batch_size)
            .seed(self.data.seed)
            .verbosity(if self.quiet {
                Verbosity::Silent
            } else {
                Verbosity::Auto
            })
            .backup(self.out.join(LAST))
            .callback(CsvLogger::new(self.out.join("history.csv")))
            .callback(
                ModelCheckpoint::new(self.out.join("best.safetensors"), meta)
                    .save_best_only(best_by),
            );
        if let Some(validation) = &splits.validation {
            fit = fit.validation_data(validation);
        }
        if let Some(augment) = self.augment {
            fit = fit.augment(augment);
        }
        if let Some(rule) = self.reduce_lr_on_plateau {
            fit = fit.callback(rule.callback());
        }
        if let Some(rule) = self.lr_schedule {
            fit = fit.callback(LearningRateScheduler(rule.starting_at(initial_rate)));
        }
        if let Some(rule) = self.early_stopping {
            fit = fit.callback(rule.callback(!self.quiet));
        }
        fit
    }

    /// The finished run's files (rank 0).
    fn write_outputs(
        &self,
        model: &Model,
        meta: CheckpointMeta,
        history: &History,
        scored: &Scored,
        splits: &Splits,
    ) -> Result<()> {
        let out = &self.out;
        let (scored_on, scored_name) = splits.evaluation_or_training();
        model
            .checkpoint(meta.clone())?
            .save(&out.join("model.safetensors"))?;
        model.spec().save_json(&out.join("model.json"))?;
        history.write_csv(&out.join("history.csv"))?;
        let extra = serde_json::json!({
            "backend": meta.backend, "model": model.spec().name, "dataset": self.data.dataset_shown(),
            "optimizer": model.compile_settings().optimizer.name(),
            "loss": model.compile_settings().loss.name(), "epochs_run": history.epochs.len(),
            "batch_size": self.data.batch_size, "seed": self.data.seed,
            "train_images": splits.train.len(),
            "validation_images": splits.validation.as_ref().map(Dataset::len),
            "scored_on": scored_name, "scored_images": scored_on.len(),
            "data_sources": splits.sources,
        });
        scored.write_metrics_json(&out.join("metrics.json"), Some(history), extra)?;
        scored.write_predictions_csv(&out.join("predictions.csv"))?;
        let report = format!("{}\n\n{}", model.summary()?, scored.text());
        crate::io::write_bytes_atomic(&out.join("report.txt"), report.as_bytes())?;
        for ext in ["png", "svg"] {
            TrainingCurves(history).save(&out.join(format!("history.{ext}")))?;
            ConfusionHeatmap::new(&scored.confusion)
                .save(&out.join(format!("confusion_matrix.{ext}")))?;
            ConfusionHeatmap::new(&scored.confusion)
                .normalized(true)
                .save(&out.join(format!("confusion_matrix_normalized.{ext}")))?;
            SampleGrid::new(scored_on, 32, Some(&scored.evaluation.predicted))
                .save(&out.join(format!("samples.{ext}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_resume_takes_only_a_new_length() {
        let run = tempfile::tempdir().unwrap();
        let record = CommandRecord {
            cwd: run.path().to_path_buf(),
            args: args(&["convkit", "train", "--epochs", "2"]),
        };
        record.save(run.path()).unwrap();
        let dir = run.path().to_str().unwrap();
        let (same, longer) = CommandRecord::resumed(run.path(), &args(&["--resume", dir])).unwrap();
        assert_eq!((same, longer), (record.clone(), false));
        for given in [
            args(&["--resume", dir, "--epochs", "5"]),
            args(&["--epochs=5", &format!("--resume={dir}")]),
        ] {
            let (more, longer) = CommandRecord::resumed(run.path(), &given).unwrap();
            assert!(longer);
            assert_eq!(more.args[4..], args(&["--epochs", "5"]));
        }
        let e = CommandRecord::resumed(run.path(), &args(&["--resume", dir, "--seed", "9"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("give no other argument but --epochs"), "{e}");
        let e = CommandRecord::resumed(&run.path().join("nothing"), &args(&["--resume", "x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("command.json"), "{e}");
    }
}
