//! ReLU on the CPU as one pass forward and one backward, as candle custom ops.
//!
//! candle 0.11.1's own `relu` passes the gradient at exactly 0; Keras and PyTorch give 0
//! there, which matters on real images (a blank patch gives a pre-activation of exactly 0 at
//! initialisation, with zero biases). The engine's device-neutral workaround, `x · (x > 0)`,
//! takes three passes forward and two back; this takes one each. NaN stays NaN.

use crate::host::values;
use crate::threads::for_each_chunk;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The name errors give the op.
const OP: &str = "convkit relu";

/// Elements per parallel task: large enough to amortise the hand-off.
const CHUNK: usize = 16 * 1024;

/// `max(x, 0)`, with a gradient of 0 wherever the output is not positive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "convkit-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(storage, layout, OP, "input")?;
        let mut y = vec![0f32; x.len()];
        for_each_chunk(
            &mut y,
            CHUNK,
            || (),
            |(), i, y| {
                for (y, &x) in y.iter_mut().zip(&x[i * CHUNK..]) {
                    *y = if x <= 0.0 { 0.0 } else { x };
                }
            },
        );
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op2_no_bwd(y, &ReluGrad)?))
    }
}

/// `dy` where the ReLU's output `y` is positive, 0 elsewhere.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "convkit-relu-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, y) = (
            values(dys, dyl, OP, "output gradient")?,
            values(ys, yl, OP, "output")?,
        );
        let mut dx = vec![0f32; dy.len()];
        for_each_chunk(
            &mut dx,
            CHUNK,
            || (),
            |(), i, dx| {
                let (dy, y) = (&dy[i * CHUNK..], &y[i * CHUNK..]);
                for ((dx, &dy), &y) in dx.iter_mut().zip(dy).zip(y) {
                    *dx = if y > 0.0 { dy } else { 0.0 };
                }
            },
        );
        Ok((CpuStorage::F32(dx), dyl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn zero_gradient_at_zero_and_nan_kept() {
        let x = Var::new(&[-1f32, 0.0, 2.0, f32::NAN], &Device::Cpu).unwrap();
        let y = x.as_tensor().apply_op1(Relu).unwrap();
        let v = y.to_vec1::<f32>().unwrap();
        assert_eq!(&v[..3], &[0.0, 0.0, 2.0]);
        assert!(v[3].is_nan());
        let weights = Tensor::new(&[1f32, 1.0, 3.0, 0.0], &Device::Cpu).unwrap();
        let grads = (y.mul(&weights).unwrap().narrow(0, 0, 3).unwrap())
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, [0.0, 0.0, 3.0, 0.0]);
    }
}
