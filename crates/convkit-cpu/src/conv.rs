//! 2-D convolution as im2col + GEMM, forward and backward: the forward `W · cols` per group
//! of images side by side, the kernel gradient `dy · colsᵀ` over the whole batch at once, the
//! input gradient `col2im(Wᵀ · dy[n])` per image. `cols` is `[c·kh·kw, oh·ow]`: kernel entry
//! by output position (in the forward, possibly by position in rows as wide as the input's).
//! Padding (TensorFlow's asymmetric `same` included) and per-axis strides are handled in
//! im2col, so nothing is copied to pad. The bias is where each output row starts, and its
//! gradient one pass over the output gradient. At stride 1 a kernel of few values (a first
//! layer's) is applied directly in the forward instead, without im2col or GEMM, and so is a
//! larger one without padding, with its gradients where it has 16 channels or more on their
//! side (the `direct` module's docs say how).

use crate::gemm::{matmul, matmul_by_rows};
use crate::scratch::with_scratch;
use crate::threads::{for_each_chunk, for_each_share_with, zeroed_chunks, Threads};
use crate::{check_len, shape_error, Result};

/// The name errors give the op.
const OP: &str = "convkit conv2d";

/// The width the forward's product is made at least, in output positions (see
/// [`Conv2dShape::forward_group`]): narrower ones spend much of their time packing operands.
const FORWARD_COLUMNS: usize = 512;
/// The most values of working memory the forward's images take at once.
const FORWARD_SCRATCH: usize = 256 << 10;

/// A convolution's settings: zero padding `[top, bottom, left, right]` and `strides`
/// `[sh, sw]`, no dilation, one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    pub pad: [usize; 4],
    pub strides: [usize; 2],
}

impl Conv2d {
    pub fn new(pad: [usize; 4], strides: [usize; 2]) -> Self {
        Conv2d { pad, strides }
    }

    /// The sizes of this convolution over input `[n, c, h, w]` with kernel `[o, c, kh, kw]`.
    pub fn shape(&self, input: &[usize], kernel: &[usize]) -> Result<Conv2dShape> {
        let (&[n, c, h, w], &[o, kc, kh, kw]) = (input, kernel) else {
            return Err(shape_error(
                OP,
                format!("expected a 4-D input and kernel, found {input:?} and {kernel:?}"),
            ));
        };
        let [top, bottom, left, right] = self.pad;
        let [sh, sw] = self.strides;
        if kc != c || sh == 0 || sw == 0 || h + top + bottom < kh || w + left + right < kw {
            return Err(shape_error(
                OP,
                format!(
                    "kernel {kernel:?} does not fit input {input:?} with padding {:?} and strides {:?}",
                    self.pad, self.strides
                ),
            ));
        }
        Ok(Conv2dShape {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh: (h + top + bottom - kh) / sh + 1,
            ow: (w + left + right - kw) / sw + 1,
            pad: self.pad,
            strides: self.strides,
        })
    }
}

/// One convolution's sizes: input `[n, c, h, w]`, kernel `[o, c, kh, kw]`, bias `[o]`,
/// output `[n, o, oh, ow]`, all NCHW and contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub pad: [usize; 4],
    pub strides: [usize; 2],
}

/// Where [`Conv2dShape::group_forward`] puts an image's output: output `(y, x)` of a channel
/// at `y·row + x` of its `plane` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutputRows {
    pub row: usize,
    pub plane: usize,
}

