//! The candle engine for convkit: the tensor operations core's executor runs a network with,
//! on candle's CPU or CUDA device. candle's own conv `[out, in, kh, kw]` and linear
//! `[out, in]` layouts are the canonical ones, so weights cross the seam as they are.
//!
//! ```no_run
//! use convkit_core::{Backend, Compile, Loss, Model, Optimizer, Sequential};
//! let backend = convkit_candle::CandleBackend::cpu();
//! let spec = Sequential::preset("tutorial-mnist")?;
//! let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
//! let model = Model::new(spec, compile, &backend, 42)?;
//! # Ok::<(), convkit_core::Error>(())
//! ```

mod conv;
mod dense;
mod host;
mod pool;
mod relu;
#[cfg(test)]
mod testing;
mod threads;
mod update;

use candle_core::{DType, Device, Tensor, Var};
use convkit_core::backend::without_panics;
use convkit_core::exec::Engine;
use convkit_core::optim::TensorMath;
use convkit_core::plan::{PlannedOp, PoolKind};
use convkit_core::primitives::{
    conv2d_relu_max_pool_unfused, Binary, ConvReluMaxPool, ElementUpdate, Ops, Reduction, Unary,
};

/// Errors of the candle engine; they reach users as [`convkit_core::Error::Engine`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(candle_core::Error),
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

    /// CUDA device `ordinal`, once a small computation has run on it; fails without a GPU or
    /// its driver library, or when built without the `cuda` feature. candle loads the CUDA
    /// libraries at run time (cudarc's dynamic loading, as the GPU bundle builds it) and panics
    /// when one is missing, so the probe turns that into an error here, up front.
    pub fn cuda(ordinal: usize) -> convkit_core::Result<Self> {
        let probe = || -> candle_core::Result<(Device, f32)> {
            let device = Device::new_cuda(ordinal)?;
            let sum = Tensor::new(&[1f32, 2.0], &device)?.sum_all()?.to_scalar()?;
            Ok((device, sum))
        };
        let failed = |message: String| convkit_core::Error::engine("candle-cuda", message);
        match without_panics(probe).map_err(failed)? {
            Ok((device, 3.0)) => Ok(CandleBackend {
                device,
                name: "candle-cuda",
            }),
            Ok((_, sum)) => Err(failed(format!("the probe 1 + 2 gave {sum}"))),
            Err(e) => Err(failed(Error::from(e).to_string())),
        }
    }
}

impl Engine for CandleBackend {
    type Ops = CandleOps;

    fn name(&self) -> &str {
        self.name
    }

    fn device(&self) -> String {
        match &self.device {
            Device::Cpu => format!("CPU, {} threads", candle_core::utils::get_num_threads()),
            other => format!("{other:?}"),
        }
    }

    fn ops(&self) -> CandleOps {
        CandleOps {
            device: self.device.clone(),
            engine: self.name,
        }
    }
}

/// candle's operations on one device, for core's executor.
pub struct CandleOps {
    device: Device,
    engine: &'static str,
}

impl CandleOps {
    fn engine_result<T>(&self, r: candle_core::Result<T>) -> convkit_core::Result<T> {
        r.map_err(|e| convkit_core::Error::engine(self.engine, Error::from(e)))
    }
}

/// A candle tensor as core's executor and optimizer rules see it.
#[derive(Clone)]
pub struct Value(Tensor);

impl TensorMath for Value {
    fn zeros_like(&self) -> convkit_core::Result<Self> {
        value_of(self.0.zeros_like())
    }
    fn affine(&self, mul: f64, add: f64) -> convkit_core::Result<Self> {
        value_of(self.0.affine(mul, add))
    }
    fn add(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(&self.0 + &rhs.0)
    }
    fn sub(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(&self.0 - &rhs.0)
    }
    fn mul(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(&self.0 * &rhs.0)
    }
    fn div(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(&self.0 / &rhs.0)
    }
    fn sqr(&self) -> convkit_core::Result<Self> {
        value_of(self.0.sqr())
    }
    fn sqrt(&self) -> convkit_core::Result<Self> {
        value_of(self.0.sqrt())
    }
    fn sign(&self) -> convkit_core::Result<Self> {
        value_of(self.0.sign())
    }
    fn sum(&self) -> convkit_core::Result<f64> {
        self.0
            .sum_all()
            .and_then(|t| t.to_dtype(DType::F64)?.to_scalar::<f64>())
            .map_err(|e| convkit_core::Error::engine("candle", Error::from(e)))
    }
}

/// A candle result as core's value, its error as the engine's.
fn value_of(r: candle_core::Result<Tensor>) -> convkit_core::Result<Value> {
    r.map(Value)
        .map_err(|e| convkit_core::Error::engine("candle", Error::from(e)))
}

impl Ops for CandleOps {
    type Tensor = Value;

    fn engine(&self) -> &str {
        self.engine
    }

