//! Keras' optimizer update rules, written once against a tiny element-wise tensor trait that
//! every engine implements for its own tensor type, so all engines run the same arithmetic in
//! the same order on their own devices.

use convkit_cpu::{for_each_chunk_across, vectorized, Serial, Threads, Vectorize};

use crate::compile::Optimizer;
use crate::spec::{Regularizer, Shape};
use crate::Result;

/// How many elements of a weight one task of the one-pass update takes
/// ([`Training::step_elements`]): 32 KiB of each array, so a task's weight, gradient and
/// slots stay in L2. Weights no larger are updated on the calling thread.
pub const UPDATE_CHUNK: usize = 8 << 10;

/// The element-wise operations the update rules need. Engines implement this for their
/// device tensors; core implements it for `ndarray` (used by the tests below).
pub trait TensorMath: Sized {
    fn zeros_like(&self) -> Result<Self>;
    /// `self · mul + add`.
    fn affine(&self, mul: f64, add: f64) -> Result<Self>;
    fn add(&self, rhs: &Self) -> Result<Self>;
    fn sub(&self, rhs: &Self) -> Result<Self>;
    fn mul(&self, rhs: &Self) -> Result<Self>;
    fn div(&self, rhs: &Self) -> Result<Self>;
    fn sqr(&self) -> Result<Self>;
    fn sqrt(&self) -> Result<Self>;
    /// −1, 0 or 1 per element.
    fn sign(&self) -> Result<Self>;
    /// The sum of every element, read back to the host.
    fn sum(&self) -> Result<f64>;
}

/// The optimizer's state between steps, on the host: what a resumed run needs to continue
/// exactly where it stopped (Keras' `optimizer.variables`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OptimizerState {
    /// Updates applied so far (Keras' `iterations`).
    pub step: u64,
    /// Each slot that exists, keyed `VARIABLE/SLOT` (`conv2d.weight/m`), in the variable's
    /// canonical layout (as [`crate::Weights`]).
    pub slots: std::collections::BTreeMap<String, crate::weights::Tensor>,
}

impl<T> Slots<T> {
    /// The slots by name (`m`, `v`, `mg`), those not created yet as `None`.
    pub fn named(&self) -> [(&'static str, Option<&T>); 3] {
        [
            ("m", self.m.as_ref()),
            ("v", self.v.as_ref()),
            ("mg", self.mg.as_ref()),
        ]
    }
}

/// Per-parameter optimizer state (Keras' "slots"), created on first use.
#[derive(Debug)]
pub struct Slots<T> {
    /// SGD/RMSprop momentum, Adam's first moment.
    pub m: Option<T>,
    /// Adam's second moment, RMSprop's mean square.
    pub v: Option<T>,
    /// RMSprop centred: mean gradient.
    pub mg: Option<T>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            m: None,
            v: None,
            mg: None,
        }
    }
}

fn slot<'a, T: TensorMath>(s: &'a mut Option<T>, like: &T) -> Result<&'a mut T> {
    if s.is_none() {
        *s = Some(like.zeros_like()?);
    }
    Ok(s.as_mut().expect("just set"))
}

