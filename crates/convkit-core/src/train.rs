//! Keras' model API over one engine: `Model` (`fit`, `evaluate`, `predict`, weights,
//! freezing, checkpoints), with the training loop in `fit`, the History in `history` and the
//! callbacks in `callbacks`.

pub mod backup;
mod callbacks;
mod fit;
mod history;

pub use callbacks::{
    Callback, Control, CsvLogger, EarlyStopping, EarlyStoppingRule, LearningRateScheduler,
    ModelCheckpoint, Monitor, PlateauRule, ReduceLrOnPlateau, Schedule, ScheduleRule,
};
pub(crate) use fit::bar_style;
pub use fit::{BatchOrder, Fit, Verbosity, PROGRESS_LINE_EVERY};
pub use history::{EpochLog, History};

use ndarray::{s, Array2, Array4};

use crate::backend::{Backend, Network};
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::collective::{Collective, Solo};
use crate::compile::{Compile, Head, Loss};
use crate::data::Dataset;
use crate::metrics::ConfusionMatrix;
use crate::plan::Compiled;
use crate::spec::Sequential;
use crate::weights::Weights;
use crate::{Error, Result};

/// A compiled model on one engine: spec + compile settings + the engine's network.
pub struct Model {
    spec: Sequential,
    compile: Compile,
    head: Head,
    network: Box<dyn Network>,
    backend: String,
    learning_rate: f64,
    /// The ranks `fit` trains with ([`Model::distribute`]); [`Solo`] by default.
    group: std::rc::Rc<dyn Collective>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec.name)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Model {
    /// Build `spec` on `backend` with Keras' default initialisation from `seed`.
    pub fn new(
        spec: Sequential,
        compile: Compile,
        backend: &dyn Backend,
        seed: u64,
    ) -> Result<Self> {
        let model = Compiled::new(spec, compile)?;
        let weights = crate::init::glorot_uniform_for(model.plan(), seed)?;
        Self::build(model, backend, &weights)
    }

    /// Build `spec` on `backend` with the given weights (checked against the spec).
    pub fn with_weights(
        spec: Sequential,
        compile: Compile,
        backend: &dyn Backend,
        weights: &Weights,
    ) -> Result<Self> {
        Self::build(Compiled::new(spec, compile)?, backend, weights)
    }

    /// `model` on `backend` from `weights`, its frozen layers frozen.
    fn build(model: Compiled, backend: &dyn Backend, weights: &Weights) -> Result<Self> {
        let mut network = backend.build(&model, weights)?;
        let (spec, compile, head) = model.into_parts();
        for (i, layer) in spec.layers.iter().enumerate() {
            if !layer.trainable {
                network.set_trainable(i, false)?;
            }
        }
        Ok(Model {
            learning_rate: compile.optimizer.learning_rate(),
            spec,
            compile,
            head,
            network,
            backend: backend.name().to_string(),
            group: std::rc::Rc::new(Solo),
        })
    }

    /// Rebuild a saved model on `backend`.
    pub fn from_checkpoint(checkpoint: &Checkpoint, backend: &dyn Backend) -> Result<Self> {
        Self::with_weights(
            checkpoint.spec.clone(),
            checkpoint.compile.clone(),
            backend,
            &checkpoint.weights,
        )
    }

    pub fn spec(&self) -> &Sequential {
        &self.spec
    }
    pub fn compile_settings(&self) -> &Compile {
        &self.compile
    }
    pub fn head(&self) -> Head {
        self.head
    }
    pub fn backend_name(&self) -> &str {
        &self.backend
    }
    /// The engine's network, for direct access (conformance tests, benchmarks).
    pub fn network_mut(&mut self) -> &mut dyn Network {
        self.network.as_mut()
    }
    /// The engine's network, read-only (direct predictions on raw batches).
    pub fn network(&self) -> &dyn Network {
        self.network.as_ref()
    }
    pub fn learning_rate(&self) -> f64 {
        self.learning_rate
    }
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
        self.network.set_learning_rate(learning_rate);
    }

    pub fn weights(&self) -> Result<Weights> {
        self.network.weights()
    }

    pub fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        weights.check(&self.spec)?;
        self.network.set_weights(weights)
    }

    /// Train data-parallel with the other processes of `group` (Keras' multi-worker
    /// strategy): every rank builds the same model and calls `fit` with the same data and
    /// settings. `fit` then starts from rank 0's weights, gives each rank its slice of every
    /// global batch of `batch_size` images, sums each step's gradients over the ranks before
    /// the one update every rank applies, and reduces the metrics, so every rank keeps the
    /// same weights and History. Only rank 0 prints progress, and callbacks write files there
    /// only. `evaluate` and `predict` stay local. See docs/distributed.md.
    pub fn distribute(&mut self, group: std::rc::Rc<dyn Collective>) {
        self.network.set_collective(group.clone());
        self.group = group;
    }

    /// The ranks this model trains with ([`Solo`] unless [`Model::distribute`] was called).
    pub fn collective(&self) -> &dyn Collective {
        self.group.as_ref()
    }

    /// Freeze or unfreeze layer `index`; recorded in the spec, so it survives save/load.
    pub fn set_trainable(&mut self, index: usize, trainable: bool) -> Result<()> {
        let n = self.spec.layers.len();
        let layer = self.spec.layers.get_mut(index).ok_or_else(|| {
            Error::config(
                "layer index",
                format!(
                    "the model has {n} layers (0..{}), found {index}",
                    n.saturating_sub(1)
                ),
            )
        })?;
        layer.trainable = trainable;
        self.network.set_trainable(index, trainable)
    }

    /// Keras-style summary.
    pub fn summary(&self) -> Result<String> {
        self.spec.summary()
    }

    /// A checkpoint of the current state.
    pub fn checkpoint(&self, meta: CheckpointMeta) -> Result<Checkpoint> {
        Ok(Checkpoint {
            spec: self.spec.clone(),
            compile: self.compile.clone(),
            weights: self.weights()?,
            meta,
        })
    }

    fn check_data(&self, ds: &Dataset) -> Result<()> {
        let [h, w, c] = self.spec.input_shape;
        let s = ds.shape;
        if (s.height, s.width, s.channels) != (h, w, c) {
            return Err(Error::Shape {
                expected: format!("images of {h}×{w}×{c} (model `{}` input)", self.spec.name),
                found: format!("{s} images"),
            });
        }
        let outputs = self.spec.output_shape()?.numel();
        let ok = match self.head {
            Head::Softmax => outputs == ds.num_classes(),
            Head::Sigmoid => ds.num_classes() == 2,
        };
        if !ok {
            return Err(Error::Shape {
                expected: match self.head {
                    Head::Softmax => {
                        format!("a dataset with {outputs} classes (the model's output units)")
                    }
                    Head::Sigmoid => "a dataset with 2 classes (one sigmoid unit)".into(),
                },
                found: format!("{} classes", ds.num_classes()),
            });
        }
        Ok(())
    }

    /// Probabilities `[n, classes]` (`[n, 1]` for a sigmoid head), in batches of `batch_size`.
    pub fn predict(&self, ds: &Dataset, batch_size: usize) -> Result<Array2<f32>> {
        let [h, w, c] = self.spec.input_shape;
        if (ds.shape.height, ds.shape.width, ds.shape.channels) != (h, w, c) {
            self.check_data(ds)?;
        }
        let indices: Vec<usize> = (0..ds.len()).collect();
        self.predict_indices(ds, &indices, batch_size)
    }

    /// Probabilities `[n, classes]` for a batch of already normalised images `[n, H, W, C]`
    /// (Keras' `predict` on an array), in one engine call.
    pub fn predict_batch(&self, x: ndarray::ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let [h, w, c] = self.spec.input_shape;
        let (_, xh, xw, xc) = x.dim();
        if (xh, xw, xc) != (h, w, c) {
            return Err(Error::Shape {
                expected: format!("images of {h}×{w}×{c} (the model's input)"),
                found: format!("a batch of {xh}×{xw}×{xc} images"),
            });
        }
        self.network.predict(x)
    }

    fn predict_indices(
        &self,
        ds: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<Array2<f32>> {
        check_batch_size(batch_size)?;
        let [h, w, c] = self.spec.input_shape;
        let outputs = self.spec.output_shape()?.numel();
        let mut out = Array2::zeros((indices.len(), outputs));
        let mut buffer = Array4::zeros((batch_size.min(indices.len().max(1)), h, w, c));
        let batcher = ds.batcher()?;
        for (b, chunk) in indices.chunks(batch_size).enumerate() {
            let mut x = buffer.slice_mut(s![..chunk.len(), .., .., ..]);
            batcher.fill(chunk, x.view_mut())?;
            let p = self.network.predict(x.view())?;
            if p.dim() != (chunk.len(), outputs) {
                return Err(Error::engine(
                    &self.backend,
                    format!(
                        "predict returned {:?}, expected ({}, {outputs})",
                        p.dim(),
                        chunk.len()
                    ),
                ));
            }
            out.slice_mut(s![b * batch_size..b * batch_size + chunk.len(), ..])
                .assign(&p);
        }
        Ok(out)
    }

    /// Loss and accuracy on `ds` (one forward pass), keeping the probabilities.
    pub fn evaluate(&self, ds: &Dataset, batch_size: usize) -> Result<Evaluation> {
        self.check_data(ds)?;
        let indices: Vec<usize> = (0..ds.len()).collect();
        self.evaluate_indices(ds, &indices, batch_size)
    }

    fn evaluate_indices(
        &self,
        ds: &Dataset,
        indices: &[usize],
        batch_size: usize,
    ) -> Result<Evaluation> {
        let probabilities = self.predict_indices(ds, indices, batch_size)?;
        let (loss, head, classes) = (self.compile.loss, self.head, ds.classes.clone());
        let mut evaluation = match &ds.soft_targets {
            Some(rows) => {
                let targets = rows.select(ndarray::Axis(0), indices);
                Evaluation::soft(loss, head, probabilities, targets, classes)?
            }
            None => {
                let labels: Vec<u32> = indices.iter().map(|&i| ds.labels[i]).collect();
                Evaluation::new(loss, head, probabilities, labels, classes)?
            }
        };
        // Keras' evaluate reports the loss with the kernel regularisers' penalty added.
        if (0..self.spec.layers.len()).any(|i| self.spec.kernel_regularizer(i).is_some()) {
            evaluation.loss += self.weights()?.kernel_penalty(&self.spec)?;
        }
        Ok(evaluation)
    }
}

