//! Convolution on the CPU as im2col + GEMM, forward and backward, as candle custom ops on the
//! `gemm` crate candle's own matmul uses.
//!
//! candle 0.11's CPU `conv2d` is fine forward, but its backward computes the input gradient
//! with a direct `conv_transpose2d` loop (SIMD only when built for AVX2) even for a first
//! layer whose input needs none, and the kernel gradient as a convolution with an
//! image-sized kernel. Here every pass is an im2col (or col2im) and a GEMM: the forward
//! `W · cols` per image, the kernel gradient `dy · colsᵀ` over the whole batch at once, the
//! input gradient `col2im(Wᵀ · dy[n])` per image, and the input gradient only when the input is
//! tracked. `cols` is `[c·kh·kw, oh·ow]`: kernel entry by output position. Images are
//! spread over candle's own CPU threads ([`crate::threads`]); padding (TensorFlow's asymmetric `same` included) and
//! per-axis strides are handled in im2col, so nothing is copied to pad. The bias is part of
//! the op: each output row starts at its bias before the GEMM adds to it, and its gradient is
//! one pass over the output gradient (candle's broadcast-add backward would reduce over three
//! strided axes, which took a sixth of a training step).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::host::{matmul, matmul_by_rows, values};
use crate::threads::for_each_chunk;

/// The name errors give the op.
const OP: &str = "convkit conv2d";

/// The sizes of one convolution: input `[n, c, h, w]`, kernel `[o, c, kh, kw]`, bias `[o]`,
/// zero padding `[top, bottom, left, right]`, `strides` `[sh, sw]`, output `[n, o, oh, ow]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2d {
    pub pad: [usize; 4],
    pub strides: [usize; 2],
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    pad: [usize; 4],
    strides: [usize; 2],
}

impl Geometry {
    fn new(conv: &Conv2d, x: &[usize], k: &[usize]) -> Result<Self> {
        let (&[n, c, h, w], &[o, kc, kh, kw]) = (x, k) else {
            candle_core::bail!(
                "convkit conv2d: expected a 4-D input and kernel, found {x:?} and {k:?}"
            )
        };
        let [top, bottom, left, right] = conv.pad;
        let [sh, sw] = conv.strides;
        if kc != c || sh == 0 || sw == 0 || h + top + bottom < kh || w + left + right < kw {
            candle_core::bail!(
                "convkit conv2d: kernel {k:?} does not fit input {x:?} with padding {:?} and strides {:?}",
                conv.pad,
                conv.strides
            )
        }
        Ok(Geometry {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh: (h + top + bottom - kh) / sh + 1,
            ow: (w + left + right - kw) / sw + 1,
            pad: conv.pad,
            strides: conv.strides,
        })
    }

    /// Values of one image.
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Output positions of one image.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// One kernel's values: a row of `cols`.
    fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// The taps of kernel entry `q = (ci·kh + ky)·kw + kx`: for each output row `y`,
    /// `visit(y, start, xs)` with the offset in the image of the input value under output
    /// `(y, 0)` (as if unpadded; `None` when the whole row is padding) and the range `xs` of
    /// output columns whose input column `x·sw + kx − left` lies inside the image.
    fn taps(&self, q: usize, mut visit: impl FnMut(usize, Option<usize>, std::ops::Range<usize>)) {
        let [top, _, left, _] = self.pad;
        let [sh, sw] = self.strides;
        let (ci, ky, kx) = (q / (self.kh * self.kw), q / self.kw % self.kh, q % self.kw);
        let lo = left.saturating_sub(kx).div_ceil(sw).min(self.ow);
        let hi = (self.w + left)
            .saturating_sub(kx)
            .div_ceil(sw)
            .clamp(lo, self.ow);
        for y in 0..self.oh {
            let start = (y * sh + ky)
                .checked_sub(top)
                .filter(|&iy| iy < self.h)
                // input column of output column x is x·sw + kx − left, ≥ 0 for x in lo..hi
                .map(|iy| (ci * self.h + iy) * self.w + kx);
            visit(y, start, lo..hi);
        }
    }

