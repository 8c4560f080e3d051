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

use crate::host::{matmul_by_rows, values};

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
        let mut y = bias.repeat(n);
        matmul_by_rows(
            &mut y,
            (units, inputs),
            true,
            x,
            (inputs, 1),
            kernel,
            (1, inputs),
        );
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
            .then(|| {
                dy.apply_op2_no_bwd(
                    &kernel.contiguous()?,
                    &Product {
                        lhs_transposed: false,
                    },
                )
            })
            .transpose()?;
        let dk = (kernel.track_op())
            .then(|| {
                dy.apply_op2_no_bwd(
                    &x.contiguous()?,
                    &Product {
                        lhs_transposed: true,
                    },
                )
            })
            .transpose()?;
        let db = (bias.track_op())
            .then(|| dy.apply_op1_no_bwd(&BiasGrad))
            .transpose()?;
        Ok((dx, dk, db))
    }
}

/// The product of two 2-D tensors, the left one read transposed or not: the input gradient
/// `dy [n, units] · kernel [units, inputs]` and the kernel gradient
/// `dyᵀ [units, n] · x [n, inputs]`.
struct Product {
    lhs_transposed: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "convkit-dense-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[l_rows, l_cols], &[k, n]) = (ll.dims(), rl.dims()) else {
            candle_core::bail!(
                "{OP} gradient: expected two matrices, found {:?} and {:?}",
                ll.dims(),
                rl.dims()
            )
        };
        let (m, l_k, lhs_strides) = match self.lhs_transposed {
            false => (l_rows, l_cols, (l_cols, 1)),
            true => (l_cols, l_rows, (1, l_cols)),
        };
        if l_k != k {
            candle_core::bail!(
                "{OP} gradient: {:?}{} by {:?} do not multiply",
                ll.dims(),
                if self.lhs_transposed {
                    " transposed"
                } else {
                    ""
                },
                rl.dims()
            )
        }
        let (lhs, rhs) = (
            values(ls, ll, OP, "gradient")?,
            values(rs, rl, OP, "operand")?,
        );
        let mut out = vec![0f32; m * n];
        matmul_by_rows(&mut out, (n, k), false, lhs, lhs_strides, rhs, (n, 1));
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
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
