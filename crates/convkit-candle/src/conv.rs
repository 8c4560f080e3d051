//! Convolution on the CPU as candle custom ops over convkit-cpu's im2col + GEMM kernels
//! ([`convkit_cpu::conv`]), forward and backward.
//!
//! candle 0.11's CPU `conv2d` is fine forward, but its backward computes the input gradient
//! with a direct `conv_transpose2d` loop (SIMD only when built for AVX2) even for a first
//! layer whose input needs none, and the kernel gradient as a convolution with an
//! image-sized kernel. Here the input gradient is computed only when the input is tracked,
//! and the bias is part of the op (candle's broadcast-add backward would reduce over three
//! strided axes, which took a sixth of a training step).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;

use convkit_cpu::conv::{Conv2d as Kernel, Conv2dShape};
use convkit_cpu::conv_relu_pool::ConvReluMaxPoolShape;
use convkit_cpu::pool::MaxPool2d;

use crate::host::{kernel_result, values};
use crate::threads::CandleThreads;

/// The name errors give the op.
const OP: &str = "convkit conv2d";

/// A convolution ([`convkit_cpu::conv::Conv2d`]) as a candle op: input `[n, c, h, w]`,
/// kernel `[o, c, kh, kw]`, bias `[o]` → `[n, o, oh, ow]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2d(pub Kernel);

impl Conv2d {
    fn shape(&self, x: &[usize], kernel: &[usize]) -> Result<Conv2dShape> {
        kernel_result(self.0.shape(x, kernel))
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "convkit-conv2d"
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
        let s = self.shape(xl.dims(), kl.dims())?;
        let (x, kernel) = (values(xs, xl, OP, "input")?, values(ks, kl, OP, "kernel")?);
        let bias = values(bs, bl, OP, "bias")?;
        let y = kernel_result(s.forward(&CandleThreads, x, kernel, bias))?;
        Ok((CpuStorage::F32(y), Shape::from(&s.output()[..])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        conv_grads(
            self.shape(x.dims(), kernel.dims())?,
            x,
            kernel,
            bias,
            &dy.contiguous()?,
        )
    }
}

/// The gradients of the convolution `s`'s operands from `dy`, the gradient at its output
/// (contiguous): each where its operand is tracked (not the images' of a first layer).
fn conv_grads(
    s: Conv2dShape,
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    dy: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dx = (x.track_op())
        .then(|| dy.apply_op2_no_bwd(&kernel.contiguous()?, &InputGrad(s)))
        .transpose()?;
    let dk = (kernel.track_op())
        .then(|| x.contiguous()?.apply_op2_no_bwd(dy, &KernelGrad(s)))
        .transpose()?;
    let db = (bias.track_op())
        .then(|| dy.apply_op1_no_bwd(&BiasGrad(s)))
        .transpose()?;
    Ok((dx, dk, db))
}

/// A convolution, its ReLU and a max pooling
/// ([`convkit_cpu::conv_relu_pool::ConvReluMaxPoolShape`]) as one candle op: input
/// `[n, c, h, w]`, kernel `[o, c, kh, kw]`, bias `[o]` → `[n, o, ph, pw]`. Made for one call:
/// the forward keeps each window's winner here, for the backward, when `for_grad`.
#[derive(Debug)]
pub(crate) struct ConvReluMaxPool {
    pub conv: Kernel,
    pub pool: MaxPool2d,
    /// Whether a backward will follow (an operand is tracked), so the winners are kept.
    pub for_grad: bool,
    pub winners: OnceLock<Vec<u32>>,
}

impl ConvReluMaxPool {
    fn shape(&self, x: &[usize], kernel: &[usize]) -> Result<ConvReluMaxPoolShape> {
        let conv = kernel_result(self.conv.shape(x, kernel))?;
        kernel_result(ConvReluMaxPoolShape::new(conv, self.pool))
    }
}

impl CustomOp3 for ConvReluMaxPool {
    fn name(&self) -> &'static str {
        "convkit-conv2d-relu-max-pool2d"
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
        let s = self.shape(xl.dims(), kl.dims())?;
        let (x, kernel) = (values(xs, xl, OP, "input")?, values(ks, kl, OP, "kernel")?);
        let bias = values(bs, bl, OP, "bias")?;
        let y = if self.for_grad {
            let (y, winners) =
                kernel_result(s.forward_with_winners(&CandleThreads, x, kernel, bias))?;
            if self.winners.set(winners).is_err() {
                candle_core::bail!("{OP}: one op instance was run forward twice");
            }
            y
        } else {
            kernel_result(s.forward(&CandleThreads, x, kernel, bias))?
        };
        Ok((CpuStorage::F32(y), Shape::from(&s.output()[..])))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(winners) = self.winners.get() else {
            candle_core::bail!("{OP}: a backward without a forward that kept the winners");
        };
        let s = self.shape(x.dims(), kernel.dims())?;
        let dy = dy.contiguous()?;
        let dx = (x.track_op())
            .then(|| dy.apply_op2_no_bwd(&kernel.contiguous()?, &PooledInputGrad { s, winners }))
            .transpose()?;
        let dk = (kernel.track_op())
            .then(|| {
                x.contiguous()?
                    .apply_op2_no_bwd(&dy, &PooledKernelGrad { s, winners })
            })
            .transpose()?;
        let db = (bias.track_op())
            .then(|| dy.apply_op1_no_bwd(&PooledBiasGrad { s, winners }))
            .transpose()?;
        Ok((dx, dk, db))
    }
}

/// [`ConvReluMaxPoolShape::input_grad`], `[n, c, h, w]`, from the pooled output's gradient,
/// the kernel and the forward's winners.
struct PooledInputGrad<'w> {
    s: ConvReluMaxPoolShape,
    winners: &'w [u32],
}