    /// Kernel entry `q`'s row of im2col for one image: `out[y·ow + x]`, 0 in the padding.
    fn im2col_entry(&self, q: usize, image: &[f32], out: &mut [f32]) {
        let (ow, sw, left) = (self.ow, self.strides[1], self.pad[2]);
        self.taps(q, |y, start, xs| {
            let out = &mut out[y * ow..][..ow];
            match start {
                None => out.fill(0.0),
                Some(start) => {
                    out[..xs.start].fill(0.0);
                    out[xs.end..].fill(0.0);
                    if sw == 1 {
                        let from = start + xs.start - left;
                        out[xs.clone()].copy_from_slice(&image[from..from + xs.len()]);
                    } else {
                        for x in xs {
                            out[x] = image[start + x * sw - left];
                        }
                    }
                }
            }
        });
    }

    /// `cols[q·positions + p]` for one image: kernel entry `q` by output position `p = y·ow + x`.
    fn im2col(&self, image: &[f32], cols: &mut [f32]) {
        let positions = self.positions();
        for (q, row) in cols.chunks_exact_mut(positions).enumerate() {
            self.im2col_entry(q, image, row);
        }
    }

    /// `cols[q·(n·positions) + i·positions + p]` for the whole batch `x`, rows in parallel.
    fn im2col_batch(&self, x: &[f32], cols: &mut [f32]) {
        let (positions, image) = (self.positions(), self.image());
        for_each_chunk(
            cols,
            self.n * positions,
            || (),
            |(), q, row| {
                for (i, out) in row.chunks_exact_mut(positions).enumerate() {
                    self.im2col_entry(q, &x[i * image..][..image], out);
                }
            },
        );
    }

    /// The inverse scatter of [`Geometry::im2col`]: adds every entry of `cols` to the image
    /// value it came from.
    fn col2im(&self, cols: &[f32], image: &mut [f32]) {
        let (positions, ow, sw, left) = (self.positions(), self.ow, self.strides[1], self.pad[2]);
        image.fill(0.0);
        for (q, row) in cols.chunks_exact(positions).enumerate() {
            self.taps(q, |y, start, xs| {
                if let Some(start) = start {
                    let from = &row[y * ow..][..ow];
                    if sw == 1 {
                        let to = start + xs.start - left;
                        for (v, d) in image[to..to + xs.len()].iter_mut().zip(&from[xs]) {
                            *v += d;
                        }
                    } else {
                        for x in xs {
                            image[start + x * sw - left] += from[x];
                        }
                    }
                }
            });
        }
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "convkit-conv2d"
    }

    /// `y[n] = W · im2col(x[n]) + b`, `[o, oh·ow]` per image.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(self, xl.dims(), kl.dims())?;
        let (x, kernel) = (values(xs, xl, OP, "input")?, values(ks, kl, OP, "kernel")?);
        let bias = values(bs, bl, OP, "bias")?;
        if bias.len() != g.o {
            candle_core::bail!(
                "convkit conv2d: expected a bias of {} values, found {:?}",
                g.o,
                bl.dims()
            )
        }
        let (positions, patch) = (g.positions(), g.patch());
        let mut y = vec![0f32; g.n * g.o * positions];
        for_each_chunk(
            &mut y,
            g.o * positions,
            || vec![0f32; positions * patch],
            |cols, image, y| {
                let x = &x[image * g.image()..][..g.image()];
                for (row, &b) in y.chunks_mut(positions).zip(bias) {
                    row.fill(b);
                }
                g.im2col(x, cols);
                matmul(
                    (g.o, positions, patch),
                    y,
                    (positions, 1),
                    true,
                    kernel,
                    (patch, 1),
                    cols,
                    (positions, 1),
                    gemm::Parallelism::None,
                );
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.oh, g.ow))))
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
        let input = InputGrad {
            conv: *self,
            image: x.dims().to_vec(),
        };
        let dx = (x.track_op())
            .then(|| dy.apply_op2_no_bwd(&kernel.contiguous()?, &input))
            .transpose()?;
        let grad = KernelGrad {
            conv: *self,
            kernel: kernel.dims().to_vec(),
        };
        let dk = (kernel.track_op())
            .then(|| x.contiguous()?.apply_op2_no_bwd(&dy, &grad))
            .transpose()?;
        let bias_grad = BiasGrad {
            bias: bias.dims().to_vec(),
        };
        let db = (bias.track_op())
            .then(|| dy.apply_op1_no_bwd(&bias_grad))
            .transpose()?;
        Ok((dx, dk, db))
    }
}

