//! The candle engine for convkit: builds a [`convkit_core::Sequential`] as candle tensors,
//! trains it with core's Keras update rules, and exchanges weights in the canonical layout
//! (candle's own conv `[out, in, kh, kw]` and linear `[out, in]` layouts already match it).
//!
//! ```no_run
//! use convkit_core::{Backend, Compile, Loss, Model, Optimizer, Sequential};
//! let backend = convkit_candle::CandleBackend::cpu();
//! let spec = Sequential::preset("tutorial-mnist")?;
//! let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
//! let model = Model::new(spec, compile, &backend, 42)?;
//! # Ok::<(), convkit_core::Error>(())
//! ```

use candle_core::{DType, Device, Tensor, Var, D};
use convkit_core::backend::{Backend, EngineNetwork, Network, StepStats, Targets};
use convkit_core::compile::{Compile, Head, Loss};
use convkit_core::ndarray::{Array2, ArrayView4};
use convkit_core::optim::{DropoutMask, Slots, TensorMath, Training};
use convkit_core::spec::{Activation, PlannedOp, Sequential};
use convkit_core::weights::{Tensor as CoreTensor, Weights};

/// Errors of the candle engine; they reach users as [`convkit_core::Error::Engine`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(candle_core::Error),
    /// Something the candle engine cannot do.
    #[error("not supported by candle: {0}")]
    Unsupported(String),
}

impl From<candle_core::Error> for Error {
    /// Drops the backtrace candle captures under `RUST_BACKTRACE`: users get the message.
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => Error::Candle(*inner),
            other => Error::Candle(other),
        }
    }
}

type Result<T> = std::result::Result<T, Error>;

/// candle on one device (`candle-cpu`, or `candle-cuda` with the `cuda` feature).
#[derive(Debug, Clone)]
pub struct CandleBackend {
    device: Device,
    name: &'static str,
}

impl CandleBackend {
    /// The CPU.
    pub fn cpu() -> Self {
        CandleBackend {
            device: Device::Cpu,
            name: "candle-cpu",
        }
    }