impl Optimizer {
    /// One update of weight `w` with gradient `g`; returns the new weight. `lr` is the
    /// current learning rate (schedules change it), `step` the 1-based count of updates
    /// applied so far including this one (Keras' `iterations + 1`).
    pub fn update<T: TensorMath>(
        &self,
        lr: f64,
        step: u64,
        w: &T,
        g: &T,
        slots: &mut Slots<T>,
    ) -> Result<T> {
        match *self {
            Optimizer::Sgd {
                momentum, nesterov, ..
            } => {
                if momentum == 0.0 {
                    return w.sub(&g.affine(lr, 0.0)?);
                }
                let m = slot(&mut slots.m, w)?;
                let lr_g = g.affine(lr, 0.0)?;
                *m = m.affine(momentum, 0.0)?.sub(&lr_g)?;
                if nesterov {
                    w.add(&m.affine(momentum, 0.0)?)?.sub(&lr_g)
                } else {
                    w.add(m)
                }
            }
            Optimizer::Adam {
                beta_1,
                beta_2,
                epsilon,
                ..
            } => {
                let alpha = adam_step_size(lr, beta_1, beta_2, step);
                let m = slot(&mut slots.m, w)?;
                *m = m.add(&g.sub(m)?.affine(1.0 - beta_1, 0.0)?)?;
                let v = slot(&mut slots.v, w)?;
                *v = v.add(&g.sqr()?.sub(v)?.affine(1.0 - beta_2, 0.0)?)?;
                let m = slots.m.as_ref().expect("set above");
                let v = slots.v.as_ref().expect("set above");
                w.sub(
                    &m.affine(alpha, 0.0)?
                        .div(&v.sqrt()?.affine(1.0, epsilon)?)?,
                )
            }
            Optimizer::Rmsprop {
                rho,
                momentum,
                epsilon,
                centered,
                ..
            } => {
                let v = slot(&mut slots.v, w)?;
                *v = v.affine(rho, 0.0)?.add(&g.sqr()?.affine(1.0 - rho, 0.0)?)?;
                let mut denominator = v.affine(1.0, epsilon)?;
                if centered {
                    let mg = slot(&mut slots.mg, w)?;
                    *mg = mg.affine(rho, 0.0)?.add(&g.affine(1.0 - rho, 0.0)?)?;
                    denominator = denominator.sub(&mg.sqr()?)?;
                }
                let increment = g.affine(lr, 0.0)?.div(&denominator.sqrt()?)?;
                if momentum > 0.0 {
                    let m = slot(&mut slots.m, w)?;
                    *m = m.affine(momentum, 0.0)?.add(&increment)?;
                    w.sub(m)
                } else {
                    w.sub(&increment)
                }
            }
        }
    }
}

/// `x·mul + add` as the composite form's [`TensorMath::affine`] on `ndarray` computes it: in
/// f64, rounded to f32 once.
#[inline(always)]
fn affine(x: f32, mul: f64, add: f64) -> f32 {
    (x as f64 * mul + add) as f32
}

impl Optimizer {
    /// Which slots the rule keeps, as `[m, v, mg]` ([`Slots::named`]'s order): exactly those
    /// [`Optimizer::update`] creates.
    #[inline(always)]
    pub fn slots_used(&self) -> [bool; 3] {
        match *self {
            Optimizer::Sgd { momentum, .. } => [momentum != 0.0, false, false],
            Optimizer::Adam { .. } => [true, true, false],
            Optimizer::Rmsprop {
                momentum, centered, ..
            } => [momentum > 0.0, true, centered],
        }
    }

    /// [`Optimizer::update`] in one pass over host memory, for CPU engines
    /// ([`crate::primitives::Ops::update_in_place`]): `w` and the slots change in place. The same
    /// arithmetic in the same order as the composite form on `ndarray` (each `affine` in f64
    /// rounded to f32, the rest in f32), element by element. `grad(g, w)` gives an element's
    /// gradient from its data gradient in `g` (as long as `w`) and the weight's value before
    /// the update; `slots` are those [`Optimizer::slots_used`] names, in its order, each as
    /// long as `w`. Inlined, so that [`convkit_cpu::vectorized`] can widen its loops.
    #[inline(always)]
    pub fn update_elements(
        &self,
        lr: f64,
        step: u64,
        w: &mut [f32],
        g: &[f32],
        grad: impl Fn(f32, f32) -> f32,
        slots: &mut [&mut [f32]],
    ) {
        assert_eq!(g.len(), w.len(), "one data gradient per weight");
        let [uses_m, uses_v, uses_mg] = self.slots_used();
        let mut slots = slots.iter_mut();
        let mut take = |used: bool| {
            if used {
                slots.next().map(|s| &mut **s)
            } else {
                None
            }
        };
        let (m, v, mg) = (take(uses_m), take(uses_v), take(uses_mg));
        match *self {
            Optimizer::Sgd {
                momentum, nesterov, ..
            } => match m {
                None => {
                    for (w, &g) in w.iter_mut().zip(g) {
                        *w -= affine(grad(g, *w), lr, 0.0);
                    }
                }
                Some(m) => {
                    for ((w, m), &g) in w.iter_mut().zip(m.iter_mut()).zip(g) {
                        let lr_g = affine(grad(g, *w), lr, 0.0);
                        *m = affine(*m, momentum, 0.0) - lr_g;
                        *w = if nesterov {
                            *w + affine(*m, momentum, 0.0) - lr_g
                        } else {
                            *w + *m
                        };
                    }
                }
            },
            Optimizer::Adam {
                beta_1,
                beta_2,
                epsilon,
                ..
            } => {
                let alpha = adam_step_size(lr, beta_1, beta_2, step);
                let (m, v) = (m.expect("Adam keeps m"), v.expect("Adam keeps v"));
                for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    let g = grad(g, *w);
                    *m += affine(g - *m, 1.0 - beta_1, 0.0);
                    *v += affine(g * g - *v, 1.0 - beta_2, 0.0);
                    *w -= affine(*m, alpha, 0.0) / affine(v.sqrt(), 1.0, epsilon);
                }
            }
            Optimizer::Rmsprop {
                rho,
                momentum,
                epsilon,
                ..
            } => {
                let (mut m, v, mut mg) = (m, v.expect("RMSprop keeps v"), mg);
                for (i, ((w, v), &g)) in w.iter_mut().zip(v.iter_mut()).zip(g).enumerate() {
                    let g = grad(g, *w);
                    *v = affine(*v, rho, 0.0) + affine(g * g, 1.0 - rho, 0.0);
                    let mut denominator = affine(*v, 1.0, epsilon);
                    if let Some(mg) = mg.as_deref_mut() {
                        mg[i] = affine(mg[i], rho, 0.0) + affine(g, 1.0 - rho, 0.0);
                        denominator -= mg[i] * mg[i];
                    }
                    let increment = affine(g, lr, 0.0) / denominator.sqrt();
                    match m.as_deref_mut() {
                        Some(m) => {
                            m[i] = affine(m[i], momentum, 0.0) + increment;
                            *w -= m[i];
                        }
                        None => *w -= increment,
                    }
                }
            }
        }
    }
}

