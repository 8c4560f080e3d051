//! The forward of a convolution whose kernels hold few values (`c·kh·kw ≤` [`DIRECT_PATCH`]:
//! a first layer on grey or RGB images) at stride 1, computed directly rather than as
//! im2col + GEMM. There a GEMM's inner dimension is the kernel's few values, so packing its
//! operands and writing im2col's columns cost more than the multiplications: the first layer
//! of a 28×28 grey classifier ran at a fifth of the second's rate. Here each output row is
//! made from a copy of the `c·kh` input rows under it (padding included, so the inner loop has
//! no edges): one vector of output columns at a time, each of the kernel's taps read once and
//! multiplied into a block of output channels, every sum the bias and then the taps in kernel
//! order, each one fused multiply-add. The vector is AVX-512's or AVX2's where the CPU has it
//! (picked at run time), eight portable lanes otherwise; the sums are the same on each. The
//! kernel gradient of such a convolution is summed directly too
//! ([`Conv2dShape::direct_kernel_grad`]): its GEMM would have the same few values as its
//! output side.
//!
//! A larger kernel at stride 1 without padding is applied directly as well, where its output
//! planes are laid out in wide rows (`w` values apart, [`Conv2dShape::output_rows`]): there
//! the `(ci, ky, kx)` entry's taps for a run of positions are the image's values from
//! `(ci, ky, kx)` on, contiguous, so each vector is loaded straight from the image — no
//! im2col copy, no GEMM packing — and multiplied into [`WIDE_VECTORS`] vectors of positions
//! for a block of [`CHANNELS`] channels, every sum again the bias and then the taps in kernel
//! order ([`Conv2dShape::is_wide_direct`]). The second convolution of a small classifier ran
//! 20% faster so than as im2col + GEMM, whose packed copies were a fifth of its time.

use crate::conv::Conv2dShape;
use crate::scratch::with_scratch;
use crate::threads::{for_each_share, Threads};

/// The most values a kernel may hold for the direct forward.
pub(crate) const DIRECT_PATCH: usize = 32;
/// Vectors of output positions the wide forward makes at once, each for [`CHANNELS`]
/// channels: 24 running sums, the most AVX-512's 32 registers hold beside the taps.
const WIDE_VECTORS: usize = 3;

/// Returns `x86::$avx512(args)` where the CPU has AVX-512F, `x86::$avx2(args)` where it has
/// AVX2 and FMA (checked at run time), else `$portable::<Portable>(args)`: a loop on the
/// widest vector this CPU has.
macro_rules! on_widest_vector {
    ($avx512:ident, $avx2:ident, $portable:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                return unsafe { x86::$avx512($($arg),*) };
            }
            if has!("avx2") && has!("fma") {
                // SAFETY: the CPU has AVX2 and FMA, checked just above.
                return unsafe { x86::$avx2($($arg),*) };
            }
        }
        // SAFETY: `Portable` needs no CPU feature.
        unsafe { $portable::<Portable>($($arg),*) }
    }};
}
/// The most output columns one vector holds: an AVX-512 register of f32.
const LANES: usize = 16;
/// Output channels made at once: enough running sums to keep two FMA units busy.
const CHANNELS: usize = 8;

/// What one image's output rows need to know.
#[derive(Clone, Copy)]
struct Rows {
    conv: Conv2dShape,
    /// The distance in the output between two channels' planes of one image.
    channel_stride: usize,
}

impl Conv2dShape {
    /// Whether the forward computes this convolution directly (module docs).
    pub(crate) fn is_direct(&self) -> bool {
        self.strides == [1, 1] && self.patch() <= DIRECT_PATCH
    }

    /// Values of working memory [`Conv2dShape::direct_forward`] takes: the `c·kh` padded input
    /// rows under one output row, and the kernel rearranged by blocks of [`CHANNELS`].
    pub(crate) fn direct_scratch(&self) -> usize {
        self.c * self.kh * self.window_row() + self.o * self.patch()
    }

    /// Values in one row of the direct forward's window: the padded input row and [`LANES`]
    /// values of slack.
    fn window_row(&self) -> usize {
        let [_, _, left, right] = self.pad;
        self.w + left + right + LANES
    }

