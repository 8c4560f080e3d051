//! The libtorch engine for convkit, through tch: builds a [`convkit_core::Sequential`] as
//! libtorch tensors, trains it with core's Keras update rules, and exchanges weights in the
//! canonical layout (libtorch's own conv `[out, in, kh, kw]` and linear `[out, in]`).
//!
//! libtorch comes from the `torch==2.9.0` wheel (`cargo xtask setup`); `LIBTORCH` is
//! respected. The thread count follows `CONVKIT_THREADS`, else the machine's cores.

use convkit_core::backend::{Backend, EngineNetwork, Network, StepStats, Targets};
use convkit_core::compile::{Compile, Head, Loss};
use convkit_core::ndarray::{Array2, ArrayView4};
use convkit_core::optim::{DropoutMask, Slots, TensorMath, Training};
use convkit_core::spec::{Activation, PlannedOp, Sequential};
use convkit_core::weights::{Tensor as CoreTensor, Weights};
use tch::{Device, Kind, Reduction, Tensor};

/// Errors of the tch engine; they reach users as [`convkit_core::Error::Engine`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Something the tch engine cannot do, or input it cannot use.
    #[error("not supported by tch: {0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, Error>;

/// libtorch on one device (`tch-cpu`, or `tch-cuda` when libtorch sees a GPU).
#[derive(Debug, Clone)]
pub struct TchBackend {
    device: Device,
    name: &'static str,
}

fn set_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let threads = std::env::var("CONVKIT_THREADS")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get() as i32)
                    .unwrap_or(1)
            });
        tch::set_num_threads(threads.max(1));
    });
}

impl TchBackend {
    pub fn cpu() -> Self {
        set_threads();
        TchBackend {
            device: Device::Cpu,
            name: "tch-cpu",
        }
    }

    /// CUDA device `ordinal`; an error when libtorch reports no CUDA device.
    pub fn cuda(ordinal: usize) -> convkit_core::Result<Self> {
        set_threads();
        if !tch::Cuda::is_available() {
            return Err(convkit_core::Error::engine(
                "tch-cuda",
                "libtorch reports no CUDA device (or was built without CUDA)",
            ));
        }
        let count = tch::Cuda::device_count() as usize;
        if ordinal >= count {
            return Err(convkit_core::Error::engine(
                "tch-cuda",
                format!("CUDA device {ordinal} requested, libtorch sees {count}"),
            ));
        }
        Ok(TchBackend {
            device: Device::Cuda(ordinal),
            name: "tch-cuda",
        })
    }
}

impl Backend for TchBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn device(&self) -> String {
        match self.device {
            Device::Cpu => format!("CPU, {} threads (libtorch)", tch::get_num_threads()),
            Device::Cuda(i) => format!(
                "CUDA device {i} of {} (libtorch)",
                tch::Cuda::device_count()
            ),
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
        let net = TchNetwork::new(spec, compile, head, weights, self.device, self.name)
            .map_err(|e| convkit_core::Error::engine(self.name, e))?;
        Ok(Box::new(net))
    }
}

/// A device tensor as core's optimizer rules see it (used under `no_grad`).
struct Param(Tensor);

fn lift(r: std::result::Result<Tensor, tch::TchError>) -> convkit_core::Result<Param> {
    r.map(Param)
        .map_err(|e| convkit_core::Error::engine("tch", e))
}

impl TensorMath for Param {
    fn zeros_like(&self) -> convkit_core::Result<Self> {
        lift(self.0.f_zeros_like())
    }
    fn affine(&self, mul: f64, add: f64) -> convkit_core::Result<Self> {
        lift(self.0.f_mul_scalar(mul).and_then(|t| t.f_add_scalar(add)))
    }
    fn add(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(self.0.f_add(&rhs.0))
    }
    fn sub(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(self.0.f_sub(&rhs.0))
    }
    fn mul(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(self.0.f_mul(&rhs.0))
    }
    fn div(&self, rhs: &Self) -> convkit_core::Result<Self> {
        lift(self.0.f_div(&rhs.0))
    }
    fn sqr(&self) -> convkit_core::Result<Self> {
        lift(self.0.f_square())
    }
    fn sqrt(&self) -> convkit_core::Result<Self> {
        lift(self.0.f_sqrt())
    }
    fn sign(&self) -> convkit_core::Result<Self> {
        lift(self.0.f_sign())
    }
    fn sum(&self) -> convkit_core::Result<f64> {
        self.0
            .f_sum(Kind::Double)
            .and_then(|t| f64::try_from(t))
            .map_err(|e| convkit_core::Error::engine("tch", e))
    }
}