impl TensorMath for ndarray::ArrayD<f32> {
    fn zeros_like(&self) -> Result<Self> {
        Ok(Self::zeros(self.raw_dim()))
    }
    fn affine(&self, mul: f64, add: f64) -> Result<Self> {
        Ok(self.mapv(|x| (x as f64 * mul + add) as f32))
    }
    fn add(&self, rhs: &Self) -> Result<Self> {
        Ok(self + rhs)
    }
    fn sub(&self, rhs: &Self) -> Result<Self> {
        Ok(self - rhs)
    }
    fn mul(&self, rhs: &Self) -> Result<Self> {
        Ok(self * rhs)
    }
    fn div(&self, rhs: &Self) -> Result<Self> {
        Ok(self / rhs)
    }
    fn sqr(&self) -> Result<Self> {
        Ok(self.mapv(|x| x * x))
    }
    fn sqrt(&self) -> Result<Self> {
        Ok(self.mapv(f32::sqrt))
    }
    fn sign(&self) -> Result<Self> {
        Ok(self.mapv(|x| if x == 0.0 { 0.0 } else { x.signum() }))
    }
    fn sum(&self) -> Result<f64> {
        Ok(self.iter().map(|&x| x as f64).sum())
    }
}

/// The optimizer bookkeeping of a training run: the rule, the current learning rate, the
/// update count, which layers train, and the dropout stream. The executor
/// ([`crate::exec`]) holds it beside the device tensors and their [`Slots`], the same for
/// every engine, so freezing, schedules and dropout behave alike on all of them.
#[derive(Debug, Clone)]
pub struct Training {
    optimizer: crate::compile::Optimizer,
    learning_rate: f64,
    step: u64,
    trainable: Vec<bool>,
    regularizers: Vec<Option<Regularizer>>,
    /// Each Dropout layer: its index, rate and input shape (one image).
    dropouts: Vec<(usize, f32, Vec<usize>)>,
    /// A leading RandomCrop: the image's `[H, W]` and the window's `[h, w]`.
    crop: Option<([usize; 2], [usize; 2])>,
    /// Where crop windows and dropout masks come from: seeded, so every engine crops the same
    /// windows and drops the same units.
    dropout_stream: rand_chacha::ChaCha8Rng,
}

/// One Dropout layer's inverted-dropout mask for a training batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DropoutMask {
    pub layer: usize,
    /// `[n, H, W, C]` (channels last, as the canonical layout) or `[n, features]`.
    pub shape: Vec<usize>,
    /// 0 for a dropped unit, `1 / (1 − rate)` for a kept one (Keras' inverted dropout).
    pub values: Vec<f32>,
}

