//! The one network executor. Core walks the checked [`Plan`]: the forward pass in training or
//! inference mode, batch normalisation with its moving statistics, dropout with core's masks,
//! the head, the losses, regularisation and the optimizer step. An engine supplies only
//! [`Ops`], tensor operations on its device with its own autodiff (the rest is written once
//! over them, [`Composite`]), and is statically dispatched inside [`Executor`]; the
//! object-safe [`Network`] seam stays for the CLI.
//!
//! Layout on the device: images are NCHW (`[n, channels, height, width]`), flat activations
//! `[n, features]`. Host data (batches, dropout masks) is NHWC, and core transposes it once
//! on the way in.

use std::collections::{BTreeMap, BTreeSet};

use ndarray::{Array2, ArrayView4};

use std::rc::Rc;

use crate::backend::{Backend, Network, StepStats, Targets};
use crate::collective::{Collective, Solo};
use crate::compile::{Head, Loss};
use crate::composite::Composite;
use crate::optim::{DropoutMask, OptimizerState, Slots, TensorMath, Training};
use crate::plan::{Compiled, Plan, PlannedOp, PoolKind, WeightSpec};
use crate::primitives::{ConvReluMaxPool, Ops};

/// A forward pass's logits `[n, outputs]` and, in training, each batch normalisation's new
/// moving statistics by weight index.
type Forward<T> = (T, Vec<(usize, T)>);
use crate::spec::Activation;
use crate::weights::{Tensor as HostTensor, Weights};
use crate::{Error, Result};

/// What a training step's forward and backward passes give, before the update.
struct StepParts<T> {
    /// Mean loss over the batch (without the regularisation penalty).
    loss: f32,
    /// Images classified right.
    correct: usize,
    /// One per weight: its gradient; `None` for a frozen one or a moving statistic.
    grads: Vec<Option<T>>,
    /// Each moving statistic the step updates (weight index, new value; `None` on a rank
    /// with no images until the sum over the ranks fills it in).
    moving: Vec<(usize, Option<T>)>,
}

/// An engine as core sees it: its name and device, and its [`Ops`]. Every `Engine` is a
/// [`Backend`], whose networks are [`Executor`]s over those operations: an engine crate
/// writes no `build`.
pub trait Engine: Send + Sync {
    type Ops: Ops + 'static;
    /// The `--backend` name, e.g. `candle-cpu`.
    fn name(&self) -> &str;
    /// The device, in words.
    fn device(&self) -> String;
    /// See [`Backend::left_out_by_default`].
    fn left_out_by_default(&self) -> Option<String> {
        None
    }
    /// The operations on this engine's device.
    fn ops(&self) -> Self::Ops;
}

impl<E: Engine> Backend for E {
    fn name(&self) -> &str {
        Engine::name(self)
    }
    fn device(&self) -> String {
        Engine::device(self)
    }
    fn left_out_by_default(&self) -> Option<String> {
        Engine::left_out_by_default(self)
    }
    fn build(&self, model: &Compiled, weights: &Weights) -> Result<Box<dyn Network>> {
        Ok(Box::new(Executor::new(self.ops(), model, weights)?))
    }
}

/// A network on an engine: the plan, the variables on the device, their optimizer slots and
/// the training bookkeeping. Every [`Engine`]'s [`Backend::build`] makes one with
/// [`Executor::new`].
pub struct Executor<O: Ops> {
    ops: O,
    plan: Plan,
    input_shape: [usize; 3],
    /// Number of outputs (class scores, or 1 for a sigmoid head).
    outputs: usize,
    /// One per [`Plan::weights`], as the engine keeps it.
    values: Vec<O::Tensor>,
    /// One per [`Plan::weights`]; the moving statistics' stay empty.
    slots: Vec<Slots<O::Tensor>>,
    training: Training,
    loss: Loss,
    head: Head,
    /// The ranks this network trains with ([`Network::set_collective`]); [`Solo`] at first.
    group: Rc<dyn Collective>,
}