fn check_batch_size(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::config("batch size", "must be at least 1, found 0"));
    }
    Ok(())
}

/// Class predicted from one row of probabilities.
pub fn predicted_class(head: Head, probabilities: &[f32]) -> u32 {
    match head {
        Head::Sigmoid => u32::from(probabilities[0] > 0.5),
        Head::Softmax => crate::data::most_likely(probabilities),
    }
}

/// Keras clips probabilities to `[ε, 1−ε]` with ε = 1e-7 before taking logs.
const PROB_EPSILON: f64 = 1e-7;

/// Loss and accuracy of a model on a dataset, with its probabilities and predictions.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// `[n, outputs]`.
    pub probabilities: Array2<f32>,
    pub predicted: Vec<u32>,
    /// Each image's class: its label, or its soft targets' most likely class.
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
    /// The soft targets `[n, classes]` scored against, when the data has them.
    pub soft_targets: Option<Array2<f32>>,
}

impl Evaluation {
    /// Score `probabilities` against `labels` with `loss` (cross-entropy of clipped probabilities).
    pub fn new(
        loss: Loss,
        head: Head,
        probabilities: Array2<f32>,
        labels: Vec<u32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        Evaluation::score(loss, head, probabilities, labels, None, classes)
    }

    /// Score `probabilities` against soft targets `[n, classes]` (values in [0, 1]; for a
    /// sigmoid unit, rows `[1 − t, t]`): the cross-entropy of the targets, and the accuracy of
    /// their most likely classes (for binary targets, thresholded at 0.5 as the predictions
    /// are; Keras' `binary_accuracy` compares float targets exactly, so it counts none).
    pub fn soft(
        loss: Loss,
        head: Head,
        probabilities: Array2<f32>,
        targets: Array2<f32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        let labels = crate::data::soft_labels(&targets, classes.len())?;
        Evaluation::score(loss, head, probabilities, labels, Some(targets), classes)
    }