impl Training {
    /// Every layer of `model` trainable, at its optimizer's learning rate, with its kernel
    /// regularisers.
    pub fn new(model: &crate::plan::Compiled) -> Result<Self> {
        use rand::SeedableRng;
        let (spec, optimizer) = (model.spec(), &model.compile().optimizer);
        let layers = spec.layers.len();
        let shapes = &model.plan().shapes;
        let dropouts = (model.plan().ops.iter().zip(shapes).enumerate())
            .filter_map(|(i, (op, shape))| {
                let rate = op.dropout_rate()?;
                Some(match *shape {
                    Shape::Image { h, w, c } => (i, rate, vec![h, w, c]),
                    Shape::Flat(n) => (i, rate, vec![n]),
                })
            })
            .collect();
        Ok(Training {
            optimizer: optimizer.clone(),
            learning_rate: optimizer.learning_rate(),
            step: 0,
            trainable: vec![true; layers],
            regularizers: (0..layers).map(|i| spec.kernel_regularizer(i)).collect(),
            dropouts,
            crop: model
                .plan()
                .ops
                .first()
                .and_then(crate::op::PlannedOp::crop),
            dropout_stream: rand_chacha::ChaCha8Rng::seed_from_u64(0),
        })
    }

    /// Each image's crop window `[top, left]` for a training batch of `n`, drawn uniformly
    /// from the stream (Keras' RandomCrop in training); `None` without a RandomCrop. Drawn
    /// before the batch's dropout masks.
    pub fn crop_offsets(&mut self, n: usize) -> Option<Vec<[usize; 2]>> {
        use rand::Rng;
        let ([h, w], [ch, cw]) = self.crop?;
        Some(
            (0..n)
                .map(|_| {
                    [
                        self.dropout_stream.random_range(0..=h - ch),
                        self.dropout_stream.random_range(0..=w - cw),
                    ]
                })
                .collect(),
        )
    }

    /// Draw the next masks from `seed`'s stream, `position` words in (a fit seeds it; a
    /// resumed fit continues where the backup's stream was).
    pub fn set_dropout_stream(&mut self, seed: u64, position: u128) {
        use rand::SeedableRng;
        self.dropout_stream = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        self.dropout_stream.set_word_pos(position);
    }

    /// How far the dropout stream has come (its word position), for a backup.
    pub fn dropout_position(&self) -> u128 {
        self.dropout_stream.get_word_pos()
    }

    /// The masks of a training batch of `n` images, one per Dropout layer with a positive
    /// rate, in layer order. The executor multiplies each layer's input by its mask, so every
    /// engine drops the same units for the same seed.
    pub fn dropout_masks(&mut self, n: usize) -> Vec<DropoutMask> {
        use rand::Rng;
        let mut masks = Vec::new();
        for (layer, rate, shape) in &self.dropouts {
            if *rate <= 0.0 {
                continue;
            }
            let keep = 1.0 / (1.0 - rate);
            let len = n * shape.iter().product::<usize>();
            let values = (0..len)
                .map(|_| {
                    if self.dropout_stream.random::<f32>() >= *rate {
                        keep
                    } else {
                        0.0
                    }
                })
                .collect();
            masks.push(DropoutMask {
                layer: *layer,
                shape: std::iter::once(n).chain(shape.iter().copied()).collect(),
                values,
            });
        }
        masks
    }

