//! ReLU on the CPU as candle custom ops over convkit-cpu's one-pass kernels
//! ([`convkit_cpu::relu`]).
//!
//! candle 0.11.1's own `relu` passes the gradient at exactly 0; Keras and PyTorch give 0
//! there, which matters on real images (a blank patch gives a pre-activation of exactly 0 at
//! initialisation, with zero biases). The engine's device-neutral workaround, `x · (x > 0)`,
//! takes three passes forward and two back; this takes one each. NaN stays NaN.

use crate::host::{kernel_result, values};
use crate::threads::CandleThreads;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The name errors give the op.
const OP: &str = "convkit relu";

/// `max(x, 0)`, with a gradient of 0 wherever the output is not positive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "convkit-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = values(storage, layout, OP, "input")?;
        let y = convkit_cpu::relu::forward(&CandleThreads, x);
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
        let dx = kernel_result(convkit_cpu::relu::backward(&CandleThreads, dy, y))?;
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