/// The bias gradient: each channel's sum of `dy` `[n, o, oh, ow]` over images and positions,
/// in a fixed order (so the same on every run), accumulated in f64.
struct BiasGrad {
    bias: Vec<usize>,
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "convkit-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = values(dys, dyl, OP, "output gradient")?;
        let (&[images, o, oh, ow], &[bias]) = (dyl.dims(), self.bias.as_slice()) else {
            candle_core::bail!(
                "convkit conv2d bias gradient: expected dy [n, o, oh, ow] and a bias [o], found {:?} and {:?}",
                dyl.dims(),
                self.bias
            )
        };
        if bias != o {
            candle_core::bail!("convkit conv2d bias gradient: {o} channels, a bias of {bias}")
        }
        let positions = oh * ow;
        let mut db = vec![0f32; o];
        // One channel's sum per task, over its images in order: the same on every run.
        for_each_chunk(
            &mut db,
            1,
            || (),
            |(), channel, db| {
                let sum: f64 = (0..images)
                    .map(|image| &dy[(image * o + channel) * positions..][..positions])
                    .map(|plane| plane.iter().map(|&v| v as f64).sum::<f64>())
                    .sum();
                db[0] = sum as f32;
            },
        );
        Ok((CpuStorage::F32(db), Shape::from(self.bias.as_slice())))
    }
}

/// The kernel gradient `Σₙ dy[n] · im2col(x[n])ᵀ`, `[o, c·kh·kw]`, from `x` and `dy`.
struct KernelGrad {
    conv: Conv2d,
    kernel: Vec<usize>,
}

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
        let g = Geometry::new(&self.conv, xl.dims(), &self.kernel)?;
        let (x, dy) = (
            values(xs, xl, OP, "input")?,
            values(dys, dyl, OP, "output gradient")?,
        );
        let (positions, patch) = (g.positions(), g.patch());
        // One GEMM over the whole batch, `dy [o, n·positions] · colsᵀ [n·positions, patch]`,
        // its output rows shared out between the threads: each sum runs whole on one thread,
        // so the result does not depend on the number of threads or their timing (a resumed
        // run repeats an uninterrupted one).
        let samples = g.n * positions;
        let mut cols = vec![0f32; patch * samples];
        g.im2col_batch(x, &mut cols);
        let mut dy_t = vec![0f32; g.o * samples];
        for_each_chunk(
            &mut dy_t,
            samples,
            || (),
            |(), oc, row| {
                for (image, part) in row.chunks_mut(positions).enumerate() {
                    let from = (image * g.o + oc) * positions;
                    part.copy_from_slice(&dy[from..from + positions]);
                }
            },
        );
        let mut dk = vec![0f32; g.o * patch];
        matmul_by_rows(
            &mut dk,
            (patch, samples),
            false,
            &dy_t,
            (samples, 1),
            &cols,
            (1, samples),
        );
        Ok((CpuStorage::F32(dk), Shape::from(self.kernel.as_slice())))
    }
}

/// The input gradient `col2im(Wᵀ · dy[n])`, `[n, c, h, w]`, from `dy` and the kernel.
struct InputGrad {
    conv: Conv2d,
    image: Vec<usize>,
}

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
        let g = Geometry::new(&self.conv, &self.image, kl.dims())?;
        let (dy, kernel) = (
            values(dys, dyl, OP, "output gradient")?,
            values(ks, kl, OP, "kernel")?,
        );
        let (positions, patch) = (g.positions(), g.patch());
        let mut dx = vec![0f32; g.n * g.image()];
        for_each_chunk(
            &mut dx,
            g.image(),
            || vec![0f32; positions * patch],
            |dcols, image, dx| {
                let dy = &dy[image * g.o * positions..][..g.o * positions];
                matmul(
                    (positions, patch, g.o),
                    dcols,
                    (1, positions),
                    false,
                    dy,
                    (1, positions),
                    kernel,
                    (patch, 1),
                    gemm::Parallelism::None,
                );
                g.col2im(dcols, dx);
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from(self.image.as_slice())))
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
            let conv = Conv2d {
                pad: [pad; 4],
                strides: [stride; 2],
            };
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

    #[test]
    fn the_input_gradient_is_skipped_for_a_constant_input() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 6, 6), &device).unwrap();
        let k =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 1, 3, 3), &device).unwrap()).unwrap();
        let conv = Conv2d {
            pad: [0, 1, 0, 1],
            strides: [1, 2],
        };
        let b = Tensor::zeros(3, candle_core::DType::F32, &device).unwrap();
        let y = x.apply_op3(k.as_tensor(), &b, conv).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5, 3]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(k.as_tensor()).is_some());
        assert!(grads.get(&b).is_none());
    }
}