impl Conv2dShape {
    /// The output's dims, `[n, o, oh, ow]`.
    pub fn output(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }
    /// The input's dims, `[n, c, h, w]`.
    pub fn input(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
    /// The kernel's dims, `[o, c, kh, kw]`.
    pub fn kernel(&self) -> [usize; 4] {
        [self.o, self.c, self.kh, self.kw]
    }

    /// Checks that `x`, `kernel` and `bias` hold the input's, kernel's and bias's values.
    pub(crate) fn check_operands(&self, x: &[f32], kernel: &[f32], bias: &[f32]) -> Result<()> {
        check_len(OP, "input", x.len(), self.n * self.image())?;
        check_len(OP, "kernel", kernel.len(), self.o * self.patch())?;
        check_len(OP, "bias", bias.len(), self.o)
    }

    /// Checks that `dy` holds the output's `n·o·oh·ow` values.
    fn check_output_grad(&self, dy: &[f32]) -> Result<()> {
        check_len(
            OP,
            "output gradient",
            dy.len(),
            self.n * self.o * self.positions(),
        )
    }

    /// Values of one image.
    pub(crate) fn image(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Output positions of one image.
    pub(crate) fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// One kernel's values: a row of `cols`.
    pub(crate) fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Kernel entry `q = (ci·kh + ky)·kw + kx` as `(ci, ky, kx)`.
    pub(crate) fn entry(&self, q: usize) -> (usize, usize, usize) {
        (q / (self.kh * self.kw), q / self.kw % self.kh, q % self.kw)
    }

    /// Where kernel entry `q`'s tap for output `(0, 0)` lies in an unpadded image
    /// `[c, h, w]` at stride 1; output `(y, x)`'s is `y·w + x` further on.
    pub(crate) fn entry_offset(&self, q: usize) -> usize {
        let (ci, ky, kx) = self.entry(q);
        (ci * self.h + ky) * self.w + kx
    }

    /// `y [n, o, oh, ow] = W · im2col(x[n]) + b` from `x [n, c, h, w]`, `kernel [o, c, kh, kw]`
    /// and `bias [o]`.
    pub fn forward(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
    ) -> Result<Vec<f32>> {
        self.check_operands(x, kernel, bias)?;
        let (rows, group) = (self.output_rows(), self.forward_group());
        let (positions, cols_len) = (self.positions(), self.group_scratch(group));
        let len = self.n * self.o * positions;
        let y = zeroed_chunks(threads, len, group * self.o * positions, |g, y| {
            let images = self.group_images(g);
            if images.len() == 1 && rows.plane == positions {
                // The output as it is to be: made in place.
                return with_scratch(cols_len, |cols| {
                    self.group_forward(x, images, kernel, bias, cols, y)
                });
            }
            let z_len = self.o * images.len() * rows.plane;
            with_scratch(cols_len + z_len, |scratch| {
                let (cols, z) = scratch.split_at_mut(cols_len);
                self.group_forward(x, images.clone(), kernel, bias, cols, &mut z[..z_len]);
                for (i, y) in y.chunks_exact_mut(self.o * positions).enumerate() {
                    for (channel, y) in y.chunks_exact_mut(positions).enumerate() {
                        let z = self.group_plane(z, images.len(), channel, i);
                        for (y, z) in y.chunks_exact_mut(self.ow).zip(z.chunks(rows.row)) {
                            y.copy_from_slice(&z[..self.ow]);
                        }
                    }
                }
            })
        });
        Ok(y)
    }

    /// Image `image` of the batch `x [n, c, h, w]`: `[c, h, w]`.
    pub(crate) fn input_image<'x>(&self, x: &'x [f32], image: usize) -> &'x [f32] {
        &x[image * self.image()..][..self.image()]
    }

    /// How [`Conv2dShape::group_forward`] lays out an image's output plane. At stride 1
    /// without padding its rows are as wide as the input's, so that each row of im2col is one
    /// run of the image, copied at once; the values past `ow` in each row are not outputs.
    /// Compact rows take a copy per kernel entry and output row instead (`c·kh·kw·oh` short
    /// ones), and the unfused forward's output a copy per channel and row (`o·oh`) to leave
    /// the wide rows: wide where the first are the more, compact otherwise.
    pub(crate) fn output_rows(&self) -> OutputRows {
        let wide = self.strides == [1, 1] && self.pad == [0; 4] && self.patch() >= self.o;
        if wide && !self.is_direct() {
            OutputRows {
                row: self.w,
                plane: (self.oh - 1) * self.w + self.ow,
            }
        } else {
            OutputRows {
                row: self.ow,
                plane: self.positions(),
            }
        }
    }

    /// How many images [`Conv2dShape::group_forward`] multiplies at once in the forward: enough
    /// for a product [`FORWARD_COLUMNS`] wide, where its working memory stays within
    /// [`FORWARD_SCRATCH`] values. Fixed by the shape alone, so the results do not depend on
    /// the number of threads.
    pub(crate) fn forward_group(&self) -> usize {
        let OutputRows { plane, .. } = self.output_rows();
        let fits = FORWARD_SCRATCH / ((self.patch() + self.o) * plane).max(1);
        FORWARD_COLUMNS
            .div_ceil(plane)
            .min(fits)
            .clamp(1, self.n.max(1))
    }

    /// Values of working memory [`Conv2dShape::group_forward`] takes for `images` images.
    pub(crate) fn group_scratch(&self, images: usize) -> usize {
        if self.is_direct() {
            self.direct_scratch()
        } else if self.is_wide_direct() {
            0
        } else {
            self.patch() * images * self.output_rows().plane
        }
    }

