//! The burn engine for convkit: builds a [`convkit_core::Sequential`] as burn tensors, trains it
//! with core's Keras update rules on burn's autodiff, and exchanges weights in the canonical
//! layout. One engine serves every burn backend compiled in (burn 0.22 picks the backend from
//! the [`Device`] at run time):
//!
//! | feature | `--backend` | burn device |
//! |---|---|---|
//! | `flex` | `burn-flex` | `Device::flex()`, burn's pure-Rust CPU backend |
//! | `ndarray` | `burn-ndarray` | `Device::ndarray()` (deprecated by burn in favour of flex) |
//! | `wgpu` | `burn-wgpu` | `Device::wgpu(..)`: Vulkan, Metal or DX12 |
//! | `cuda` | `burn-cuda` | `Device::cuda(0)` |
//!
//! Dense weights live on the device as burn lays out a linear layer, `[in, out]`; the
//! canonical layout is `[out, in]`, and [`Network::weights`] / [`Network::set_weights`]
//! transpose at the seam. Conv weights are `[out, in, kh, kw]` in both.
//!
//! ```no_run
//! # #[cfg(feature = "flex")] {
//! use convkit_core::{Compile, Loss, Model, Optimizer, Sequential};
//! let backend = convkit_burn::BurnBackend::flex();
//! let spec = Sequential::preset("tutorial-mnist")?;
//! let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
//! let model = Model::new(spec, compile, &backend, 42)?;
//! # }
//! # Ok::<(), convkit_core::Error>(())
//! ```

use burn_tensor::activation::{log_softmax, relu, sigmoid, softmax, tanh};
use burn_tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn_tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn_tensor::{Device, Tensor, TensorData};
use convkit_core::backend::{Backend, EngineNetwork, Network, StepStats, Targets};
use convkit_core::compile::{Compile, Head, Loss};
use convkit_core::ndarray::{Array2, ArrayView4};
use convkit_core::optim::{DropoutMask, Slots, TensorMath, Training};
use convkit_core::spec::{Activation, PlannedOp, Sequential};
use convkit_core::weights::{Tensor as CoreTensor, Weights};

/// Errors of the burn engine; they reach users as [`convkit_core::Error::Engine`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// burn's device could not start (no adapter, no driver); burn reports this by panicking,
    /// and the engine turns the panic into this error.
    #[error("the {backend} device could not start: {message}")]
    Device {
        backend: &'static str,
        message: String,
    },
    /// Something the burn engine cannot do, or input it cannot use.
    #[error("not supported by burn: {0}")]
    Unsupported(String),
    /// Reading a tensor back from the device failed.
    #[error("reading a tensor back from the device: {0}")]
    Readback(String),
}

type Result<T> = std::result::Result<T, Error>;

/// One burn backend on one device; the name is the CLI's `--backend` value.
#[derive(Debug, Clone)]
pub struct BurnBackend {
    device: Device,
    name: &'static str,
    /// The adapter burn-wgpu runs on; `None` for the other backends.
    adapter: Option<Adapter>,
}

/// The wgpu adapter burn-wgpu settled on.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))] // made only by `BurnBackend::wgpu`
struct Adapter {
    /// The driver's name for it and the graphics API, e.g. `llvmpipe (LLVM 15.0.7, 256 bits),
    /// Vulkan`.
    description: String,
    /// A CPU implementation of the API (Mesa's lavapipe, say) rather than a GPU.
    software: bool,
}

impl BurnBackend {
    /// burn's Flex CPU backend (`burn-flex`).
    #[cfg(feature = "flex")]
    pub fn flex() -> Self {
        BurnBackend {
            device: Device::flex(),
            name: "burn-flex",
            adapter: None,
        }
    }

    /// burn's NdArray CPU backend (`burn-ndarray`).
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // burn 0.22 deprecates NdArray in favour of Flex; it is still a choice.
    pub fn ndarray() -> Self {
        BurnBackend {
            device: Device::ndarray(),
            name: "burn-ndarray",
            adapter: None,
        }
    }

