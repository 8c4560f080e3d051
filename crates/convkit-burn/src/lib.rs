//! The burn engine for convkit: the tensor operations core's executor runs a network with, on
//! burn's autodiff. One engine serves every burn backend compiled in (burn 0.22 picks the
//! backend from the [`Device`] at run time):
//!
//! | feature | `--backend` | burn device |
//! |---|---|---|
//! | `flex` | `burn-flex` | `Device::flex()`, burn's pure-Rust CPU backend |
//! | `ndarray` | `burn-ndarray` | `Device::ndarray()` (deprecated by burn in favour of flex) |
//! | `wgpu` | `burn-wgpu` | `Device::wgpu(..)`: Vulkan, Metal or DX12 |
//! | `cuda` | `burn-cuda` | `Device::cuda(0)` |
//!
//! Dense kernels live on the device as burn lays out a linear layer, `[in, out]`; the
//! canonical layout is `[out, in]`, and [`Ops::upload_weight`] / [`Ops::download_weight`]
//! transpose at the seam. Conv kernels are `[out, in, kh, kw]` in both. burn's rank is a type
//! parameter, so every tensor the executor sees is 4-D, lower ranks padded with trailing
//! axes of 1 (`[c]` is `[c, 1, 1, 1]`, `[n, k]` is `[n, k, 1, 1]`).
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

use burn_tensor::activation::{relu, sigmoid, tanh};
use burn_tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn_tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn_tensor::{Device, Tensor, TensorData};
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use convkit_core::backend::without_panics;
use convkit_core::exec::Engine;
use convkit_core::optim::TensorMath;
use convkit_core::plan::{PoolKind, Role, WeightSpec};
use convkit_core::primitives::{
    conv2d_relu_max_pool_unfused, Binary, ConvReluMaxPool, ElementUpdate, Ops, Reduction, Unary,
};