    /// CUDA device `ordinal`; fails without a GPU, or when built without the `cuda` feature.
    pub fn cuda(ordinal: usize) -> convkit_core::Result<Self> {
        let device =
            Device::new_cuda(ordinal).map_err(|e| convkit_core::Error::engine("candle-cuda", e))?;
        Ok(CandleBackend {
            device,
            name: "candle-cuda",
        })
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn device(&self) -> String {
        match &self.device {
            Device::Cpu => format!("CPU, {} threads", candle_core::utils::get_num_threads()),
            other => format!("{other:?}"),
        }
    }

    fn build(
        &self,
        spec: &Sequential,
        compile: &Compile,
        weights: &Weights,
    ) -> convkit_core::Result<Box<dyn Network>> {
        let head = compile.check(spec)?;
        weights.check(spec)?;
        let net = CandleNetwork::new(spec, compile, head, weights, &self.device, self.name)
            .map_err(|e| convkit_core::Error::engine(self.name, e))?;
        Ok(Box::new(net))
    }
}

/// A device tensor as core's optimizer rules see it.
struct Param(Tensor);

impl TensorMath for Param {
    fn zeros_like(&self) -> convkit_core::Result<Self> {
        lift(self.0.zeros_like())
    }
    fn affine(&self, mul: f64, add: f64) -> convkit_core::Result<Self> {
        lift(self.0.affine(mul, add))
    }
    fn add(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(&self.0 + &rhs.0)
    }
    fn sub(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(&self.0 - &rhs.0)
    }
    fn mul(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(&self.0 * &rhs.0)
    }
    fn div(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(&self.0 / &rhs.0)
    }
    fn sqr(&self) -> convkit_core::Result<Self> {
        lift(self.0.sqr())
    }
    fn sqrt(&self) -> convkit_core::Result<Self> {
        lift(self.0.sqrt())
    }
    fn sign(&self) -> convkit_core::Result<Self> {
        lift(self.0.sign())
    }
    fn sum(&self) -> convkit_core::Result<f64> {
        self.0
            .sum_all()
            .and_then(|t| t.to_dtype(DType::F64)?.to_scalar::<f64>())
            .map_err(|e| convkit_core::Error::engine("candle", e))
    }
}

fn lift(r: candle_core::Result<Tensor>) -> convkit_core::Result<Param> {
    r.map(Param)
        .map_err(|e| convkit_core::Error::engine("candle", e))
}

enum Op {
    Conv {
        weight: usize,
        pad: [usize; 4],
        stride: usize,
        activation: Activation,
    },
    MaxPool {
        size: (usize, usize),
        stride: (usize, usize),
    },
    AvgPool {
        size: (usize, usize),
        stride: (usize, usize),
    },
    Flatten,
    Dense {
        weight: usize,
        activation: Activation,
    },
    Dropout(f32),
    /// `gamma`, then `beta`, `moving_mean` and `moving_variance` at the next indices.
    BatchNorm {
        layer: usize,
        gamma: usize,
        momentum: f64,
        epsilon: f64,
    },
}

struct Variable {
    name: String,
    layer: usize,
    /// A kernel (weight), not a bias: its layer's regulariser applies.
    kernel: bool,
    /// Stepped by the optimizer; moving statistics are not.
    optimized: bool,
    var: Var,
    slots: Slots<Param>,
}

struct CandleNetwork {
    engine: &'static str,
    device: Device,
    input_shape: [usize; 3],
    ops: Vec<Op>,
    /// `weight` then `bias` of each weighted layer, in layer order.
    vars: Vec<Variable>,
    training: Training,
    loss: Loss,
    head: Head,
}

impl CandleNetwork {
    fn new(
        spec: &Sequential,
        compile: &Compile,
        head: Head,
        weights: &Weights,
        device: &Device,
        engine: &'static str,
    ) -> Result<Self> {
        let plan = spec.plan().map_err(|e| Error::Unsupported(e.to_string()))?;
        let names = spec.layer_names();
        let mut vars = Vec::new();
        let mut ops = Vec::with_capacity(plan.len());
        for (layer, planned) in plan.into_iter().enumerate() {
            let mut param = |name: &str, kernel: bool, optimized: bool| -> Result<usize> {
                let t = weights
                    .get(name)
                    .map_err(|e| Error::Unsupported(e.to_string()))?;
                let var =
                    Var::from_tensor(&Tensor::from_slice(&t.data, t.shape.as_slice(), device)?)?;
                vars.push(Variable {
                    name: name.to_string(),
                    layer,
                    kernel,
                    optimized,
                    var,
                    slots: Slots::default(),
                });
                Ok(vars.len() - 1)
            };
            ops.push(match planned {
                PlannedOp::Conv2D { weight, bias, pad, strides, activation } => {
                    if strides[0] != strides[1] {
                        return Err(Error::Unsupported(format!(
                            "layer {layer} ({}): Conv2D strides {strides:?} differ per axis; candle's conv2d takes one stride",
                            names[layer]
                        )));
                    }
                    let weight = param(&weight, true, true)?;
                    param(&bias, false, true)?;
                    Op::Conv { weight, pad, stride: strides[0], activation }
                }
                PlannedOp::MaxPool2D { size, strides } => Op::MaxPool { size: (size[0], size[1]), stride: (strides[0], strides[1]) },
                PlannedOp::AvgPool2D { size, strides } => Op::AvgPool { size: (size[0], size[1]), stride: (strides[0], strides[1]) },
                PlannedOp::Flatten => Op::Flatten,
                PlannedOp::Dense { weight, bias, activation } => {
                    let weight = param(&weight, true, true)?;
                    param(&bias, false, true)?;
                    Op::Dense { weight, activation }
                }
                PlannedOp::Dropout { rate } => Op::Dropout(rate),
                PlannedOp::BatchNorm { gamma, beta, moving_mean, moving_variance, momentum, epsilon } => {
                    let gamma = param(&gamma, false, true)?;
                    param(&beta, false, true)?;
                    param(&moving_mean, false, false)?;
                    param(&moving_variance, false, false)?;
                    Op::BatchNorm { layer, gamma, momentum, epsilon }
                }
            });
        }
        Ok(CandleNetwork {
            engine,
            device: device.clone(),
            input_shape: spec.input_shape,
            ops,
            vars,
            training: Training::new(&compile.optimizer, spec)
                .map_err(|e| Error::Unsupported(e.to_string()))?,
            loss: compile.loss,
            head,
        })
    }

