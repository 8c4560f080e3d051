//! The `convkit` command line: train, evaluate, predict, export, summary, backends, search, compare.

mod compare;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use convkit::prelude::*;
use convkit::search::TrialResult;
use convkit::{artifacts::Scored, data, Checkpoint, CheckpointMeta, SizeLimits};

#[derive(Parser)]
#[command(
    name = "convkit",
    version,
    about = "Keras-style CNN tutorials on burn, candle and tch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model, evaluate it on the test split and write the run's files.
    Train(TrainArgs),
    /// Evaluate saved weights on a dataset's test split.
    Evaluate(EvaluateArgs),
    /// Classify image files with saved weights.
    Predict(PredictArgs),
    /// Export saved weights for other runtimes: an ONNX inference graph.
    Export(ExportArgs),
    /// Print a model's layers, output shapes and parameter counts.
    Summary {
        /// A preset (tutorial-mnist, ...) or a spec .json.
        #[arg(long, default_value = "tutorial-mnist")]
        model: String,
        #[command(flatten)]
        size: ModelSize,
    },
    /// List the compiled-in engines and their devices.
    Backends,
    /// Hyper-parameter search: short fits over a space read from TOML, ranked by validation accuracy.
    Search(SearchArgs),
    /// Cross-check and benchmark every engine on the same work.
    Compare(compare::CompareArgs),
    /// One engine of a comparison, in its own process (used by `compare`).
    #[command(hide = true)]
    CompareWorker(compare::CompareArgs),
}

/// How large a model read from a file (spec or checkpoint) may be.
#[derive(Args)]
struct ModelSize {
    /// Accept a spec or checkpoint over convkit's size caps (100 million parameters, a
    /// 4096×4096×4 input, 64 million values in one layer's output per image).
    #[arg(long)]
    allow_large_model: bool,
}

impl ModelSize {
    fn limits(&self) -> SizeLimits {
        if self.allow_large_model {
            SizeLimits::NONE
        } else {
            SizeLimits::default()
        }
    }
}

#[derive(Args)]
struct DataArgs {
    /// mnist, fashion-mnist, cifar10, synthetic, or an image folder: train/<class>/ with val/
    /// (or validation/, valid/) and/or test/, or just <class>/ folders.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Engine to run on (see `convkit backends`).
    #[arg(long, default_value = "candle-cpu")]
    backend: String,
    /// Use at most N images of each split: a seeded sample with the classes in equal shares.
    #[arg(long)]
    limit: Option<usize>,
    /// Hold out this fraction of the training data, chosen at random from --seed, for
    /// validation (0: none). Default: the dataset's own val/ folder, else 0.1.
    #[arg(long, conflicts_with = "validate_on_test")]
    validation_split: Option<f32>,
    /// Validate on the test split, as the Keras tutorial's `validation_data=(x_test, y_test)`:
    /// early stopping and "best" weights then select on the data the model is scored on.
    #[arg(long)]
    validate_on_test: bool,
    /// Seeds the weights, the hold-out, the samples and the batch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    size: ModelSize,
    /// A preset (tutorial-mnist, tutorial-cifar10-cnn, ...) or a spec .json.
    #[arg(long, default_value = "tutorial-mnist")]
    model: String,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// sgd, adam or rmsprop (Keras defaults).
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// Override the optimizer's learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Loss; defaults to sparse_categorical_crossentropy (binary_crossentropy for one sigmoid unit).
    #[arg(long)]
    loss: Option<String>,
    /// Stop when val_loss has not improved for this many epochs, restoring the best weights.
    #[arg(long)]
    early_stopping: Option<usize>,
    /// Multiply the learning rate by 0.1 when val_loss has not improved for this many epochs.
    #[arg(long)]
    reduce_lr_on_plateau: Option<usize>,
    /// Augment training batches on the fly: any of flip, vflip, rotate=DEG, shift=FRACTION,
    /// zoom=FRACTION, comma-separated. Writes augmented.png with examples.
    #[arg(long, value_parser = |s: &str| convkit::augment::Augment::parse(s).map_err(|e| e.to_string()))]
    augment: Option<convkit::augment::Augment>,
    /// Penalise every Conv2D and Dense kernel, as Keras' kernel_regularizer: `l2=0.001`,
    /// `l1=0.0001` or `l1=F,l2=F`; the penalty is added to the loss.
    #[arg(long, value_parser = |s: &str| convkit::Regularizer::parse(s).map_err(|e| e.to_string()))]
    kernel_regularizer: Option<convkit::Regularizer>,
    /// Add a BatchNormalization (Keras' defaults) after every Conv2D and every Dense but the
    /// last; --freeze counts the layers after this.
    #[arg(long)]
    batch_norm: bool,
    /// Learning rate per epoch: `step=FACTOR/EVERY` (×FACTOR every EVERY epochs) or `exp=RATE`.
    #[arg(long, value_parser = parse_schedule)]
    lr_schedule: Option<LrSchedule>,
    /// Start from a trained checkpoint (its model replaces --model): fine-tuning, possibly on
    /// another engine than the one it was trained on.
    #[arg(long, conflicts_with = "init_pytorch")]
    init_weights: Option<PathBuf>,
    /// Start from a PyTorch torch.nn.Sequential's state_dict saved with safetensors, whose
    /// layers match --model (matched by position, shapes checked).
    #[arg(long)]
    init_pytorch: Option<PathBuf>,
    /// How that PyTorch model flattened images before its first Linear: chw (nn.Flatten on
    /// NCHW, a model written in PyTorch) or hwc (Keras' order, as python/convkit_torch.py's).
    #[arg(long, default_value = "chw", value_parser = parse_flatten_order)]
    pytorch_flatten: convkit::pytorch::FlattenOrder,
    /// Freeze the first N layers (they keep their weights; saved in the checkpoint).
    #[arg(long)]
    freeze: Option<usize>,
    /// Replace the last Dense layer by a new one with K outputs (a new classifier head).
    #[arg(long)]
    new_head: Option<usize>,
    /// Output folder. After every epoch it holds last.safetensors (everything needed to
    /// continue, see --resume) and best.safetensors (the best epoch by val_loss, or by loss
    /// without validation data).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue the interrupted run in RUN_DIR from the end of its last finished epoch, with
    /// the arguments it was started with (RUN_DIR/command.json); give no other argument.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
}