enum Op {
    Conv {
        weight: usize,
        pad: [usize; 4],
        stride: [usize; 2],
        activation: Activation,
    },
    MaxPool {
        size: [i64; 2],
        stride: [i64; 2],
    },
    AvgPool {
        size: [i64; 2],
        stride: [i64; 2],
    },
    Flatten,
    Dense {
        weight: usize,
        activation: Activation,
    },
    Dropout(f64),
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
    /// Stepped by the optimizer (and tracked by autograd); moving statistics are not.
    optimized: bool,
    tensor: Tensor,
    slots: Slots<Param>,
}

struct TchNetwork {
    engine: &'static str,
    device: Device,
    input_shape: [usize; 3],
    ops: Vec<Op>,
    vars: Vec<Variable>,
    training: Training,
    loss: Loss,
    head: Head,
}

fn i64s(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

fn to_device(t: &CoreTensor, device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(&t.data)?
        .f_reshape(i64s(&t.shape))?
        .f_to_device(device)?)
}

/// A device tensor as a canonical host tensor (libtorch's layouts are canonical).
fn download(t: &Tensor) -> Result<CoreTensor> {
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<f32>::try_from(t.detach().f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    Ok(CoreTensor { shape, data })
}

impl TchNetwork {
    /// `t` on the device, checked against the shape of the variable `name`.
    fn upload(&self, name: &str, t: &CoreTensor) -> Result<Tensor> {
        let v = self
            .vars
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::Unsupported(format!("the model has no variable `{name}`")))?;
        let expected: Vec<usize> = v.tensor.size().iter().map(|&d| d as usize).collect();
        if t.shape != expected {
            return Err(Error::Unsupported(format!(
                "tensor `{name}`: expected shape {expected:?}, found {:?}",
                t.shape
            )));
        }
        to_device(t, self.device)
    }

    fn new(
        spec: &Sequential,
        compile: &Compile,
        head: Head,
        weights: &Weights,
        device: Device,
        engine: &'static str,
    ) -> Result<Self> {
        let plan = spec.plan().map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut vars = Vec::new();
        let mut ops = Vec::with_capacity(plan.len());
        let pair = |v: [usize; 2]| [v[0] as i64, v[1] as i64];
        for (layer, planned) in plan.into_iter().enumerate() {
            let mut param = |name: &str, kernel: bool, optimized: bool| -> Result<usize> {
                let t = weights
                    .get(name)
                    .map_err(|e| Error::Unsupported(e.to_string()))?;
                let tensor = to_device(t, device)?.set_requires_grad(optimized);
                vars.push(Variable {
                    name: name.to_string(),
                    layer,
                    kernel,
                    optimized,
                    tensor,
                    slots: Slots::default(),
                });
                Ok(vars.len() - 1)
            };
            ops.push(match planned {
                PlannedOp::Conv2D {
                    weight,
                    bias,
                    pad,
                    strides,
                    activation,
                } => {
                    let weight = param(&weight, true, true)?;
                    param(&bias, false, true)?;
                    Op::Conv {
                        weight,
                        pad,
                        stride: strides,
                        activation,
                    }
                }
                PlannedOp::MaxPool2D { size, strides } => Op::MaxPool {
                    size: pair(size),
                    stride: pair(strides),
                },
                PlannedOp::AvgPool2D { size, strides } => Op::AvgPool {
                    size: pair(size),
                    stride: pair(strides),
                },
                PlannedOp::Flatten => Op::Flatten,
                PlannedOp::Dense {
                    weight,
                    bias,
                    activation,
                } => {
                    let weight = param(&weight, true, true)?;
                    param(&bias, false, true)?;
                    Op::Dense { weight, activation }
                }
                PlannedOp::Dropout { rate } => Op::Dropout(rate as f64),
                PlannedOp::BatchNorm {
                    gamma,
                    beta,
                    moving_mean,
                    moving_variance,
                    momentum,
                    epsilon,
                } => {
                    let gamma = param(&gamma, false, true)?;
                    param(&beta, false, true)?;
                    param(&moving_mean, false, false)?;
                    param(&moving_variance, false, false)?;
                    Op::BatchNorm {
                        layer,
                        gamma,
                        momentum,
                        epsilon,
                    }
                }
            });
        }
        Ok(TchNetwork {
            engine,
            device,
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
        let t = Tensor::f_from_slice(x.as_slice().expect("standard layout"))?
            .f_reshape([n as i64, h as i64, w as i64, c as i64])?;
        Ok(t.f_to_device(self.device)?
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?)
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
        let mut x = x.shallow_clone();
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
                    let (w, b) = (&self.vars[*weight].tensor, &self.vars[*weight + 1].tensor);
                    let [top, bottom, left, right] = *pad;
                    let y = if top == bottom && left == right {
                        x.f_conv2d(
                            w,
                            Some(b),
                            i64s(stride),
                            [top as i64, left as i64],
                            [1, 1],
                            1,
                        )?
                    } else {
                        x.f_constant_pad_nd([left as i64, right as i64, top as i64, bottom as i64])?
                            .f_conv2d(w, Some(b), i64s(stride), [0, 0], [1, 1], 1)?
                    };
                    activate(y, *activation)?
                }
                Op::MaxPool { size, stride } => {
                    x.f_max_pool2d(size, stride, [0, 0], [1, 1], false)?
                }
                Op::AvgPool { size, stride } => {
                    x.f_avg_pool2d(size, stride, [0, 0], false, true, None::<i64>)?
                }
                // Keras flattens channels-last: (H, W, C).
                Op::Flatten => x.f_permute([0, 2, 3, 1])?.f_flatten(1, -1)?,
                Op::Dense { weight, activation } => {
                    let (w, b) = (&self.vars[*weight].tensor, &self.vars[*weight + 1].tensor);
                    activate(x.f_linear(w, Some(b))?, *activation)?
                }
                Op::Dropout(rate) if train && *rate > 0.0 => {
                    let m = masks.next().ok_or_else(|| {
                        Error::Unsupported("a Dropout layer was given no mask".into())
                    })?;
                    let mask = Tensor::f_from_slice(&m.values)?
                        .f_reshape(i64s(&m.shape))?
                        .f_to_device(self.device)?;
                    // Masks come channels-last, as images do.
                    let mask = if m.shape.len() == 4 {
                        mask.f_permute([0, 3, 1, 2])?
                    } else {
                        mask
                    };
                    x.f_mul(&mask)?
                }
                Op::Dropout(_) => x,
                Op::BatchNorm {
                    layer,
                    gamma,
                    momentum,
                    epsilon,
                } => {
                    let var = |i: usize| &self.vars[*gamma + i].tensor;
                    // [1, c] or [1, c, 1, 1]: the channel axis is 1.
                    let mut shape = vec![1i64; x.dim()];
                    shape[1] = x.size()[1];
                    let axes: Vec<i64> = (0..x.dim() as i64).filter(|&d| d != 1).collect();
                    let (mean, variance) = if self.training.uses_batch_statistics(*layer, train) {
                        let mean = x.f_mean_dim(axes.as_slice(), true, Kind::Float)?;
                        let variance = x.f_sub(&mean)?.f_square()?.f_mean_dim(
                            axes.as_slice(),
                            true,
                            Kind::Float,
                        )?;
                        for (i, batch) in [(2, &mean), (3, &variance)] {
                            let new = Training::moving_average(
                                &Param(var(i).shallow_clone()),
                                &Param(batch.detach().f_flatten(0, -1)?),
                                *momentum,
                            )
                            .map_err(|e| Error::Unsupported(e.to_string()))?;
                            moving.push((*gamma + i, new.0));
                        }
                        (mean, variance)
                    } else {
                        (var(2).f_reshape(&shape)?, var(3).f_reshape(&shape)?)
                    };
                    x.f_sub(&mean)?
                        .f_mul(&variance.f_add_scalar(*epsilon)?.f_rsqrt()?)?
                        .f_mul(&var(0).f_reshape(&shape)?)?
                        .f_add(&var(1).f_reshape(&shape)?)?
                }
            };
        }
        Ok((x, moving))
    }

    /// Class indices as an i64 device tensor `[n]`.
    fn class_indices(&self, labels: &[u32]) -> Result<Tensor> {
        let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        Ok(Tensor::f_from_slice(&labels)?.f_to_device(self.device)?)
    }

    /// Dense target rows as an f32 device tensor `[n, classes]`.
    fn target_rows(&self, rows: &convkit_core::ndarray::Array2<f32>) -> Result<Tensor> {
        let rows = rows.as_standard_layout();
        let (n, k) = rows.dim();
        Ok(
            Tensor::f_from_slice(rows.as_slice().expect("standard layout"))?
                .f_reshape([n as i64, k as i64])?
                .f_to_device(self.device)?,
        )
    }

    fn loss(&self, logits: &Tensor, y: &Targets) -> Result<Tensor> {
        Ok(match (self.loss, y) {
            (Loss::SparseCategoricalCrossentropy, Targets::Sparse(labels)) => {
                let t = self.class_indices(labels)?;
                logits
                    .f_log_softmax(-1, Kind::Float)?
                    .f_nll_loss::<Tensor>(&t, None, Reduction::Mean, -100)?
            }
            (Loss::CategoricalCrossentropy, Targets::Dense(rows)) => {
                let t = self.target_rows(rows)?;
                logits
                    .f_log_softmax(-1, Kind::Float)?
                    .f_mul(&t)?
                    .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?
                    .f_mean(Kind::Float)?
                    .f_neg()?
            }
            (Loss::BinaryCrossentropy, Targets::Binary(v)) => {
                let t = Tensor::f_from_slice(v)?.f_to_device(self.device)?;
                logits
                    .f_flatten(0, -1)?
                    .f_binary_cross_entropy_with_logits::<Tensor>(&t, None, None, Reduction::Mean)?
            }
            (loss, targets) => {
                return Err(Error::Unsupported(format!(
                    "{} cannot use targets {targets:?}",
                    loss.name()
                )))
            }
        })
    }

    fn correct(&self, logits: &Tensor, y: &Targets) -> Result<usize> {
        let hits = match y {
            Targets::Sparse(labels) => {
                let t = self.class_indices(labels)?;
                logits.f_argmax(-1, false)?.f_eq_tensor(&t)?
            }
            Targets::Dense(rows) => {
                let t = self.target_rows(rows)?;
                logits
                    .f_argmax(-1, false)?
                    .f_eq_tensor(&t.f_argmax(-1, false)?)?
            }
            Targets::Binary(v) => {
                let t = Tensor::f_from_slice(v)?
                    .f_to_device(self.device)?
                    .f_gt(0.5)?;
                logits.f_flatten(0, -1)?.f_gt(0.0)?.f_eq_tensor(&t)?
            }
        };
        Ok(i64::try_from(hits.f_sum(Kind::Int64)?)? as usize)
    }
}

