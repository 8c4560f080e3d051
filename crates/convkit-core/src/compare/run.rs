//! One engine's measured run ([`run_engine`] with [`RunSettings`]) and what it records
//! ([`EngineRun`]); PyTorch's row gets the same inputs from [`write_pytorch_inputs`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array4;
use serde::{Deserialize, Serialize};

use crate::artifacts::Scored;
use crate::backend::{Backend, StepStats, Targets};
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::compile::{Compile, Loss, Optimizer};
use crate::data::{Dataset, ImageShape, Locator, Normalisation, Split};
use crate::spec::Sequential;
use crate::train::{BatchOrder, Callback, Control, History, Model};
use crate::weights::Weights;
use crate::{Error, Result};

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
/// The batch of the inference rate, as onnxruntime's and PyTorch's are measured.
pub const INFERENCE_BATCH: usize = 256;
/// Timed passes over the test images for the inference rate; the best counts.
const INFERENCE_PASSES: usize = 3;
/// Training batches per point of the loss trace.
const LOSS_TRACE_EVERY: usize = 20;

/// `model`'s inference rate on `test`, images/s, measured as onnxruntime's and PyTorch's are:
/// after an untimed pass, the best of [`INFERENCE_PASSES`] passes of probabilities in batches
/// of [`INFERENCE_BATCH`], each batch normalised before its clock starts (one batch in memory
/// at a time, whatever the size of the test split).
fn inference_rate(model: &Model, test: &Dataset) -> Result<f64> {
    let [h, w, c] = model.spec().input_shape;
    let all: Vec<usize> = (0..test.len()).collect();
    let mut buffer = Array4::zeros((INFERENCE_BATCH.min(test.len()), h, w, c));
    let batcher = test.batcher()?;
    let mut best = f64::INFINITY;
    for pass in 0..=INFERENCE_PASSES {
        let mut seconds = 0.0;
        for chunk in all.chunks(INFERENCE_BATCH) {
            let mut x = buffer.slice_mut(ndarray::s![..chunk.len(), .., .., ..]);
            batcher.fill(chunk, x.view_mut())?;
            let t = Instant::now();
            model.predict_batch(x.view())?;
            seconds += t.elapsed().as_secs_f64();
        }
        if pass > 0 {
            best = best.min(seconds);
        }
    }
    Ok(if best > 0.0 {
        test.len() as f64 / best
    } else {
        0.0
    })
}

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
    let scored = Scored::new(model.evaluate(&test, 256)?)?;
    let inference_images_per_second = inference_rate(&model, &test)?;
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

/// The row of PyTorch eager itself (`python/convkit_compare_torch.py`) with NCHW tensors, as a
/// tutorial's reader runs it.
pub const PYTORCH: &str = "pytorch";

/// The row of PyTorch as an informed user runs it: channels_last, a fused optimizer and
/// `torch.compile` where it compiles (`convkit_compare_torch.py --tuned`).
pub const PYTORCH_TUNED: &str = "pytorch-tuned";

/// Whether `backend` names one of PyTorch's rows, which every engine's time is given against.
pub fn is_pytorch(backend: &str) -> bool {
    backend == PYTORCH || backend == PYTORCH_TUNED
}

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
        "threads": crate::threads::chosen().count(),
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

/// This machine's FP32 peak as the report's yardstick, GFLOP/s, and how it was measured: the
/// rate rayon's threads issue fused multiply-adds at on the widest vectors this CPU has
/// (AVX-512 where it has it, picked at run time), the best of six rounds; the description
/// names the CPU's model and the instruction set, and gives the rate gemm's kernel (the
/// engines' GEMMs) reaches on six 2048×2048×2048 products on the same threads.
pub fn machine_peak_gflops() -> (f64, String) {
    let peak = convkit_cpu::peak::measure(&convkit_cpu::Rayon, 2048, 6);
    let cpu = peak.cpu.as_deref().unwrap_or("an unnamed CPU");
    (peak.gflops, format!("{cpu}; {}", peak.method))
}