    pub fn set_trainable(&mut self, layer: usize, trainable: bool) -> Result<()> {
        let n = self.trainable.len();
        let slot = self.trainable.get_mut(layer).ok_or_else(|| {
            crate::Error::config(
                "layer index",
                format!(
                    "the model has {n} layers (0..{}), found {layer}",
                    n.saturating_sub(1)
                ),
            )
        })?;
        *slot = trainable;
        Ok(())
    }

    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
    }

    /// Whether `layer`'s weights are updated (the executor skips their gradients when not).
    pub fn is_trainable(&self, layer: usize) -> bool {
        self.trainable.get(layer).copied().unwrap_or(true)
    }

    /// Whether batch normalisation `layer` normalises with the batch's statistics (and then
    /// updates its moving ones): only in a training pass, and only while the layer is
    /// trainable. A frozen BatchNormalization runs in inference mode, as in Keras.
    pub fn uses_batch_statistics(&self, layer: usize, train: bool) -> bool {
        train && self.is_trainable(layer)
    }

    /// Keras' update of a batch normalisation's moving statistic after a training step:
    /// `moving·momentum + batch·(1 − momentum)`.
    pub fn moving_average<T: TensorMath>(moving: &T, batch: &T, momentum: f64) -> Result<T> {
        moving
            .affine(momentum, 0.0)?
            .add(&batch.affine(1.0 - momentum, 0.0)?)
    }

    /// Count one optimizer step (Keras counts it even when every layer is frozen).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// The update rule.
    pub fn optimizer(&self) -> &crate::compile::Optimizer {
        &self.optimizer
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Continue counting from `step` updates (a resumed run).
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    /// The penalty `l1·Σ|w| + l2·Σw²` that Keras adds to the loss for `layer`'s kernel `w`
    /// (0 without a regulariser; frozen layers still count, as in Keras).
    pub fn penalty<T: TensorMath>(&self, layer: usize, w: &T) -> Result<f64> {
        let Some(Regularizer { l1, l2 }) = self.regularizers.get(layer).copied().flatten() else {
            return Ok(0.0);
        };
        let mut penalty = 0.0;
        if l1 > 0.0 {
            penalty += l1 as f64 * w.sign()?.mul(w)?.sum()?;
        }
        if l2 > 0.0 {
            penalty += l2 as f64 * w.sqr()?.sum()?;
        }
        Ok(penalty)
    }

    /// The data gradient `g` of kernel `w` plus the penalty's: `l1·sign(w) + 2·l2·w`.
    fn regularised<T: TensorMath>(&self, layer: usize, w: &T, g: &T) -> Result<Option<T>> {
        let Some(Regularizer { l1, l2 }) = self.regularizers.get(layer).copied().flatten() else {
            return Ok(None);
        };
        let mut out: Option<T> = None;
        if l1 > 0.0 {
            out = Some(g.add(&w.sign()?.affine(l1 as f64, 0.0)?)?);
        }
        if l2 > 0.0 {
            let base = out.as_ref().unwrap_or(g);
            out = Some(base.add(&w.affine(2.0 * l2 as f64, 0.0)?)?);
        }
        Ok(out)
    }

    /// One variable's share of a step, what every engine calls per variable after backward:
    /// the new value of `w` (`None` when the layer is frozen or `g` is missing) and, for a
    /// `kernel`, the penalty its regulariser adds to the loss, taken before the update.
    pub fn step<T: TensorMath>(
        &self,
        layer: usize,
        kernel: bool,
        w: &T,
        g: Option<&T>,
        slots: &mut Slots<T>,
    ) -> Result<(Option<T>, f64)> {
        let penalty = if kernel { self.penalty(layer, w)? } else { 0.0 };
        let new = match g {
            Some(g) => self.apply(layer, kernel, w, g, slots)?,
            None => None,
        };
        Ok((new, penalty))
    }

    /// [`Training::step`] for a trainable `layer` in one pass over host memory, for engines
    /// that update in place ([`crate::primitives::Ops::update_in_place`]): `w` and `slots` (those
    /// [`Optimizer::slots_used`] names, in its order) change in place; returns the penalty a
    /// `kernel`'s regulariser adds to the loss, taken before the update. The arithmetic is the
    /// composite form's, element by element, the elements shared out on `threads` in chunks
    /// of [`UPDATE_CHUNK`].
    pub fn step_elements(
        &self,
        threads: &dyn Threads,
        layer: usize,
        kernel: bool,
        w: &mut [f32],
        g: &[f32],
        slots: &mut [&mut [f32]],
    ) -> f64 {
        let sign = |x: f32| if x == 0.0 { 0.0 } else { x.signum() };
        let regularizer = match self.regularizers.get(layer).copied().flatten() {
            Some(r) if kernel => r,
            _ => {
                self.update_chunks(threads, w, g, slots, |g, _| g);
                return 0.0;
            }
        };
        let Regularizer { l1, l2 } = regularizer;
        // The penalty reads every weight before the update changes it.
        let (mut l1_sum, mut l2_sum) = (0.0f64, 0.0f64);
        for &x in w.iter() {
            l1_sum += (sign(x) * x) as f64;
            l2_sum += (x * x) as f64;
        }
        let rule = |mut g: f32, x: f32| {
            if l1 > 0.0 {
                g += affine(sign(x), l1 as f64, 0.0);
            }
            if l2 > 0.0 {
                g += affine(x, 2.0 * l2 as f64, 0.0);
            }
            g
        };
        self.update_chunks(threads, w, g, slots, rule);
        let mut penalty = 0.0;
        if l1 > 0.0 {
            penalty += l1 as f64 * l1_sum;
        }
        if l2 > 0.0 {
            penalty += l2 as f64 * l2_sum;
        }
        penalty
    }

    /// [`Optimizer::update_elements`] of `w` and its `slots` by chunks of [`UPDATE_CHUNK`]
    /// elements on `threads` (a small weight on this thread alone); `g` and `grad(g, w)` as
    /// there.
    fn update_chunks(
        &self,
        threads: &dyn Threads,
        w: &mut [f32],
        g: &[f32],
        slots: &mut [&mut [f32]],
        grad: impl Fn(f32, f32) -> f32 + Sync,
    ) {
        let threads = if w.len() > UPDATE_CHUNK {
            threads
        } else {
            &Serial
        };
        let mut all: Vec<&mut [f32]> = std::iter::once(w)
            .chain(slots.iter_mut().map(|s| &mut **s))
            .collect();
        for_each_chunk_across(threads, &mut all, UPDATE_CHUNK, |start, chunk| {
            let (w, slots) = chunk.split_first_mut().expect("the weight's chunk");
            vectorized(ChunkUpdate {
                training: self,
                g: &g[start..][..w.len()],
                w,
                grad: &grad,
                slots,
            });
        });
    }

    /// The new value of weight `w` of `layer` given the data gradient `g`, or `None` if the
    /// layer is frozen. A `kernel` (not a bias) has its regulariser's gradient added first.
    pub fn apply<T: TensorMath>(
        &self,
        layer: usize,
        kernel: bool,
        w: &T,
        g: &T,
        slots: &mut Slots<T>,
    ) -> Result<Option<T>> {
        if !self.trainable[layer] {
            return Ok(None);
        }
        let regularised = if kernel {
            self.regularised(layer, w, g)?
        } else {
            None
        };
        self.optimizer
            .update(
                self.learning_rate,
                self.step,
                w,
                regularised.as_ref().unwrap_or(g),
                slots,
            )
            .map(Some)
    }
}

