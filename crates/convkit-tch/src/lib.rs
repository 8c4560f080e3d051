//! The libtorch engine for convkit, through tch: the tensor operations core's executor runs a
//! network with, on libtorch's CPU or CUDA device. libtorch's own conv `[out, in, kh, kw]` and
//! linear `[out, in]` layouts are the canonical ones.
//!
//! libtorch comes from the `torch==2.9.0` wheel (`cargo xtask setup`); `LIBTORCH` is
//! respected. The thread count is convkit's one knob ([`convkit_core::threads`]).

use convkit_core::exec::Engine;
use convkit_core::optim::TensorMath;
use convkit_core::plan::PoolKind;
use convkit_core::primitives::{Binary, Ops, Reduction, Unary};
use tch::{Device, Kind, Tensor};

/// Errors of the tch engine; they reach users as [`convkit_core::Error::Engine`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// libtorch on one device (`tch-cpu`, or `tch-cuda` when libtorch sees a GPU).
#[derive(Debug, Clone)]
pub struct TchBackend {
    device: Device,
    name: &'static str,
}

/// libtorch's intra-op threads, as convkit's one knob chose ([`convkit_core::threads`]).
fn set_threads() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let threads = convkit_core::threads::chosen().count();
        tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX).max(1));
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

impl Engine for TchBackend {
    type Ops = TchOps;

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

    fn ops(&self) -> TchOps {
        TchOps {
            device: self.device,
            engine: self.name,
        }
    }
}

/// libtorch's operations on one device, for core's executor.
pub struct TchOps {
    device: Device,
    engine: &'static str,
}

impl TchOps {
    fn engine_result<T>(
        &self,
        r: std::result::Result<T, tch::TchError>,
    ) -> convkit_core::Result<T> {
        r.map_err(|e| convkit_core::Error::engine(self.engine, Error::from(e)))
    }
}

/// A libtorch tensor as core's executor and optimizer rules see it.
pub struct Value(Tensor);

impl Clone for Value {
    /// Shares the storage, as a tensor handle does.
    fn clone(&self) -> Self {
        Value(self.0.shallow_clone())
    }
}

/// A tch result as core's value, its error as the engine's.
fn value_of(r: std::result::Result<Tensor, tch::TchError>) -> convkit_core::Result<Value> {
    r.map(Value)
        .map_err(|e| convkit_core::Error::engine("tch", e))
}

impl TensorMath for Value {
    fn zeros_like(&self) -> convkit_core::Result<Self> {
        value_of(self.0.f_zeros_like())
    }
    fn affine(&self, mul: f64, add: f64) -> convkit_core::Result<Self> {
        value_of(self.0.f_mul_scalar(mul).and_then(|t| t.f_add_scalar(add)))
    }
    fn add(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(self.0.f_add(&rhs.0))
    }
    fn sub(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(self.0.f_sub(&rhs.0))
    }
    fn mul(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(self.0.f_mul(&rhs.0))
    }
    fn div(&self, rhs: &Self) -> convkit_core::Result<Self> {
        value_of(self.0.f_div(&rhs.0))
    }
    fn sqr(&self) -> convkit_core::Result<Self> {
        value_of(self.0.f_square())
    }
    fn sqrt(&self) -> convkit_core::Result<Self> {
        value_of(self.0.f_sqrt())
    }
    fn sign(&self) -> convkit_core::Result<Self> {
        value_of(self.0.f_sign())
    }
    fn sum(&self) -> convkit_core::Result<f64> {
        self.0
            .f_sum(Kind::Double)
            .and_then(f64::try_from)
            .map_err(|e| convkit_core::Error::engine("tch", e))
    }
}

