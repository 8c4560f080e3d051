//! The `convkit` command line: train, evaluate, predict, export, summary, backends, search, compare.

mod compare;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use convkit::data::Validation;
use convkit::run::{self, DataRequest, Group, ModelSource};
use convkit::{Optimizer, Sequential, SizeLimits};

#[derive(Parser)]
#[command(
    name = "convkit",
    version,
    about = "Keras-style CNN tutorials on burn, candle and tch",
    args_override_self = true,
    after_help = "Exit status: 0 success, 1 error, 2 bad arguments, 3 a compare check failed.\n\
Environment: CONVKIT_DATA (dataset folder), CONVKIT_OFFLINE=1 (never download), CONVKIT_MIRROR \
(dataset mirror URL), CONVKIT_THREADS (as --threads), CONVKIT_PYTHON (python for compare's \
PyTorch rows), CONVKIT_COLLECTIVE_TIMEOUT (seconds an MPI rank waits for the others)."
)]
struct Cli {
    /// Compute threads for every engine (candle, burn, libtorch). Default: CONVKIT_THREADS,
    /// else under mpirun or srun the node's cores shared by its ranks, else every core.
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
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
    /// Fetch named datasets into convkit's cache (~/.cache/convkit) through its checksummed
    /// downloader, with progress, or say where each is already (CONVKIT_DATA, the cache,
    /// /usr/share/datasets). CONVKIT_MIRROR replaces the mirrors; CONVKIT_OFFLINE=1 only looks.
    Download {
        /// mnist, fashion-mnist, cifar10.
        #[arg(required = true)]
        datasets: Vec<convkit::data::DatasetName>,
    },
    /// Hyper-parameter search: short fits over a space read from TOML, ranked by validation accuracy.
    Search(SearchArgs),
    /// Cross-check and benchmark every engine on the same work.
    Compare(compare::CompareArgs),
    /// One engine of a comparison, in its own process (used by `compare`).
    #[command(hide = true)]
    CompareWorker(compare::CompareArgs),
    /// Print a shell completion script: `convkit completions bash > ~/.local/share/bash-completion/completions/convkit`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
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
    /// mnist, fashion-mnist, cifar10, synthetic, random (tutorial 1: noise, soft targets), or an
    /// image folder: train/<class>/ with val/ (or validation/, valid/) and/or test/, or just
    /// <class>/ folders.
    #[arg(long, default_value = "mnist")]
    dataset: OsString,
    /// Engine to run on (see `convkit backends`); the first compiled in by default.
    #[arg(long, default_value = convkit::default_backend_name(), value_parser = engines())]
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
    /// Resize the dataset's images to HEIGHT WIDTH on load (bilinear, as Keras' image_size);
    /// it must be the model's input size. Folders are always resized to the model's input.
    #[arg(long, num_args = 2, value_names = ["HEIGHT", "WIDTH"])]
    image_size: Option<Vec<usize>>,
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
    /// With Keras' defaults.
    #[arg(long, default_value = "adam", ignore_case = true, value_parser = convkit::Optimizer::NAMES)]
    optimizer: String,
    /// Override the optimizer's learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Default: sparse_categorical_crossentropy (binary_crossentropy for one sigmoid unit).
    #[arg(long, ignore_case = true, value_parser = convkit::Loss::NAMES)]
    loss: Option<String>,
    /// Stop when the monitored quantity stops improving: a patience (`3`) or Keras' EarlyStopping
    /// arguments, `monitor=val_accuracy,patience=3,min_delta=0.001,restore_best_weights=true`.
    /// Defaults: val_loss, patience 0, min_delta 0, best weights restored (Keras: not restored).
    #[arg(long, value_name = "PATIENCE|KEY=VALUE,..")]
    early_stopping: Option<convkit::EarlyStoppingRule>,
    /// Lower the learning rate when the monitored quantity stops improving: a patience (`2`) or
    /// Keras' ReduceLROnPlateau arguments, `monitor=val_loss,factor=0.5,patience=2,
    /// min_delta=0.0001,cooldown=0,min_lr=0`, defaulting as in Keras.
    #[arg(
        long = "reduce-lr",
        alias = "reduce-lr-on-plateau",
        value_name = "PATIENCE|KEY=VALUE,.."
    )]
    reduce_lr_on_plateau: Option<convkit::PlateauRule>,
    /// Augment training batches on the fly: any of flip, vflip, rotate=DEG, shift=FRACTION,
    /// zoom=FRACTION, comma-separated. Writes augmented.png with examples.
    #[arg(long, value_parser = |s: &str| convkit::augment::Augment::parse(s).map_err(|e| e.to_string()))]
    augment: Option<convkit::augment::Augment>,
    /// Penalise every Conv2D and Dense kernel, as Keras' kernel_regularizer: `l2=0.001`,
    /// `l1=0.0001` or `l1=F,l2=F`; the penalty is added to the loss.
    #[arg(long, value_parser = |s: &str| convkit::Regularizer::parse(s).map_err(|e| e.to_string()))]
    kernel_regularizer: Option<convkit::Regularizer>,
    /// Crop each training image to HEIGHT WIDTH at a random place (Keras' RandomCrop as the
    /// model's first layer; the centre window at inference); the rest of the model sees the
    /// windows. --freeze counts this layer.
    #[arg(long, num_args = 2, value_names = ["HEIGHT", "WIDTH"])]
    random_crop: Option<Vec<usize>>,
    /// Add a BatchNormalization (Keras' defaults) after every Conv2D and every Dense but the
    /// last; --freeze counts the layers after this.
    #[arg(long)]
    batch_norm: bool,
    /// Learning rate per epoch: `step=FACTOR/EVERY` (×FACTOR every EVERY epochs) or `exp=RATE`.
    #[arg(long)]
    lr_schedule: Option<convkit::ScheduleRule>,
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
    #[arg(long, default_value = "chw")]
    pytorch_flatten: convkit::pytorch::FlattenOrder,
    /// Freeze the first N layers, or every layer up to and including the one named (see
    /// `convkit summary`); they keep their weights, and the checkpoint records it.
    #[arg(long, value_name = "N|LAYER")]
    freeze: Option<convkit::run::Freeze>,
    /// A new classifier head: K replaces the last Dense layer by one of K outputs; a stack
    /// such as "Dense 256 relu, Dropout 0.5, Dense 2 softmax" (or a .json file of layers)
    /// replaces the fully connected layers at the end (see --remove-layers).
    #[arg(long, value_name = "K|LAYERS")]
    new_head: Option<convkit::run::NewHead>,
    /// With a --new-head of layers: how many layers to remove from the end (default: the
    /// fully connected ones, after the last Flatten or global pooling).
    #[arg(long, requires = "new_head")]
    remove_layers: Option<usize>,
    /// Output folder. After every epoch it holds last.safetensors (everything needed to
    /// continue, see --resume) and best.safetensors (the best epoch by val_loss, or by loss
    /// without validation data).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Continue the run in RUN_DIR from the end of its last finished epoch, with the arguments
    /// it was started with (RUN_DIR/command.json); give no other argument but --epochs, which
    /// trains a finished run further, to that many epochs in all.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Start afresh in an --out that holds another run, replacing its backup (without it, such
    /// a folder is refused and left as it is).
    #[arg(long)]
    overwrite: bool,
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
    #[arg(long, default_value = convkit::default_backend_name(), value_parser = engines())]
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
    #[arg(long, default_value = convkit::default_backend_name(), value_parser = engines())]
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
    #[arg(long)]
    weights: PathBuf,
}

