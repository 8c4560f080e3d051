//! Max pooling on the CPU as candle custom ops over convkit-cpu's one-pass kernels
//! ([`convkit_cpu::pool`]).
//!
//! candle 0.11.1's own `max_pool2d` backward scales the gradient by the share of maxima in the
//! window, and has none for a stride other than the window. Keras (TensorFlow) and PyTorch
//! give all of a window's gradient to its first maximum; so does convkit-cpu's, for any window
//! and stride.

use crate::host::{kernel_result, values};
use crate::threads::CandleThreads;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use convkit_cpu::pool::{MaxPool2d as Kernel, MaxPool2dShape};

/// The name errors give the op.
const OP: &str = "convkit max_pool2d";

/// Max pooling of NCHW input ([`convkit_cpu::pool::MaxPool2d`]) as a candle op.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPool2d(pub Kernel);

impl MaxPool2d {
    fn shape(&self, dims: &[usize]) -> Result<MaxPool2dShape> {
        kernel_result(self.0.shape(dims))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "convkit-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = self.shape(layout.dims())?;
        let x = values(storage, layout, OP, "input")?;
        let y = kernel_result(s.forward(&CandleThreads, x))?;
        Ok((CpuStorage::F32(y), Shape::from(&s.output()[..])))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(
            &dy.contiguous()?,
            &MaxPool2dGrad(*self),
        )?))
    }
}

/// The input gradient of [`MaxPool2d`]: each output's gradient to its window's first maximum.
struct MaxPool2dGrad(MaxPool2d);

impl CustomOp2 for MaxPool2dGrad {
    fn name(&self) -> &'static str {
        "convkit-max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.0.shape(xl.dims())?;
        let (x, dy) = (
            values(xs, xl, OP, "input")?,
            values(dys, dyl, OP, "output gradient")?,
        );
        let dx = kernel_result(s.backward(&CandleThreads, x, dy))?;
        Ok((CpuStorage::F32(dx), Shape::from(xl.dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Through candle's autodiff: the gradient reaches the first maximum of each window (the
    /// kernel's own tests cover ties and NaNs against a plain scan).
    #[test]
    fn the_gradient_goes_to_the_first_maximum_through_candle() {
        let plane = [
            1.0, 1.0, 0.0, 5.0, //
            1.0, 1.0, 2.0, 0.0, //
            0.0, 3.0, 0.0, 0.0, //
            9.0, 0.0, 0.0, 4.0f32,
        ];
        let x = Var::from_tensor(&Tensor::from_slice(&plane, (1, 1, 4, 4), &Device::Cpu).unwrap())
            .unwrap();
        let y = x
            .as_tensor()
            .apply_op1(MaxPool2d(Kernel::new([2, 2], [2, 2])))
            .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 5.0, 9.0, 4.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap();
        let mut expected = [0f32; 16];
        for i in [0, 3, 12, 15] {
            expected[i] = 1.0;
        }
        assert_eq!(
            dx.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected
        );
    }
}