    /// burn's Wgpu backend on the default adapter, a GPU when the machine has one
    /// (`burn-wgpu`); an error when no adapter starts (no Vulkan/Metal/DX12 driver).
    #[cfg(feature = "wgpu")]
    pub fn wgpu() -> convkit_core::Result<Self> {
        // burn sets a wgpu runtime up once per process, and only that first call hands back the
        // adapter it chose; every later backend reuses both.
        static STARTED: std::sync::OnceLock<std::result::Result<(Device, Adapter), String>> =
            std::sync::OnceLock::new();
        let started = STARTED.get_or_init(|| {
            let (device, setup) =
                without_panics(|| burn_tensor::Device::wgpu_options().init_with_setup())?
                    .map_err(|e| e.to_string())?;
            let info = setup.adapter.get_info();
            let adapter = Adapter {
                description: format!("{}, {:?}", info.name, info.backend),
                software: info.device_type == burn_tensor::wgpu::wgpu::DeviceType::Cpu,
            };
            Ok((device, adapter))
        });
        let (device, adapter) = started
            .as_ref()
            .map_err(|m| device_error("burn-wgpu", m.clone()))?;
        let mut backend = BurnBackend::started(device.clone(), "burn-wgpu")?;
        backend.adapter = Some(adapter.clone());
        Ok(backend)
    }

    /// burn's Cuda backend on GPU `ordinal` (`burn-cuda`); an error without a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> convkit_core::Result<Self> {
        BurnBackend::started(Device::cuda(ordinal), "burn-cuda")
    }

    /// The backend, once a small computation has run on `device`: GPU runtimes start lazily
    /// and panic when they cannot, so the probe turns that into an error here, up front.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn started(device: Device, name: &'static str) -> convkit_core::Result<Self> {
        let probe = device.clone();
        let outcome = without_panics(move || {
            Tensor::<1>::from_floats([1.0, 2.0], &probe)
                .sum()
                .into_scalar::<f32>()
        });
        let message = match outcome {
            Ok(sum) if sum == 3.0 => {
                return Ok(BurnBackend {
                    device,
                    name,
                    adapter: None,
                })
            }
            Ok(sum) => format!("the probe 1 + 2 gave {sum}"),
            Err(message) => message,
        };
        Err(device_error(name, message))
    }
}

/// The error of a device that could not start, as users see it.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn device_error(backend: &'static str, message: String) -> convkit_core::Error {
    convkit_core::Error::engine(backend, Error::Device { backend, message })
}

/// Runs `f`, turning a panic into its message: GPU runtimes report a device that cannot start
/// by panicking. The panic hook is silenced meanwhile.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn without_panics<T>(
    f: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> std::result::Result<T, String> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(f);
    std::panic::set_hook(quiet);
    outcome.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown cause".into())
    })
}

impl Backend for BurnBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn device(&self) -> String {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self.name {
            "burn-flex" => format!("CPU, {threads} threads (burn Flex)"),
            "burn-ndarray" => format!("CPU, {threads} threads (burn NdArray)"),
            "burn-wgpu" => match &self.adapter {
                Some(a) if a.software => {
                    format!("{} (software, on the CPU; burn Wgpu)", a.description)
                }
                Some(a) => format!("{} (burn Wgpu)", a.description),
                None => "the default wgpu adapter (burn Wgpu)".into(),
            },
            _ => format!("{:?} (burn)", self.device),
        }
    }

    fn left_out_by_default(&self) -> Option<String> {
        match (self.name, &self.adapter) {
            ("burn-ndarray", _) => Some(
                "burn deprecates NdArray in favour of Flex (burn-flex), which trains the same models many times faster".into(),
            ),
            ("burn-wgpu", Some(a)) if a.software => Some(format!(
                "its only adapter, {}, is a software implementation running on the CPU, slower than the CPU engines",
                a.description
            )),
            _ => None,
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
        let net = BurnNetwork::new(spec, compile, head, weights, self)
            .map_err(|e| convkit_core::Error::engine(self.name, e))?;
        Ok(Box::new(net))
    }
}

/// A device tensor as core's optimizer rules see it (never tracked by autodiff).
struct Param(Tensor<1>);

impl TensorMath for Param {
    fn zeros_like(&self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.zeros_like()))
    }
    fn affine(&self, mul: f64, add: f64) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().mul_scalar(mul).add_scalar(add)))
    }
    fn add(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().add(rhs.0.clone())))
    }
    fn sub(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().sub(rhs.0.clone())))
    }
    fn mul(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().mul(rhs.0.clone())))
    }
    fn div(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().div(rhs.0.clone())))
    }
    fn sqr(&self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().square()))
    }
    fn sqrt(&self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().sqrt()))
    }
    fn sign(&self) -> convkit_core::Result<Self> {
        Ok(Param(self.0.clone().sign()))
    }
    fn sum(&self) -> convkit_core::Result<f64> {
        Ok(self.0.clone().sum().into_scalar::<f32>() as f64)
    }
}