/// [`Optimizer::update_elements`] of one chunk, as [`Training::update_chunks`] runs it: on the
/// widest vectors the CPU has.
struct ChunkUpdate<'t, 'c, 's, G> {
    training: &'t Training,
    w: &'c mut [f32],
    g: &'c [f32],
    grad: G,
    slots: &'c mut [&'s mut [f32]],
}

impl<G: Fn(f32, f32) -> f32> Vectorize for ChunkUpdate<'_, '_, '_, G> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let Training {
            optimizer,
            learning_rate,
            step,
            ..
        } = self.training;
        optimizer.update_elements(*learning_rate, *step, self.w, self.g, self.grad, self.slots);
    }
}

/// Adam's bias-corrected step size at update `step` (from 1): `lr·√(1 − β₂ᵗ) / (1 − β₁ᵗ)`.
fn adam_step_size(lr: f64, beta_1: f64, beta_2: f64, step: u64) -> f64 {
    let t = step as i32;
    lr * (1.0 - beta_2.powi(t)).sqrt() / (1.0 - beta_1.powi(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, ArrayD};

    fn t(v: &[f32]) -> ArrayD<f32> {
        arr1(v).into_dyn()
    }

    fn run(opt: &Optimizer, grads: &[f32]) -> Vec<f32> {
        let mut w = t(&[1.0]);
        let mut slots = Slots::default();
        for (i, g) in grads.iter().enumerate() {
            w = opt
                .update(opt.learning_rate(), i as u64 + 1, &w, &t(&[*g]), &mut slots)
                .unwrap();
        }
        w.into_raw_vec_and_offset().0
    }

    fn close(a: f32, b: f64) {
        assert!((a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }

    #[test]
    fn sgd_plain_momentum_nesterov() {
        // w = 1 - 0.1*0.5 = 0.95
        close(
            run(&Optimizer::sgd().with_learning_rate(0.1), &[0.5])[0],
            0.95,
        );
        // momentum 0.9: v1 = -0.05, w1 = 0.95; v2 = -0.045 - 0.05 = -0.095, w2 = 0.855
        let m = Optimizer::sgd()
            .with_learning_rate(0.1)
            .with_momentum(0.9)
            .unwrap();
        close(run(&m, &[0.5, 0.5])[0], 0.855);
        // nesterov: v1 = -0.05, w1 = 1 + 0.9*(-0.05) - 0.05 = 0.905
        let n = Optimizer::Sgd {
            learning_rate: 0.1,
            momentum: 0.9,
            nesterov: true,
        };
        close(run(&n, &[0.5])[0], 0.905);
    }

    #[test]
    fn adam_matches_keras() {
        // step 1: m = 0.1*g, v = 0.001*g², alpha = lr*sqrt(0.001)/0.1
        // w = 1 - alpha * m / (sqrt(v) + eps) with g = 0.5:
        let g = 0.5f64;
        let (m, v) = (0.1 * g, 0.001 * g * g);
        let alpha = 1e-3 * (0.001f64).sqrt() / 0.1;
        let expect1 = 1.0 - alpha * m / (v.sqrt() + 1e-7);
        close(run(&Optimizer::adam(), &[0.5])[0], expect1);
        // step 2 with g = -0.2
        let g2 = -0.2f64;
        let m2 = m + (g2 - m) * 0.1;
        let v2 = v + (g2 * g2 - v) * 0.001;
        let alpha2 = 1e-3 * (1.0 - 0.999f64.powi(2)).sqrt() / (1.0 - 0.9f64.powi(2));
        let expect2 = expect1 - alpha2 * m2 / (v2.sqrt() + 1e-7);
        close(run(&Optimizer::adam(), &[0.5, -0.2])[0], expect2);
    }

    #[test]
    fn rmsprop_matches_keras() {
        // s = 0.1*g², w = 1 - lr*g/sqrt(s + eps)
        let g = 0.5f64;
        let s = 0.1 * g * g;
        let expect = 1.0 - 1e-3 * g / (s + 1e-7).sqrt();
        close(run(&Optimizer::rmsprop(), &[0.5])[0], expect);
        // with momentum 0.5, two steps of g = 0.5
        let opt = Optimizer::rmsprop().with_momentum(0.5).unwrap();
        let s2 = 0.9 * s + 0.1 * g * g;
        let inc1 = 1e-3 * g / (s + 1e-7).sqrt();
        let inc2 = 1e-3 * g / (s2 + 1e-7).sqrt();
        let expect = 1.0 - inc1 - (0.5 * inc1 + inc2);
        close(run(&opt, &[0.5, 0.5])[0], expect);
        // centred: denominator s - mg² + eps, mg = 0.1 g
        let c = Optimizer::Rmsprop {
            learning_rate: 1e-3,
            rho: 0.9,
            momentum: 0.0,
            epsilon: 1e-7,
            centered: true,
        };
        let expect = 1.0 - 1e-3 * g / (s - (0.1 * g).powi(2) + 1e-7).sqrt();
        close(run(&c, &[0.5])[0], expect);
    }

    /// The one-pass form ([`Training::step_elements`]) against the composite form
    /// ([`Training::step`] on `ndarray`), several steps of every rule, with and without a
    /// regulariser: weights, slots and penalties agree to 1e-7.
    #[test]
    fn one_pass_update_matches_the_composite_form() {
        use crate::spec::{Dense, Sequential};
        use rand::{Rng, SeedableRng};
        let sgd = Optimizer::sgd().with_learning_rate(0.1);
        let rules = [
            sgd.clone(),
            sgd.clone().with_momentum(0.9).unwrap(),
            Optimizer::Sgd {
                learning_rate: 0.1,
                momentum: 0.9,
                nesterov: true,
            },
            Optimizer::adam(),
            Optimizer::rmsprop(),
            Optimizer::rmsprop().with_momentum(0.5).unwrap(),
            Optimizer::Rmsprop {
                learning_rate: 1e-3,
                rho: 0.9,
                momentum: 0.5,
                epsilon: 1e-7,
                centered: true,
            },
        ];
        let n = 37;
        let regularizers = [None, Some(Regularizer { l1: 0.01, l2: 0.02 })];
        for rule in &rules {
            for regularizer in regularizers {
                let mut dense = Dense::new(n);
                if let Some(r) = regularizer {
                    dense = dense.kernel_regularizer(r);
                }
                let spec = Sequential::new(1, 1, 1).flatten().add(dense);
                let compile =
                    crate::Compile::new(rule.clone(), crate::Loss::SparseCategoricalCrossentropy);
                let model = crate::plan::Compiled::new(spec, compile).unwrap();
                let mut training = Training::new(&model).unwrap();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
                let start: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut composite = ArrayD::from_shape_vec(vec![n], start.clone()).unwrap();
                let mut composite_slots = Slots::default();
                let mut one_pass = start;
                let used = rule.slots_used();
                let mut one_pass_slots: Vec<Vec<f32>> =
                    used.iter().filter(|&&u| u).map(|_| vec![0.0; n]).collect();
                for _ in 0..5 {
                    let g: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    training.begin_step();
                    let (new, penalty) = training
                        .step(1, true, &composite, Some(&t(&g)), &mut composite_slots)
                        .unwrap();
                    composite = new.unwrap();
                    let mut slots: Vec<&mut [f32]> =
                        one_pass_slots.iter_mut().map(Vec::as_mut_slice).collect();
                    let one_pass_penalty =
                        training.step_elements(&Serial, 1, true, &mut one_pass, &g, &mut slots);
                    let label = format!("{rule:?} with {regularizer:?}");
                    assert!(
                        (penalty - one_pass_penalty).abs() <= 1e-7,
                        "{label}: penalty"
                    );
                    assert_close(composite.as_slice().unwrap(), &one_pass, &label);
                    let kept = composite_slots.named();
                    let kept: Vec<&ArrayD<f32>> = kept.iter().filter_map(|(_, s)| *s).collect();
                    assert_eq!(kept.len(), one_pass_slots.len(), "{label}: slots kept");
                    for (a, b) in kept.iter().zip(&one_pass_slots) {
                        assert_close(a.as_slice().unwrap(), b, &label);
                    }
                }
            }
        }
    }

    /// A weight of several [`UPDATE_CHUNK`]s and a short one, updated by chunks on rayon's
    /// threads, ends bit for bit where one pass over the whole weight on this thread does:
    /// the chunks line up with the gradient's elements and each element's arithmetic is
    /// unchanged.
    #[test]
    fn chunked_update_matches_one_pass_over_the_weight() {
        use crate::spec::{Dense, Sequential};
        use rand::{Rng, SeedableRng};
        let n = 3 * UPDATE_CHUNK + 5;
        let regularizer = Regularizer { l1: 0.01, l2: 0.02 };
        let spec = Sequential::new(1, 1, 1)
            .flatten()
            .add(Dense::new(n).kernel_regularizer(regularizer));
        let compile = crate::Compile::new(
            Optimizer::adam(),
            crate::Loss::SparseCategoricalCrossentropy,
        );
        let model = crate::plan::Compiled::new(spec, compile).unwrap();
        let mut training = Training::new(&model).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut random = || -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (mut chunked, g) = (random(), random());
        let (mut whole, mut whole_slots) = (chunked.clone(), [vec![0f32; n], vec![0f32; n]]);
        let mut chunked_slots = whole_slots.clone();
        for _ in 0..3 {
            training.begin_step();
            let [m, v] = &mut chunked_slots;
            let penalty =
                training.step_elements(&convkit_cpu::Rayon, 1, true, &mut chunked, &g, &mut [m, v]);
            // The reference: the rule over the whole weight at once, the penalty as before.
            let [m, v] = &mut whole_slots;
            let expected: f64 = whole
                .iter()
                .map(|&x| 0.01 * x.abs() as f64 + 0.02 * (x * x) as f64)
                .sum();
            let rule = |g: f32, x: f32| {
                let sign = if x == 0.0 { 0.0 } else { x.signum() };
                g + affine(sign, 0.01f32 as f64, 0.0) + affine(x, 2.0 * 0.02f32 as f64, 0.0)
            };
            let (lr, step) = (training.learning_rate, training.step);
            training
                .optimizer
                .update_elements(lr, step, &mut whole, &g, rule, &mut [m, v]);
            assert!((penalty - expected).abs() <= 1e-6 * expected, "penalty");
            assert_eq!(chunked, whole, "weights");
            assert_eq!(chunked_slots, whole_slots, "slots");
        }
    }

    fn assert_close(a: &[f32], b: &[f32], label: &str) {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 1e-7, "{label}: differs by {worst}");
    }
}
