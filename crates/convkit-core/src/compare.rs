//! Cross-engine comparison: one engine's run ([`run_engine`] with [`RunSettings`]) and what it
//! records ([`EngineRun`]), and the agreement and speed report over several runs
//! ([`Comparison`]): `compare.md`, `compare.json`, `compare.csv` and PNG charts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use std::time::Instant;

use ndarray::{Array2, Array4};

use crate::artifacts::Scored;
use crate::backend::{Backend, StepStats, Targets};
use crate::compile::{Compile, Loss, Optimizer};
use crate::data::{Dataset, ImageShape, Locator, Normalisation, Split};
use crate::plot::Figure;
use crate::spec::Sequential;
use crate::train::{BatchOrder, Callback, Control, History, Model};
use crate::weights::{Checkpoint, CheckpointMeta, Weights};
use crate::{Error, Result};

/// Agreement tolerances, in one place.
///
/// The first two are exact detectors: the same weights and batch must give the same
/// probabilities and, after one SGD step, the same weights up to float rounding. The one-step
/// check uses SGD whatever `--optimizer` says: Adam and RMSprop divide each gradient by its
/// own magnitude, so rounding noise in a near-zero gradient becomes a step of up to `lr`.
/// Their update rules are checked exactly, per engine, by the conformance suite. The rest are
/// sanity bounds on whole runs, which drift apart by rounding over thousands of steps (most
/// with adaptive optimizers, and on borderline images).
pub mod tolerance {
    /// Forward probabilities at initialisation, max abs.
    pub const FORWARD: f64 = 1e-4;
    /// Every weight after one SGD step (lr 0.01), max abs.
    pub const ONE_STEP: f64 = 1e-5;
    /// Training loss of each epoch, abs.
    pub const EPOCH_LOSS: f64 = 0.05;
    /// Final test accuracy, abs.
    pub const ACCURACY: f64 = 0.02;
    /// Share of test predictions that must match the reference's.
    pub const PREDICTION_AGREEMENT: f64 = 0.90;
    /// Share of confusion-matrix counts that may move between cells.
    pub const CONFUSION_MOVED: f64 = 0.05;
}

/// What one engine's run records. Written by the worker process as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct EngineRun {
    pub backend: String,
    pub device: String,
    pub build_profile: String,
    pub model: String,
    pub dataset: String,
    pub optimizer: String,
    pub batch_size: usize,
    pub train_images: usize,
    pub test_images: usize,
    /// Probabilities of the first test images at initialisation.
    pub init_probabilities: Vec<Vec<f32>>,
    /// Checkpoint after one SGD step (lr 0.01) on the first batch.
    pub one_step_weights: PathBuf,
    /// Training loss and accuracy per epoch (first repeat).
    pub epoch_loss: Vec<f64>,
    pub epoch_accuracy: Vec<f64>,
    /// Mean loss over every `loss_trace_every` training batches (first repeat).
    pub loss_trace: Vec<f64>,
    pub loss_trace_every: usize,
    /// Seconds of every epoch of every repeat.
    pub epoch_seconds: Vec<f64>,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub confusion_matrix: Vec<Vec<u64>>,
    pub predicted: Vec<u32>,
    pub inference_images_per_second: f64,
    pub peak_rss_bytes: u64,
    /// Forward + backward ≈ 3 × forward FLOPs per training image.
    pub flops_per_training_image: u64,
    /// Set when the engine failed; everything else may be empty.
    pub error: Option<String>,
}

impl EngineRun {
    /// A run that failed before it could record anything.
    pub fn failed(backend: &str, error: impl Into<String>) -> Self {
        EngineRun {
            backend: backend.into(),
            error: Some(error.into()),
            ..Default::default()
        }
    }

    pub fn median_epoch_seconds(&self) -> f64 {
        let mut s = self.epoch_seconds.clone();
        if s.is_empty() {
            return f64::NAN;
        }
        s.sort_by(|a, b| a.total_cmp(b));
        let m = s.len() / 2;
        if s.len() % 2 == 1 {
            s[m]
        } else {
            (s[m - 1] + s[m]) / 2.0
        }
    }