/// One layer, its parameters named by index into [`BurnNetwork::vars`] (weight, then bias).
enum Op {
    Conv {
        weight: usize,
        options: ConvOptions<2>,
        activation: Activation,
    },
    MaxPool(MaxPoolOptions<2>),
    AvgPool(AvgPoolOptions<2>),
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

/// A parameter kept flat on the device (`[numel]`), with the shape the forward pass gives it.
struct Variable {
    name: String,
    layer: usize,
    /// A kernel (weight), not a bias: its layer's regulariser applies.
    kernel: bool,
    /// Stepped by the optimizer (and tracked by autodiff); moving statistics are not.
    optimized: bool,
    /// Device shape: conv `[out, in, kh, kw]`, dense `[in, out]`, bias `[out]`.
    shape: Vec<usize>,
    /// Dense weights are stored transposed relative to the canonical `[out, in]`.
    transposed: bool,
    value: Tensor<1>,
    slots: Slots<Param>,
}

impl Variable {
    fn canonical_shape(&self) -> Vec<usize> {
        if self.transposed {
            vec![self.shape[1], self.shape[0]]
        } else {
            self.shape.clone()
        }
    }

    /// The value on the device, from a canonical host tensor.
    fn upload(&self, t: &CoreTensor, device: &Device) -> Result<Tensor<1>> {
        let expected = self.canonical_shape();
        if t.shape != expected {
            return Err(Error::Unsupported(format!(
                "tensor `{}`: expected shape {expected:?}, found {:?}",
                self.name, t.shape
            )));
        }
        let data = if self.transposed {
            transpose(&t.data, expected[0], expected[1])
        } else {
            t.data.clone()
        };
        let n = data.len();
        Ok(Tensor::from_data(TensorData::new(data, [n]), device))
    }

    /// The value as a canonical host tensor.
    fn download(&self) -> Result<CoreTensor> {
        self.download_like(&self.value)
    }

    /// `t`, laid out as this variable is (its value or an optimizer slot), as a canonical
    /// host tensor.
    fn download_like(&self, t: &Tensor<1>) -> Result<CoreTensor> {
        let data = read(t.clone())?;
        let data = if self.transposed {
            transpose(&data, self.shape[0], self.shape[1])
        } else {
            data
        };
        Ok(CoreTensor {
            shape: self.canonical_shape(),
            data,
        })
    }
}

/// A row-major `[rows, cols]` matrix as row-major `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Readback(format!("{e:?}")))
}

struct BurnNetwork {
    engine: &'static str,
    device: Device,
    input_shape: [usize; 3],
    ops: Vec<Op>,
    vars: Vec<Variable>,
    training: Training,
    loss: Loss,
    head: Head,
    classes: usize,
}