    /// The direct forward of one `image` `[c, h, w]` (either form, module docs): its output
    /// planes in [`Conv2dShape::output_rows`]' layout, from `z`'s start, each channel's
    /// `channel_stride` values after the last's. `window` ([`Conv2dShape::direct_scratch`]
    /// values) is working memory for the first form; the wide one reads the image as it is.
    pub(crate) fn direct_forward(
        &self,
        image: &[f32],
        kernel: &[f32],
        bias: &[f32],
        window: &mut [f32],
        z: &mut [f32],
        channel_stride: usize,
    ) {
        let rows = Rows {
            conv: *self,
            channel_stride,
        };
        if self.is_direct() {
            on_widest_vector!(
                image_avx512,
                image_avx2,
                image_rows(&rows, image, kernel, bias, window, z)
            )
        } else {
            debug_assert!(self.is_wide_direct());
            on_widest_vector!(
                wide_avx512,
                wide_avx2,
                wide_planes(&rows, image, kernel, bias, z)
            )
        }
    }

    /// Whether the forward takes its taps straight from the input image (module docs): stride
    /// 1, no padding, a kernel of more than [`DIRECT_PATCH`] values and output planes in wide
    /// rows ([`Conv2dShape::output_rows`]) of at least [`WIDE_VECTORS`] AVX-512 vectors.
    pub(crate) fn is_wide_direct(&self) -> bool {
        let rows = self.output_rows();
        !self.is_direct()
            && self.strides == [1, 1]
            && self.pad == [0; 4]
            && rows.row == self.w
            && rows.plane >= WIDE_VECTORS * LANES
    }

    /// The kernel gradient `dW [o, c, kh, kw] = Σₙ dy[n] · im2col(x[n])ᵀ` of a direct
    /// convolution (module docs) from `x [n, c, h, w]` and `dy [n, o, oh, ow]`, without
    /// GEMM: there its inner side is the kernel's few values, and the batch-wide copies of
    /// `dy` and im2col it needs cost more than the products. Each thread takes a share of the
    /// output channels and, image by image, im2col of the image and the dot product of each
    /// channel's output gradient plane with each kernel entry's row of it, one vector of
    /// positions at a time; every sum runs over the images, the vectors and then their lanes
    /// in that order, so it does not depend on the number of threads.
    pub(crate) fn direct_kernel_grad(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        dy: &[f32],
    ) -> Vec<f32> {
        let patch = self.patch();
        let mut dk = vec![0f32; self.o * patch];
        for_each_share(threads, &mut dk, patch, |channels, dk| {
            with_scratch(patch * self.positions(), |cols| {
                on_widest_vector!(
                    kernel_grad_avx512,
                    kernel_grad_avx2,
                    kernel_grad_rows(self, x, dy, channels, cols, dk)
                )
            })
        });
        dk
    }
}

/// The kernel gradient's rows `dk [channels, patch]` for output `channels` (see
/// [`Conv2dShape::direct_kernel_grad`]), with `cols` (`patch·positions` values) as working
/// memory, on vectors `V`.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn kernel_grad_rows<V: Vector>(
    conv: &Conv2dShape,
    x: &[f32],
    dy: &[f32],
    channels: std::ops::Range<usize>,
    cols: &mut [f32],
    dk: &mut [f32],
) {
    let (patch, positions) = (conv.patch(), conv.positions());
    let cols = &mut cols[..patch * positions];
    // A running vector of sums per (channel, entry), and one scalar for the positions past
    // the last whole vector.
    // SAFETY: (all in this function) the CPU has `V`'s features, the caller's promise.
    let mut sums = vec![unsafe { V::splat(0.0) }; channels.len() * patch];
    let mut tails = vec![0f32; channels.len() * patch];
    for image in 0..conv.n {
        let x = conv.input_image(x, image);
        for (q, row) in cols.chunks_exact_mut(positions).enumerate() {
            conv.im2col_entry(q, x, row);
        }
        for (i, channel) in channels.clone().enumerate() {
            let dy = &dy[(image * conv.o + channel) * positions..][..positions];
            let (sums, tails) = (
                &mut sums[i * patch..][..patch],
                &mut tails[i * patch..][..patch],
            );
            // Entries by eights, so that as many sums run side by side; the rest one by one.
            let mut q = 0;
            while q + CHANNELS <= patch {
                unsafe { entry_dots::<V, CHANNELS>(dy, cols, q, sums, tails) };
                q += CHANNELS;
            }
            for q in q..patch {
                unsafe { entry_dots::<V, 1>(dy, cols, q, sums, tails) };
            }
        }
    }
    for ((dk, sum), tail) in dk.iter_mut().zip(sums).zip(tails) {
        let mut lanes = [0f32; LANES];
        unsafe { sum.store(lanes.as_mut_ptr()) };
        *dk = lanes[..V::WIDTH].iter().sum::<f32>() + tail;
    }
}