    pub fn train_images_per_second(&self) -> f64 {
        self.train_images as f64 / self.median_epoch_seconds()
    }

    pub fn gflops(&self) -> f64 {
        self.train_images_per_second() * self.flops_per_training_image as f64 / 1e9
    }
}

/// What every engine of a comparison trains and measures: the same model, initial weights
/// (from `seed`), batches and epochs.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// A dataset name (`mnist`, `fashion-mnist`, `cifar10`, `synthetic`) or an image folder.
    pub dataset: String,
    /// A preset or a spec .json.
    pub model: String,
    pub epochs: usize,
    /// At most this many images of each split: a class-balanced sample from `seed`.
    pub limit: Option<usize>,
    pub batch_size: usize,
    /// `sgd`, `adam` or `rmsprop`, with Keras' defaults.
    pub optimizer: String,
    /// Train this many times; seconds per epoch is the median over all of them.
    pub repeat: usize,
    pub seed: u64,
}

impl RunSettings {
    /// One epoch, batch 32, adam, one repeat, seed 42, every image.
    pub fn new(dataset: impl Into<String>, model: impl Into<String>) -> Self {
        RunSettings {
            dataset: dataset.into(),
            model: model.into(),
            epochs: 1,
            limit: None,
            batch_size: 32,
            optimizer: "adam".into(),
            repeat: 1,
            seed: 42,
        }
    }
}

/// Test images whose probabilities at initialisation are compared.
const INIT_PROBE: usize = 64;
/// Training batches per point of the loss trace.
const LOSS_TRACE_EVERY: usize = 20;