impl BurnNetwork {
    fn new(
        spec: &Sequential,
        compile: &Compile,
        head: Head,
        weights: &Weights,
        backend: &BurnBackend,
    ) -> Result<Self> {
        let plan = spec.plan().map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut vars = Vec::new();
        let mut ops = Vec::with_capacity(plan.len());
        for (layer, planned) in plan.into_iter().enumerate() {
            // Kernels are the weights (not biases); dense kernels are stored transposed.
            let mut param =
                |name: &str, kernel: bool, transposed: bool, optimized: bool| -> Result<usize> {
                    let t = weights
                        .get(name)
                        .map_err(|e| Error::Unsupported(e.to_string()))?;
                    let shape = if transposed {
                        vec![t.shape[1], t.shape[0]]
                    } else {
                        t.shape.clone()
                    };
                    let mut var = Variable {
                        name: name.to_string(),
                        layer,
                        kernel,
                        optimized,
                        shape,
                        transposed,
                        value: Tensor::zeros([1], &backend.device),
                        slots: Slots::default(),
                    };
                    var.value = var.upload(t, &backend.device)?;
                    vars.push(var);
                    Ok(vars.len() - 1)
                };
            ops.push(match planned {
                PlannedOp::Conv2D {
                    weight,
                    bias,
                    pad: [top, bottom, left, right],
                    strides,
                    activation,
                } => {
                    let weight = param(&weight, true, false, true)?;
                    param(&bias, false, false, true)?;
                    Op::Conv {
                        weight,
                        options: ConvOptions::new_with_padding(
                            strides,
                            [(top, bottom), (left, right)],
                            [1, 1],
                            1,
                        ),
                        activation,
                    }
                }
                PlannedOp::MaxPool2D { size, strides } => {
                    Op::MaxPool(MaxPoolOptions::new(size).with_stride(strides))
                }
                PlannedOp::AvgPool2D { size, strides } => {
                    Op::AvgPool(AvgPoolOptions::new(size).with_stride(strides))
                }
                PlannedOp::Flatten => Op::Flatten,
                PlannedOp::Dense {
                    weight,
                    bias,
                    activation,
                } => {
                    let weight = param(&weight, true, true, true)?;
                    param(&bias, false, false, true)?;
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
                    let gamma = param(&gamma, false, false, true)?;
                    param(&beta, false, false, true)?;
                    param(&moving_mean, false, false, false)?;
                    param(&moving_variance, false, false, false)?;
                    Op::BatchNorm {
                        layer,
                        gamma,
                        momentum,
                        epsilon,
                    }
                }
            });
        }
        Ok(BurnNetwork {
            engine: backend.name,
            device: backend.device.clone(),
            input_shape: spec.input_shape,
            ops,
            vars,
            training: Training::new(&compile.optimizer, spec)
                .map_err(|e| Error::Unsupported(e.to_string()))?,
            loss: compile.loss,
            head,
            classes: spec
                .output_shape()
                .map_err(|e| Error::Unsupported(e.to_string()))?
                .numel(),
        })
    }

    /// NHWC host batch → NCHW device tensor.
    fn input(&self, x: ArrayView4<'_, f32>) -> Result<Tensor<4>> {
        let (n, h, w, c) = x.dim();
        if [h, w, c] != self.input_shape {
            return Err(Error::Unsupported(format!(
                "input batch is {h}×{w}×{c}, the model expects {:?}",
                self.input_shape
            )));
        }
        let data = x.as_standard_layout().iter().copied().collect::<Vec<f32>>();
        Ok(
            Tensor::<4>::from_data(TensorData::new(data, [n, h, w, c]), &self.device)
                .permute([0, 3, 1, 2]),
        )
    }

