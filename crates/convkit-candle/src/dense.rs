//! The Dense layer on the CPU, `y = x · kernelᵀ + bias`, forward and backward, as candle
//! custom ops over convkit-cpu's kernel ([`convkit_cpu::dense`]).
//!
//! candle's `matmul` of a small batch (32 × 1600 by 1600 × 128 in the tutorial's model) ran on
//! the calling thread alone, and the bias's `broadcast_add` added a reduction to the backward.
//! Here each GEMM is shared out between candle's CPU threads by output rows, the bias is where
//! the output starts, and its gradient is one pass over `dy`. The input gradient is computed
//! only when the input is tracked.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use convkit_cpu::dense::{Dense as Kernel, KernelLayout};

use crate::host::{kernel_result, values};
use crate::threads::CandleThreads;

/// The name errors give the op.
const OP: &str = "convkit dense";

/// `x [n, inputs]`, `kernel [units, inputs]`, `bias [units]` → `y [n, units]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dense;

/// The product's sizes from the input's and the kernel's dims.
fn sizes(x: &[usize], kernel: &[usize]) -> Result<Kernel> {
    match (x, kernel) {
        (&[n, inputs], &[units, k_inputs]) if inputs == k_inputs => {
            Ok(Kernel::new(n, inputs, units, KernelLayout::UnitsByInputs))
        }
        _ => candle_core::bail!(
            "{OP}: expected an input [n, inputs] and a kernel [units, inputs], found {x:?} and {kernel:?}"
        ),
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "convkit-dense"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = sizes(xl.dims(), kl.dims())?;
        let (x, kernel) = (values(xs, xl, OP, "input")?, values(ks, kl, OP, "kernel")?);
        let bias = values(bs, bl, OP, "bias")?;
        let y = kernel_result(d.forward(&CandleThreads, x, kernel, bias))?;
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.units))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = sizes(x.dims(), kernel.dims())?;
        let dy = dy.contiguous()?;
        let dx = (x.track_op())
            .then(|| dy.apply_op2_no_bwd(&kernel.contiguous()?, &Grad::Input(d)))
            .transpose()?;
        let dk = (kernel.track_op())
            .then(|| dy.apply_op2_no_bwd(&x.contiguous()?, &Grad::Kernel(d)))
            .transpose()?;
        let db = (bias.track_op())
            .then(|| dy.apply_op1_no_bwd(&BiasGrad(d)))
            .transpose()?;
        Ok((dx, dk, db))
    }
}

/// A gradient from `dy` and one operand: the input's `dy · kernel`, `[n, inputs]`, or the
/// kernel's `dyᵀ · x`, `[units, inputs]`.
enum Grad {
    Input(Kernel),
    Kernel(Kernel),
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        "convkit-dense-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, operand) = (
            values(dys, dyl, OP, "gradient")?,
            values(os, ol, OP, "operand")?,
        );
        let (values, shape) = match self {
            Grad::Input(d) => (d.input_grad(&CandleThreads, dy, operand), (d.n, d.inputs)),
            Grad::Kernel(d) => (
                d.kernel_grad(&CandleThreads, operand, dy),
                (d.units, d.inputs),
            ),
        };
        Ok((CpuStorage::F32(kernel_result(values)?), Shape::from(shape)))
    }
}

/// `dbias [units]`: each unit's sum of `dy [n, units]` over the rows.
struct BiasGrad(Kernel);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "convkit-dense-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = values(dys, dyl, OP, "output gradient")?;
        let db = kernel_result(self.0.bias_grad(dy))?;
        Ok((CpuStorage::F32(db), Shape::from(self.0.units)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_matches_candle, random_var};
    use candle_core::Device;

    /// Forward and the three gradients against candle's matmul and broadcast add, for batches
    /// that split evenly between threads and ones that do not.
    #[test]
    fn matches_candles_matmul_forward_and_backward() {
        for (n, inputs, units) in [(1, 3, 2), (5, 7, 3), (32, 40, 9)] {
            assert_matches_candle(
                Dense,
                [&[n, inputs], &[units, inputs], &[units]],
                |x, k, b| x.matmul(&k.t()?)?.broadcast_add(b),
                [1e-4, 1e-4],
                &format!("{n}×{inputs}→{units}"),
            );
        }
    }

    #[test]
    fn the_input_gradient_is_skipped_for_a_constant_input_and_bad_shapes_are_errors() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 3), &device).unwrap();
        let (k, b) = (random_var(&[2, 3]), random_var(&[2]));
        let y = x.apply_op3(k.as_tensor(), b.as_tensor(), Dense).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(k.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        let wrong = Tensor::zeros((2, 5), candle_core::DType::F32, &device).unwrap();
        let err = x.apply_op3(&wrong, b.as_tensor(), Dense).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected an input [n, inputs] and a kernel [units, inputs]"),
            "{err}"
        );
    }
}