impl<O: Ops> Executor<O> {
    /// `model`, starting from `weights` (canonical layout), on `ops`' engine. Checks the
    /// weights' names, shapes and values against the plan, and asks the engine about every
    /// layer, once, here.
    pub fn new(ops: O, model: &Compiled, weights: &Weights) -> Result<Self> {
        weights.check_for(model)?;
        let plan = model.plan().clone();
        let names = model.spec().layer_names();
        for (i, op) in plan.ops.iter().enumerate() {
            ops.supports(op).map_err(|reason| {
                Error::engine(
                    ops.engine(),
                    format!(
                        "not supported by {}: layer {i} ({}): {reason}",
                        ops.engine(),
                        names[i]
                    ),
                )
            })?;
        }
        let mut values = Vec::with_capacity(plan.weights.len());
        for w in &plan.weights {
            let value = ops.upload_weight(w, &weights.get(&w.name)?.data)?;
            values.push(ops.variable(value)?);
        }
        Ok(Executor {
            slots: plan.weights.iter().map(|_| Slots::default()).collect(),
            outputs: plan.shapes.last().expect("a plan has a layer").numel(),
            input_shape: model.spec().input_shape,
            training: Training::new(model)?,
            loss: model.compile().loss,
            head: model.head(),
            values,
            plan,
            ops,
            group: Rc::new(Solo),
        })
    }

    /// NHWC host batch → NCHW device tensor. A leading RandomCrop crops it here, on the
    /// host: at each image's `[top, left]` of `crops` (training), or the centre (inference).
    fn images(&self, x: ArrayView4<'_, f32>, crops: Option<&[[usize; 2]]>) -> Result<O::Tensor> {
        let (n, h, w, c) = x.dim();
        if [h, w, c] != self.input_shape {
            let [eh, ew, ec] = self.input_shape;
            return Err(Error::Shape {
                expected: format!("a batch of {eh}×{ew}×{ec} images (the model's input)"),
                found: format!("{h}×{w}×{c} images"),
            });
        }
        let x: ndarray::CowArray<'_, f32, ndarray::Ix4> =
            match self.plan.ops.first().and_then(PlannedOp::crop) {
                Some(([h, w], [ch, cw])) => {
                    let centre = vec![[(h - ch) / 2, (w - cw) / 2]; n];
                    crate::augment::crop(x, crops.unwrap_or(&centre), [ch, cw]).into()
                }
                None => x.into(),
            };
        let (n, h, w, c) = x.dim();
        let x = x.as_standard_layout();
        let data = x.as_slice().expect("standard layout");
        self.ops.images([n, h, w, c], data)
    }

    /// Dense target rows `[n, outputs]` on the device, checked against the loss and the
    /// number of outputs.
    fn target_rows(&self, y: &Targets) -> Result<O::Tensor> {
        let (n, k) = (y.len(), self.outputs);
        let mismatch = |found: String| {
            Err(Error::Shape {
                expected: format!(
                    "{} targets for {k} output{}",
                    match self.loss {
                        Loss::SparseCategoricalCrossentropy => "class-index (sparse)",
                        Loss::CategoricalCrossentropy => "one row per image (dense)",
                        Loss::BinaryCrossentropy => "binary, in [0, 1],",
                    },
                    if k == 1 { "" } else { "s" }
                ),
                found,
            })
        };
        let rows = match (self.loss, y) {
            (Loss::SparseCategoricalCrossentropy, Targets::Sparse(labels)) => {
                let mut rows = vec![0.0f32; n * k];
                for (i, &label) in labels.iter().enumerate() {
                    if label as usize >= k {
                        return mismatch(format!("label {label} for image {i}"));
                    }
                    rows[i * k + label as usize] = 1.0;
                }
                rows
            }
            (Loss::CategoricalCrossentropy, Targets::Dense(rows)) if rows.ncols() == k => {
                rows.iter().copied().collect()
            }
            (Loss::BinaryCrossentropy, Targets::Binary(v)) if k == 1 => v.clone(),
            (_, Targets::Dense(rows)) => {
                return mismatch(format!("dense rows of {} values", rows.ncols()))
            }
            (_, other) => return mismatch(format!("{other:?}")),
        };
        if let Some((i, v)) = rows
            .iter()
            .enumerate()
            .find(|(_, v)| !(0.0..=1.0).contains(*v))
        {
            return mismatch(format!("target {v} for image {}", i / k));
        }
        self.ops.upload(&[n, k], &rows)
    }