    /// The images of group `g` of [`Conv2dShape::forward_group`] images (the last one may be
    /// smaller).
    pub(crate) fn group_images(&self, g: usize) -> std::ops::Range<usize> {
        let group = self.forward_group();
        g * group..(g * group + group).min(self.n)
    }

    /// `z [o, images.len()·plane] = W · [im2col(x[i]) for i in images] + b`: the images of
    /// the batch `x [n, c, h, w]` side by side in one product, each plane in the layout of
    /// [`Conv2dShape::output_rows`] ([`Conv2dShape::group_plane`] finds one). `cols`
    /// ([`Conv2dShape::group_scratch`] values at least, contents unspecified) is working
    /// memory; `z`'s contents on entry do not matter. Each output row starts as its bias and
    /// the product is added to it; a kernel of few values, or one whose planes are in long
    /// wide rows, is applied directly instead ([`crate::direct`]).
    pub(crate) fn group_forward(
        &self,
        x: &[f32],
        images: std::ops::Range<usize>,
        kernel: &[f32],
        bias: &[f32],
        cols: &mut [f32],
        z: &mut [f32],
    ) {
        let (patch, rows) = (self.patch(), self.output_rows());
        let width = images.len() * rows.plane;
        if self.is_direct() || self.is_wide_direct() {
            for (i, image) in images.enumerate() {
                let z = &mut z[i * rows.plane..];
                self.direct_forward(self.input_image(x, image), kernel, bias, cols, z, width);
            }
            return;
        }
        for (row, &b) in z.chunks_exact_mut(width).zip(bias) {
            row.fill(b);
        }
        let compact = rows.plane == self.positions();
        for (q, row) in cols[..patch * width].chunks_exact_mut(width).enumerate() {
            for (image, row) in images.clone().zip(row.chunks_exact_mut(rows.plane)) {
                let image = self.input_image(x, image);
                if compact {
                    self.im2col_entry(q, image, row);
                } else {
                    // Entry (ci, ky, kx)'s row: the image from (ci, ky, kx) on, `plane`
                    // values, which end inside it (at (ci, h − kh + ky, w − kw + kx)).
                    let from = self.entry_offset(q);
                    row.copy_from_slice(&image[from..from + rows.plane]);
                }
            }
        }
        matmul(
            (self.o, width, patch),
            z,
            (width, 1),
            true,
            kernel,
            (patch, 1),
            cols,
            (width, 1),
        );
    }