fn activate(x: Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::Linear => x,
        Activation::Relu => x.f_relu()?,
        Activation::Sigmoid => x.f_sigmoid()?,
        Activation::Tanh => x.f_tanh()?,
        Activation::Softmax => x.f_softmax(-1, Kind::Float)?,
    })
}

impl EngineNetwork for TchNetwork {
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
        let correct = tch::no_grad(|| self.correct(&logits, y))?;
        for v in &mut self.vars {
            v.tensor.zero_grad();
        }
        loss.f_backward()?;
        self.training.begin_step();
        let training = &self.training;
        let mut penalty = 0.0;
        for v in self.vars.iter_mut().filter(|v| v.optimized) {
            let grad = v.tensor.grad();
            let grad = grad.defined().then(|| Param(grad));
            tch::no_grad(|| -> Result<()> {
                let w = Param(v.tensor.detach());
                let (new, p) = training
                    .step(v.layer, v.kernel, &w, grad.as_ref(), &mut v.slots)
                    .map_err(|e| Error::Unsupported(e.to_string()))?;
                penalty += p;
                if let Some(new) = new {
                    v.tensor.f_copy_(&new.0)?;
                }
                Ok(())
            })?;
        }
        for (i, value) in moving {
            tch::no_grad(|| self.vars[i].tensor.f_copy_(&value))?;
        }
        Ok(StepStats {
            loss: (f64::try_from(&loss)? + penalty) as f32,
            correct,
        })
    }

    fn predict(&self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        tch::no_grad(|| {
            let (logits, _) = self.forward(&self.input(x)?, false, &[])?;
            let p = match self.head {
                Head::Softmax => logits.f_softmax(-1, Kind::Float)?,
                Head::Sigmoid => logits.f_sigmoid()?,
            };
            let size = p.size();
            let (n, k) = (size[0] as usize, size[1] as usize);
            let data = Vec::<f32>::try_from(p.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
            Ok(Array2::from_shape_vec((n, k), data).expect("dims from the tensor"))
        })
    }

    fn weights(&self) -> Result<Weights> {
        let mut w = Weights::default();
        for v in &self.vars {
            w.insert(v.name.clone(), download(&v.tensor)?);
        }
        Ok(w)
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        for i in 0..self.vars.len() {
            let name = &self.vars[i].name;
            let t = weights
                .get(name)
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            let src = self.upload(name, t)?;
            tch::no_grad(|| self.vars[i].tensor.f_copy_(&src))?;
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