    /// Logits `[n, classes]` from `params` (the variables' values, tracked or not); and, in
    /// training, each batch normalisation's new moving statistics by variable index.
    /// `masks` are the training batch's dropout masks (none for inference).
    fn forward(
        &self,
        params: &[Tensor<1>],
        x: Tensor<4>,
        train: bool,
        masks: &[DropoutMask],
    ) -> Result<(Tensor<2>, Vec<(usize, Tensor<1>)>)> {
        let shaped = |i: usize| params[i].clone();
        let mut moving = Vec::new();
        let mut masks = masks.iter();
        let mut image = Some(x);
        let mut flat: Option<Tensor<2>> = None;
        for op in &self.ops {
            match op {
                Op::Conv {
                    weight,
                    options,
                    activation,
                } => {
                    let s = &self.vars[*weight].shape;
                    let w = shaped(*weight).reshape([s[0], s[1], s[2], s[3]]);
                    let y = conv2d(
                        image.take().expect("conv follows an image"),
                        w,
                        Some(shaped(*weight + 1)),
                        options.clone(),
                    );
                    image = Some(activate(y, *activation));
                }
                Op::MaxPool(options) => {
                    image = image.map(|x| max_pool2d(x, options.clone()));
                }
                Op::AvgPool(options) => {
                    image = image.map(|x| avg_pool2d(x, options.clone()));
                }
                // Keras flattens channels-last: (H, W, C).
                Op::Flatten => {
                    let x = image.take().expect("flatten follows an image");
                    let [n, c, h, w] = x.dims();
                    flat = Some(x.permute([0, 2, 3, 1]).reshape([n, h * w * c]));
                }
                Op::Dense { weight, activation } => {
                    let s = &self.vars[*weight].shape;
                    let w = shaped(*weight).reshape([s[0], s[1]]);
                    let b = shaped(*weight + 1).reshape([1, s[1]]);
                    let x = flat.take().expect("dense follows a flat tensor");
                    flat = Some(activate(x.matmul(w).add(b), *activation));
                }
                Op::Dropout(rate) if train && *rate > 0.0 => {
                    let m = masks.next().ok_or_else(|| {
                        Error::Unsupported("a Dropout layer was given no mask".into())
                    })?;
                    let values = TensorData::new(m.values.clone(), m.shape.clone());
                    if let Some(x) = image.take() {
                        // Masks come channels-last, as images do.
                        let mask =
                            Tensor::<4>::from_data(values, &self.device).permute([0, 3, 1, 2]);
                        image = Some(x.mul(mask));
                    } else if let Some(x) = flat.take() {
                        flat = Some(x.mul(Tensor::<2>::from_data(values, &self.device)));
                    }
                }
                Op::Dropout(_) => {}
                Op::BatchNorm {
                    layer,
                    gamma,
                    momentum,
                    epsilon,
                } => {
                    let norm = |x: Tensor<4>, moving: &mut Vec<(usize, Tensor<1>)>| {
                        let [n, c, h, w] = x.dims();
                        let p = |i: usize| shaped(*gamma + i).reshape([1, c, 1, 1]);
                        let (mean, variance) = if self.training.uses_batch_statistics(*layer, train)
                        {
                            let rows = x.clone().swap_dims(0, 1).reshape([c, n * h * w]);
                            let mean = rows.clone().mean_dim(1);
                            let variance = rows.sub(mean.clone()).square().mean_dim(1);
                            for (i, batch) in [(2, &mean), (3, &variance)] {
                                let batch = Param(batch.clone().detach().inner().reshape([c]));
                                let old = Param(self.vars[*gamma + i].value.clone());
                                let new = Training::moving_average(&old, &batch, *momentum)
                                    .map_err(|e| Error::Unsupported(e.to_string()))?;
                                moving.push((*gamma + i, new.0));
                            }
                            (mean.reshape([1, c, 1, 1]), variance.reshape([1, c, 1, 1]))
                        } else {
                            (p(2), p(3))
                        };
                        Ok::<_, Error>(
                            x.sub(mean)
                                .div(variance.add_scalar(*epsilon).sqrt())
                                .mul(p(0))
                                .add(p(1)),
                        )
                    };
                    if let Some(x) = image.take() {
                        image = Some(norm(x, &mut moving)?);
                    } else if let Some(x) = flat.take() {
                        let [n, k] = x.dims();
                        flat = Some(norm(x.reshape([n, k, 1, 1]), &mut moving)?.reshape([n, k]));
                    }
                }
            }
        }
        Ok((flat.expect("the spec ends in a dense layer"), moving))
    }

    /// Dense target rows `[n, classes]` as a device tensor (one-hot for class indices).
    fn target_rows(&self, y: &Targets) -> Tensor<2> {
        let (n, k) = (y.len(), self.classes);
        let rows = match y {
            Targets::Sparse(labels) => {
                let mut rows = vec![0.0f32; n * k];
                for (i, &l) in labels.iter().enumerate() {
                    rows[i * k + l as usize] = 1.0;
                }
                rows
            }
            Targets::Dense(rows) => rows.as_standard_layout().iter().copied().collect(),
            Targets::Binary(v) => v.clone(),
        };
        Tensor::from_data(TensorData::new(rows, [n, k]), &self.device)
    }

    /// Mean loss over the batch, from logits, as Keras computes it.
    fn loss(&self, logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
        match self.loss {
            Loss::SparseCategoricalCrossentropy | Loss::CategoricalCrossentropy => {
                log_softmax(logits, 1).mul(targets).sum_dim(1).mean().neg()
            }
            // max(z, 0) − z·t + log(1 + e^−|z|): stable for any z.
            Loss::BinaryCrossentropy => relu(logits.clone())
                .sub(logits.clone().mul(targets))
                .add(logits.abs().neg().exp().log1p())
                .mean(),
        }
    }

    fn check_targets(&self, y: &Targets) -> Result<()> {
        let fits = match (self.loss, y) {
            (Loss::SparseCategoricalCrossentropy, Targets::Sparse(labels)) => {
                match labels.iter().find(|&&l| l as usize >= self.classes) {
                    Some(&l) => {
                        return Err(Error::Unsupported(format!(
                            "label {l} is out of range for {} classes",
                            self.classes
                        )))
                    }
                    None => true,
                }
            }
            (Loss::CategoricalCrossentropy, Targets::Dense(rows)) => rows.ncols() == self.classes,
            (Loss::BinaryCrossentropy, Targets::Binary(_)) => self.classes == 1,
            _ => false,
        };
        if !fits {
            return Err(Error::Unsupported(format!(
                "{} cannot use targets {y:?} with {} outputs",
                self.loss.name(),
                self.classes
            )));
        }
        Ok(())
    }