    /// NHWC host batch → NCHW device tensor.
    fn input(&self, x: ArrayView4<'_, f32>) -> Result<Tensor> {
        let (n, h, w, c) = x.dim();
        if [h, w, c] != self.input_shape {
            return Err(Error::Unsupported(format!(
                "input batch is {h}×{w}×{c}, the model expects {:?}",
                self.input_shape
            )));
        }
        let x = x.as_standard_layout();
        let t = Tensor::from_slice(
            x.as_slice().expect("standard layout"),
            (n, h, w, c),
            &self.device,
        )?;
        Ok(t.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// Logits: the last layer's pre-activation when the head applies softmax/sigmoid; and,
    /// in training, each batch normalisation's new moving statistics by variable index.
    /// `masks` are the training batch's dropout masks (none for inference).
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        masks: &[DropoutMask],
    ) -> Result<(Tensor, Vec<(usize, Tensor)>)> {
        let mut x = x.clone();
        let mut moving = Vec::new();
        let mut masks = masks.iter();
        for op in &self.ops {
            x = match op {
                Op::Conv {
                    weight,
                    pad,
                    stride,
                    activation,
                } => {
                    let (w, b) = (
                        self.vars[*weight].var.as_tensor(),
                        self.vars[*weight + 1].var.as_tensor(),
                    );
                    let [top, bottom, left, right] = *pad;
                    let y = if top == bottom && left == right && top == left {
                        x.conv2d(w, top, *stride, 1, 1)?
                    } else {
                        x.pad_with_zeros(2, top, bottom)?
                            .pad_with_zeros(3, left, right)?
                            .conv2d(w, 0, *stride, 1, 1)?
                    };
                    let y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
                    activate(y, *activation)?
                }
                // candle's own max-pool forward is right; only its backward is not.
                Op::MaxPool { size, stride } if size == stride && !train => {
                    x.max_pool2d_with_stride(*size, *stride)?
                }
                Op::MaxPool { size, stride } if size == stride => tiled_max_pool(&x, *size)?,
                Op::AvgPool { size, stride } if size == stride => {
                    x.avg_pool2d_with_stride(*size, *stride)?
                }
                Op::MaxPool { size, stride } => windowed_pool(&x, *size, *stride, true)?,
                Op::AvgPool { size, stride } => windowed_pool(&x, *size, *stride, false)?,
                // Keras flattens channels-last: (H, W, C).
                Op::Flatten => x.permute((0, 2, 3, 1))?.flatten_from(1)?,
                Op::Dense { weight, activation } => {
                    let (w, b) = (
                        self.vars[*weight].var.as_tensor(),
                        self.vars[*weight + 1].var.as_tensor(),
                    );
                    activate(x.matmul(&w.t()?)?.broadcast_add(b)?, *activation)?
                }
                Op::Dropout(rate) if train && *rate > 0.0 => {
                    let m = masks.next().ok_or_else(|| {
                        Error::Unsupported("a Dropout layer was given no mask".into())
                    })?;
                    let mask = Tensor::from_slice(&m.values, m.shape.as_slice(), &self.device)?;
                    // Masks come channels-last, as images do.
                    let mask = if m.shape.len() == 4 {
                        mask.permute((0, 3, 1, 2))?
                    } else {
                        mask
                    };
                    (x * mask)?
                }
                Op::Dropout(_) => x,
                Op::BatchNorm {
                    layer,
                    gamma,
                    momentum,
                    epsilon,
                } => {
                    let var = |i: usize| self.vars[*gamma + i].var.as_tensor();
                    // [1, c] or [1, c, 1, 1]: the channel axis is 1.
                    let mut shape = vec![1; x.rank()];
                    shape[1] = x.dim(1)?;
                    let axes: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
                    let (mean, variance) = if self.training.uses_batch_statistics(*layer, train) {
                        let mean = x.mean_keepdim(axes.as_slice())?;
                        let variance = x
                            .broadcast_sub(&mean)?
                            .sqr()?
                            .mean_keepdim(axes.as_slice())?;
                        for (i, batch) in [(2, &mean), (3, &variance)] {
                            let old = Param(var(i).clone());
                            let new = Training::moving_average(
                                &old,
                                &Param(batch.detach().flatten_all()?),
                                *momentum,
                            )
                            .map_err(|e| Error::Unsupported(e.to_string()))?;
                            moving.push((*gamma + i, new.0));
                        }
                        (mean, variance)
                    } else {
                        (
                            var(2).reshape(shape.as_slice())?,
                            var(3).reshape(shape.as_slice())?,
                        )
                    };
                    let scale = (variance + *epsilon)?.sqrt()?.recip()?;
                    x.broadcast_sub(&mean)?
                        .broadcast_mul(&scale)?
                        .broadcast_mul(&var(0).reshape(shape.as_slice())?)?
                        .broadcast_add(&var(1).reshape(shape.as_slice())?)?
                }
            };
        }
        Ok((x, moving))
    }

    fn loss(&self, logits: &Tensor, y: &Targets) -> Result<Tensor> {
        Ok(match (self.loss, y) {
            (Loss::SparseCategoricalCrossentropy, Targets::Sparse(labels)) => {
                let t = Tensor::from_slice(labels, labels.len(), &self.device)?;
                candle_nn::loss::cross_entropy(logits, &t)?
            }
            (Loss::CategoricalCrossentropy, Targets::Dense(rows)) => {
                let rows = rows.as_standard_layout();
                let t = Tensor::from_slice(
                    rows.as_slice().expect("standard layout"),
                    rows.dim(),
                    &self.device,
                )?;
                (candle_nn::ops::log_softmax(logits, D::Minus1)? * t)?
                    .sum(1)?
                    .mean(0)?
                    .neg()?
            }
            (Loss::BinaryCrossentropy, Targets::Binary(v)) => {
                // max(x, 0) − x·y + log(1 + exp(−|x|)), stable for any logit.
                let x = logits.flatten_all()?;
                let t = Tensor::from_slice(v, v.len(), &self.device)?;
                let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
                ((x.relu()? - (&x * &t)?)? + soft)?.mean(0)?
            }
            (loss, targets) => {
                return Err(Error::Unsupported(format!(
                    "{} needs {} targets, found {targets:?}",
                    loss.name(),
                    match loss {
                        Loss::SparseCategoricalCrossentropy => "sparse class-index",
                        Loss::CategoricalCrossentropy => "dense (one-hot)",
                        Loss::BinaryCrossentropy => "binary 0/1",
                    }
                )))
            }
        })
    }

    fn correct(&self, logits: &Tensor, y: &Targets) -> Result<usize> {
        let rows = logits.to_vec2::<f32>()?;
        let argmax = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        };
        Ok(match y {
            Targets::Sparse(labels) => rows
                .iter()
                .zip(labels)
                .filter(|(r, &l)| argmax(r) == l as usize)
                .count(),
            Targets::Dense(t) => rows
                .iter()
                .zip(t.rows())
                .filter(|(r, t)| argmax(r) == argmax(t.as_slice().expect("standard")))
                .count(),
            Targets::Binary(t) => rows
                .iter()
                .zip(t)
                .filter(|(r, &t)| (r[0] > 0.0) == (t > 0.5))
                .count(),
        })
    }
}

/// A device tensor as a canonical host tensor (candle's layouts are canonical).
fn download(t: &Tensor) -> Result<CoreTensor> {
    Ok(CoreTensor {
        shape: t.dims().to_vec(),
        data: t.flatten_all()?.to_vec1::<f32>()?,
    })
}

impl CandleNetwork {
    /// `t` on the device, checked against the shape of the variable `name`.
    fn upload(&self, name: &str, t: &CoreTensor) -> Result<Tensor> {
        let v = self
            .vars
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::Unsupported(format!("the model has no variable `{name}`")))?;
        let expected = v.var.as_tensor().dims();
        if t.shape != expected {
            return Err(Error::Unsupported(format!(
                "tensor `{name}`: expected shape {expected:?}, found {:?}",
                t.shape
            )));
        }
        Ok(Tensor::from_slice(
            &t.data,
            t.shape.as_slice(),
            &self.device,
        )?)
    }
}