    fn supports(&self, op: &PlannedOp) -> std::result::Result<(), String> {
        match op {
            // The CPU convolution is convkit's own (see `conv`), which takes any strides.
            PlannedOp::Conv2D { strides, .. }
                if strides[0] != strides[1] && !self.device.is_cpu() =>
            {
                Err(format!(
                    "Conv2D strides {strides:?} differ per axis; candle's conv2d takes one stride"
                ))
            }
            PlannedOp::Conv2D { .. }
            | PlannedOp::Pool2D { .. }
            | PlannedOp::GlobalPool2D { .. }
            | PlannedOp::Flatten
            | PlannedOp::Dense { .. }
            | PlannedOp::Activation(_)
            | PlannedOp::Dropout { .. }
            | PlannedOp::BatchNorm { .. }
            | PlannedOp::Crop { .. } => Ok(()),
        }
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> convkit_core::Result<Value> {
        self.engine_result(Tensor::from_slice(data, shape, &self.device))
            .map(Value)
    }

    fn download(&self, t: &Value) -> convkit_core::Result<Vec<f32>> {
        self.engine_result(t.0.flatten_all().and_then(|t| t.to_vec1::<f32>()))
    }

    fn variable(&self, value: Value) -> convkit_core::Result<Value> {
        self.engine_result(Var::from_tensor(&value.0))
            .map(|v| Value(v.into_inner()))
    }

    fn assign(&self, variable: &mut Value, value: Value) -> convkit_core::Result<()> {
        self.engine_result(Var::from_tensor(&variable.0).and_then(|v| v.set(&value.0)))
    }

    /// On the CPU, in place through candle's in-place ops (see `update`); the composite
    /// form on a GPU.
    fn update_in_place(
        &self,
        variable: &mut Value,
        grad: &Value,
        slots: &mut [&mut Value],
        update: &mut ElementUpdate<'_>,
    ) -> convkit_core::Result<bool> {
        if !self.device.is_cpu() {
            return Ok(false);
        }
        let slots: Vec<&Tensor> = slots.iter().map(|s| &s.0).collect();
        self.engine_result(update::in_place(&variable.0, &grad.0, &slots, update))
    }

    fn read(&self, variable: &Value, grad: bool) -> Value {
        if grad {
            variable.clone()
        } else {
            // Detached: otherwise the optimizer slots would keep this step's autograd graph
            // alive through their history, and memory would grow with every step.
            Value(variable.0.detach())
        }
    }

    fn gradients(&self, loss: &Value, wrt: &[&Value]) -> convkit_core::Result<Vec<Option<Value>>> {
        let grads = self.engine_result(loss.0.backward())?;
        Ok(wrt
            .iter()
            .map(|t| grads.get(&t.0).map(|g| Value(g.detach())))
            .collect())
    }

    fn detach(&self, t: &Value) -> Value {
        Value(t.0.detach())
    }

    fn conv2d(
        &self,
        x: &Value,
        kernel: &Value,
        bias: &Value,
        [top, bottom, left, right]: [usize; 4],
        strides: [usize; 2],
    ) -> convkit_core::Result<Value> {
        self.engine_result((|| {
            if self.device.is_cpu() {
                let conv = conv::Conv2d(convkit_cpu::conv::Conv2d::new(
                    [top, bottom, left, right],
                    strides,
                ));
                let (kernel, bias) = (kernel.0.contiguous()?, bias.0.contiguous()?);
                return x.0.contiguous()?.apply_op3(&kernel, &bias, conv);
            }
            let y = if top == bottom && left == right && top == left {
                x.0.conv2d(&kernel.0, top, strides[0], 1, 1)?
            } else {
                x.0.pad_with_zeros(2, top, bottom)?
                    .pad_with_zeros(3, left, right)?
                    .conv2d(&kernel.0, 0, strides[0], 1, 1)?
            };
            y.broadcast_add(&bias.0.reshape((1, (), 1, 1))?)
        })())
        .map(Value)
    }

    fn conv2d_relu_max_pool(
        &self,
        x: &Value,
        kernel: &Value,
        bias: &Value,
        block: ConvReluMaxPool,
    ) -> convkit_core::Result<Value> {
        if !self.device.is_cpu() {
            return conv2d_relu_max_pool_unfused(self, x, kernel, bias, block);
        }
        let op = conv::ConvReluMaxPool {
            conv: convkit_cpu::conv::Conv2d::new(block.pad, block.strides),
            pool: convkit_cpu::pool::MaxPool2d::new(block.pool_size, block.pool_strides),
            for_grad: [x, kernel, bias].iter().any(|t| t.0.track_op()),
            winners: Default::default(),
        };
        self.engine_result((|| {
            let (kernel, bias) = (kernel.0.contiguous()?, bias.0.contiguous()?);
            x.0.contiguous()?.apply_op3(&kernel, &bias, op)
        })())
        .map(Value)
    }

    fn pool2d(
        &self,
        x: &Value,
        kind: PoolKind,
        [kh, kw]: [usize; 2],
        [sh, sw]: [usize; 2],
    ) -> convkit_core::Result<Value> {
        let tiled = (kh, kw) == (sh, sw);
        self.engine_result(match kind {
            PoolKind::Max if self.device.is_cpu() => x.0.contiguous().and_then(|x| {
                x.apply_op1(pool::MaxPool2d(convkit_cpu::pool::MaxPool2d::new(
                    [kh, kw],
                    [sh, sw],
                )))
            }),
            // candle's own max-pool forward is right; only its backward is not.
            PoolKind::Max if tiled && !x.0.track_op() => {
                x.0.max_pool2d_with_stride((kh, kw), (sh, sw))
            }
            PoolKind::Max if tiled => tiled_max_pool(&x.0, (kh, kw)),
            PoolKind::Average if tiled => x.0.avg_pool2d_with_stride((kh, kw), (sh, sw)),
            PoolKind::Max => windowed_pool(&x.0, (kh, kw), (sh, sw), true),
            PoolKind::Average => windowed_pool(&x.0, (kh, kw), (sh, sw), false),
        })
        .map(Value)
    }

    fn dense(&self, x: &Value, kernel: &Value, bias: &Value) -> convkit_core::Result<Value> {
        if self.device.is_cpu() && x.0.rank() == 2 {
            return self
                .engine_result((|| {
                    let (kernel, bias) = (kernel.0.contiguous()?, bias.0.contiguous()?);
                    x.0.contiguous()?.apply_op3(&kernel, &bias, dense::Dense)
                })())
                .map(Value);
        }
        self.engine_result(
            kernel
                .0
                .t()
                .and_then(|k| x.0.matmul(&k))
                .and_then(|y| y.broadcast_add(&bias.0)),
        )
        .map(Value)
    }

    fn dims(&self, x: &Value) -> Vec<usize> {
        x.0.dims().to_vec()
    }

    fn reshape(&self, x: &Value, shape: &[usize]) -> convkit_core::Result<Value> {
        self.engine_result(x.0.reshape(shape)).map(Value)
    }

    fn permute(&self, x: &Value, axes: &[usize]) -> convkit_core::Result<Value> {
        self.engine_result(x.0.permute(axes)).map(Value)
    }

    fn unary(&self, op: Unary, x: &Value) -> convkit_core::Result<Value> {
        let x = &x.0;
        self.engine_result(match op {
            Unary::Relu if self.device.is_cpu() => {
                x.contiguous().and_then(|x| x.apply_op1(relu::Relu))
            }
            Unary::Relu => relu(x),
            Unary::Sigmoid => candle_nn::ops::sigmoid(x),
            Unary::Tanh => x.tanh(),
            Unary::Exp => x.exp(),
            Unary::Log => x.log(),
        })
        .map(Value)
    }

    fn binary(&self, op: Binary, a: &Value, b: &Value) -> convkit_core::Result<Value> {
        let (a, b) = (&a.0, &b.0);
        self.engine_result(match op {
            Binary::Add => a.broadcast_add(b),
            Binary::Sub => a.broadcast_sub(b),
            Binary::Mul => a.broadcast_mul(b),
            Binary::Div => a.broadcast_div(b),
        })
        .map(Value)
    }

    fn reduce(&self, op: Reduction, x: &Value, axes: &[usize]) -> convkit_core::Result<Value> {
        self.engine_result(match op {
            Reduction::Sum => x.0.sum_keepdim(axes),
            Reduction::Max => axes
                .iter()
                .try_fold(x.0.clone(), |t, &axis| t.max_keepdim(axis)),
        })
        .map(Value)
    }
}

/// Non-overlapping max pooling with Keras'/PyTorch's gradient: all of it to the first
/// maximum of each window. candle's own `max_pool2d` backward (0.11.1) scales the gradient by
/// the share of maxima in the window (¼ for a unique maximum in 2×2), and its `max` reduction
/// gives every tied maximum the whole gradient (saturated image patches tie). So each window
/// becomes a row, its first maximum is picked by `argmax`, and the output is the sum of the row
/// under that one-hot mask. Rows/columns that do not fill a window are dropped, as Keras does.
fn tiled_max_pool(x: &Tensor, (kh, kw): (usize, usize)) -> candle_core::Result<Tensor> {
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
    (windows * mask)?.sum(4)
}

/// Pooling whose stride differs from its window, from shifted slices (candle's pooling ops
/// have no backward pass for that case): max/sum over the window offsets at stride 1, then
/// every `stride`-th row and column.
fn windowed_pool(
    x: &Tensor,
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    max: bool,
) -> candle_core::Result<Tensor> {
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
    let pick = |n: usize, s: usize| -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = (0..n).step_by(s).map(|i| i as u32).collect();
        let len = idx.len();
        Tensor::from_vec(idx, len, x.device())
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
fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x * x.gt(0.0)?.to_dtype(x.dtype())?
}