    /// Logits `[n, outputs]` from `params` (the variables as read for this pass); and, in
    /// training, each batch normalisation's new moving statistics by weight index. `masks`
    /// are the training batch's dropout masks (none for inference).
    fn forward(
        &self,
        params: &[O::Tensor],
        mut x: O::Tensor,
        train: bool,
        masks: &[DropoutMask],
    ) -> Result<Forward<O::Tensor>> {
        let ops = &self.ops;
        let mut moving = Vec::new();
        let mut masks = masks.iter();
        let mut layers = self.plan.ops.iter().enumerate().peekable();
        while let Some((layer, op)) = layers.next() {
            x = match *op {
                PlannedOp::Conv2D {
                    kernel,
                    bias,
                    pad,
                    strides,
                    activation,
                } => {
                    let (kernel, bias) = (&params[kernel], &params[bias]);
                    // A ReLU convolution and the max pooling after it, as one operation.
                    if let (
                        Activation::Relu,
                        Some(&(
                            _,
                            &PlannedOp::Pool2D {
                                kind: PoolKind::Max,
                                size,
                                strides: pool_strides,
                            },
                        )),
                    ) = (activation, layers.peek())
                    {
                        layers.next();
                        let block = ConvReluMaxPool {
                            pad,
                            strides,
                            pool_size: size,
                            pool_strides,
                        };
                        ops.conv2d_relu_max_pool(&x, kernel, bias, block)?
                    } else {
                        let y = ops.conv2d(&x, kernel, bias, pad, strides)?;
                        ops.activation(&y, activation)?
                    }
                }
                PlannedOp::Pool2D {
                    kind,
                    size,
                    strides,
                } => ops.pool2d(&x, kind, size, strides)?,
                PlannedOp::GlobalPool2D { kind, size } => {
                    // [n, c, 1, 1] flattens to [n, c] in any order.
                    ops.flatten(&ops.pool2d(&x, kind, size, size)?)?
                }
                // A flat vector is flat already.
                PlannedOp::Flatten if layer > 0 && !self.plan.shapes[layer - 1].is_image() => x,
                PlannedOp::Flatten => ops.flatten(&x)?,
                PlannedOp::Dense {
                    kernel,
                    bias,
                    activation,
                } => ops.activation(&ops.dense(&x, &params[kernel], &params[bias])?, activation)?,
                PlannedOp::Activation(activation) => ops.activation(&x, activation)?,
                PlannedOp::Dropout { rate } if train && rate > 0.0 => {
                    let mask = masks.next().ok_or_else(|| {
                        Error::engine(ops.engine(), "a Dropout layer was given no mask")
                    })?;
                    x.mul(&self.mask(mask)?)?
                }
                PlannedOp::Dropout { .. } => x,
                // Cropped on the host before the batch came to the device (`images`).
                PlannedOp::Crop { .. } => x,
                PlannedOp::BatchNorm {
                    gamma,
                    beta,
                    moving_mean,
                    moving_variance,
                    momentum,
                    epsilon,
                } => {
                    let (mean, variance) = if self.training.uses_batch_statistics(layer, train) {
                        let (mean, variance) = ops.moments(&x)?;
                        for (i, batch) in [(moving_mean, &mean), (moving_variance, &variance)] {
                            let old = ops.read(&self.values[i], false);
                            let new = Training::moving_average(&old, &ops.detach(batch), momentum)?;
                            moving.push((i, new));
                        }
                        (mean, variance)
                    } else {
                        (params[moving_mean].clone(), params[moving_variance].clone())
                    };
                    ops.batch_norm(&x, &mean, &variance, &params[gamma], &params[beta], epsilon)?
                }
            };
        }
        Ok((x, moving))
    }