/// Adds `dy · cols[q]` for kernel entries `q..q + B` (rows of `cols`, each as long as `dy`)
/// to their running `sums` (whole vectors) and `tails` (the positions after them).
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn entry_dots<V: Vector, const B: usize>(
    dy: &[f32],
    cols: &[f32],
    q: usize,
    sums: &mut [V],
    tails: &mut [f32],
) {
    let positions = dy.len();
    assert!(cols.len() >= (q + B) * positions && sums.len() >= q + B && tails.len() >= q + B);
    let vectors = positions / V::WIDTH;
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); each load reads
    // `WIDTH` values from `v·WIDTH < positions − WIDTH + 1` of a row of `positions` values
    // inside `dy` or `cols` (asserted).
    let mut running: [V; B] = std::array::from_fn(|j| sums[q + j]);
    for v in 0..vectors {
        let d = unsafe { V::load(dy.as_ptr().add(v * V::WIDTH)) };
        for (j, sum) in running.iter_mut().enumerate() {
            let col = unsafe { V::load(cols.as_ptr().add((q + j) * positions + v * V::WIDTH)) };
            *sum = unsafe { V::mul_add(d, col, *sum) };
        }
    }
    for (j, sum) in running.into_iter().enumerate() {
        sums[q + j] = sum;
        let col = &cols[(q + j) * positions..][..positions];
        for p in vectors * V::WIDTH..positions {
            tails[q + j] += dy[p] * col[p];
        }
    }
}

/// Independent running sums in [`fma_chains`]: more than the FMA units can have in flight
/// (two units, four cycles each, on current x86 cores).
const FMA_CHAINS: usize = 12;

/// `rounds` fused multiply-adds on each of [`FMA_CHAINS`] independent running sums of the
/// widest vector this CPU has (AVX-512, else AVX2 with FMA, checked at run time): the rate at
/// which one core issues floating-point work when nothing else holds it up, the ceiling no
/// kernel on it passes. Returns the floating-point operations done (two a lane) and a value
/// that depends on every one of them, for the caller to keep.
pub(crate) fn fma_rounds(rounds: usize) -> (f64, f32) {
    on_widest_vector!(fma_rate_avx512, fma_rate_avx2, fma_chains(rounds))
}

/// [`fma_rounds`] on vectors `V`.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn fma_chains<V: Vector>(rounds: usize) -> (f64, f32) {
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); each store
    // writes `WIDTH ≤ LANES` values into `lanes`.
    let (scale, shift) = unsafe { (V::splat(0.999_999), V::splat(1e-7)) };
    let mut sums = [unsafe { V::splat(1.0) }; FMA_CHAINS];
    for _ in 0..rounds {
        for sum in sums.iter_mut() {
            *sum = unsafe { V::mul_add(scale, *sum, shift) };
        }
    }
    let mut lanes = [0f32; LANES];
    let mut total = 0.0;
    for sum in sums {
        unsafe { sum.store(lanes.as_mut_ptr()) };
        total += lanes[..V::WIDTH].iter().sum::<f32>();
    }
    ((2 * rounds * FMA_CHAINS * V::WIDTH) as f64, total)
}