    /// Image `i` (of `count`) of [`Conv2dShape::group_forward`]'s output `z`: its plane of
    /// output channel `channel`.
    pub(crate) fn group_plane<'z>(
        &self,
        z: &'z [f32],
        count: usize,
        channel: usize,
        i: usize,
    ) -> &'z [f32] {
        let plane = self.output_rows().plane;
        &z[(channel * count + i) * plane..][..plane]
    }

    /// The input gradient `dx [n, c, h, w] = col2im(Wᵀ · dy[n])` from `dy [n, o, oh, ow]` and
    /// `kernel [o, c, kh, kw]`. At stride 1 without padding, for a kernel of more than 32
    /// values and 16 input channels or more, it is summed straight from `dy` and the kernel,
    /// without GEMM or col2im (see `direct`'s module docs).
    pub fn input_grad(
        &self,
        threads: &dyn Threads,
        dy: &[f32],
        kernel: &[f32],
    ) -> Result<Vec<f32>> {
        self.check_output_grad(dy)?;
        check_len(OP, "kernel", kernel.len(), self.o * self.patch())?;
        if self.has_wide_input_grad() {
            return Ok(self.wide_input_grad(threads, dy, kernel));
        }
        let (positions, patch) = (self.positions(), self.patch());
        // Zeroed: col2im adds into it.
        let dx = zeroed_chunks(threads, self.n * self.image(), self.image(), |image, dx| {
            let dy = &dy[image * self.o * positions..][..self.o * positions];
            with_scratch(positions * patch, |dcols| {
                matmul(
                    (positions, patch, self.o),
                    dcols,
                    (1, positions),
                    false,
                    dy,
                    (1, positions),
                    kernel,
                    (patch, 1),
                );
                self.col2im(dcols, dx);
            });
        });
        Ok(dx)
    }

    /// The kernel gradient `dW [o, c, kh, kw] = Σₙ dy[n] · im2col(x[n])ᵀ` from
    /// `x [n, c, h, w]` and `dy [n, o, oh, ow]`: one GEMM over the whole batch. The threads
    /// share out the larger side of `dW`, so each reads the smaller operand whole and its own
    /// part of the larger: kernel entries (rows of `cols`, each thread making its own) where
    /// there are more of them than output channels, output channels (rows of `dy`) otherwise.
    /// At stride 1 with a kernel of at most 32 values it is summed directly, without GEMM;
    /// without padding, for a larger kernel and 16 output channels or more, straight from `x`
    /// and `dy`, without im2col or GEMM (see `direct`'s module docs).
    pub fn kernel_grad(&self, threads: &dyn Threads, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        check_len(OP, "input", x.len(), self.n * self.image())?;
        self.check_output_grad(dy)?;
        if self.is_direct() {
            return Ok(self.direct_kernel_grad(threads, x, dy));
        }
        if self.has_wide_kernel_grad() {
            return Ok(self.wide_kernel_grad(threads, x, dy));
        }
        let (o, positions, patch) = (self.o, self.positions(), self.patch());
        let samples = self.n * positions;
        with_scratch((patch + o) * samples, |scratch| {
            let (cols, dy_t) = scratch.split_at_mut(patch * samples);
            // dy as [o, n·positions]
            for_each_chunk(threads, dy_t, samples, |oc, row| {
                for (image, part) in row.chunks_mut(positions).enumerate() {
                    let from = (image * o + oc) * positions;
                    part.copy_from_slice(&dy[from..from + positions]);
                }
            });
            let dy_t = &*dy_t;
            // Row `q` of `cols` for the whole batch: `[n·positions]`.
            let im2col_row = |q: usize, row: &mut [f32]| {
                for (i, out) in row.chunks_exact_mut(positions).enumerate() {
                    self.im2col_entry(q, self.input_image(x, i), out);
                }
            };
            if patch <= o {
                for_each_chunk(threads, cols, samples, im2col_row);
                let mut dk = vec![0f32; o * patch];
                matmul_by_rows(
                    threads,
                    &mut dk,
                    (patch, samples),
                    false,
                    dy_t,
                    (samples, 1),
                    cols,
                    (1, samples),
                );
                return Ok(dk);
            }
            // dW transposed, [c·kh·kw, o]: a share of kernel entries is a share of its rows.
            let mut dk_t = vec![0f32; patch * o];
            for_each_share_with(
                threads,
                &mut dk_t,
                o,
                cols,
                samples,
                |entries, dk_t, cols| {
                    for (q, row) in entries.clone().zip(cols.chunks_exact_mut(samples)) {
                        im2col_row(q, row);
                    }
                    // dWᵀ[entries, o] = cols[entries, n·positions] · dy_tᵀ
                    matmul(
                        (entries.len(), o, samples),
                        dk_t,
                        (o, 1),
                        false,
                        cols,
                        (samples, 1),
                        dy_t,
                        (1, samples),
                    );
                },
            );
            Ok(first_columns(&dk_t, o, o))
        })
    }

    /// The bias gradient `db [o]`: each channel's sum of `dy [n, o, oh, ow]` over images and
    /// positions, in a fixed order (eight running f64 sums per plane), so the same on any
    /// number of threads.
    pub fn bias_grad(&self, threads: &dyn Threads, dy: &[f32]) -> Result<Vec<f32>> {
        let (o, positions) = (self.o, self.positions());
        self.check_output_grad(dy)?;
        let mut db = vec![0f32; o];
        for_each_chunk(threads, &mut db, 1, |channel, db| {
            let sum: f64 = (0..self.n)
                .map(|image| &dy[(image * o + channel) * positions..][..positions])
                .map(plane_sum)
                .sum();
            db[0] = sum as f32;
        });
        Ok(db)
    }

    /// The taps of kernel entry `q = (ci·kh + ky)·kw + kx`: for each output row `y`,
    /// `visit(y, start, xs)` with the offset in the image of the input value under output
    /// `(y, 0)` (as if unpadded; `None` when the whole row is padding) and the range `xs` of
    /// output columns whose input column `x·sw + kx − left` lies inside the image.
    fn taps(&self, q: usize, mut visit: impl FnMut(usize, Option<usize>, std::ops::Range<usize>)) {
        let [top, _, left, _] = self.pad;
        let [sh, sw] = self.strides;
        let (ci, ky, kx) = self.entry(q);
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
    pub(crate) fn im2col_entry(&self, q: usize, image: &[f32], out: &mut [f32]) {
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

    /// The inverse of im2col (`cols[q·positions + p]`: each kernel entry's
    /// [`Conv2dShape::im2col_entry`]): adds every entry of `cols` to the
    /// image value it came from (`image` starts zeroed).
    fn col2im(&self, cols: &[f32], image: &mut [f32]) {
        let (positions, ow, sw, left) = (self.positions(), self.ow, self.strides[1], self.pad[2]);
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

/// The first `count` columns of `rows` (rows of `row_len` values), each as a row: a
/// transposed gradient back in its kernel's layout.
pub(crate) fn first_columns(rows: &[f32], row_len: usize, count: usize) -> Vec<f32> {
    let mut columns = Vec::with_capacity(count * rows.len() / row_len.max(1));
    columns.extend((0..count).flat_map(|col| rows.iter().skip(col).step_by(row_len).copied()));
    columns
}

/// The sum of `values` in f64, in a fixed order: eight running sums over the values in steps
/// of eight (which the compiler keeps in vector registers), then the rest, then the eight.
fn plane_sum(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v as f64;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_all_close, random, POOLS};

    /// The direct definition: `y[n, o, i, j] = b[o] + Σ x[n, c, i·sh + ky − top, j·sw + kx − left] · k[o, c, ky, kx]`.
    fn reference(s: &Conv2dShape, x: &[f32], k: &[f32], b: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; s.n * s.o * s.oh * s.ow];
        for n in 0..s.n {
            for o in 0..s.o {
                for i in 0..s.oh {
                    for j in 0..s.ow {
                        let mut sum = b[o] as f64;
                        for c in 0..s.c {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let (iy, ix) = (
                                        (i * s.strides[0] + ky) as isize - s.pad[0] as isize,
                                        (j * s.strides[1] + kx) as isize - s.pad[2] as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize];
                                    sum += (xv * k[((o * s.c + c) * s.kh + ky) * s.kw + kx]) as f64;
                                }
                            }
                        }
                        y[((n * s.o + o) * s.oh + i) * s.ow + j] = sum as f32;
                    }
                }
            }
        }
        y
    }

    /// Forward against the definition; each gradient against the reference's own (with the
    /// calling thread's working memory poisoned, which is all of it on [`crate::Serial`]): the
    /// forward is linear in each operand, so `⟨dy, f(x + e_i)⟩ − ⟨dy, f(x)⟩` is exact up to
    /// rounding, and summing `dy · ∂y/∂v` directly gives the reference gradient.
    #[test]
    fn forward_and_gradients_match_the_definition() {
        // The kernel gradient shares out kernel entries where there are more of them than
        // output channels, output channels otherwise: both kinds are here. The forward is
        // direct at stride 1 for kernels of up to 32 values, taken straight from the image
        // for larger ones into planes of wide rows long enough, im2col + GEMM otherwise (short
        // wide rows, or compact ones where padded or with more channels out than kernel
        // values).
        let (mut partial_group, mut direct, mut wide, mut gemm_stride_1) =
            (false, false, false, false);
        let (mut wide_dk, mut wide_dx, mut gemm_dk, mut gemm_dx) = (false, false, false, false);
        for (pad, strides, [h, w], [o, c, kh, kw]) in [
            ([0; 4], [1, 1], [7, 6], [4, 3, 3, 2]),
            ([1; 4], [1, 1], [5, 5], [4, 3, 3, 2]),
            ([0, 1, 0, 1], [2, 2], [6, 7], [4, 3, 3, 2]),
            ([2, 1, 1, 2], [3, 2], [8, 9], [4, 3, 3, 2]),
            ([1, 0, 0, 1], [1, 1], [6, 5], [9, 1, 3, 2]),
            ([0; 4], [1, 1], [5, 6], [9, 1, 2, 3]),
            ([0; 4], [1, 1], [4, 5], [2, 3, 1, 1]),
            // Planes wide enough that the forward multiplies two images at once, then one.
            ([0; 4], [1, 1], [20, 20], [2, 1, 3, 3]),
            // Direct: a block of eight channels and three more; rows wider than a vector.
            ([0; 4], [1, 1], [20, 21], [11, 1, 3, 3]),
            ([1, 1, 2, 0], [1, 1], [19, 18], [9, 3, 3, 3]),
            // im2col + GEMM at stride 1: wide rows, compact padded, compact for 40 channels.
            ([0; 4], [1, 1], [7, 6], [4, 4, 3, 3]),
            ([1; 4], [1, 1], [5, 5], [4, 4, 3, 3]),
            ([0; 4], [1, 1], [6, 6], [40, 4, 3, 3]),
            // Wide direct: a block of eight channels and three more; a last block of
            // positions that overlaps the one before.
            ([0; 4], [1, 1], [9, 10], [11, 4, 3, 3]),
            // Gradients straight from the operands: the kernel's for 18 output channels
            // (padded to 32) and 45 kernel entries (blocks of six and singles); the input's for
            // 17 input channels and 15 positions (a block of twelve and singles); both.
            ([0; 4], [1, 1], [6, 5], [18, 5, 3, 3]),
            ([0; 4], [1, 1], [5, 7], [3, 17, 3, 3]),
            ([0; 4], [1, 1], [5, 6], [16, 16, 2, 3]),
        ] {
            let s = Conv2d::new(pad, strides)
                .shape(&[3, c, h, w], &[o, c, kh, kw])
                .unwrap();
            partial_group |= !s.n.is_multiple_of(s.forward_group());
            direct |= s.is_direct();
            wide |= s.is_wide_direct();
            gemm_stride_1 |= !s.is_direct() && !s.is_wide_direct() && strides == [1, 1];
            (wide_dk, gemm_dk) = (
                wide_dk | s.has_wide_kernel_grad(),
                gemm_dk | !s.has_wide_kernel_grad() && !s.is_direct(),
            );
            (wide_dx, gemm_dx) = (
                wide_dx | s.has_wide_input_grad(),
                gemm_dx | !s.has_wide_input_grad(),
            );
            let x = random(s.n * s.c * h * w, 1);
            let k = random(s.o * s.patch(), 2);
            let b = random(s.o, 3);
            let dy = random(s.n * s.o * s.positions(), 4);
            let expected = reference(&s, &x, &k, &b);
            // Gradients of L = ⟨dy, y⟩, by linearity: dL/dv = ⟨dy, y(e_v)⟩ with the others 0 where linear.
            let zero_b = vec![0f32; s.o];
            let dot = |y: &[f32]| y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>();
            let unit = |len: usize, i: usize| {
                let mut v = vec![0f32; len];
                v[i] = 1.0;
                v
            };
            let dx_ref: Vec<f32> = (0..x.len())
                .map(|i| dot(&reference(&s, &unit(x.len(), i), &k, &zero_b)) as f32)
                .collect();
            let dk_ref: Vec<f32> = (0..k.len())
                .map(|i| dot(&reference(&s, &x, &unit(k.len(), i), &zero_b)) as f32)
                .collect();
            let db_ref: Vec<f32> = (0..s.o)
                .map(|i| dot(&reference(&s, &vec![0.0; x.len()], &k, &unit(s.o, i))) as f32)
                .collect();
            for &threads in POOLS {
                let what = format!("pad {pad:?} strides {strides:?}");
                // Working memory left NaN: any value read before it is written shows.
                crate::scratch::poison();
                assert_all_close(
                    &what,
                    &[
                        (s.forward(threads, &x, &k, &b).unwrap(), &expected, 1e-5),
                        (s.input_grad(threads, &dy, &k).unwrap(), &dx_ref, 1e-5),
                        (s.kernel_grad(threads, &x, &dy).unwrap(), &dk_ref, 1e-5),
                        (s.bias_grad(threads, &dy).unwrap(), &db_ref, 1e-5),
                    ],
                );
            }
        }
        assert!(partial_group, "no case ends in a smaller group");
        assert!(direct && wide && gemm_stride_1, "every forward at stride 1");
        assert!(wide_dk && wide_dx && gemm_dk && gemm_dx, "every gradient");
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let conv = Conv2d::new([0; 4], [1, 1]);
        let err = conv.shape(&[1, 2, 5, 5], &[3, 1, 3, 3]).unwrap_err();
        assert!(
            err.to_string().contains("does not fit input [1, 2, 5, 5]"),
            "{err}"
        );
        let err = conv.shape(&[1, 1, 2, 2], &[1, 1, 3, 3]).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let s = conv.shape(&[1, 1, 3, 3], &[1, 1, 2, 2]).unwrap();
        let err = s
            .forward(&crate::Serial, &[0.0; 8], &[0.0; 4], &[0.0])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "convkit conv2d: expected 9 values for the input, found 8"
        );
    }
}