fn i64s(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

impl Ops for TchOps {
    type Tensor = Value;

    fn engine(&self) -> &str {
        self.engine
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> convkit_core::Result<Value> {
        self.engine_result(
            Tensor::f_from_slice(data)
                .and_then(|t| t.f_reshape(i64s(shape)))
                .and_then(|t| t.f_to_device(self.device)),
        )
        .map(Value)
    }

    fn download(&self, t: &Value) -> convkit_core::Result<Vec<f32>> {
        self.engine_result(
            t.0.detach()
                .f_to_device(Device::Cpu)
                .and_then(|t| t.f_flatten(0, -1))
                .and_then(Vec::<f32>::try_from),
        )
    }

    /// Kept channels-last in memory (an NCHW view of the NHWC values): libtorch's CPU
    /// convolutions and pooling run about twice as fast on it as on NCHW-contiguous tensors.
    fn images(&self, shape: [usize; 4], data: &[f32]) -> convkit_core::Result<Value> {
        self.engine_result(
            Tensor::f_from_slice(data)
                .and_then(|t| t.f_reshape(i64s(&shape)))
                .and_then(|t| t.f_to_device(self.device))
                .and_then(|t| t.f_permute([0, 3, 1, 2]))
                .and_then(|t| t.f_contiguous()),
        )
        .map(Value)
    }

    fn variable(&self, value: Value) -> convkit_core::Result<Value> {
        Ok(Value(value.0.detach().set_requires_grad(true)))
    }

    fn assign(&self, variable: &mut Value, value: Value) -> convkit_core::Result<()> {
        self.engine_result(tch::no_grad(|| variable.0.f_copy_(&value.0)))
    }

    fn read(&self, variable: &Value, grad: bool) -> Value {
        if grad {
            variable.clone()
        } else {
            Value(variable.0.detach())
        }
    }

    fn gradients(&self, loss: &Value, wrt: &[&Value]) -> convkit_core::Result<Vec<Option<Value>>> {
        let inputs: Vec<&Tensor> = wrt.iter().map(|t| &t.0).collect();
        let grads =
            self.engine_result(Tensor::f_run_backward(&[&loss.0], &inputs, false, false))?;
        Ok(grads
            .into_iter()
            .map(|g| g.defined().then(|| Value(g)))
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
        let (w, b) = (&kernel.0, Some(&bias.0));
        self.engine_result(if top == bottom && left == right {
            x.0.f_conv2d(w, b, i64s(&strides), [top as i64, left as i64], [1, 1], 1)
        } else {
            x.0.f_constant_pad_nd([left as i64, right as i64, top as i64, bottom as i64])
                .and_then(|x| x.f_conv2d(w, b, i64s(&strides), [0, 0], [1, 1], 1))
        })
        .map(Value)
    }

    fn pool2d(
        &self,
        x: &Value,
        kind: PoolKind,
        size: [usize; 2],
        strides: [usize; 2],
    ) -> convkit_core::Result<Value> {
        let (size, strides) = (i64s(&size), i64s(&strides));
        self.engine_result(match kind {
            PoolKind::Max => x.0.f_max_pool2d(&size, &strides, [0, 0], [1, 1], false),
            PoolKind::Average => {
                x.0.f_avg_pool2d(&size, &strides, [0, 0], false, true, None::<i64>)
            }
        })
        .map(Value)
    }

    fn dense(&self, x: &Value, kernel: &Value, bias: &Value) -> convkit_core::Result<Value> {
        self.engine_result(x.0.f_linear(&kernel.0, Some(&bias.0)))
            .map(Value)
    }

    fn dims(&self, x: &Value) -> Vec<usize> {
        x.0.size().iter().map(|&d| d as usize).collect()
    }

    fn reshape(&self, x: &Value, shape: &[usize]) -> convkit_core::Result<Value> {
        self.engine_result(x.0.f_reshape(i64s(shape))).map(Value)
    }

    fn permute(&self, x: &Value, axes: &[usize]) -> convkit_core::Result<Value> {
        self.engine_result(x.0.f_permute(i64s(axes))).map(Value)
    }

    fn unary(&self, op: Unary, x: &Value) -> convkit_core::Result<Value> {
        let x = &x.0;
        self.engine_result(match op {
            Unary::Relu => x.f_relu(),
            Unary::Sigmoid => x.f_sigmoid(),
            Unary::Tanh => x.f_tanh(),
            Unary::Exp => x.f_exp(),
            Unary::Log => x.f_log(),
        })
        .map(Value)
    }

    fn binary(&self, op: Binary, a: &Value, b: &Value) -> convkit_core::Result<Value> {
        let (a, b) = (&a.0, &b.0);
        self.engine_result(match op {
            Binary::Add => a.f_add(b),
            Binary::Sub => a.f_sub(b),
            Binary::Mul => a.f_mul(b),
            Binary::Div => a.f_div(b),
        })
        .map(Value)
    }

    fn reduce(&self, op: Reduction, x: &Value, axes: &[usize]) -> convkit_core::Result<Value> {
        let axes = i64s(axes);
        self.engine_result(match op {
            Reduction::Sum => x.0.f_sum_dim_intlist(axes.as_slice(), true, Kind::Float),
            Reduction::Max => x.0.f_amax(axes.as_slice(), true),
        })
        .map(Value)
    }
}