/// A vector of f32 the direct forward computes with. Its operations need the CPU feature its
/// type is made of (hence `unsafe`); every one is exact or one rounding, the same on each.
trait Vector: Copy {
    /// Values in one vector (at most [`LANES`]).
    const WIDTH: usize;
    /// `value` in every lane.
    unsafe fn splat(value: f32) -> Self;
    /// `WIDTH` values from `from`, which must hold them.
    unsafe fn load(from: *const f32) -> Self;
    /// `weight · tap + sum`, rounded once (fused multiply-add).
    unsafe fn mul_add(weight: Self, tap: Self, sum: Self) -> Self;
    /// The `WIDTH` values to `to`, which must have room for them.
    unsafe fn store(self, to: *mut f32);
}

/// Eight lanes in plain Rust, for CPUs without AVX2.
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Vector for Portable {
    const WIDTH: usize = 8;
    unsafe fn splat(value: f32) -> Self {
        Portable([value; 8])
    }
    unsafe fn load(from: *const f32) -> Self {
        // SAFETY: the caller's promise that `from` holds eight values.
        Portable(unsafe { from.cast::<[f32; 8]>().read_unaligned() })
    }
    unsafe fn mul_add(weight: Self, tap: Self, sum: Self) -> Self {
        Portable(std::array::from_fn(|l| {
            weight.0[l].mul_add(tap.0[l], sum.0[l])
        }))
    }
    unsafe fn store(self, to: *mut f32) {
        // SAFETY: the caller's promise that `to` has room for eight values.
        unsafe { to.cast::<[f32; 8]>().write_unaligned(self.0) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{fma_chains, image_rows, kernel_grad_rows, wide_planes, Conv2dShape, Rows, Vector};

    /// For one x86 register type: `Vector` from its four intrinsics, and `image_rows` and
    /// `kernel_grad_rows` on it compiled with the features it needs, as the functions `$image`
    /// and `$kernel_grad`.
    macro_rules! x86_vector {
        ($image:ident, $wide:ident, $kernel_grad:ident, $fma_rate:ident, $vector:ty,
         $width:literal, $features:literal, $splat:ident, $load:ident, $fma:ident,
         $store:ident) => {
            #[doc = concat!("[`fma_chains`] on `", stringify!($vector), "` (", $features, ").")]
            #[target_feature(enable = $features)]
            pub(super) fn $fma_rate(rounds: usize) -> (f64, f32) {
                // SAFETY: this function runs only where the CPU has the register's features
                // (its target features).
                unsafe { fma_chains::<$vector>(rounds) }
            }

            #[doc = concat!("[`wide_planes`] on `", stringify!($vector), "` (", $features, ").")]
            #[target_feature(enable = $features)]
            pub(super) fn $wide(
                r: &Rows,
                image: &[f32],
                kernel: &[f32],
                bias: &[f32],
                z: &mut [f32],
            ) {
                // SAFETY: this function runs only where the CPU has the register's features
                // (its target features).
                unsafe { wide_planes::<$vector>(r, image, kernel, bias, z) }
            }

            #[doc = concat!("[`kernel_grad_rows`] on `", stringify!($vector), "` (", $features, ").")]
            #[target_feature(enable = $features)]
            pub(super) fn $kernel_grad(
                conv: &Conv2dShape,
                x: &[f32],
                dy: &[f32],
                channels: std::ops::Range<usize>,
                cols: &mut [f32],
                dk: &mut [f32],
            ) {
                // SAFETY: this function runs only where the CPU has the register's features
                // (its target features).
                unsafe { kernel_grad_rows::<$vector>(conv, x, dy, channels, cols, dk) }
            }

            #[doc = concat!("[`image_rows`] on `", stringify!($vector), "` (", $features, ").")]
            #[target_feature(enable = $features)]
            pub(super) fn $image(
                r: &Rows,
                image: &[f32],
                kernel: &[f32],
                bias: &[f32],
                window: &mut [f32],
                z: &mut [f32],
            ) {
                // SAFETY: this function runs only where the CPU has the register's features
                // (its target features).
                unsafe { image_rows::<$vector>(r, image, kernel, bias, window, z) }
            }

            impl Vector for $vector {
                const WIDTH: usize = $width;
                #[inline(always)]
                unsafe fn splat(value: f32) -> Self {
                    // SAFETY: (all four) the caller runs with the register's features;
                    // pointers as the trait says.
                    unsafe { $splat(value) }
                }
                #[inline(always)]
                unsafe fn load(from: *const f32) -> Self {
                    unsafe { $load(from) }
                }
                #[inline(always)]
                unsafe fn mul_add(weight: Self, tap: Self, sum: Self) -> Self {
                    unsafe { $fma(weight, tap, sum) }
                }
                #[inline(always)]
                unsafe fn store(self, to: *mut f32) {
                    unsafe { $store(to, self) }
                }
            }
        };
    }

    #[rustfmt::skip]
    x86_vector!(image_avx512, wide_avx512, kernel_grad_avx512, fma_rate_avx512, __m512, 16, "avx512f",
        _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
    #[rustfmt::skip]
    x86_vector!(image_avx2, wide_avx2, kernel_grad_avx2, fma_rate_avx2, __m256, 8, "avx2,fma",
        _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_storeu_ps);
}

/// Every output row of one `image` `[c, h, w]` into `z` (module docs), on vectors `V`.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn image_rows<V: Vector>(
    r: &Rows,
    image: &[f32],
    kernel: &[f32],
    bias: &[f32],
    window: &mut [f32],
    z: &mut [f32],
) {
    let Conv2dShape {
        c,
        h,
        w,
        o,
        kh,
        kw,
        oh,
        ow,
        ..
    } = r.conv;
    let ([top, _, left, _], patch, window_row) = (r.conv.pad, r.conv.patch(), r.conv.window_row());
    // The kernel's full blocks of `CHANNELS` output channels, each `[patch, CHANNELS]`: a
    // tap's weights side by side. The channels after the last full block read `kernel`.
    let blocks = o / CHANNELS;
    let (by_block, window) = window.split_at_mut(blocks * CHANNELS * patch);
    for (block, by_block) in by_block.chunks_exact_mut(CHANNELS * patch).enumerate() {
        for (q, weights) in by_block.chunks_exact_mut(CHANNELS).enumerate() {
            for (j, weight) in weights.iter_mut().enumerate() {
                *weight = kernel[(block * CHANNELS + j) * patch + q];
            }
        }
    }
    let by_block = &*by_block;
    let window = &mut window[..c * kh * window_row];
    // Where tap `q = (ci·kh + ky)·kw + kx` starts in the window: at output column 0.
    let mut taps = [0usize; DIRECT_PATCH];
    for (q, tap) in taps[..patch].iter_mut().enumerate() {
        *tap = (q / kw) * window_row + q % kw;
    }
    let taps = &taps[..patch];
    // Padding and slack stay zero; only the image's part of each row is written below.
    window.fill(0.0);
    for y in 0..oh {
        // Window row `ci·kh + ky`: input row `y + ky − top` of channel `ci`, padded.
        for (row, out) in window.chunks_exact_mut(window_row).enumerate() {
            let (ci, ky) = (row / kh, row % kh);
            let out = &mut out[left..left + w];
            match (y + ky).checked_sub(top).filter(|&iy| iy < h) {
                Some(iy) => out.copy_from_slice(&image[(ci * h + iy) * w..][..w]),
                None => out.fill(0.0),
            }
        }
        // Vectors of columns; a last partial one moved back to end at `ow` (its first
        // columns made twice, the same both times), so every store is whole.
        let mut x = 0;
        while x < ow {
            let start = if x + V::WIDTH <= ow {
                x
            } else {
                ow.saturating_sub(V::WIDTH)
            };
            let valid = V::WIDTH.min(ow - start);
            let (window, z) = (&window[start..], &mut z[y * ow + start..]);
            for (block, weights) in by_block.chunks_exact(CHANNELS * patch).enumerate() {
                let channel = block * CHANNELS;
                // SAFETY: the caller's promise about `V`.
                unsafe {
                    channels::<V, CHANNELS>(r, window, taps, weights, bias, channel, z, valid)
                };
            }
            for channel in blocks * CHANNELS..o {
                let weights = &kernel[channel * patch..][..patch];
                // SAFETY: as above.
                unsafe { channels::<V, 1>(r, window, taps, weights, bias, channel, z, valid) };
            }
            x = start + V::WIDTH;
        }
    }
}

/// Output channels `channel..channel + B` at one vector of columns: the bias, then each tap
/// (its values from `window` at offset `taps[q]`) times its weight (`weights [patch, B]`)
/// added in kernel order; the first `valid` columns written to `z`, from its start in the
/// first channel's plane.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[allow(clippy::too_many_arguments)] // one call site, inlined; a struct would hide the loop
#[inline(always)]
unsafe fn channels<V: Vector, const B: usize>(
    r: &Rows,
    window: &[f32],
    taps: &[usize],
    weights: &[f32],
    bias: &[f32],
    channel: usize,
    z: &mut [f32],
    valid: usize,
) {
    let last_tap = taps.last().copied().unwrap_or(0);
    assert!(V::WIDTH <= LANES && last_tap + V::WIDTH <= window.len());
    assert!(weights.len() == taps.len() * B && channel + B <= bias.len());
    assert!((channel + B - 1) * r.channel_stride + valid <= z.len());
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); every load reads
    // `WIDTH` values from a tap's offset, at most `last_tap` (taps grow with `q`), inside
    // `window` (asserted); weights and biases by index within their lengths (asserted).
    let mut sums: [V; B] = std::array::from_fn(|j| unsafe { V::splat(bias[channel + j]) });
    for (q, &tap) in taps.iter().enumerate() {
        let tap = unsafe { V::load(window.as_ptr().add(tap)) };
        for (j, sum) in sums.iter_mut().enumerate() {
            let weight = unsafe { V::splat(*weights.get_unchecked(q * B + j)) };
            *sum = unsafe { V::mul_add(weight, tap, *sum) };
        }
    }
    for (j, sum) in sums.into_iter().enumerate() {
        let z = &mut z[(channel + j) * r.channel_stride..];
        if valid == V::WIDTH {
            // SAFETY: `z` has room for `valid` values (asserted above).
            unsafe { sum.store(z.as_mut_ptr()) };
        } else {
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` has room for `WIDTH ≤ LANES` values.
            unsafe { sum.store(lanes.as_mut_ptr()) };
            z[..valid].copy_from_slice(&lanes[..valid]);
        }
    }
}

/// Every output plane of one `image` `[c, h, w]` into `z` in wide rows (module docs), on
/// vectors `V`: [`WIDE_VECTORS`] vectors of positions at a time, a last block moved back to
/// end at the plane's end (its first positions made twice, the same both times), so every
/// load and store is whole.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn wide_planes<V: Vector>(
    r: &Rows,
    image: &[f32],
    kernel: &[f32],
    bias: &[f32],
    z: &mut [f32],
) {
    let (o, plane) = (r.conv.o, r.conv.output_rows().plane);
    let step = WIDE_VECTORS * V::WIDTH;
    assert!(plane >= step);
    let blocks = o / CHANNELS;
    let mut next = 0;
    while next < plane {
        let start = next.min(plane - step);
        for block in 0..blocks {
            // SAFETY: the caller's promise about `V`.
            unsafe {
                wide_channels::<V, CHANNELS>(r, image, kernel, bias, block * CHANNELS, start, z)
            };
        }
        for channel in blocks * CHANNELS..o {
            // SAFETY: as above.
            unsafe { wide_channels::<V, 1>(r, image, kernel, bias, channel, start, z) };
        }
        next = start + step;
    }
}

/// Output channels `channel..channel + B` at [`WIDE_VECTORS`] vectors of wide-row positions
/// from `start`: the bias, then each kernel entry `(ci, ky, kx)` times the image from
/// `(ci, ky, kx + start)` on, added in kernel order; written to `z` from `start` in each
/// channel's plane.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn wide_channels<V: Vector, const B: usize>(
    r: &Rows,
    image: &[f32],
    kernel: &[f32],
    bias: &[f32],
    channel: usize,
    start: usize,
    z: &mut [f32],
) {
    let Conv2dShape {
        c, h, w, kh, kw, ..
    } = r.conv;
    let (patch, step) = (r.conv.patch(), WIDE_VECTORS * V::WIDTH);
    // The last tap's last load ends at `(c−1)·h·w + (kh−1)·w + kw−1 + start + step`, which is
    // `c·h·w` or less while `start + step ≤ plane = (h−kh)·w + w−kw+1`.
    assert!(V::WIDTH <= LANES && start + step <= r.conv.output_rows().plane);
    assert!(image.len() >= c * h * w && kernel.len() >= (channel + B) * patch);
    assert!(channel + B <= bias.len());
    assert!((channel + B - 1) * r.channel_stride + start + step <= z.len());
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); loads inside
    // `image`, weights and biases by index within their lengths (asserted above).
    let mut sums = [[unsafe { V::splat(0.0) }; B]; WIDE_VECTORS];
    for row in sums.iter_mut() {
        for (j, sum) in row.iter_mut().enumerate() {
            *sum = unsafe { V::splat(bias[channel + j]) };
        }
    }
    let mut q = 0;
    for ci in 0..c {
        for ky in 0..kh {
            let from = (ci * h + ky) * w + start;
            for kx in 0..kw {
                let mut taps = [unsafe { V::splat(0.0) }; WIDE_VECTORS];
                for (v, tap) in taps.iter_mut().enumerate() {
                    *tap = unsafe { V::load(image.as_ptr().add(from + kx + v * V::WIDTH)) };
                }
                for j in 0..B {
                    let weight = unsafe { *kernel.get_unchecked((channel + j) * patch + q) };
                    let weight = unsafe { V::splat(weight) };
                    for (row, tap) in sums.iter_mut().zip(&taps) {
                        row[j] = unsafe { V::mul_add(weight, *tap, row[j]) };
                    }
                }
                q += 1;
            }
        }
    }
    for (v, row) in sums.iter().enumerate() {
        for (j, sum) in row.iter().enumerate() {
            let at = (channel + j) * r.channel_stride + start + v * V::WIDTH;
            // SAFETY: `z` has room for `WIDTH` values from `at` (asserted above).
            unsafe { sum.store(z.as_mut_ptr().add(at)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Conv2d;
    use crate::testing::random;

    /// The portable version of a loop and those of the x86 vectors this CPU has.
    #[cfg(target_arch = "x86_64")]
    fn on_this_cpu<F>(portable: F, avx2: F, avx512: F) -> Vec<F> {
        use std::arch::is_x86_feature_detected as has;
        let mut vectors = vec![portable];
        if has!("avx2") && has!("fma") {
            vectors.push(avx2);
        }
        if has!("avx512f") {
            vectors.push(avx512);
        }
        vectors
    }

    /// Every vector's outputs (started as NaN) are the first's bit for bit, and none is NaN.
    fn assert_alike_and_written(outputs: impl Iterator<Item = Vec<f32>>, s: &Conv2dShape) {
        let bits = |z: Vec<f32>| z.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let sums: Vec<_> = outputs.map(bits).collect();
        assert!(sums.iter().all(|z| z == &sums[0]), "{:?}", s.kernel());
        assert!(
            sums[0].iter().all(|&v| !f32::from_bits(v).is_nan()),
            "every output"
        );
    }

    /// One vector's [`image_rows`].
    type ImageRows = unsafe fn(&Rows, &[f32], &[f32], &[f32], &mut [f32], &mut [f32]);

    /// Every vector this CPU has gives the portable lanes' sums bit for bit (the forward's
    /// values against the definition are tested in `conv`, on the vector picked at run time).
    #[test]
    fn every_vector_gives_the_same_sums() {
        #[cfg(target_arch = "x86_64")]
        let vectors: Vec<ImageRows> =
            on_this_cpu(image_rows::<Portable>, x86::image_avx2, x86::image_avx512);
        #[cfg(not(target_arch = "x86_64"))]
        let vectors: Vec<ImageRows> = vec![image_rows::<Portable>];
        for (pad, [h, w], [o, c, kh, kw]) in [
            ([0; 4], [20, 21], [11, 1, 3, 3]),
            ([1, 1, 2, 0], [9, 7], [9, 3, 3, 3]),
            ([0; 4], [5, 4], [3, 2, 2, 2]),
        ] {
            let s = Conv2d::new(pad, [1, 1])
                .shape(&[1, c, h, w], &[o, c, kh, kw])
                .unwrap();
            assert!(s.is_direct());
            let (x, k, b) = (random(c * h * w, 1), random(o * s.patch(), 2), random(o, 3));
            let rows = Rows {
                conv: s,
                channel_stride: s.positions(),
            };
            let sums = vectors.iter().map(|&image_rows| {
                let mut window = vec![f32::NAN; s.direct_scratch()];
                let mut z = vec![f32::NAN; o * s.positions()];
                // SAFETY: each vector was listed only where the CPU has its features.
                unsafe { image_rows(&rows, &x, &k, &b, &mut window, &mut z) };
                z
            });
            assert_alike_and_written(sums, &s);
        }
    }

    /// One vector's [`wide_planes`].
    type WidePlanes = unsafe fn(&Rows, &[f32], &[f32], &[f32], &mut [f32]);

    /// Every vector this CPU has gives the portable lanes' wide forward bit for bit (its values
    /// against the definition are tested in `conv`): a block of eight channels and three
    /// more, planes whose last block of positions overlaps the one before.
    #[test]
    fn every_vector_gives_the_same_wide_sums() {
        #[cfg(target_arch = "x86_64")]
        let vectors: Vec<WidePlanes> =
            on_this_cpu(wide_planes::<Portable>, x86::wide_avx2, x86::wide_avx512);
        #[cfg(not(target_arch = "x86_64"))]
        let vectors: Vec<WidePlanes> = vec![wide_planes::<Portable>];
        for [h, w, o, c] in [[9, 10, 11, 4], [8, 13, 3, 4], [13, 13, 8, 32]] {
            let s = Conv2d::new([0; 4], [1, 1])
                .shape(&[1, c, h, w], &[o, c, 3, 3])
                .unwrap();
            assert!(s.is_wide_direct());
            let (x, k, b) = (random(c * h * w, 1), random(o * s.patch(), 2), random(o, 3));
            let plane = s.output_rows().plane;
            let rows = Rows {
                conv: s,
                channel_stride: plane,
            };
            let sums = vectors.iter().map(|&wide_planes| {
                let mut z = vec![f32::NAN; o * plane];
                // SAFETY: each vector was listed only where the CPU has its features.
                unsafe { wide_planes(&rows, &x, &k, &b, &mut z) };
                z
            });
            assert_alike_and_written(sums, &s);
        }
    }

    /// One vector's [`kernel_grad_rows`].
    type KernelGradRows =
        unsafe fn(&Conv2dShape, &[f32], &[f32], std::ops::Range<usize>, &mut [f32], &mut [f32]);

    /// Every vector this CPU has gives the kernel gradient of the portable lanes to within
    /// rounding (their lanes split the sums differently), for a share of the channels.
    #[test]
    fn every_vector_gives_the_same_kernel_gradient() {
        #[cfg(target_arch = "x86_64")]
        let vectors: Vec<KernelGradRows> = on_this_cpu(
            kernel_grad_rows::<Portable>,
            x86::kernel_grad_avx2,
            x86::kernel_grad_avx512,
        );
        #[cfg(not(target_arch = "x86_64"))]
        let vectors: Vec<KernelGradRows> = vec![kernel_grad_rows::<Portable>];
        // A block of eight kernel entries and one more; three blocks and three.
        for (pad, [h, w], [o, c, kh, kw]) in [
            ([0; 4], [20, 21], [5, 1, 3, 3]),
            ([1, 1, 2, 0], [9, 7], [4, 3, 3, 3]),
        ] {
            let s = Conv2d::new(pad, [1, 1])
                .shape(&[2, c, h, w], &[o, c, kh, kw])
                .unwrap();
            let (x, dy) = (random(2 * c * h * w, 1), random(2 * o * s.positions(), 2));
            let channels = 1..o;
            let grads: Vec<Vec<f32>> = vectors
                .iter()
                .map(|&rows| {
                    let mut cols = vec![f32::NAN; s.patch() * s.positions()];
                    let mut dk = vec![f32::NAN; channels.len() * s.patch()];
                    // SAFETY: each vector was listed only where the CPU has its features.
                    unsafe { rows(&s, &x, &dy, channels.clone(), &mut cols, &mut dk) };
                    dk
                })
                .collect();
            let whole = s.direct_kernel_grad(&crate::Serial, &x, &dy);
            for dk in &grads {
                crate::testing::assert_close(dk, &whole[s.patch()..], 1e-5, "kernel gradient");
            }
        }
    }
}