impl CustomOp2 for PooledInputGrad<'_> {
    fn name(&self) -> &'static str {
        "convkit-conv2d-relu-max-pool2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, kernel) = (
            values(dys, dyl, OP, "output gradient")?,
            values(ks, kl, OP, "kernel")?,
        );
        let dx = self.s.input_grad(&CandleThreads, dy, self.winners, kernel);
        Ok((
            CpuStorage::F32(kernel_result(dx)?),
            Shape::from(&self.s.conv.input()[..]),
        ))
    }
}

/// [`ConvReluMaxPoolShape::kernel_grad`], `[o, c, kh, kw]`, from the input, the pooled
/// output's gradient and the forward's winners.
struct PooledKernelGrad<'w> {
    s: ConvReluMaxPoolShape,
    winners: &'w [u32],
}

impl CustomOp2 for PooledKernelGrad<'_> {
    fn name(&self) -> &'static str {
        "convkit-conv2d-relu-max-pool2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (
            values(xs, xl, OP, "input")?,
            values(dys, dyl, OP, "output gradient")?,
        );
        let dk = self.s.kernel_grad(&CandleThreads, x, dy, self.winners);
        Ok((
            CpuStorage::F32(kernel_result(dk)?),
            Shape::from(&self.s.conv.kernel()[..]),
        ))
    }
}

/// [`ConvReluMaxPoolShape::bias_grad`], `[o]`, from the pooled output's gradient and the
/// forward's winners.
struct PooledBiasGrad<'w> {
    s: ConvReluMaxPoolShape,
    winners: &'w [u32],
}

impl CustomOp1 for PooledBiasGrad<'_> {
    fn name(&self) -> &'static str {
        "convkit-conv2d-relu-max-pool2d-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = values(dys, dyl, OP, "output gradient")?;
        let db = self.s.bias_grad(&CandleThreads, dy, self.winners);
        Ok((
            CpuStorage::F32(kernel_result(db)?),
            Shape::from(self.s.conv.o),
        ))
    }
}

/// The bias gradient [`Conv2dShape::bias_grad`], `[o]`, from `dy`.
struct BiasGrad(Conv2dShape);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "convkit-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = values(dys, dyl, OP, "output gradient")?;
        let db = kernel_result(self.0.bias_grad(&CandleThreads, dy))?;
        Ok((CpuStorage::F32(db), Shape::from(self.0.o)))
    }
}

/// The kernel gradient [`Conv2dShape::kernel_grad`], `[o, c, kh, kw]`, from `x` and `dy`.
struct KernelGrad(Conv2dShape);

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "convkit-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (
            values(xs, xl, OP, "input")?,
            values(dys, dyl, OP, "output gradient")?,
        );
        let dk = kernel_result(self.0.kernel_grad(&CandleThreads, x, dy))?;
        Ok((CpuStorage::F32(dk), Shape::from(&self.0.kernel()[..])))
    }
}