/// Train and measure one engine as `settings` say. Writes `OUT/<engine>-one-step.safetensors`
/// (the weights after one SGD step on the first batch), which [`Comparison::new`] reads.
/// `peak_rss_bytes` is this process's peak so far: per engine only when each runs in its own
/// process, as `convkit compare` does.
pub fn run_engine(backend: &dyn Backend, settings: &RunSettings, out: &Path) -> Result<EngineRun> {
    let name = backend.name().to_string();
    let Prepared {
        spec,
        compile,
        train,
        test,
        weights,
    } = prepare(settings)?;
    let [h, w, c] = spec.input_shape;

    // Forward at initialisation, and one SGD step on the first batch (dataset order); see
    // `tolerance` for why the step is SGD's.
    let sgd = Compile::new(Optimizer::sgd(), compile.loss);
    let mut model = Model::with_weights(spec.clone(), sgd, backend, &weights)?;
    let probe = INIT_PROBE.min(test.len());
    let init = model.predict(&test.select(&(0..probe).collect::<Vec<_>>()), 256)?;
    let init_probabilities = init.rows().into_iter().map(|r| r.to_vec()).collect();
    let first: Vec<usize> = (0..settings.batch_size.min(train.len())).collect();
    let mut x = Array4::zeros((first.len(), h, w, c));
    train.fill_batch(&first, x.view_mut())?;
    let y = Targets::Sparse(first.iter().map(|&i| train.labels[i]).collect());
    model.network_mut().train_step(x.view(), &y)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let one_step_weights = out.join(format!("{name}-one-step.safetensors"));
    model
        .checkpoint(CheckpointMeta::default())?
        .save(&one_step_weights)?;

    // Training: `repeat` fits from the same initial weights and batches.
    let mut epoch_seconds = Vec::new();
    let mut first_fit = None;
    for r in 0..settings.repeat.max(1) {
        let mut model = Model::with_weights(spec.clone(), compile.clone(), backend, &weights)?;
        let mut trace = LossTrace::default();
        let history = model
            .fit(&train)
            .epochs(settings.epochs)
            .batch_size(settings.batch_size)
            .seed(settings.seed)
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
        backend: name,
        device: backend.device(),
        build_profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        model: spec.name.clone(),
        dataset: settings.dataset.clone(),
        optimizer: settings.optimizer.clone(),
        batch_size: settings.batch_size,
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

/// What every row of a comparison starts from.
struct Prepared {
    spec: Sequential,
    compile: Compile,
    /// Normalised (`x / 255`).
    train: Dataset,
    test: Dataset,
    /// The initial weights, from the seed.
    weights: Weights,
}

fn prepare(settings: &RunSettings) -> Result<Prepared> {
    let spec = Sequential::from_preset_or_file(&settings.model)?;
    let compile = Compile::new(
        Optimizer::by_name(&settings.optimizer)?,
        Loss::SparseCategoricalCrossentropy,
    );
    let [h, w, c] = spec.input_shape;
    let shape = ImageShape::new(h, w, c);
    let classes = spec.output_shape()?.numel();
    let load = |split| -> Result<Dataset> {
        let ds = crate::data::open(
            &settings.dataset,
            split,
            shape,
            classes,
            settings.seed,
            &Locator::from_env(),
        )?;
        Ok(match settings.limit {
            Some(n) => ds.sample(n, settings.seed),
            None => ds,
        }
        .normalise(Normalisation::Rescale))
    };
    let weights = crate::init::glorot_uniform(&spec, settings.seed)?;
    Ok(Prepared {
        train: load(Split::Train)?,
        test: load(Split::Test)?,
        spec,
        compile,
        weights,
    })
}

/// The row of PyTorch eager itself (`python/convkit_compare_torch.py`), the yardstick every
/// engine's time is given against.
pub const PYTORCH: &str = "pytorch";

/// Why PyTorch cannot be a row for `settings`' model, if it cannot: its dropout masks would be
/// PyTorch's own, not core's, so the one-step and loss checks would compare different steps.
pub fn pytorch_cannot_run(settings: &RunSettings) -> Result<Option<String>> {
    let spec = Sequential::from_preset_or_file(&settings.model)?;
    let dropout = spec
        .layers
        .iter()
        .any(|l| matches!(&l.kind, crate::spec::LayerKind::Dropout(d) if d.rate > 0.0));
    Ok(dropout.then(|| {
        format!(
            "`{}` has Dropout, whose masks PyTorch would draw itself: its run would not be the same training",
            spec.name
        )
    }))
}

/// Write into `dir` what `python/convkit_compare_torch.py` trains from, so that PyTorch
/// trains what every engine trains: the initial weights as a checkpoint, the images (bytes)
/// and labels (u32) of both splits, each epoch's order as `fit` shuffles it, and settings.
pub fn write_pytorch_inputs(settings: &RunSettings, dir: &Path) -> Result<()> {
    let Prepared {
        spec,
        compile,
        train,
        test,
        weights,
    } = prepare(settings)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let flops_per_training_image = 3 * spec.forward_flops()?;
    Checkpoint {
        spec,
        compile,
        weights,
        meta: CheckpointMeta::default(),
    }
    .save(&dir.join("initial.safetensors"))?;
    let u32s = |values: &mut dyn Iterator<Item = u32>| -> Vec<u8> {
        values.flat_map(u32::to_le_bytes).collect()
    };
    for (name, ds) in [("train", &train), ("test", &test)] {
        crate::io::write_bytes_atomic(&dir.join(format!("{name}.u8")), &ds.images)?;
        crate::io::write_bytes_atomic(
            &dir.join(format!("{name}-labels.u32")),
            &u32s(&mut ds.labels.iter().copied()),
        )?;
    }
    let mut batch_order = BatchOrder::new((0..train.len()).collect(), settings.seed, true);
    let mut orders = Vec::with_capacity(settings.epochs * train.len() * 4);
    for _ in 0..settings.epochs {
        orders.extend(u32s(
            &mut batch_order.next_epoch().iter().map(|&i| i as u32),
        ));
    }
    crate::io::write_bytes_atomic(&dir.join("orders.u32"), &orders)?;
    let json = serde_json::json!({
        "dataset": settings.dataset,
        "batch_size": settings.batch_size,
        "epochs": settings.epochs,
        "repeat": settings.repeat,
        "loss_trace_every": LOSS_TRACE_EVERY,
        "init_probe": INIT_PROBE.min(test.len()),
        "flops_per_training_image": flops_per_training_image,
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    crate::io::write_bytes_atomic(&dir.join("settings.json"), json.to_string().as_bytes())
}

/// Mean training loss over every [`LOSS_TRACE_EVERY`] batches.
#[derive(Default)]
struct LossTrace {
    sum: f64,
    count: usize,
    trace: Vec<f64>,
}

impl Callback for LossTrace {
    fn on_batch_end(&mut self, _batch: usize, stats: &StepStats) -> Result<()> {
        self.sum += stats.loss as f64;
        self.count += 1;
        if self.count == LOSS_TRACE_EVERY {
            self.trace.push(self.sum / LOSS_TRACE_EVERY as f64);
            (self.sum, self.count) = (0.0, 0);
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, _history: &History, _model: &mut Model) -> Result<Control> {
        Ok(Control::Continue)
    }
}

/// This process's peak resident memory (Linux `VmHWM`), bytes; 0 where unknown.
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

/// This machine's FP32 peak as the report's yardstick, GFLOP/s: the best of several
/// 1024×1024×1024 products with ndarray's threaded matrixmultiply; and how it was measured.
pub fn machine_peak_gflops() -> (f64, String) {
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

/// One agreement check of one engine against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub engine: String,
    pub check: String,
    pub value: f64,
    pub tolerance: f64,
    pub pass: bool,
}

/// An engine that a comparison did not run, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeftOut {
    pub engine: String,
    pub reason: String,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub runs: Vec<EngineRun>,
    pub reference: Option<String>,
    pub checks: Vec<Check>,
    /// Compiled-in engines that did not run: their device is missing, or they are left out
    /// unless asked for ([`crate::backend::Backend::left_out_by_default`]).
    pub left_out: Vec<LeftOut>,
    /// FP32 matrix-multiply peak of this machine, GFLOP/s, as measured by the harness.
    pub machine_peak_gflops: f64,
    pub peak_method: String,
}

fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

impl Comparison {
    /// Compare every successful run with the reference (`tch-cpu` when present, else the
    /// first successful engine; never PyTorch's row, which is checked like an engine).
    pub fn new(runs: Vec<EngineRun>, machine_peak_gflops: f64, peak_method: &str) -> Result<Self> {
        let ok: Vec<&EngineRun> = runs.iter().filter(|r| r.error.is_none()).collect();
        let reference = ok
            .iter()
            .find(|r| r.backend == "tch-cpu")
            .or(ok.iter().find(|r| r.backend != PYTORCH))
            .copied();
        let mut checks = Vec::new();
        if let Some(r) = reference {
            let r_step = Checkpoint::load(&r.one_step_weights)?;
            for e in ok.iter().filter(|e| e.backend != r.backend) {
                let mut check = |name: &str, value: f64, tolerance: f64, pass: bool| {
                    checks.push(Check {
                        engine: e.backend.clone(),
                        check: name.into(),
                        value,
                        tolerance,
                        pass,
                    })
                };
                let d = max_abs(&e.init_probabilities, &r.init_probabilities);
                check(
                    "forward at init (max abs)",
                    d,
                    tolerance::FORWARD,
                    d <= tolerance::FORWARD,
                );
                let step = Checkpoint::load(&e.one_step_weights)?;
                let d = step
                    .weights
                    .max_abs_diff(&r_step.weights)?
                    .into_iter()
                    .map(|(_, d)| d as f64)
                    .fold(0.0, f64::max);
                check(
                    "weights after one SGD step (max abs)",
                    d,
                    tolerance::ONE_STEP,
                    d <= tolerance::ONE_STEP,
                );
                let d = e
                    .epoch_loss
                    .iter()
                    .zip(&r.epoch_loss)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                check(
                    "loss per epoch (max abs)",
                    d,
                    tolerance::EPOCH_LOSS,
                    d <= tolerance::EPOCH_LOSS,
                );
                let d = (e.test_accuracy - r.test_accuracy).abs();
                check(
                    "final test accuracy (abs)",
                    d,
                    tolerance::ACCURACY,
                    d <= tolerance::ACCURACY,
                );
                let n = e.predicted.len().max(1) as f64;
                let same = e
                    .predicted
                    .iter()
                    .zip(&r.predicted)
                    .filter(|(a, b)| a == b)
                    .count() as f64
                    / n;
                check(
                    "test predictions agreeing (share)",
                    same,
                    tolerance::PREDICTION_AGREEMENT,
                    same >= tolerance::PREDICTION_AGREEMENT,
                );
                let moved: u64 = e
                    .confusion_matrix
                    .iter()
                    .flatten()
                    .zip(r.confusion_matrix.iter().flatten())
                    .map(|(a, b)| a.abs_diff(*b))
                    .sum();
                let share = moved as f64 / 2.0 / n;
                check(
                    "confusion-matrix counts moved (share)",
                    share,
                    tolerance::CONFUSION_MOVED,
                    share <= tolerance::CONFUSION_MOVED,
                );
            }
        }
        Ok(Comparison {
            reference: reference.map(|r| r.backend.clone()),
            runs,
            checks,
            left_out: Vec::new(),
            machine_peak_gflops,
            peak_method: peak_method.into(),
        })
    }

    /// The comparison, noting the engines that did not run and why.
    pub fn with_left_out(mut self, left_out: Vec<LeftOut>) -> Self {
        self.left_out = left_out;
        self
    }

    /// Each run's median seconds per epoch over PyTorch's in the same comparison, when
    /// PyTorch's row ran.
    pub fn ratio_to_pytorch(&self, run: &EngineRun) -> Option<f64> {
        let torch = self
            .runs
            .iter()
            .find(|r| r.backend == PYTORCH && r.error.is_none())?;
        (run.error.is_none()).then(|| run.median_epoch_seconds() / torch.median_epoch_seconds())
    }

    /// Whether every check passed and no engine failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass) && self.runs.iter().all(|r| r.error.is_none())
    }

    /// The speed table as a DataFrame, one row per engine.
    pub fn to_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let ok: Vec<&EngineRun> = self.runs.iter().collect();
        let f = |g: &dyn Fn(&EngineRun) -> f64| {
            ok.iter()
                .map(|r| if r.error.is_some() { None } else { Some(g(r)) })
                .collect::<Vec<Option<f64>>>()
        };
        DataFrame::new_infer_height(vec![
            Column::new(
                "engine".into(),
                ok.iter().map(|r| r.backend.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "device".into(),
                ok.iter().map(|r| r.device.clone()).collect::<Vec<_>>(),
            ),
            Column::new("seconds_per_epoch".into(), f(&|r| r.median_epoch_seconds())),
            Column::new(
                "ratio_to_pytorch".into(),
                ok.iter()
                    .map(|r| self.ratio_to_pytorch(r))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "train_images_per_s".into(),
                f(&|r| r.train_images_per_second()),
            ),
            Column::new(
                "inference_images_per_s".into(),
                f(&|r| r.inference_images_per_second),
            ),
            Column::new(
                "peak_rss_mib".into(),
                f(&|r| r.peak_rss_bytes as f64 / 1048576.0),
            ),
            Column::new("gflops".into(), f(&|r| r.gflops())),
            Column::new(
                "share_of_peak".into(),
                f(&|r| r.gflops() / self.machine_peak_gflops),
            ),
            Column::new("test_accuracy".into(), f(&|r| r.test_accuracy)),
            Column::new(
                "error".into(),
                ok.iter().map(|r| r.error.clone()).collect::<Vec<_>>(),
            ),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let first = self.runs.iter().find(|r| r.error.is_none());
        let _ = writeln!(s, "# convkit compare\n");
        if let Some(r) = first {
            let _ = writeln!(
                s,
                "Model `{}` on `{}`: {} training and {} test images, batch {}, {}, build profile `{}`. FLOPs per training image (forward + backward ≈ 3 × forward): {}.\n",
                r.model, r.dataset, r.train_images, r.test_images, r.batch_size, r.optimizer, r.build_profile, r.flops_per_training_image
            );
        }
        let _ = writeln!(
            s,
            "Machine FP32 matrix-multiply peak: {:.1} GFLOP/s ({}).\n",
            self.machine_peak_gflops, self.peak_method
        );
        let _ = writeln!(
            s,
            "## Agreement (reference: {})\n",
            self.reference.as_deref().unwrap_or("none")
        );
        let _ = writeln!(
            s,
            "| engine | check | value | tolerance | result |\n|---|---|---|---|---|"
        );
        for c in &self.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3e} | {:.0e} | {} |",
                c.engine,
                c.check,
                c.value,
                c.tolerance,
                if c.pass { "PASS" } else { "FAIL" }
            );
        }
        if self.checks.is_empty() {
            let _ = writeln!(s, "| — | fewer than two engines ran | | | |");
        }
        let _ = writeln!(s, "\n## Speed\n");
        let _ = writeln!(s, "| engine | device | s / epoch (median) | × PyTorch | train img/s | inference img/s (batch 256) | peak RSS MiB | GFLOP/s | share of peak | test accuracy |\n|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.runs {
            match &r.error {
                Some(e) => {
                    let _ = writeln!(
                        s,
                        "| {} | FAILED: {} | | | | | | | | |",
                        r.backend,
                        e.replace('\n', " ").replace('|', "/")
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1}% | {:.4} |",
                        r.backend,
                        r.device,
                        r.median_epoch_seconds(),
                        self.ratio_to_pytorch(r)
                            .map_or("—".to_string(), |x| format!("{x:.2}×")),
                        r.train_images_per_second(),
                        r.inference_images_per_second,
                        r.peak_rss_bytes as f64 / 1048576.0,
                        r.gflops(),
                        100.0 * r.gflops() / self.machine_peak_gflops,
                        r.test_accuracy
                    );
                }
            }
        }
        if !self.left_out.is_empty() {
            let _ = writeln!(
                s,
                "\nNot run (name an engine, or `--backends all`, to run it anyway):\n"
            );
            for l in &self.left_out {
                let _ = writeln!(s, "- {}: {}", l.engine, l.reason.replace('\n', " "));
            }
        }
        let _ = writeln!(
            s,
            "\nOverall: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        s
    }

    /// Write `compare.md`, `compare.json`, `compare.csv`, `throughput.png`, `loss.png` and
    /// `accuracy.png` into `dir`, atomically each.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::io::write_bytes_atomic(&dir.join("compare.md"), self.markdown().as_bytes())?;
        let json = serde_json::to_string_pretty(self).expect("serialisable");
        crate::io::write_bytes_atomic(&dir.join("compare.json"), json.as_bytes())?;
        crate::table::write_csv(&mut self.to_dataframe()?, &dir.join("compare.csv"))?;
        self.throughput_chart().save(&dir.join("throughput.png"))?;
        self.accuracy_chart().save(&dir.join("accuracy.png"))?;
        self.loss_chart().save(&dir.join("loss.png"))?;
        Ok(())
    }

    /// The agreement checks as a DataFrame, one row per engine and check.
    pub fn checks_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let c = &self.checks;
        DataFrame::new_infer_height(vec![
            Column::new(
                "engine".into(),
                c.iter().map(|c| c.engine.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "check".into(),
                c.iter().map(|c| c.check.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "value".into(),
                c.iter().map(|c| c.value).collect::<Vec<_>>(),
            ),
            Column::new(
                "tolerance".into(),
                c.iter().map(|c| c.tolerance).collect::<Vec<_>>(),
            ),
            Column::new("pass".into(), c.iter().map(|c| c.pass).collect::<Vec<_>>()),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }

    fn succeeded(&self) -> Vec<&EngineRun> {
        self.runs.iter().filter(|r| r.error.is_none()).collect()
    }

    /// Training images per second, a bar per engine.
    pub fn throughput_chart(&self) -> impl Figure + '_ {
        Bars {
            title: "training throughput (images/s)",
            decimals: 0,
            top: None,
            bars: self
                .succeeded()
                .iter()
                .map(|r| (r.backend.clone(), r.train_images_per_second()))
                .collect(),
        }
    }

    /// Final test accuracy, a bar per engine.
    pub fn accuracy_chart(&self) -> impl Figure + '_ {
        Bars {
            title: "final test accuracy",
            decimals: 2,
            top: Some(1.0),
            bars: self
                .succeeded()
                .iter()
                .map(|r| (r.backend.clone(), r.test_accuracy))
                .collect(),
        }
    }

    /// Every engine's smoothed training loss on one plot.
    pub fn loss_chart(&self) -> impl Figure + '_ {
        LossCurves(self.succeeded())
    }
}

type DrawResult = std::result::Result<(), String>;

fn e<T: std::fmt::Display>(err: T) -> String {
    err.to_string()
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A bar per engine.
struct Bars {
    title: &'static str,
    bars: Vec<(String, f64)>,
    /// Decimals of the value axis' labels (0 for images/s, 2 for an accuracy).
    decimals: usize,
    /// A fixed top of the value axis (1 for an accuracy); otherwise 15% above the tallest bar.
    top: Option<f64>,
}

impl Figure for Bars {
    fn size(&self) -> (u32, u32) {
        (200 + 120 * self.bars.len().max(1) as u32, 400)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let tallest = self.bars.iter().map(|b| b.1).fold(0.0, f64::max);
        let top = self.top.unwrap_or((tallest * 1.15).max(1e-9));
        // One slot per bar: centred on 0, 1, … n−1, half a slot of room on either side.
        let n = self.bars.len().max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(e)?;
        let decimals = self.decimals;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .draw()
            .map_err(e)?;
        let font = ("sans-serif", 14.0).into_font();
        for (i, (name, value)) in self.bars.iter().enumerate() {
            let x = i as f64;
            chart
                .draw_series([Rectangle::new(
                    [(x - 0.35, 0.0), (x + 0.35, *value)],
                    PALETTE[i % PALETTE.len()].filled(),
                )])
                .map_err(e)?;
            // The engine's name under its bar, the value above it.
            let (px, py) = chart.backend_coord(&(x, 0.0));
            let width = 7 * name.chars().count() as i32;
            root.draw(&Text::new(
                name.clone(),
                (px - width / 2, py + 8),
                font.clone(),
            ))
            .map_err(e)?;
            // Values two decimals finer than the axis where they are fractions (accuracy).
            let label = match decimals {
                0 => format!("{value:.0}"),
                d => format!("{value:.prec$}", prec = d + 2),
            };
            let (vx, vy) = chart.backend_coord(&(x, *value));
            let width = 7 * label.chars().count() as i32;
            root.draw(&Text::new(label, (vx - width / 2, vy - 18), font.clone()))
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Every engine's smoothed training loss on one plot.
struct LossCurves<'a>(Vec<&'a EngineRun>);

impl Figure for LossCurves<'_> {
    fn size(&self) -> (u32, u32) {
        (900, 450)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let len = self
            .0
            .iter()
            .map(|r| r.loss_trace.len())
            .max()
            .unwrap_or(1)
            .max(2);
        let max = self
            .0
            .iter()
            .flat_map(|r| r.loss_trace.iter().cloned())
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.05;
        let every = self
            .0
            .first()
            .map(|r| r.loss_trace_every)
            .unwrap_or(1)
            .max(1);
        let (chart_area, legend_row) = crate::plot::with_legend_row(root);
        let mut chart = ChartBuilder::on(&chart_area)
            .caption(
                format!("training loss (mean of every {every} batches)"),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..(len * every) as f64, 0f64..max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("batch")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()
            .map_err(e)?;
        let mut legend = Vec::new();
        for (i, r) in self.0.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    r.loss_trace
                        .iter()
                        .enumerate()
                        .map(|(k, v)| (((k + 1) * every) as f64, *v)),
                    color.stroke_width(2),
                ))
                .map_err(e)?;
            // A short run has too few points for a line to show: mark each one.
            if r.loss_trace.len() <= 30 {
                chart
                    .draw_series(r.loss_trace.iter().enumerate().map(|(k, v)| {
                        Circle::new((((k + 1) * every) as f64, *v), 4, color.filled())
                    }))
                    .map_err(e)?;
            }
            legend.push((r.backend.clone(), color));
        }
        crate::plot::draw_legend(&legend_row, &legend)?;
        Ok(())
    }
}