/// How a run was started, saved as `command.json` in its folder so that `--resume` can start it
/// again the same way.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCommand {
    /// The working directory relative paths in `args` refer to.
    cwd: PathBuf,
    /// The command line, program name first.
    args: Vec<String>,
}

#[derive(Args)]
struct SearchArgs {
    /// The search: base model, dataset, epochs, limit, validation_split, strategy (grid or
    /// random), seed, and a [space] of optimizer, learning_rate, batch_size, filters, dropout.
    #[arg(long)]
    space: PathBuf,
    /// At most this many trials (the first of the grid, or this many random draws).
    #[arg(long, default_value_t = 10)]
    trials: usize,
    #[arg(long, default_value = "candle-cpu")]
    backend: String,
    /// Writes search.csv (trials ranked by validation accuracy), best_model.json, best.json,
    /// and trials.jsonl (each trial as it finishes).
    #[arg(long, default_value = "runs/search")]
    out: PathBuf,
    /// Continue the search logged in --out's trials.jsonl (or this shard's log): trials
    /// already there are not run again (the space must still give them in the same order).
    #[arg(long)]
    resume: bool,
    /// Run part K of N of the search (trials K, K+N, K+2N, …), as one task of a Slurm job
    /// array, logging to --out's trials-shard-K-of-N.jsonl; join the parts with --merge.
    /// Under mpirun, the ranks split the search this way by themselves.
    #[arg(long, value_name = "K/N")]
    shard: Option<convkit::search::Shard>,
    /// Run nothing: join the finished shards' logs found in these folders into one table
    /// in --out (search.csv, best_model.json, best.json).
    #[arg(long, value_name = "FOLDER", num_args = 1..)]
    merge: Vec<PathBuf>,
}

#[derive(Args)]
struct EvaluateArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    size: ModelSize,
    /// A checkpoint file, or a run folder holding model.safetensors; repeat it to evaluate an
    /// ensemble of models.
    #[arg(long, required = true)]
    weights: Vec<PathBuf>,
    /// How an ensemble combines its models: average (probabilities) or vote (classes).
    #[arg(long, default_value = "average")]
    ensemble: convkit::artifacts::Combine,
    /// Write metrics.json and predictions.csv here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct PredictArgs {
    #[command(flatten)]
    size: ModelSize,
    /// A checkpoint file, or a run folder holding model.safetensors.
    #[arg(long)]
    weights: PathBuf,
    #[arg(long, default_value = "candle-cpu")]
    backend: String,
    /// Image files (png, jpg).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    size: ModelSize,
    /// Write an ONNX model (opset 17): input `input` [batch, H, W, C] float32, output
    /// `probabilities` [batch, classes] ([batch, 1] for a binary model).
    #[arg(long, value_name = "FILE")]
    onnx: PathBuf,
    /// Put the checkpoint's normalisation in the graph, so it takes pixel values 0–255.
    #[arg(long)]
    pixels: bool,
    /// A checkpoint file, or a run folder holding model.safetensors.
    weights: PathBuf,
}

