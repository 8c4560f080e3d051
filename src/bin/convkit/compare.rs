//! `convkit compare`: the same model, initial weights and batches on every engine, each in its
//! own process (`convkit compare-worker`), one after another; then the agreement and speed
//! report.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use convkit::artifacts::Scored;
use convkit::compare::{Comparison, EngineRun};
use convkit::data::{self, Locator, Split};
use convkit::ndarray::{s, Array2, Array4};
use convkit::prelude::*;
use convkit::StepStats;

#[derive(Args, Clone)]
pub struct CompareArgs {
    /// Comma-separated engines (default: every compiled-in engine whose device is here).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    #[arg(long, default_value = "tutorial-mnist")]
    pub model: String,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Use at most N images of each split (default: all).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// Train this many times; seconds per epoch is the median over all of them.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value = "target/compare")]
    pub out: PathBuf,
}

/// Test images whose probabilities at initialisation are compared.
const INIT_PROBE: usize = 64;
const LOSS_TRACE_EVERY: usize = 20;

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Runs every engine in its own process and writes the report; fails when a check fails.
pub fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let names: Vec<String> = if args.backends.is_empty() {
        convkit::backend_names()
            .into_iter()
            .filter(|n| match convkit::backend(n) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("compare: skipping {n}: {e}");
                    false
                }
            })
            .map(String::from)
            .collect()
    } else {
        args.backends.clone()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let exe = std::env::current_exe().context("locating the convkit binary")?;
    let start = Instant::now();
    let mut runs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let eta = if i > 0 {
            format!(
                ", about {:.0} s left",
                start.elapsed().as_secs_f64() / i as f64 * (names.len() - i) as f64
            )
        } else {
            String::new()
        };
        eprintln!("compare: [{}/{}] {name}{eta}", i + 1, names.len());
        let json = args.out.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&json);
        let mut cmd = Command::new(&exe);
        cmd.arg("compare-worker").arg("--backends").arg(name);
        for (flag, value) in [
            ("--dataset", args.dataset.clone()),
            ("--model", args.model.clone()),
            ("--epochs", args.epochs.to_string()),
            ("--batch-size", args.batch_size.to_string()),
            ("--optimizer", args.optimizer.clone()),
            ("--repeat", args.repeat.to_string()),
            ("--seed", args.seed.to_string()),
        ] {
            cmd.arg(flag).arg(value);
        }
        if let Some(n) = args.limit {
            cmd.arg("--limit").arg(n.to_string());
        }
        cmd.arg("--out").arg(&args.out);
        let status = cmd
            .status()
            .with_context(|| format!("starting the {name} worker"))?;
        let run = match std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str::<EngineRun>(&t).ok()) {
            Some(run) => run,
            None => EngineRun::failed(name, format!("the worker process ended with {status} without a result (see its messages above)")),
        };
        if let Some(e) = &run.error {
            eprintln!("compare: {name} failed: {e}");
        }
        runs.push(run);
    }
    let (peak, method) = measure_peak();
    let comparison = Comparison::new(runs, peak, &method)?;
    comparison.write(&args.out)?;
    println!("{}", comparison.markdown());
    println!("wrote {}", args.out.display());
    if !comparison.passed() {
        bail!(
            "the engines disagree or one failed (see {})",
            args.out.join("compare.md").display()
        );
    }
    Ok(())
}

/// Best of several 1024×1024×1024 FP32 products with threaded matrixmultiply, GFLOP/s.
fn measure_peak() -> (f64, String) {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    }
    let n = 1024;
    let a = Array2::<f32>::from_shape_fn((n, n), |(i, j)| ((i * 7 + j) % 13) as f32 / 13.0);
    let b = Array2::<f32>::from_shape_fn((n, n), |(i, j)| ((i + j * 3) % 11) as f32 / 11.0);
    let mut best = 0f64;
    for _ in 0..6 {
        let t = Instant::now();
        let c = a.dot(&b);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(c);
        best = best.max(2.0 * (n * n * n) as f64 / secs / 1e9);
    }
    (best, format!("best of 6 products of 1024×1024 f32 matrices, ndarray/matrixmultiply with {threads} threads"))
}

struct LossTrace {
    every: usize,
    sum: f64,
    count: usize,
    trace: Vec<f64>,
}