/// The input gradient [`Conv2dShape::input_grad`], `[n, c, h, w]`, from `dy` and the kernel.
struct InputGrad(Conv2dShape);

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "convkit-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, kernel) = (
            values(dys, dyl, OP, "output gradient")?,
            values(ks, kl, OP, "kernel")?,
        );
        let dx = kernel_result(self.0.input_grad(&CandleThreads, dy, kernel))?;
        Ok((CpuStorage::F32(dx), Shape::from(&self.0.input()[..])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_matches_candle;
    use candle_core::{Device, Var};

    /// Forward and the three gradients against candle's own conv2d and broadcast add, where that one applies:
    /// symmetric padding, one stride, and (for its backward, which fails otherwise) windows
    /// that tile the padded input exactly. The conformance suite covers the rest against Keras.
    #[test]
    fn matches_candles_conv2d_forward_and_backward() {
        for (pad, stride, h, w) in [(0, 1, 9, 8), (1, 1, 9, 8), (1, 2, 9, 7), (2, 3, 8, 11)] {
            let conv = Conv2d(Kernel::new([pad; 4], [stride; 2]));
            assert_matches_candle(
                conv,
                [&[3, 2, h, w], &[4, 2, 3, 3], &[4]],
                |x, k, b| {
                    x.conv2d(k, pad, stride, 1, 1)?
                        .broadcast_add(&b.reshape((1, 4, 1, 1))?)
                },
                [1e-4, 1e-3],
                &format!("pad {pad} stride {stride}"),
            );
        }
    }

    /// The fused op against convkit's three ops one after the other (the kernel crate's
    /// tests check them bit for bit, with ties and NaNs): the same values and gradients, and
    /// the same values again on constant operands, where no winners are kept.
    #[test]
    fn the_fused_block_matches_convolution_relu_and_pooling() {
        // Two input channels: the dense gradients of the scattered output gradient; sixteen:
        // the sums over the winners.
        for (pad, stride, pool, pool_stride, c) in
            [(0, 1, 2, 2, 2), (1, 2, 3, 1, 2), (0, 1, 2, 2, 16)]
        {
            let conv = Kernel::new([pad; 4], [stride; 2]);
            let pool = MaxPool2d::new([pool; 2], [pool_stride; 2]);
            let fused = || ConvReluMaxPool {
                conv,
                pool,
                for_grad: true,
                winners: OnceLock::new(),
            };
            let unfused = |x: &Tensor, k: &Tensor, b: &Tensor| {
                x.apply_op3(k, b, Conv2d(conv))?
                    .apply_op1(crate::relu::Relu)?
                    .apply_op1(crate::pool::MaxPool2d(pool))
            };
            let case = format!("pad {pad} stride {stride} pool {pool:?} channels {c}");
            assert_matches_candle(
                fused(),
                [&[3, c, 10, 9], &[4, c, 3, 3], &[4]],
                unfused,
                [1e-6, 1e-5],
                &case,
            );
            let [x, k, b] = [&[2, c, 8, 8][..], &[4, c, 3, 3], &[4]]
                .map(|dims| Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap());
            let inference = ConvReluMaxPool {
                for_grad: false,
                ..fused()
            };
            let y = x.apply_op3(&k, &b, inference).unwrap();
            let expected = unfused(&x, &k, &b).unwrap();
            let gap = (y - expected).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(gap.to_scalar::<f32>().unwrap(), 0.0, "{case}");
        }
    }

    #[test]
    fn the_input_gradient_is_skipped_for_a_constant_input() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 6, 6), &device).unwrap();
        let k =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 1, 3, 3), &device).unwrap()).unwrap();
        let conv = Conv2d(Kernel::new([0, 1, 0, 1], [1, 2]));
        let b = Tensor::zeros(3, candle_core::DType::F32, &device).unwrap();
        let y = x.apply_op3(k.as_tensor(), &b, conv).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5, 3]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(k.as_tensor()).is_some());
        assert!(grads.get(&b).is_none());
    }
}