#[cfg(feature = "flex")]
mod host;

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
    /// Reading a tensor back from the device failed.
    #[error("reading a tensor back from the device: {0}")]
    Readback(String),
    /// convkit's CPU kernels refused the operands (burn-flex).
    #[cfg(feature = "flex")]
    #[error(transparent)]
    Kernel(#[from] convkit_cpu::Error),
}

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
            Ok(3.0) => {
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

impl Engine for BurnBackend {
    type Ops = BurnOps;

    fn name(&self) -> &str {
        self.name
    }

    fn device(&self) -> String {
        let threads = convkit_core::threads::chosen().count();
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

    fn ops(&self) -> BurnOps {
        BurnOps {
            device: self.device.clone(),
            engine: self.name,
            host_memory: matches!(self.name, "burn-flex" | "burn-ndarray"),
            host_kernels: self.name == "burn-flex",
        }
    }
}

/// burn's operations on one device, for core's executor.
pub struct BurnOps {
    device: Device,
    engine: &'static str,
    /// The backend keeps tensors in host memory (Flex, NdArray), where the optimizer update
    /// runs in one pass ([`Ops::update_in_place`]).
    host_memory: bool,
    /// Convolution, max pooling, ReLU and Dense run on convkit-cpu's kernels ([`host`]):
    /// burn-flex only; the other backends keep burn's operations.
    host_kernels: bool,
}

/// A burn tensor as core's executor and optimizer rules see it: always 4-D (see the crate
/// docs), tracked by autodiff only while a training step reads it for its gradient.
#[derive(Clone)]
pub struct Value(Tensor<4>);

impl TensorMath for Value {
    fn zeros_like(&self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.zeros_like()))
    }
    fn affine(&self, mul: f64, add: f64) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().mul_scalar(mul).add_scalar(add)))
    }
    fn add(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().add(rhs.0.clone())))
    }
    fn sub(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().sub(rhs.0.clone())))
    }
    fn mul(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().mul(rhs.0.clone())))
    }
    fn div(&self, rhs: &Self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().div(rhs.0.clone())))
    }
    fn sqr(&self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().square()))
    }
    fn sqrt(&self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().sqrt()))
    }
    fn sign(&self) -> convkit_core::Result<Self> {
        Ok(Value(self.0.clone().sign()))
    }
    fn sum(&self) -> convkit_core::Result<f64> {
        Ok(self.0.clone().sum().into_scalar::<f32>() as f64)
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

/// A shape of rank ≤ 4 padded with trailing axes of 1.
fn rank4_dims(shape: &[usize]) -> [usize; 4] {
    let mut out = [1; 4];
    out[..shape.len()].copy_from_slice(shape);
    out
}

/// The first two axes of a `[a, b, 1, 1]` tensor.
fn to_rank2(t: &Tensor<4>) -> Tensor<2> {
    let [a, b, _, _] = t.dims();
    t.clone().reshape([a, b])
}

/// The first axis of a `[a, 1, 1, 1]` tensor.
fn to_rank1(t: &Tensor<4>) -> Tensor<1> {
    let [a, _, _, _] = t.dims();
    t.clone().reshape([a])
}

/// A tensor of lower rank, padded to 4-D.
fn as_rank4<const D: usize>(t: Tensor<D>) -> Value {
    Value(t.clone().reshape(rank4_dims(&t.dims())))
}

impl BurnOps {
    /// `t`'s values, moved out of it (no copy when nothing else holds them, as Flex lets the
    /// buffer go), `t` left empty until they are put back.
    fn take_out(&self, t: &mut Value) -> TensorData {
        let placeholder = Tensor::<4>::empty([0, 1, 1, 1], &self.device);
        std::mem::replace(&mut t.0, placeholder).into_data()
    }

    /// `kernel`'s result, its error as the engine's.
    #[cfg(feature = "flex")]
    fn checked<T>(&self, kernel: convkit_cpu::Result<T>) -> convkit_core::Result<T> {
        kernel.map_err(|e| convkit_core::Error::engine(self.engine, Error::Kernel(e)))
    }

    /// The sizes of a convolution on the host kernels, its operands checked.
    #[cfg(feature = "flex")]
    fn host_conv2d_shape(
        &self,
        x: &Value,
        kernel: &Value,
        bias: &Value,
        conv: convkit_cpu::conv::Conv2d,
    ) -> convkit_core::Result<convkit_cpu::conv::Conv2dShape> {
        let checked = conv
            .shape(&x.0.dims(), &kernel.0.dims())
            .and_then(|s| match bias.0.dims() {
                [o, 1, 1, 1] if o == s.o => Ok(s),
                found => Err(convkit_cpu::Error::Shape {
                    op: "convkit conv2d",
                    message: format!("expected a bias [{}, 1, 1, 1], found {found:?}", s.o),
                }),
            });
        self.checked(checked)
    }

    /// The operands of a Dense product on the host kernels, checked: `x [n, inputs, 1, 1]`,
    /// `kernel [inputs, units, 1, 1]`, `bias [units, 1, 1, 1]`.
    #[cfg(feature = "flex")]
    fn host_dense(&self, x: &Value, kernel: &Value, bias: &Value) -> convkit_core::Result<Value> {
        match (x.0.dims(), kernel.0.dims(), bias.0.dims()) {
            ([_, inputs, 1, 1], [k_inputs, units, 1, 1], [b_units, 1, 1, 1])
                if inputs == k_inputs && units == b_units =>
            {
                Ok(Value(host::ops::dense(&x.0, &kernel.0, &bias.0)))
            }
            (x, kernel, bias) => self.checked(Err(convkit_cpu::Error::Shape {
                op: "convkit dense",
                message: format!(
                    "expected an input [n, inputs, 1, 1], a kernel [inputs, units, 1, 1] and a bias [units, 1, 1, 1], found {x:?}, {kernel:?} and {bias:?}"
                ),
            })),
        }
    }

    fn read_back(&self, t: Tensor<4>) -> convkit_core::Result<Vec<f32>> {
        t.into_data().try_into_vec::<f32>().map_err(|e| {
            convkit_core::Error::engine(self.engine, Error::Readback(format!("{e:?}")))
        })
    }
}

impl Ops for BurnOps {
    type Tensor = Value;

    fn engine(&self) -> &str {
        self.engine
    }

    /// burn-flex: Flex and convkit's kernels share rayon's pool, whose idle threads would
    /// otherwise sleep between two operations (a tenth of a training step on 2 cores).
    fn keep_threads_awake(&self) -> Option<convkit_cpu::RayonAwake> {
        self.host_kernels.then(convkit_cpu::RayonAwake::new)
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> convkit_core::Result<Value> {
        Ok(Value(Tensor::from_data(
            TensorData::new(data.to_vec(), rank4_dims(shape)),
            &self.device,
        )))
    }

    fn download(&self, t: &Value) -> convkit_core::Result<Vec<f32>> {
        self.read_back(t.0.clone().inner())
    }

    /// Kept channels-last in memory (an NCHW view of the NHWC values), where Flex's
    /// convolutions run faster than on NCHW-contiguous tensors.
    fn images(&self, shape: [usize; 4], data: &[f32]) -> convkit_core::Result<Value> {
        let nhwc = Tensor::<4>::from_data(TensorData::new(data.to_vec(), shape), &self.device);
        Ok(Value(nhwc.permute([0, 3, 1, 2])))
    }

    fn upload_weight(&self, weight: &WeightSpec, data: &[f32]) -> convkit_core::Result<Value> {
        match (weight.role, &weight.shape[..]) {
            (Role::Kernel, &[out, inputs]) => {
                self.upload(&[inputs, out], &transpose(data, out, inputs))
            }
            _ => self.upload(&weight.shape, data),
        }
    }

    fn download_weight(&self, weight: &WeightSpec, t: &Value) -> convkit_core::Result<Vec<f32>> {
        let data = self.download(t)?;
        Ok(match (weight.role, &weight.shape[..]) {
            (Role::Kernel, &[out, inputs]) => transpose(&data, inputs, out),
            _ => data,
        })
    }

    fn variable(&self, value: Value) -> convkit_core::Result<Value> {
        Ok(value)
    }

    /// On Flex and NdArray: the values are moved out of their tensors, updated and moved back,
    /// without a copy where Flex owns the only reference. GPU backends keep the composite form.
    fn update_in_place(
        &self,
        variable: &mut Value,
        grad: &Value,
        slots: &mut [&mut Value],
        update: &mut ElementUpdate<'_>,
    ) -> convkit_core::Result<bool> {
        let dims = variable.0.dims();
        if !self.host_memory || grad.0.dims() != dims || slots.iter().any(|s| s.0.dims() != dims) {
            return Ok(false);
        }
        let grad = grad.0.clone().into_data();
        let mut value = self.take_out(variable);
        let mut kept: Vec<TensorData> = slots.iter_mut().map(|s| self.take_out(s)).collect();
        let ran = (|| {
            let mut kept_values = Vec::with_capacity(kept.len());
            for data in kept.iter_mut() {
                kept_values.push(data.as_mut_slice::<f32>()?);
            }
            update(
                &convkit_cpu::Rayon,
                value.as_mut_slice::<f32>()?,
                grad.as_slice::<f32>()?,
                &mut kept_values,
            );
            Ok(())
        })();
        // Back in place whether or not the update ran.
        variable.0 = Tensor::from_data(value, &self.device);
        for (slot, data) in slots.iter_mut().zip(kept) {
            slot.0 = Tensor::from_data(data, &self.device);
        }
        ran.map_err(|e: burn_tensor::DataError| {
            convkit_core::Error::engine(self.engine, Error::Readback(format!("{e:?}")))
        })?;
        Ok(true)
    }

    fn read(&self, variable: &Value, grad: bool) -> Value {
        if grad {
            Value(variable.0.clone().autodiff().require_grad())
        } else {
            variable.clone()
        }
    }

    fn gradients(&self, loss: &Value, wrt: &[&Value]) -> convkit_core::Result<Vec<Option<Value>>> {
        let grads = loss.0.backward();
        Ok(wrt.iter().map(|t| t.0.grad(&grads).map(Value)).collect())
    }

    fn detach(&self, t: &Value) -> Value {
        Value(t.0.clone().inner())
    }

    fn conv2d(
        &self,
        x: &Value,
        kernel: &Value,
        bias: &Value,
        [top, bottom, left, right]: [usize; 4],
        strides: [usize; 2],
    ) -> convkit_core::Result<Value> {
        #[cfg(feature = "flex")]
        if self.host_kernels {
            let conv = convkit_cpu::conv::Conv2d::new([top, bottom, left, right], strides);
            self.host_conv2d_shape(x, kernel, bias, conv)?;
            return Ok(Value(host::ops::conv2d(&x.0, &kernel.0, &bias.0, conv)));
        }
        let options =
            ConvOptions::new_with_padding(strides, [(top, bottom), (left, right)], [1, 1], 1);
        Ok(Value(conv2d(
            x.0.clone(),
            kernel.0.clone(),
            Some(to_rank1(&bias.0)),
            options,
        )))
    }

    fn conv2d_relu_max_pool(
        &self,
        x: &Value,
        kernel: &Value,
        bias: &Value,
        block: ConvReluMaxPool,
    ) -> convkit_core::Result<Value> {
        #[cfg(feature = "flex")]
        if self.host_kernels {
            let conv = convkit_cpu::conv::Conv2d::new(block.pad, block.strides);
            let pool = convkit_cpu::pool::MaxPool2d::new(block.pool_size, block.pool_strides);
            let s = self.host_conv2d_shape(x, kernel, bias, conv)?;
            let s = convkit_cpu::conv_relu_pool::ConvReluMaxPoolShape::new(s, pool);
            self.checked(s)?;
            return Ok(Value(host::ops::conv2d_relu_max_pool(
                &x.0, &kernel.0, &bias.0, conv, pool,
            )));
        }
        conv2d_relu_max_pool_unfused(self, x, kernel, bias, block)
    }

    fn pool2d(
        &self,
        x: &Value,
        kind: PoolKind,
        size: [usize; 2],
        strides: [usize; 2],
    ) -> convkit_core::Result<Value> {
        #[cfg(feature = "flex")]
        if self.host_kernels && kind == PoolKind::Max {
            let pool = convkit_cpu::pool::MaxPool2d::new(size, strides);
            self.checked(pool.shape(&x.0.dims()))?;
            return Ok(Value(host::ops::max_pool2d(&x.0, pool)));
        }
        let x = x.0.clone();
        Ok(Value(match kind {
            PoolKind::Max => max_pool2d(x, MaxPoolOptions::new(size).with_stride(strides)),
            PoolKind::Average => avg_pool2d(x, AvgPoolOptions::new(size).with_stride(strides)),
        }))
    }

    fn dense(&self, x: &Value, kernel: &Value, bias: &Value) -> convkit_core::Result<Value> {
        #[cfg(feature = "flex")]
        if self.host_kernels {
            return self.host_dense(x, kernel, bias);
        }
        let [_, out, _, _] = kernel.0.dims();
        let y = to_rank2(&x.0)
            .matmul(to_rank2(&kernel.0))
            .add(to_rank1(&bias.0).reshape([1, out]));
        Ok(as_rank4(y))
    }

    fn dims(&self, x: &Value) -> Vec<usize> {
        x.0.dims().to_vec()
    }

    fn reshape(&self, x: &Value, shape: &[usize]) -> convkit_core::Result<Value> {
        Ok(Value(x.0.clone().reshape(rank4_dims(shape))))
    }

    /// `axes` of a lower rank are padded with the trailing axes, which stay in place.
    fn permute(&self, x: &Value, axes: &[usize]) -> convkit_core::Result<Value> {
        let mut all = [0, 1, 2, 3];
        all[..axes.len()].copy_from_slice(axes);
        Ok(Value(x.0.clone().permute(all)))
    }

    fn unary(&self, op: Unary, x: &Value) -> convkit_core::Result<Value> {
        let x = x.0.clone();
        Ok(Value(match op {
            #[cfg(feature = "flex")]
            Unary::Relu if self.host_kernels => host::ops::relu(&x),
            Unary::Relu => relu(x),
            Unary::Sigmoid => sigmoid(x),
            Unary::Tanh => tanh(x),
            Unary::Exp => x.exp(),
            Unary::Log => x.log(),
        }))
    }

    fn binary(&self, op: Binary, a: &Value, b: &Value) -> convkit_core::Result<Value> {
        let (a, b) = (a.0.clone(), b.0.clone());
        Ok(Value(match op {
            Binary::Add => a.add(b),
            Binary::Sub => a.sub(b),
            Binary::Mul => a.mul(b),
            Binary::Div => a.div(b),
        }))
    }

    fn reduce(&self, op: Reduction, x: &Value, axes: &[usize]) -> convkit_core::Result<Value> {
        Ok(Value(axes.iter().fold(x.0.clone(), |t, &axis| match op {
            Reduction::Sum => t.sum_dim(axis),
            Reduction::Max => t.max_dim(axis),
        })))
    }
}