    /// The forward and backward pass of one training step on this process's batch.
    fn local_step(
        &mut self,
        x: ArrayView4<'_, f32>,
        y: &Targets,
        tracked: &[bool],
    ) -> Result<StepParts<O::Tensor>> {
        let _awake = self.ops.keep_threads_awake();
        let targets = self.target_rows(y)?;
        let crops = self.training.crop_offsets(x.dim().0);
        let masks = self.training.dropout_masks(x.dim().0);
        let x = self.images(x, crops.as_deref())?;
        let ops = &self.ops;
        let params: Vec<O::Tensor> = (self.values.iter().zip(tracked))
            .map(|(v, &grad)| ops.read(v, grad))
            .collect();
        let (logits, moving) = self.forward(&params, x, true, &masks)?;
        let loss = match self.loss {
            Loss::BinaryCrossentropy => ops.sigmoid_cross_entropy(&logits, &targets)?,
            Loss::SparseCategoricalCrossentropy | Loss::CategoricalCrossentropy => {
                ops.softmax_cross_entropy(&logits, &targets)?
            }
        };
        let correct = self.correct(&ops.download(&ops.detach(&logits))?, y);
        let wrt: Vec<&O::Tensor> = (params.iter().zip(tracked))
            .filter(|(_, &grad)| grad)
            .map(|(p, _)| p)
            .collect();
        // Everything frozen: nothing to differentiate (and nothing tracked to start from).
        let mut found = if wrt.is_empty() {
            Vec::new()
        } else {
            ops.gradients(&loss, &wrt)?
        }
        .into_iter();
        let grads = (tracked.iter())
            .map(|&t| if t { found.next().flatten() } else { None })
            .collect();
        let loss = ops.download(&ops.detach(&loss))?[0];
        let moving = moving.into_iter().map(|(i, t)| (i, Some(t))).collect();
        Ok(StepParts {
            loss,
            correct,
            grads,
            moving,
        })
    }

    /// Weight indices of the moving statistics a training step updates, in the order
    /// [`Executor::forward`] gives them.
    fn moving_statistics(&self) -> impl Iterator<Item = usize> + '_ {
        (self.plan.ops.iter().enumerate())
            .filter(|(layer, _)| self.training.uses_batch_statistics(*layer, true))
            .filter_map(|(_, op)| op.moving_statistics())
            .flatten()
    }

    /// Data-parallel training: sums this rank's step (`n` images) with every other rank's in
    /// one all-reduce, so that every rank continues with the same values. Gradients and moving
    /// statistics are weighted by each rank's batch size, so they become the means over the
    /// global batch, as one process would compute them from it (batch normalisation still
    /// normalises with each rank's own batch statistics); the loss becomes the global batch's
    /// mean and `correct` its count.
    fn sum_over_group(
        &self,
        n: usize,
        tracked: &[bool],
        step: &mut StepParts<O::Tensor>,
    ) -> Result<()> {
        let StepParts {
            loss,
            correct,
            grads,
            moving,
        } = step;
        let expected: Vec<usize> = self.moving_statistics().collect();
        if moving.iter().map(|m| m.0).ne(expected.iter().copied()) {
            return Err(Error::engine(
                self.ops.engine(),
                "the forward pass updated other moving statistics than the plan names",
            ));
        }
        let weight = n as f32;
        let mut buffer = Vec::new();
        let mut add = |i: usize, t: &Option<O::Tensor>| -> Result<f32> {
            let w = &self.plan.weights[i];
            match t {
                Some(t) => {
                    let values = self.ops.download_weight(w, t)?;
                    buffer.extend(values.iter().map(|v| v * weight));
                    Ok(1.0)
                }
                None => {
                    buffer.resize(buffer.len() + w.shape.iter().product::<usize>(), 0.0);
                    Ok(0.0)
                }
            }
        };
        let mut present = Vec::new();
        for (i, grad) in grads.iter().enumerate().filter(|(i, _)| tracked[*i]) {
            present.push(add(i, grad)?);
        }
        for (i, value) in moving.iter() {
            add(*i, value)?;
        }
        buffer.extend(present);
        buffer.extend([*loss * weight, *correct as f32, weight]);
        self.group.all_reduce_f32(&mut buffer)?;
        let total = buffer[buffer.len() - 1];
        let present_at = buffer.len() - 3 - tracked.iter().filter(|&&t| t).count();
        let (sums, tail) = buffer.split_at(present_at);
        let mut sums = sums.iter().map(|v| v / total);
        let mut take = |i: usize| -> Result<O::Tensor> {
            let w = &self.plan.weights[i];
            let values: Vec<f32> = sums.by_ref().take(w.shape.iter().product()).collect();
            self.ops.upload_weight(w, &values)
        };
        let mut present = tail.iter();
        for (i, grad) in grads.iter_mut().enumerate() {
            if tracked[i] {
                let sum = take(i)?;
                // A gradient that no rank has stays absent (the loss does not depend on it).
                *grad =
                    (*present.next().expect("one flag per tracked weight") > 0.0).then_some(sum);
            }
        }
        for (i, value) in moving.iter_mut() {
            *value = Some(take(*i)?);
        }
        *loss = tail[tail.len() - 3] / total;
        *correct = tail[tail.len() - 2] as usize;
        Ok(())
    }

    /// A dropout mask on the device, NCHW for an image.
    fn mask(&self, mask: &DropoutMask) -> Result<O::Tensor> {
        match mask.shape[..] {
            [n, h, w, c] => self.ops.images([n, h, w, c], &mask.values),
            _ => self.ops.upload(&mask.shape, &mask.values),
        }
    }

    /// Images of the batch the logits (`[n, outputs]`, row-major) classify as `y` says.
    fn correct(&self, logits: &[f32], y: &Targets) -> usize {
        use crate::data::most_likely;
        let rows = logits.chunks_exact(self.outputs);
        match y {
            Targets::Sparse(labels) => rows
                .zip(labels)
                .filter(|(r, &l)| most_likely(*r) == l)
                .count(),
            Targets::Dense(t) => rows
                .zip(t.rows())
                .filter(|(r, t)| most_likely(*r) == most_likely(t))
                .count(),
            Targets::Binary(t) => rows
                .zip(t)
                .filter(|(r, &t)| (r[0] > 0.0) == (t > 0.5))
                .count(),
        }
    }

    /// `weight`'s tensor (a value or a slot) as a canonical host tensor.
    fn to_host(&self, weight: &WeightSpec, t: &O::Tensor) -> Result<HostTensor> {
        HostTensor::new(weight.shape.clone(), self.ops.download_weight(weight, t)?)
    }

    /// A canonical host tensor for `weight` (a value or a slot) on the device, checked
    /// against its shape; `what` names it in errors.
    fn upload_host(&self, weight: &WeightSpec, t: &HostTensor, what: &str) -> Result<O::Tensor> {
        if t.shape != weight.shape {
            return Err(Error::Weights {
                tensor: what.to_string(),
                message: format!("expected shape {:?}, found {:?}", weight.shape, t.shape),
            });
        }
        self.ops.upload_weight(weight, &t.data)
    }
}