fn main() -> ExitCode {
    convkit::keep_freed_memory_for_reuse();
    let cli = Cli::parse();
    if let Err(err) = convkit::threads::configure(cli.threads) {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Train(args) => run::in_launched_group(|group| train(args, group)),
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
        Command::Search(args) => run::in_launched_group(|group| search(args, group)),
        Command::CompareWorker(args) => compare::worker(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "convkit",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Download { datasets } => {
            let locator = convkit::data::Locator::from_env();
            datasets.into_iter().try_for_each(|name| {
                let dir = locator.find(name, None)?;
                println!("{}: {}", name.dir_name(), dir.display());
                Ok(())
            })
        }
        Command::Backends => {
            convkit::describe_backends()
                .iter()
                .for_each(|l| println!("{l}"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<convkit::Error>() {
                Some(convkit::Error::ChecksFailed { .. }) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The engines compiled in, for `--backend`.
fn engines() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(convkit::backend_names())
}

impl DataArgs {
    fn request(&self) -> DataRequest {
        DataRequest {
            dataset: self.dataset.clone(),
            limit: self.limit,
            validation: Validation::chosen(self.validate_on_test, self.validation_split),
            seed: self.seed,
            batch_size: self.batch_size,
            image_size: self.image_size.as_deref().map(|s| [s[0], s[1]]),
        }
    }
}

/// `convkit train`, or `convkit train --resume RUN_DIR`: the run started again from the
/// arguments saved in its folder.
fn train(args: TrainArgs, group: &Group) -> anyhow::Result<()> {
    let Some(run) = &args.resume else {
        let record = run::CommandRecord::current()?;
        return train_run(args, false, Some(record), group);
    };
    let given: Vec<OsString> = std::env::args_os().skip(2).collect();
    let (saved, longer) = run::CommandRecord::resumed(run, &given)?;
    saved.enter_cwd(run)?;
    let Command::Train(args) = Cli::try_parse_from(&saved.args)
        .with_context(|| format!("{}: the saved command does not parse", run.display()))?
        .command
    else {
        bail!(
            "{}: the saved command is not `convkit train`",
            run.display()
        );
    };
    // A run trained further is resumed with its new length from then on.
    let record = longer.then_some(saved);
    train_run(args, true, record, group)
}

/// `convkit train` as a request, a fresh run or a `resume`; `record` is written as the run's
/// command.json (`None` when a resume leaves it as it was).
fn train_run(
    args: TrainArgs,
    resume: bool,
    record: Option<run::CommandRecord>,
    group: &Group,
) -> anyhow::Result<()> {
    let model = match (args.init_weights, args.init_pytorch) {
        (Some(path), _) => ModelSource::Checkpoint(path),
        (None, Some(state_dict)) => ModelSource::PyTorch {
            spec: args.model,
            state_dict,
            flatten: args.pytorch_flatten,
        },
        (None, None) => ModelSource::Spec(args.model),
    };
    let mut optimizer = Optimizer::by_name(&args.optimizer)?;
    if let Some(rate) = args.learning_rate {
        optimizer = optimizer.with_learning_rate(rate);
    }
    let request = run::TrainRequest {
        edits: run::SpecEdits {
            random_crop: args.random_crop.as_deref().map(|s| [s[0], s[1]]),
            new_head: args
                .new_head
                .map(|head| head.removing(args.remove_layers))
                .transpose()?,
            kernel_regularizer: args.kernel_regularizer,
            batch_norm: args.batch_norm,
            freeze: args.freeze,
        },
        size_limits: args.size.limits(),
        optimizer,
        loss: args
            .loss
            .as_deref()
            .map(convkit::Loss::by_name)
            .transpose()?,
        epochs: args.epochs,
        augment: args.augment,
        early_stopping: args.early_stopping,
        reduce_lr_on_plateau: args.reduce_lr_on_plateau,
        lr_schedule: args.lr_schedule,
        quiet: args.data.quiet,
        command: record,
        resume,
        overwrite: args.overwrite,
        ..run::TrainRequest::new(model, args.data.request(), args.out)
    };
    let backend = convkit::backend(&args.data.backend)?;
    if let Some(report) = request.report(&request.run(backend.as_ref(), group)?) {
        println!("{report}");
    }
    Ok(())
}

fn search(args: SearchArgs, group: &Group) -> anyhow::Result<()> {
    let request = run::SearchRequest {
        trials: args.trials,
        resume: args.resume,
        shard: args.shard,
        merge: args.merge,
        ..run::SearchRequest::new(&args.space, &args.out)
    };
    let backend = convkit::backend(&args.backend)?;
    if let Some(report) = request.report(&request.run(backend.as_ref(), group)?) {
        println!("{report}");
    }
    Ok(())
}

fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let request = run::EvaluateRequest {
        data: args.data.request(),
        size_limits: args.size.limits(),
        weights: args.weights,
        combine: args.ensemble,
        out: args.out,
    };
    let outcome = request.run(convkit::backend(&args.data.backend)?.as_ref())?;
    println!("{outcome}");
    if let Some(out) = &request.out {
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let request = run::ExportRequest {
        size_limits: args.size.limits(),
        pixels: args.pixels,
        ..run::ExportRequest::new(args.weights, args.onnx)
    };
    println!("{}", request.run()?);
    Ok(())
}

fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let request = run::PredictRequest {
        size_limits: args.size.limits(),
        ..run::PredictRequest::new(args.weights, args.images)
    };
    for prediction in request.run(convkit::backend(&args.backend)?.as_ref())? {
        println!("{prediction}");
    }
    Ok(())
}