fn main() -> ExitCode {
    convkit::keep_freed_memory_for_reuse();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => in_group(|group| train(args, group)),
        Command::Evaluate(args) => evaluate(args),
        Command::Predict(args) => predict(args),
        Command::Export(args) => export(args),
        Command::Summary { model, size } => {
            Sequential::from_preset_or_file_within(&model, &size.limits())
                .and_then(|s| s.summary())
                .map(|s| println!("{s}"))
                .map_err(Into::into)
        }
        Command::Compare(args) => compare::compare(args),
        Command::Search(args) => in_group(|group| search(args, group)),
        Command::CompareWorker(args) => compare::worker(args),
        Command::Backends => {
            backends();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run `command` in the group of processes the launcher (`mpirun`, `srun`) started this one
/// in, or alone. A rank that fails prints its error, naming itself, and stops every rank at
/// once, so that none waits for it.
fn in_group(command: impl FnOnce(&Group) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let group = convkit::collective::from_environment()?;
    let result = command(&group);
    if let Err(err) = &result {
        if group.size() > 1 {
            eprintln!("error: rank {} of {}: {err:#}", group.rank(), group.size());
            group.abort(1);
        }
    }
    result
}

/// The processes a command runs on (one, unless started by an MPI launcher).
type Group = std::rc::Rc<dyn convkit::collective::Collective>;

fn parse_flatten_order(text: &str) -> Result<convkit::pytorch::FlattenOrder, String> {
    match text {
        "chw" => Ok(convkit::pytorch::FlattenOrder::ChannelsFirst),
        "hwc" => Ok(convkit::pytorch::FlattenOrder::ChannelsLast),
        other => Err(format!("expected chw or hwc, found `{other}`")),
    }
}

/// `--lr-schedule`, before the initial rate is known.
#[derive(Clone, Copy)]
enum LrSchedule {
    Step { factor: f64, every: usize },
    Exponential { rate: f64 },
}

fn parse_schedule(text: &str) -> Result<LrSchedule, String> {
    let bad = || format!("expected step=FACTOR/EVERY or exp=RATE, found `{text}`");
    let (kind, value) = text.split_once('=').ok_or_else(bad)?;
    match kind {
        "step" => {
            let (factor, every) = value.split_once('/').ok_or_else(bad)?;
            let factor: f64 = factor.parse().map_err(|_| bad())?;
            let every: usize = every.parse().map_err(|_| bad())?;
            if factor <= 0.0 || every == 0 {
                return Err(bad());
            }
            Ok(LrSchedule::Step { factor, every })
        }
        "exp" => match value.parse::<f64>() {
            Ok(rate) if rate > 0.0 => Ok(LrSchedule::Exponential { rate }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn backends() {
    for name in convkit::backend_names() {
        match convkit::backend(name) {
            Ok(b) => match b.left_out_by_default() {
                Some(why) => println!(
                    "{name:<14} {} (compare runs it only when named: {why})",
                    b.device()
                ),
                None => println!("{name:<14} {}", b.device()),
            },
            Err(e) => println!("{name:<14} unavailable: {e}"),
        }
    }
}

fn input_shape(spec: &Sequential) -> ImageShape {
    let [h, w, c] = spec.input_shape;
    ImageShape::new(h, w, c)
}

impl DataArgs {
    fn validation(&self) -> data::Validation {
        match (self.validate_on_test, self.validation_split) {
            (true, _) => data::Validation::Test,
            (false, Some(f)) if f == 0.0 => data::Validation::None,
            (false, Some(f)) => data::Validation::Holdout(f),
            (false, None) => data::Validation::Auto(0.1),
        }
    }
}

/// The training, validation and test data `args` ask for, in `spec`'s input shape,
/// normalised; `validation` overrides how the validation data is chosen.
fn load_splits(
    args: &DataArgs,
    spec: &Sequential,
    validation: data::Validation,
    normalisation: &Normalisation,
) -> anyhow::Result<data::Splits> {
    let options = data::SplitOptions {
        validation,
        limit: args.limit,
        seed: args.seed,
    };
    let mut splits = data::open_splits(
        &args.dataset,
        input_shape(spec),
        spec.class_count()?,
        options,
        &Locator::from_env(),
    )
    .with_context(|| format!("loading `{}`", args.dataset))?;
    let parts = [
        Some(&mut splits.train),
        splits.validation.as_mut(),
        splits.test.as_mut(),
    ];
    for part in parts.into_iter().flatten() {
        if part.is_empty() {
            bail!(
                "`{}`: a part of the data is empty: {:?}",
                args.dataset,
                splits.sources
            );
        }
        part.normalisation = normalisation.clone();
    }
    Ok(splits)
}

fn verbosity(quiet: bool) -> Verbosity {
    if quiet {
        Verbosity::Silent
    } else {
        Verbosity::Auto
    }
}

fn train(args: TrainArgs, group: &Group) -> anyhow::Result<()> {
    let Some(run) = &args.resume else {
        return train_run(args, false, group);
    };
    let given: Vec<String> = std::env::args().skip(2).collect();
    let alone = given.len() == 2 && given[0] == "--resume"
        || given.len() == 1 && given[0].starts_with("--resume=");
    if !alone {
        bail!("--resume continues a run with the arguments it was started with (saved in {}); give no other argument, found {given:?}", run.join("command.json").display());
    }
    let path = run.join("command.json");
    let saved: SavedCommand =
        serde_json::from_str(&convkit::io::read_to_string_capped(&path, 1 << 20)?)
            .with_context(|| format!("{}: not a convkit command record", path.display()))?;
    std::env::set_current_dir(&saved.cwd).with_context(|| {
        format!(
            "{}: the run was started in {}, which is not there",
            path.display(),
            saved.cwd.display()
        )
    })?;
    let Command::Train(args) = Cli::try_parse_from(&saved.args)
        .with_context(|| format!("{}: the saved command does not parse", path.display()))?
        .command
    else {
        bail!(
            "{}: the saved command is not `convkit train`",
            path.display()
        );
    };
    if !args.out.join(LAST).exists() {
        bail!(
            "{}: no {LAST}: the run did not finish an epoch; start it again",
            args.out.display()
        );
    }
    train_run(args, true, group)
}

/// The resumable state of a run, written after every epoch.
const LAST: &str = "last.safetensors";

/// `convkit train`. Under an MPI launcher every rank trains its slice of each batch
/// ([`Model::distribute`]) and rank 0 alone prints, scores the model and writes the files.
fn train_run(args: TrainArgs, resume: bool, group: &Group) -> anyhow::Result<()> {
    let root = group.is_root();
    // The starting point: a preset/spec with fresh weights, or a trained checkpoint.
    let model_spec = || Sequential::from_preset_or_file_within(&args.model, &args.size.limits());
    let (mut spec, start, normalisation) = match (&args.init_weights, &args.init_pytorch) {
        (Some(path), _) => {
            let ckpt = Checkpoint::load_within(path, &args.size.limits())?;
            (ckpt.spec, Some(ckpt.weights), ckpt.meta.normalisation)
        }
        (None, Some(path)) => {
            let spec = model_spec()?;
            let weights =
                convkit::pytorch::weights_from_state_dict(path, &spec, args.pytorch_flatten)?;
            (spec, Some(weights), Normalisation::Rescale)
        }
        (None, None) => (model_spec()?, None, Normalisation::Rescale),
    };
    if let Some(k) = args.new_head {
        spec = spec.with_new_head(k)?;
    }
    if let Some(r) = args.kernel_regularizer {
        spec = spec.with_kernel_regularizer(r);
    }
    if args.batch_norm {
        spec = spec.with_batch_normalization();
    }
    if let Some(n) = args.freeze {
        spec.freeze_first(n)?;
    }
    let mut optimizer = Optimizer::by_name(&args.optimizer)?;
    if let Some(lr) = args.learning_rate {
        optimizer = optimizer.with_learning_rate(lr);
    }
    let loss = match &args.loss {
        Some(name) => Loss::by_name(name)?,
        None if spec.output_shape()?.numel() == 1 => Loss::BinaryCrossentropy,
        None => Loss::SparseCategoricalCrossentropy,
    };
    let compile = Compile::new(optimizer, loss);
    compile.check(&spec)?;
    let backend = convkit::backend(&args.data.backend)?;
    let splits = load_splits(&args.data, &spec, args.data.validation(), &normalisation)?;
    let (scored_on, scored_name) = splits.evaluation().with_context(|| {
        format!(
            "`{}` has no test split and no validation data is chosen, so nothing would score the model; hold some out with --validation-split",
            args.data.dataset
        )
    })?;
    let train = &splits.train;
    if !args.data.quiet && root {
        println!("{}", spec.summary()?);
        println!(
            "training on {} ({}), images of {}",
            backend.name(),
            backend.device(),
            train.shape
        );
        for line in &splits.sources {
            println!("  {line}");
        }
        if group.size() > 1 {
            println!(
                "data-parallel on {} processes: each takes its share of every batch of {}",
                group.size(),
                args.data.batch_size
            );
        }
    }
    let weights = match &start {
        Some(trained) => convkit::init::transfer(&spec, trained, args.data.seed)?,
        None => convkit::init::glorot_uniform(&spec, args.data.seed)?,
    };
    let optimizer_lr = compile.optimizer.learning_rate();
    let mut model = Model::with_weights(spec, compile, backend.as_ref(), &weights)?;
    model.distribute(group.clone());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let last = args.out.join(LAST);
    if !resume && root {
        // A fresh run starts over, whatever an earlier run left in the folder.
        if last.exists() {
            std::fs::remove_file(&last).with_context(|| format!("removing {}", last.display()))?;
        }
        let command = SavedCommand {
            cwd: std::env::current_dir().context("the working directory")?,
            args: std::env::args().collect(),
        };
        let json = serde_json::to_string_pretty(&command).expect("serialisable");
        convkit::io::write_bytes_atomic(&args.out.join("command.json"), json.as_bytes())?;
    }
    let meta = CheckpointMeta {
        classes: train.classes.clone(),
        normalisation,
        backend: backend.name().into(),
    };
    let best_by = if splits.validation.is_some() {
        Monitor::ValLoss
    } else {
        Monitor::Loss
    };
    let mut fit = model
        .fit(train)
        .epochs(args.epochs)
        .batch_size(args.data.batch_size)
        .seed(args.data.seed)
        .verbosity(verbosity(args.data.quiet))
        .backup(&last)
        .callback(CsvLogger::new(args.out.join("history.csv")))
        .callback(
            ModelCheckpoint::new(args.out.join("best.safetensors"), meta.clone())
                .save_best_only(best_by),
        );
    if let Some(validation) = &splits.validation {
        fit = fit.validation_data(validation);
    }
    if let Some(augment) = args.augment {
        fit = fit.augment(augment);
    }
    if let Some(augment) = args.augment.filter(|_| root) {
        // Eight training images, each followed by three augmented copies.
        let preview = augment.preview(train, 8, 3, args.data.seed)?;
        let captions = (0..preview.len())
            .map(|i| match i % 4 {
                0 => format!("original: {}", preview.classes[preview.labels[i] as usize]),
                _ => "augmented".to_string(),
            })
            .collect();
        SampleGrid::new(&preview, preview.len(), None)
            .columns(4)
            .captions(captions)
            .save(&args.out.join("augmented.png"))?;
    }
    if let Some(patience) = args.reduce_lr_on_plateau {
        fit = fit.callback(ReduceLrOnPlateau::new(Monitor::ValLoss, patience));
    }
    if let Some(schedule) = args.lr_schedule {
        let initial = optimizer_lr;
        fit = fit.callback(LearningRateScheduler(match schedule {
            LrSchedule::Step { factor, every } => Schedule::Step {
                initial,
                factor,
                every,
            },
            LrSchedule::Exponential { rate } => Schedule::Exponential { initial, rate },
        }));
    }
    if let Some(patience) = args.early_stopping {
        fit = fit.callback(
            EarlyStopping::new(Monitor::ValLoss, patience)
                .restore_best_weights(true)
                .verbose(!args.data.quiet),
        );
    }
    let out = &args.out;
    let history = match fit.run() {
        // As Keras' TerminateOnNaN: stop, and keep the last weights known to be finite.
        Err(err @ convkit::Error::NonFinite { .. }) if root => {
            let path = out.join("model.safetensors");
            model.checkpoint(meta)?.save(&path)?;
            model.spec().save_json(&out.join("model.json"))?;
            eprintln!("saved the last finite weights to {}", path.display());
            return Err(err.into());
        }
        other => other?,
    };
    if !root {
        // Rank 0 holds the same model and writes the run's files.
        return Ok(());
    }

    let scored = Scored::new(model.evaluate(scored_on, 256)?)?;
    println!("scored on the {scored_name} data:\n{}", scored.text());
    model
        .checkpoint(meta)?
        .save(&out.join("model.safetensors"))?;
    model.spec().save_json(&out.join("model.json"))?;
    history.write_csv(&out.join("history.csv"))?;
    let extra = serde_json::json!({
        "backend": backend.name(), "model": model.spec().name, "dataset": args.data.dataset,
        "optimizer": model.compile_settings().optimizer.name(), "loss": loss.name(), "epochs_run": history.epochs.len(),
        "batch_size": args.data.batch_size, "seed": args.data.seed, "train_images": train.len(),
        "validation_images": splits.validation.as_ref().map(Dataset::len), "scored_on": scored_name, "scored_images": scored_on.len(), "data_sources": splits.sources,
    });
    scored.write_metrics_json(&out.join("metrics.json"), Some(&history), extra)?;
    scored.write_predictions_csv(&out.join("predictions.csv"))?;
    let report = format!("{}\n\n{}", model.summary()?, scored.text());
    convkit::io::write_bytes_atomic(&out.join("report.txt"), report.as_bytes())?;
    for ext in ["png", "svg"] {
        TrainingCurves(&history).save(&out.join(format!("history.{ext}")))?;
        ConfusionHeatmap::new(&scored.confusion)
            .save(&out.join(format!("confusion_matrix.{ext}")))?;
        ConfusionHeatmap::new(&scored.confusion)
            .normalized(true)
            .save(&out.join(format!("confusion_matrix_normalized.{ext}")))?;
        SampleGrid::new(scored_on, 32, Some(&scored.evaluation.predicted))
            .save(&out.join(format!("samples.{ext}")))?;
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// `convkit search`: every trial in this process; one part with `--shard`; the ranks' parts
/// under an MPI launcher, gathered on rank 0; or, with `--merge`, the parts' logs joined.
fn search(args: SearchArgs, group: &Group) -> anyhow::Result<()> {
    let config = convkit::search::SearchConfig::from_toml(&args.space)?;
    let base = Sequential::from_preset_or_file(&config.model)?;
    let total = config.trials(args.trials).len();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if !args.merge.is_empty() {
        if args.shard.is_some() || group.size() > 1 {
            bail!("--merge joins the logs of finished parts in one process: give it without --shard and without an MPI launcher");
        }
        let results = merge_logs(&args.merge, &config, args.trials, &base)?;
        return write_search(&results, &base, &args.out, &args.backend);
    }
    let shard = match (args.shard, group.size()) {
        (Some(_), n) if n > 1 => bail!(
            "--shard picks one part of the search, and {n} MPI ranks already split it: give one or the other"
        ),
        (Some(shard), _) => shard,
        (None, n) => convkit::search::Shard::new(group.rank() + 1, n)?,
    };
    let mine = run_trials(&args, &config, &base, shard, group.is_root())?;
    let results = if group.size() > 1 {
        // Rank 0 gathers every rank's part and writes the table, once every rank has run its
        // trials, however long that takes.
        group.barrier()?;
        let json = serde_json::to_vec(&mine)?;
        let mut parts = Vec::new();
        for (rank, bytes) in group.all_gather(json)?.into_iter().enumerate() {
            let part: Vec<TrialResult> =
                serde_json::from_slice(&bytes).with_context(|| format!("rank {rank}'s results"))?;
            parts.push((convkit::search::Shard::new(rank + 1, group.size())?, part));
        }
        if !group.is_root() {
            return Ok(());
        }
        convkit::search::merge_parts(parts, total, &args.out)?
    } else {
        mine
    };
    if shard.parts > 1 && group.size() == 1 {
        println!(
            "shard {shard} done: {} trials logged to {}; when every shard is done, join them with\n  convkit search --space {} --trials {} --merge <each shard's --out> --out <folder>",
            results.len(),
            args.out.join(shard.log_name()).display(),
            args.space.display(),
            args.trials
        );
        return Ok(());
    }
    write_search(&results, &base, &args.out, &args.backend)
}

/// The model and compile settings of `trial` of a search from `base`.
fn trial_model(
    base: &Sequential,
    trial: &convkit::search::Trial,
) -> anyhow::Result<(Sequential, Compile)> {
    let spec = trial.spec(base)?;
    let loss = if spec.output_shape()?.numel() == 1 {
        Loss::BinaryCrossentropy
    } else {
        Loss::SparseCategoricalCrossentropy
    };
    let compile = Compile::new(trial.optimizer()?, loss);
    Ok((spec, compile))
}

/// Run `shard`'s trials of the search (every trial for [`Shard::WHOLE`]), each logged to
/// `--out` as it finishes; with `--resume`, the trials already logged are not run again.
/// `speak`: this process reports the data and each trial (rank 0, or a process alone).
fn run_trials(
    args: &SearchArgs,
    config: &convkit::search::SearchConfig,
    base: &Sequential,
    shard: convkit::search::Shard,
    speak: bool,
) -> anyhow::Result<Vec<TrialResult>> {
    let backend = convkit::backend(&args.backend)?;
    let data = DataArgs {
        dataset: config.dataset.clone(),
        backend: args.backend.clone(),
        limit: config.limit,
        validation_split: None,
        validate_on_test: false,
        seed: config.seed,
        batch_size: 32,
        quiet: true,
    };
    // Trials are ranked on validation data, never on the test split.
    let validation = match config.validation_split {
        Some(f) => data::Validation::Holdout(f),
        None => data::Validation::Auto(0.2),
    };
    let splits = load_splits(&data, base, validation, &Normalisation::Rescale)?;
    let validation = splits
        .validation
        .as_ref()
        .context("the search ranks trials on validation data: give a validation_split above 0")?;
    if speak {
        for line in &splits.sources {
            eprintln!("{line}");
        }
    }
    let trials = config.trials(args.trials);
    let total = trials.len();
    // Each trial is logged as it finishes; --resume picks up after the last one logged.
    let log = args.out.join(shard.log_name());
    let logged = if args.resume {
        TrialResult::resume_log(&log, shard)?
    } else {
        if log.exists() {
            std::fs::remove_file(&log).with_context(|| format!("removing {}", log.display()))?;
        }
        Vec::new()
    };
    let mut results = Vec::new();
    let mine = trials
        .enumerate()
        .map(|(i, trial)| (i + 1, trial))
        .filter(|(index, _)| shard.owns(*index));
    for (k, (index, trial)) in mine.enumerate() {
        let label = if shard == convkit::search::Shard::WHOLE {
            format!("trial {index}/{total}")
        } else {
            format!("trial {index}/{total} (shard {shard})")
        };
        if let Some(done) = logged.get(k) {
            if done.trial != trial {
                bail!(
                    "{}: trial {index} was {:?}, but the space now gives {trial:?}; the search changed, so start it afresh (without --resume) or in another --out",
                    log.display(),
                    done.trial
                );
            }
            eprintln!("{label}: {trial:?} → logged before, not run again");
            results.push(done.clone());
            continue;
        }
        let (spec, compile) = trial_model(base, &trial)?;
        let mut model = Model::new(spec, compile, backend.as_ref(), config.seed)?;
        let start = std::time::Instant::now();
        let fit = model
            .fit(&splits.train)
            .epochs(config.epochs)
            .batch_size(trial.batch_size)
            .seed(config.seed)
            .validation_data(validation)
            .verbosity(Verbosity::Silent)
            .run();
        // A trial that diverges is a result (it ranks last), not the end of the search.
        let (val_accuracy, val_loss) = match fit {
            Ok(history) => {
                let last = history.epochs.last().expect("at least one epoch");
                (last.val_accuracy, last.val_loss)
            }
            Err(err @ convkit::Error::NonFinite { .. }) => {
                eprintln!("{label}: {trial:?} diverged: {err}");
                (None, None)
            }
            Err(other) => return Err(other.into()),
        };
        let result = TrialResult {
            index,
            trial,
            val_accuracy,
            val_loss,
            seconds: start.elapsed().as_secs_f64(),
        };
        result.append(&log)?;
        eprintln!(
            "{label}: {:?} → val_accuracy {:.4}, val_loss {:.4}",
            result.trial,
            val_accuracy.unwrap_or(f64::NAN),
            val_loss.unwrap_or(f64::NAN)
        );
        results.push(result);
    }
    Ok(results)
}

/// The finished parts' logs found in `folders` (each part's `trials-shard-K-of-N.jsonl`),
/// joined and checked against the search the space gives.
fn merge_logs(
    folders: &[PathBuf],
    config: &convkit::search::SearchConfig,
    max: usize,
    base: &Sequential,
) -> anyhow::Result<Vec<TrialResult>> {
    use convkit::search::Shard;
    let mut parts = Vec::new();
    for folder in folders {
        let entries =
            std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))?;
        let mut found = false;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", folder.display()))?;
            let name = entry.file_name();
            let Some(shard) = name.to_str().and_then(Shard::from_log_name) else {
                continue;
            };
            found = true;
            let path = entry.path();
            parts.push((shard, TrialResult::resume_log(&path, shard)?));
        }
        if !found {
            bail!(
                "{}: no shard log (trials-shard-K-of-N.jsonl) to merge",
                folder.display()
            );
        }
    }
    let trials: Vec<_> = config.trials(max).collect();
    let merged = convkit::search::merge_parts(parts, trials.len(), &folders[0])?;
    for (result, trial) in merged.iter().zip(&trials) {
        if result.trial != *trial {
            bail!(
                "trial {} was logged as {:?}, but the space gives {trial:?}: the shards ran another search",
                result.index,
                result.trial
            );
        }
        trial_model(base, trial)?;
    }
    Ok(merged)
}

/// The search's table (search.csv, ranked by validation accuracy) and its best trial
/// (best_model.json, best.json), in `out`.
fn write_search(
    results: &[TrialResult],
    base: &Sequential,
    out: &std::path::Path,
    backend: &str,
) -> anyhow::Result<()> {
    use convkit::polars::prelude::{Column, DataFrame, IntoColumn, SortMultipleOptions};
    let results = results
        .iter()
        .map(|r| trial_model(base, &r.trial).map(|(spec, compile)| (r.clone(), spec, compile)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let col = |name: &str, v: Vec<Option<f64>>| Column::new(name.into(), v);
    let mut df = DataFrame::new_infer_height(vec![
        Column::new(
            "trial".into(),
            results.iter().map(|r| r.0.index as u32).collect::<Vec<_>>(),
        ),
        Column::new(
            "optimizer".into(),
            results
                .iter()
                .map(|r| r.0.trial.optimizer.clone())
                .collect::<Vec<_>>(),
        ),
        col(
            "learning_rate",
            results
                .iter()
                .map(|r| Some(r.2.optimizer.learning_rate()))
                .collect(),
        ),
        Column::new(
            "batch_size".into(),
            results
                .iter()
                .map(|r| r.0.trial.batch_size as u32)
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "filters".into(),
            results
                .iter()
                .map(|r| r.0.trial.filters.map(|f| f as u32))
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "dropout".into(),
            results
                .iter()
                .map(|r| r.0.trial.dropout)
                .collect::<Vec<_>>(),
        )
        .into_column(),
        col(
            "val_accuracy",
            results.iter().map(|r| r.0.val_accuracy).collect(),
        ),
        col("val_loss", results.iter().map(|r| r.0.val_loss).collect()),
        col(
            "seconds",
            results.iter().map(|r| Some(r.0.seconds)).collect(),
        ),
    ])?
    .sort(
        ["val_accuracy"],
        SortMultipleOptions::default()
            .with_order_descending(true)
            .with_nulls_last(true),
    )?;
    println!("{df}");
    convkit::table::write_csv(&mut df, &out.join("search.csv"))?;
    let best = results
        .iter()
        .filter_map(|r| r.0.val_accuracy.map(|a| (a, r)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, r)| r)
        .context("no trial finished: the space is empty, --trials is 0, or every trial diverged")?;
    let (result, spec, compile) = best;
    spec.save_json(&out.join("best_model.json"))?;
    let summary = serde_json::json!({"trial": result.trial, "compile": compile, "val_accuracy": result.val_accuracy, "val_loss": result.val_loss, "backend": backend});
    convkit::io::write_bytes_atomic(
        &out.join("best.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "best: {:?} (val_accuracy {:.4}); wrote {}",
        result.trial,
        result.val_accuracy.unwrap_or(f64::NAN),
        out.display()
    );
    Ok(())
}

fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let backend = convkit::backend(&args.data.backend)?;
    let mut members = Vec::new();
    let mut first: Option<(Checkpoint, Dataset, &str)> = None;
    for path in &args.weights {
        let ckpt = Checkpoint::load_within(path, &args.size.limits())?;
        let (test, part) = match &first {
            Some((f, ds, part))
                if f.spec.input_shape == ckpt.spec.input_shape
                    && f.meta.normalisation == ckpt.meta.normalisation =>
            {
                (ds.clone(), *part)
            }
            _ => {
                let splits = load_splits(
                    &args.data,
                    &ckpt.spec,
                    args.data.validation(),
                    &ckpt.meta.normalisation,
                )?;
                let (data, part) = splits.evaluation().with_context(|| {
                    format!(
                        "`{}` has no test split; name validation data with --validation-split",
                        args.data.dataset
                    )
                })?;
                (data.clone(), part)
            }
        };
        if !ckpt.meta.classes.is_empty() && ckpt.meta.classes != test.classes {
            bail!(
                "{}: the weights were trained on classes {:?}, but `{}` has {:?}",
                path.display(),
                ckpt.meta.classes,
                args.data.dataset,
                test.classes
            );
        }
        let model = Model::from_checkpoint(&ckpt, backend.as_ref())?;
        let evaluation = model.evaluate(&test, args.data.batch_size.max(1))?;
        if args.weights.len() > 1 {
            println!(
                "{}: {part} loss {:.4}, {part} accuracy {:.4}",
                path.display(),
                evaluation.loss,
                evaluation.accuracy
            );
        }
        members.push(evaluation);
        if first.is_none() {
            first = Some((ckpt, test, part));
        }
    }
    let (ckpt, _, part) = first.expect("at least one --weights");
    let evaluation = if members.len() == 1 {
        members.remove(0)
    } else {
        let head = ckpt.compile.check(&ckpt.spec)?;
        println!(
            "ensemble of {} models ({:?}):",
            members.len(),
            args.ensemble
        );
        convkit::artifacts::ensemble(&members, args.ensemble, ckpt.compile.loss, head)?
    };
    let scored = Scored::new(evaluation)?;
    println!("scored on the {part} data:\n{}", scored.text());
    if let Some(out) = &args.out {
        let extra = serde_json::json!({"backend": backend.name(), "model": ckpt.spec.name, "dataset": args.data.dataset, "weights": args.weights, "ensemble": format!("{:?}", args.ensemble)});
        scored.write_metrics_json(&out.join("metrics.json"), None, extra)?;
        scored.write_predictions_csv(&out.join("predictions.csv"))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::load_within(&args.weights, &args.size.limits())?;
    let export = OnnxExport::new().pixels(args.pixels);
    export.save(&checkpoint, &args.onnx)?;
    println!(
        "wrote {} (ONNX opset {}): input `{}` {}; output `{}` [batch, {}]",
        args.onnx.display(),
        convkit::onnx::OPSET,
        convkit::onnx::INPUT,
        export.input_description(&checkpoint),
        convkit::onnx::OUTPUT,
        checkpoint.spec.output_shape()?.numel(),
    );
    Ok(())
}

fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let ckpt = Checkpoint::load_within(&args.weights, &args.size.limits())?;
    let backend = convkit::backend(&args.backend)?;
    let model = Model::from_checkpoint(&ckpt, backend.as_ref())?;
    let shape = input_shape(&ckpt.spec);
    let mut pixels = Vec::with_capacity(args.images.len() * shape.len());
    for path in &args.images {
        pixels.extend(data::load_image(path, shape)?);
    }
    let classes = if ckpt.meta.classes.is_empty() {
        (0..ckpt.spec.class_count()?)
            .map(|c| c.to_string())
            .collect()
    } else {
        ckpt.meta.classes.clone()
    };
    let ds = Dataset::new(pixels, shape, vec![0; args.images.len()], classes.clone())?
        .normalise(ckpt.meta.normalisation.clone());
    let probabilities = model.predict(&ds, 64)?;
    for (path, row) in args.images.iter().zip(probabilities.rows()) {
        let row = row.to_vec();
        let scores: Vec<(String, f32)> = if row.len() == 1 {
            vec![
                (classes[0].clone(), 1.0 - row[0]),
                (classes[1].clone(), row[0]),
            ]
        } else {
            classes.iter().cloned().zip(row).collect()
        };
        let (top, p) = scores
            .iter()
            .cloned()
            .fold((String::new(), f32::NEG_INFINITY), |b, s| {
                if s.1 > b.1 {
                    s
                } else {
                    b
                }
            });
        println!("{}: {top} ({p:.4})", path.display());
        for (name, p) in &scores {
            println!("    {name:<16} {p:.4}");
        }
    }
    Ok(())
}