    fn correct(&self, logits: Tensor<2>, targets: Tensor<2>) -> Result<usize> {
        let hits = match self.head {
            Head::Softmax => logits.argmax(1).equal(targets.argmax(1)),
            Head::Sigmoid => logits.greater_elem(0.0).equal(targets.greater_elem(0.5)),
        };
        Ok(hits.int().sum().into_scalar::<i64>() as usize)
    }
}

fn activate<const D: usize>(x: Tensor<D>, a: Activation) -> Tensor<D> {
    match a {
        Activation::Linear => x,
        Activation::Relu => relu(x),
        Activation::Sigmoid => sigmoid(x),
        Activation::Tanh => tanh(x),
        Activation::Softmax => softmax(x, D - 1),
    }
}

impl EngineNetwork for BurnNetwork {
    type Error = Error;
    fn engine(&self) -> &str {
        self.engine
    }
    fn training_mut(&mut self) -> &mut Training {
        &mut self.training
    }
    fn train_step(&mut self, x: ArrayView4<'_, f32>, y: &Targets) -> Result<StepStats> {
        self.check_targets(y)?;
        let masks = self.training.dropout_masks(x.dim().0);
        let x = self.input(x)?;
        let targets = self.target_rows(y);
        // Frozen layers' weights enter as constants: no gradient is computed for them.
        let tracked: Vec<Tensor<1>> = self
            .vars
            .iter()
            .map(|v| {
                let t = v.value.clone().autodiff();
                if v.optimized && self.training.is_trainable(v.layer) {
                    t.require_grad()
                } else {
                    t
                }
            })
            .collect();
        let (logits, moving) = self.forward(&tracked, x, true, &masks)?;
        let correct = self.correct(logits.clone().detach().inner(), targets.clone())?;
        let loss = self.loss(logits, targets);
        let grads = loss.backward();
        let loss = read(loss.inner())?[0];
        self.training.begin_step();
        let mut penalty = 0.0;
        for (v, t) in self
            .vars
            .iter_mut()
            .zip(&tracked)
            .filter(|(v, _)| v.optimized)
        {
            let grad = t.grad(&grads).map(Param);
            let w = Param(v.value.clone());
            let (new, p) = self
                .training
                .step(v.layer, v.kernel, &w, grad.as_ref(), &mut v.slots)
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            penalty += p;
            if let Some(new) = new {
                v.value = new.0;
            }
        }
        for (i, value) in moving {
            self.vars[i].value = value;
        }
        Ok(StepStats {
            loss: (loss as f64 + penalty) as f32,
            correct,
        })
    }

    fn predict(&self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        let n = x.dim().0;
        let values: Vec<Tensor<1>> = self.vars.iter().map(|v| v.value.clone()).collect();
        let (logits, _) = self.forward(&values, self.input(x)?, false, &[])?;
        let p = match self.head {
            Head::Softmax => softmax(logits, 1),
            Head::Sigmoid => sigmoid(logits),
        };
        let data = read(p)?;
        Ok(Array2::from_shape_vec((n, self.classes), data).expect("dims from the tensor"))
    }

    fn weights(&self) -> Result<Weights> {
        let mut w = Weights::default();
        for v in &self.vars {
            w.insert(v.name.clone(), v.download()?);
        }
        Ok(w)
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        let mut values = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            let t = weights
                .get(&v.name)
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            values.push(v.upload(t, &self.device)?);
        }
        for (v, value) in self.vars.iter_mut().zip(values) {
            v.value = value;
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

    fn param_to_host(&self, variable: &str, param: &Param) -> Result<CoreTensor> {
        self.variable(variable)?.download_like(&param.0)
    }

    fn param_from_host(&self, variable: &str, tensor: &CoreTensor) -> Result<Param> {
        Ok(Param(
            self.variable(variable)?.upload(tensor, &self.device)?,
        ))
    }
}

impl BurnNetwork {
    fn variable(&self, name: &str) -> Result<&Variable> {
        self.vars
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::Unsupported(format!("the model has no variable `{name}`")))
    }
}