/// Non-overlapping max pooling with Keras'/PyTorch's gradient: all of it to the first
/// maximum of each window. candle's own `max_pool2d` backward (0.11.1) scales the gradient by
/// the share of maxima in the window (¼ for a unique maximum in 2×2), and its `max` reduction
/// gives every tied maximum the whole gradient (saturated image patches tie). So each window
/// becomes a row, its first maximum is picked by `argmax`, and the output is the sum of the row
/// under that one-hot mask. Rows/columns that do not fill a window are dropped, as Keras does.
fn tiled_max_pool(x: &Tensor, (kh, kw): (usize, usize)) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / kh, w / kw);
    let x = if oh * kh != h || ow * kw != w {
        x.narrow(2, 0, oh * kh)?.narrow(3, 0, ow * kw)?
    } else {
        x.clone()
    };
    let windows = x
        .reshape((n, c, oh, kh, ow, kw))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, oh, ow, kh * kw))?;
    let first = windows.argmax_keepdim(4)?;
    let slots =
        Tensor::arange(0u32, (kh * kw) as u32, x.device())?.reshape((1, 1, 1, 1, kh * kw))?;
    let mask = slots.broadcast_eq(&first)?.to_dtype(x.dtype())?;
    Ok((windows * mask)?.sum(4)?)
}

