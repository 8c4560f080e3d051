//! The Dense layer on the CPU, `y = x · kernelᵀ + bias`, forward and backward, as a candle
//! custom op.
//!
//! candle's `matmul` of a small batch (32 × 1600 by 1600 × 128 in the tutorial's model) ran on
//! the calling thread alone, and the bias's `broadcast_add` added a reduction to the backward.
//! Here each GEMM is shared out between candle's CPU threads by output rows (so every sum runs
//! whole on one thread, the same on every run), the bias is where the output starts, and its
//! gradient is one pass over `dy`. The input gradient is computed only when the input is
//! tracked.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::host::{matmul, values};
use crate::threads::for_each_share;

/// The name errors give the op.
const OP: &str = "convkit dense";

/// `x [n, inputs]`, `kernel [units, inputs]`, `bias [units]` → `y [n, units]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dense;

/// `(n, inputs, units)` from the input's and the kernel's dims.
fn sizes(x: &[usize], kernel: &[usize]) -> Result<(usize, usize, usize)> {
    match (x, kernel) {
        (&[n, inputs], &[units, k_inputs]) if inputs == k_inputs => Ok((n, inputs, units)),
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
        let (n, inputs, units) = sizes(xl.dims(), kl.dims())?;
        let (x, kernel) = (values(xs, xl, OP, "input")?, values(ks, kl, OP, "kernel")?);
        let bias = values(bs, bl, OP, "bias")?;
        if bias.len() != units {
            candle_core::bail!(
                "{OP}: expected a bias of {units} values, found {:?}",
                bl.dims()
            )
        }
        let mut y = vec![0f32; n * units];
        for_each_share(&mut y, units, |rows, y| {
            for row in y.chunks_exact_mut(units) {
                row.copy_from_slice(bias);
            }
            matmul(
                (rows.len(), units, inputs),
                y,
                (units, 1),
                true,
                &x[rows.start * inputs..],
                (inputs, 1),
                kernel,
                (1, inputs),
                gemm::Parallelism::None,
            );
        });
        Ok((CpuStorage::F32(y), Shape::from((n, units))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = (x.track_op())
            .then(|| dy.apply_op2_no_bwd(&kernel.contiguous()?, &InputGrad))
            .transpose()?;
        let dk = (kernel.track_op())
            .then(|| dy.apply_op2_no_bwd(&x.contiguous()?, &KernelGrad))
            .transpose()?;
        let db = (bias.track_op())
            .then(|| dy.apply_op1_no_bwd(&BiasGrad))
            .transpose()?;
        Ok((dx, dk, db))
    }
}

/// `dx [n, inputs] = dy [n, units] · kernel [units, inputs]`.
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "convkit-dense-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[n, units], &[k_units, inputs]) = (dyl.dims(), kl.dims()) else {
            candle_core::bail!(
                "{OP}: expected dy [n, units] and a kernel [units, inputs], found {:?} and {:?}",
                dyl.dims(),
                kl.dims()
            )
        };
        if units != k_units {
            candle_core::bail!("{OP}: dy has {units} units, the kernel {k_units}")
        }
        let (dy, kernel) = (
            values(dys, dyl, OP, "output gradient")?,
            values(ks, kl, OP, "kernel")?,
        );
        let mut dx = vec![0f32; n * inputs];
        for_each_share(&mut dx, inputs, |rows, dx| {
            matmul(
                (rows.len(), inputs, units),
                dx,
                (inputs, 1),
                false,
                &dy[rows.start * units..],
                (units, 1),
                kernel,
                (inputs, 1),
                gemm::Parallelism::None,
            );
        });
        Ok((CpuStorage::F32(dx), Shape::from((n, inputs))))
    }
}

/// `dkernel [units, inputs] = dyᵀ [units, n] · x [n, inputs]`.
struct KernelGrad;

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "convkit-dense-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[n, units], &[x_n, inputs]) = (dyl.dims(), xl.dims()) else {
            candle_core::bail!(
                "{OP}: expected dy [n, units] and an input [n, inputs], found {:?} and {:?}",
                dyl.dims(),
                xl.dims()
            )
        };
        if n != x_n {
            candle_core::bail!("{OP}: dy has {n} rows, the input {x_n}")
        }
        let (dy, x) = (
            values(dys, dyl, OP, "output gradient")?,
            values(xs, xl, OP, "input")?,
        );
        let mut dk = vec![0f32; units * inputs];
        for_each_share(&mut dk, inputs, |units_here, dk| {
            matmul(
                (units_here.len(), inputs, n),
                dk,
                (inputs, 1),
                false,
                &dy[units_here.start..],
                (1, units),
                x,
                (inputs, 1),
                gemm::Parallelism::None,
            );
        });
        Ok((CpuStorage::F32(dk), Shape::from((units, inputs))))
    }
}

/// `dbias [units]`: each unit's sum of `dy [n, units]` over the rows, in row order, in f64.
struct BiasGrad;

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "convkit-dense-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[_, units] = dyl.dims() else {
            candle_core::bail!("{OP}: expected dy [n, units], found {:?}", dyl.dims())
        };
        let dy = values(dys, dyl, OP, "output gradient")?;
        let mut sums = vec![0f64; units];
        for row in dy.chunks_exact(units) {
            for (sum, &v) in sums.iter_mut().zip(row) {
                *sum += v as f64;
            }
        }
        let db: Vec<f32> = sums.into_iter().map(|s| s as f32).collect();
        Ok((CpuStorage::F32(db), Shape::from(units)))
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