impl convkit::train::Callback for LossTrace {
    fn on_batch_end(&mut self, _batch: usize, stats: &StepStats) -> convkit::Result<()> {
        self.sum += stats.loss as f64;
        self.count += 1;
        if self.count == self.every {
            self.trace.push(self.sum / self.every as f64);
            (self.sum, self.count) = (0.0, 0);
        }
        Ok(())
    }
    fn on_epoch_end(
        &mut self,
        _h: &convkit::History,
        _m: &mut Model,
    ) -> convkit::Result<convkit::train::Control> {
        Ok(convkit::train::Control::Continue)
    }
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// One engine, in this process; writes `OUT/<engine>.json` even when it fails.
pub fn worker(args: CompareArgs) -> anyhow::Result<()> {
    let name = args
        .backends
        .first()
        .cloned()
        .context("compare-worker needs --backends NAME")?;
    let json = args.out.join(format!("{name}.json"));
    let run = match worker_run(&name, &args) {
        Ok(run) => run,
        Err(e) => EngineRun::failed(&name, format!("{e:#}")),
    };
    let failed = run.error.clone();
    convkit::io::write_bytes_atomic(&json, serde_json::to_string(&run)?.as_bytes())?;
    match failed {
        Some(e) => bail!(e),
        None => Ok(()),
    }
}

fn worker_run(name: &str, args: &CompareArgs) -> anyhow::Result<EngineRun> {
    let backend = convkit::backend(name)?;
    let spec = Sequential::from_preset_or_file(&args.model)?;
    let compile = Compile::new(
        Optimizer::by_name(&args.optimizer)?,
        Loss::SparseCategoricalCrossentropy,
    );
    let [h, w, c] = spec.input_shape;
    let shape = ImageShape::new(h, w, c);
    let classes = spec.output_shape()?.numel();
    let load = |split| -> anyhow::Result<Dataset> {
        let ds = data::open(
            &args.dataset,
            split,
            shape,
            classes,
            args.seed,
            &Locator::from_env(),
        )?;
        Ok(match args.limit {
            Some(n) => ds.limit(n),
            None => ds,
        }
        .normalise(Normalisation::Rescale))
    };
    let train = load(Split::Train)?;
    let test = load(Split::Test)?;
    let weights = convkit::init::glorot_uniform(&spec, args.seed)?;

    // Forward at initialisation, and one SGD step on the first batch (dataset order); see
    // `convkit::compare::tolerance` for why the step is SGD's.
    let sgd = Compile::new(Optimizer::sgd(), compile.loss);
    let mut model = Model::with_weights(spec.clone(), sgd, backend.as_ref(), &weights)?;
    let probe = INIT_PROBE.min(test.len());
    let init = model.predict(&test.select(&(0..probe).collect::<Vec<_>>()), 256)?;
    let init_probabilities = init.rows().into_iter().map(|r| r.to_vec()).collect();
    let first: Vec<usize> = (0..args.batch_size.min(train.len())).collect();
    let mut x = Array4::zeros((first.len(), h, w, c));
    train.fill_batch(&first, x.slice_mut(s![.., .., .., ..]))?;
    let y = convkit::Targets::Sparse(first.iter().map(|&i| train.labels[i]).collect());
    model.network_mut().train_step(x.view(), &y)?;
    let one_step_weights = args.out.join(format!("{name}-one-step.safetensors"));
    model
        .checkpoint(CheckpointMeta::default())?
        .save(&one_step_weights)?;

    // Training: `repeat` fits from the same initial weights and batches.
    let mut epoch_seconds = Vec::new();
    let mut first_fit = None;
    for r in 0..args.repeat.max(1) {
        let mut model =
            Model::with_weights(spec.clone(), compile.clone(), backend.as_ref(), &weights)?;
        let mut trace = LossTrace {
            every: LOSS_TRACE_EVERY,
            sum: 0.0,
            count: 0,
            trace: Vec::new(),
        };
        let history = model
            .fit(&train)
            .epochs(args.epochs)
            .batch_size(args.batch_size)
            .seed(args.seed)
            .callback(&mut trace)
            .run()?;
        epoch_seconds.extend(history.epochs.iter().map(|e| e.seconds));
        if r == 0 {
            first_fit = Some((model, history, trace.trace));
        }
    }
    let (model, history, loss_trace) = first_fit.expect("at least one repeat");
    let t = Instant::now();
    let scored = Scored::new(model.evaluate(&test, 256)?)?;
    let inference_images_per_second = test.len() as f64 / t.elapsed().as_secs_f64();
    Ok(EngineRun {
        backend: name.into(),
        device: backend.device(),
        build_profile: profile().into(),
        model: spec.name.clone(),
        dataset: args.dataset.clone(),
        optimizer: args.optimizer.clone(),
        batch_size: args.batch_size,
        train_images: train.len(),
        test_images: test.len(),
        init_probabilities,
        one_step_weights,
        epoch_loss: history.epochs.iter().map(|e| e.loss).collect(),
        epoch_accuracy: history.epochs.iter().map(|e| e.accuracy).collect(),
        loss_trace,
        loss_trace_every: LOSS_TRACE_EVERY,
        epoch_seconds,
        test_loss: scored.evaluation.loss,
        test_accuracy: scored.evaluation.accuracy,
        confusion_matrix: scored
            .confusion
            .counts()
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect(),
        predicted: scored.evaluation.predicted.clone(),
        inference_images_per_second,
        peak_rss_bytes: peak_rss_bytes(),
        flops_per_training_image: 3 * spec.forward_flops()?,
        error: None,
    })
}