/// Pooling whose stride differs from its window, from shifted slices (candle's pooling ops
/// have no backward pass for that case): max/sum over the window offsets at stride 1, then
/// every `stride`-th row and column.
fn windowed_pool(
    x: &Tensor,
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    max: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (full_h, full_w) = (h - kh + 1, w - kw + 1);
    let mut acc: Option<Tensor> = None;
    for dy in 0..kh {
        for dx in 0..kw {
            let part = x.narrow(2, dy, full_h)?.narrow(3, dx, full_w)?;
            acc = Some(match acc {
                None => part,
                Some(a) if max => a.maximum(&part)?,
                Some(a) => (a + part)?,
            });
        }
    }
    let mut y = acc.expect("window is at least 1×1");
    if !max {
        y = (y / (kh * kw) as f64)?;
    }
    let pick = |n: usize, s: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n).step_by(s).map(|i| i as u32).collect();
        Ok(Tensor::from_vec(idx.clone(), idx.len(), x.device())?)
    };
    if sh > 1 {
        y = y.index_select(&pick(full_h, sh)?, 2)?;
    }
    if sw > 1 {
        y = y.index_select(&pick(full_w, sw)?, 3)?;
    }
    Ok(y)
}

/// ReLU with Keras'/PyTorch's gradient: 0 at exactly 0. candle's `relu` (0.11.1) passes the
/// gradient at 0, which matters on real images: a blank patch gives a pre-activation of
/// exactly 0 at initialisation (zero biases).
fn relu(x: &Tensor) -> Result<Tensor> {
    Ok((x * x.gt(0.0)?.to_dtype(x.dtype())?)?)
}

fn activate(x: Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::Linear => x,
        Activation::Relu => relu(&x)?,
        Activation::Sigmoid => candle_nn::ops::sigmoid(&x)?,
        Activation::Tanh => x.tanh()?,
        Activation::Softmax => candle_nn::ops::softmax(&x, D::Minus1)?,
    })
}

impl EngineNetwork for CandleNetwork {
    type Error = Error;
    fn engine(&self) -> &str {
        self.engine
    }
    fn training_mut(&mut self) -> &mut Training {
        &mut self.training
    }
    fn train_step(&mut self, x: ArrayView4<'_, f32>, y: &Targets) -> Result<StepStats> {
        let masks = self.training.dropout_masks(x.dim().0);
        let x = self.input(x)?;
        let (logits, moving) = self.forward(&x, true, &masks)?;
        let loss = self.loss(&logits, y)?;
        let correct = self.correct(&logits, y)?;
        let grads = loss.backward()?;
        self.training.begin_step();
        let mut penalty = 0.0;
        for v in self.vars.iter_mut().filter(|v| v.optimized) {
            // Detached: otherwise the optimizer slots would keep this step's whole autograd
            // graph alive through their history, and memory would grow with every step.
            let w = Param(v.var.as_tensor().detach());
            let g = grads.get(v.var.as_tensor()).map(|g| Param(g.detach()));
            let (new, p) = self
                .training
                .step(v.layer, v.kernel, &w, g.as_ref(), &mut v.slots)
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            penalty += p;
            if let Some(new) = new {
                v.var.set(&new.0)?;
            }
        }
        for (i, value) in moving {
            self.vars[i].var.set(&value)?;
        }
        Ok(StepStats {
            loss: (loss.to_scalar::<f32>()? as f64 + penalty) as f32,
            correct,
        })
    }

    fn predict(&self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let (logits, _) = self.forward(&self.input(x)?, false, &[])?;
        let p = match self.head {
            Head::Softmax => candle_nn::ops::softmax(&logits, D::Minus1)?,
            Head::Sigmoid => candle_nn::ops::sigmoid(&logits)?,
        };
        let (n, k) = p.dims2()?;
        let data = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Array2::from_shape_vec((n, k), data).expect("dims from the tensor"))
    }

    fn weights(&self) -> Result<Weights> {
        let mut w = Weights::default();
        for v in &self.vars {
            w.insert(v.name.clone(), download(v.var.as_tensor())?);
        }
        Ok(w)
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        for v in &self.vars {
            let t = weights
                .get(&v.name)
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            v.var.set(&self.upload(&v.name, t)?)?;
        }
        Ok(())
    }

    type Param = Param;

    fn slots(&self) -> Vec<(&str, &Slots<Param>)> {
        self.vars
            .iter()
            .filter(|v| v.optimized)
            .map(|v| (v.name.as_str(), &v.slots))
            .collect()
    }

    fn slots_mut(&mut self) -> Vec<&mut Slots<Param>> {
        self.vars
            .iter_mut()
            .filter(|v| v.optimized)
            .map(|v| &mut v.slots)
            .collect()
    }

    fn param_to_host(&self, _variable: &str, param: &Param) -> Result<CoreTensor> {
        download(&param.0)
    }

    fn param_from_host(&self, variable: &str, tensor: &CoreTensor) -> Result<Param> {
        Ok(Param(self.upload(variable, tensor)?))
    }
}