impl<O: Ops> Network for Executor<O> {
    fn train_step(&mut self, x: ArrayView4<'_, f32>, y: &Targets) -> Result<StepStats> {
        let n = x.dim().0;
        if n != y.len() {
            return Err(Error::Shape {
                expected: format!("one target per image ({n} images)"),
                found: format!("{} targets", y.len()),
            });
        }
        // Frozen layers' weights and the moving statistics enter as constants.
        let tracked: Vec<bool> = (self.plan.weights.iter())
            .map(|w| w.role.is_optimized() && self.training.is_trainable(w.layer))
            .collect();
        let distributed = self.group.size() > 1;
        // A rank whose slice of a small last batch is empty still takes part in the sum.
        let mut step = if n == 0 && distributed {
            StepParts {
                loss: 0.0,
                correct: 0,
                grads: vec![None; self.values.len()],
                moving: self.moving_statistics().map(|i| (i, None)).collect(),
            }
        } else {
            self.local_step(x, y, &tracked)?
        };
        if distributed {
            self.sum_over_group(n, &tracked, &mut step)?;
        }
        self.training.begin_step();
        let _awake = self.ops.keep_threads_awake();
        let mut penalty = 0.0;
        for ((i, w), grad) in self.plan.weights.iter().enumerate().zip(step.grads) {
            if !w.role.is_optimized() {
                continue;
            }
            if let Some(grad) = &grad {
                // A trainable variable (frozen ones have no gradient): one pass where the engine
                // can. The slots the rule keeps are made first, as the composite form would.
                let slots = &mut self.slots[i];
                let used = self.training.optimizer().slots_used();
                for (slot, used) in [&mut slots.m, &mut slots.v, &mut slots.mg]
                    .into_iter()
                    .zip(used)
                {
                    if used && slot.is_none() {
                        *slot = Some(self.values[i].zeros_like()?);
                    }
                }
                let mut slots: Vec<&mut O::Tensor> = [&mut slots.m, &mut slots.v, &mut slots.mg]
                    .into_iter()
                    .flatten()
                    .collect();
                let training = &self.training;
                let kernel = w.role.is_regularised();
                let mut p = 0.0;
                let done = self.ops.update_in_place(
                    &mut self.values[i],
                    grad,
                    &mut slots,
                    &mut |threads, value, grad, slots| {
                        p = training.step_elements(threads, w.layer, kernel, value, grad, slots);
                    },
                )?;
                if done {
                    penalty += p;
                    continue;
                }
            }
            let value = self.ops.read(&self.values[i], false);
            let (new, p) = self.training.step(
                w.layer,
                w.role.is_regularised(),
                &value,
                grad.as_ref(),
                &mut self.slots[i],
            )?;
            penalty += p;
            if let Some(new) = new {
                self.ops.assign(&mut self.values[i], new)?;
            }
        }
        for (i, value) in step.moving {
            if let Some(value) = value {
                self.values[i] = value;
            }
        }
        Ok(StepStats {
            loss: (step.loss as f64 + penalty) as f32,
            correct: step.correct,
        })
    }