    fn score(
        loss: Loss,
        head: Head,
        probabilities: Array2<f32>,
        labels: Vec<u32>,
        soft_targets: Option<Array2<f32>>,
        classes: Vec<String>,
    ) -> Result<Self> {
        if probabilities.nrows() != labels.len() {
            return Err(Error::Shape {
                expected: format!("{} rows of probabilities", labels.len()),
                found: format!("{}", probabilities.nrows()),
            });
        }
        let clip = |p: f32| (p as f64).clamp(PROB_EPSILON, 1.0 - PROB_EPSILON);
        // Image i's target for class k: its soft target, or 1 for its label.
        let target = |i: usize, k: usize| match &soft_targets {
            Some(rows) => rows[[i, k]] as f64,
            None => f64::from(labels[i] as usize == k),
        };
        let mut total = 0.0;
        let mut correct = 0usize;
        let mut predicted = Vec::with_capacity(labels.len());
        for (i, (row, &label)) in probabilities.rows().into_iter().zip(&labels).enumerate() {
            let row = row.as_slice().expect("standard layout");
            total += match (loss, head) {
                (Loss::BinaryCrossentropy, _) | (_, Head::Sigmoid) => {
                    let (p, t) = (clip(row[0]), target(i, 1));
                    -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
                }
                _ => -(row.iter().enumerate())
                    .map(|(k, &p)| {
                        let t = target(i, k);
                        if t == 0.0 {
                            0.0
                        } else {
                            t * clip(p).ln()
                        }
                    })
                    .sum::<f64>(),
            };
            let class = predicted_class(head, row);
            correct += usize::from(class == label);
            predicted.push(class);
        }
        let n = labels.len().max(1) as f64;
        Ok(Evaluation {
            loss: total / n,
            accuracy: correct as f64 / n,
            probabilities,
            predicted,
            labels,
            classes,
            soft_targets,
        })
    }

    pub fn confusion_matrix(&self) -> Result<ConfusionMatrix> {
        ConfusionMatrix::new(&self.labels, &self.predicted, self.classes.clone())
    }
}