    fn predict(&self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let n = x.dim().0;
        let _awake = self.ops.keep_threads_awake();
        let params: Vec<O::Tensor> = self
            .values
            .iter()
            .map(|v| self.ops.read(v, false))
            .collect();
        let (logits, _) = self.forward(&params, self.images(x, None)?, false, &[])?;
        let head = match self.head {
            Head::Softmax => Activation::Softmax,
            Head::Sigmoid => Activation::Sigmoid,
        };
        let p = self.ops.download(&self.ops.activation(&logits, head)?)?;
        Array2::from_shape_vec((n, self.outputs), p).map_err(|e| Error::Shape {
            expected: format!("{n}×{} probabilities", self.outputs),
            found: e.to_string(),
        })
    }

    fn weights(&self) -> Result<Weights> {
        let mut weights = Weights::default();
        for (w, value) in self.plan.weights.iter().zip(&self.values) {
            weights.insert(w.name.clone(), self.to_host(w, value)?);
        }
        Ok(weights)
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        let mut values = Vec::with_capacity(self.values.len());
        for w in &self.plan.weights {
            let value = self.upload_host(w, weights.get(&w.name)?, &w.name)?;
            values.push(self.ops.variable(value)?);
        }
        self.values = values;
        Ok(())
    }

    fn set_trainable(&mut self, layer: usize, trainable: bool) -> Result<()> {
        self.training.set_trainable(layer, trainable)
    }

    fn set_collective(&mut self, group: Rc<dyn Collective>) {
        self.group = group;
    }

    fn set_learning_rate(&mut self, learning_rate: f64) {
        self.training.set_learning_rate(learning_rate);
    }

    fn set_dropout_stream(&mut self, seed: u64, position: u128) {
        self.training.set_dropout_stream(seed, position);
    }

    fn dropout_position(&mut self) -> u128 {
        self.training.dropout_position()
    }

    fn optimizer_state(&mut self) -> Result<OptimizerState> {
        let mut slots = BTreeMap::new();
        for (w, weight_slots) in self.plan.weights.iter().zip(&self.slots) {
            for (slot, value) in weight_slots.named() {
                if let Some(value) = value {
                    slots.insert(format!("{}/{slot}", w.name), self.to_host(w, value)?);
                }
            }
        }
        Ok(OptimizerState {
            step: self.training.step_count(),
            slots,
        })
    }

    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        let mut restored = Vec::with_capacity(self.slots.len());
        let mut known = BTreeSet::new();
        for w in &self.plan.weights {
            let mut load = |slot: &str| -> Result<Option<O::Tensor>> {
                let key = format!("{}/{slot}", w.name);
                let value = match state.slots.get(&key) {
                    Some(t) if w.role.is_optimized() => {
                        Some(self.upload_host(w, t, &format!("optimizer/{key}"))?)
                    }
                    _ => None,
                };
                if w.role.is_optimized() {
                    known.insert(key);
                }
                Ok(value)
            };
            restored.push(Slots {
                m: load("m")?,
                v: load("v")?,
                mg: load("mg")?,
            });
        }
        if let Some(unknown) = state.slots.keys().find(|k| !known.contains(*k)) {
            return Err(Error::Weights {
                tensor: format!("optimizer/{unknown}"),
                message: "this model has no such optimizer slot (its trainable variables have m, v or mg)".into(),
            });
        }
        self.slots = restored;
        self.training.set_step_count(state.step);
        Ok(())
    }
}
