//! The gradients of a convolution followed by ReLU and max pooling
//! ([`ConvReluMaxPoolShape`]) summed over the pooling's winners only. The gradient at the
//! convolution's output is zero everywhere but at each window's winner — a 2×2 pooling keeps
//! at most one position in four, and fewer where ReLU is 0 — so the kernel gradient is the
//! sum over the winners of each one's gradient times the input patch under it, and the input
//! gradient the sum of each one's gradient times the kernel, added under its patch. Computed
//! densely from the scattered output gradient, as [`Conv2dShape`]'s gradients are, three
//! terms in four would be products with zero.
//!
//! Both work channels-last: the input (and the input gradient) laid out by position,
//! `[h·w, c]`, so the patch under an output position is `kh` runs of `kw·c` contiguous values,
//! each taken as whole vectors (the kernel's rows likewise, padded with zeros to whole
//! [`LANES`]; a vector past a run's end reads or adds into the values after it, which the
//! kernel gradient drops and the zero weights leave as they are). Each thread of the kernel
//! gradient owns a share of the output channels and keeps a block of one channel's patch
//! rows in registers while it adds the winners' terms image by image; each thread of the
//! input gradient owns whole images. Every sum runs in a fixed order — the kernel gradient's
//! over images then windows, the input gradient's over output channels then windows — the same
//! on every vector and any number of threads. With padding the patch of a border winner
//! crosses the image's edge; there the gradients are [`Conv2dShape`]'s of the scattered
//! output gradient.

use std::ops::Range;

use crate::conv::Conv2dShape;
use crate::conv_relu_pool::{ConvReluMaxPoolShape, NO_WINNER};
use crate::direct::{tiles, Portable, Vector, LANES};
use crate::scratch::with_scratch;
use crate::threads::{for_each_chunk, for_each_share, zeroed_chunks, Threads};
use crate::{check_len, Result};

#[cfg(target_arch = "x86_64")]
use crate::direct::x86;

/// The name errors give the op.
const OP: &str = "convkit conv2d+relu+max_pool2d backward";

/// Values kept after an image laid out by position: a patch row's last vector may read or
/// write up to one [`LANES`] past the image's last value.
const OVERHANG: usize = LANES;

/// Patch rows whose running sums the kernel gradient keeps at once.
const PATCH_ROWS: usize = 3;

/// The channels-last geometry both gradients walk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patches {
    n: usize,
    o: usize,
    c: usize,
    /// Pooled outputs (windows) of one image's channel.
    windows: usize,
    kh: usize,
    kw: usize,
    /// Values between two input rows laid out by position: `w·c`.
    stride: usize,
    /// One patch row, `kw·c` values, padded to whole [`LANES`].
    row_lanes: usize,
    /// Values of one image laid out by position: `h·w·c`.
    image: usize,
}

impl Patches {
    /// One patch, its rows padded: `kh·row_lanes` values.
    fn patch_lanes(&self) -> usize {
        self.kh * self.row_lanes
    }
}

/// Each window's term of the sums: its output gradient and where its patch starts in the
/// image laid out by position. Only windows with a winner have one.
type Term = (f32, usize);

impl ConvReluMaxPoolShape {
    /// Whether the gradients are summed over the winners (module docs): without padding, and
    /// for patch rows of a vector or more (a first layer's rows of a few values would fill a
    /// fifth of each vector; there the dense sums are as fast).
    fn sums_winners(&self) -> bool {
        self.conv.pad == [0; 4] && self.conv.kw * self.conv.c >= LANES
    }

    fn patches(&self) -> Patches {
        let Conv2dShape {
            n,
            o,
            c,
            h,
            w,
            kh,
            kw,
            ..
        } = self.conv;
        Patches {
            n,
            o,
            c,
            windows: self.pool.oh * self.pool.ow,
            kh,
            kw,
            stride: w * c,
            row_lanes: (kw * c).next_multiple_of(LANES),
            image: h * w * c,
        }
    }

    /// Checks the pooled output's gradient `dy [n, o, ph, pw]` and the winners, as long.
    fn check_pooled(&self, dy: &[f32], winners: &[u32]) -> Result<()> {
        let len = self.conv.n * self.conv.o * self.pool.oh * self.pool.ow;
        check_len(OP, "output gradient", dy.len(), len)?;
        check_len(OP, "winners", winners.len(), len)
    }

    /// Where the patch under each convolution output position `y·ow + x` starts in an image
    /// laid out by position: `((y·sh)·w + x·sw)·c`.
    fn patch_starts(&self) -> Vec<usize> {
        let Conv2dShape {
            c,
            w,
            oh,
            ow,
            strides: [sh, sw],
            ..
        } = self.conv;
        (0..oh)
            .flat_map(|y| (0..ow).map(move |x| (y * sh * w + x * sw) * c))
            .collect()
    }

    /// The kernel gradient `dW [o, c, kh, kw]` from `x [n, c, h, w]`, the pooled output's
    /// gradient `dy [n, o, ph, pw]` and [`Self::forward_with_winners`]'s winners: without
    /// padding summed over the winners (module docs), else [`Conv2dShape::kernel_grad`] of
    /// [`Self::conv_output_grad`].
    pub fn kernel_grad(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        dy: &[f32],
        winners: &[u32],
    ) -> Result<Vec<f32>> {
        check_len(OP, "input", x.len(), self.conv.n * self.conv.image())?;
        self.check_pooled(dy, winners)?;
        if !self.sums_winners() {
            let dz = self.conv_output_grad(threads, dy, winners)?;
            return self.conv.kernel_grad(threads, x, &dz);
        }
        let g = self.patches();
        let starts = self.patch_starts();
        // dW by patch row, `[o, kh, row_lanes]`: a share of channels is a share of its rows.
        let mut dk_t = vec![0f32; g.o * g.patch_lanes()];
        let len = g.n * g.image + OVERHANG;
        with_scratch(len + LANES, |buffer| {
            let x_t = aligned(buffer, len);
            by_position(threads, &self.conv, x, x_t);
            let x_t = &*x_t;
            for_each_share(threads, &mut dk_t, g.patch_lanes(), |channels, dk_t| {
                kernel_grad_channels(&g, x_t, dy, winners, &starts, channels, dk_t)
            });
        });
        let [kh, kw] = [g.kh, g.kw];
        let mut dk = Vec::with_capacity(g.o * g.c * kh * kw);
        for oc in 0..g.o {
            for ci in 0..g.c {
                for ky in 0..kh {
                    let row = (oc * kh + ky) * g.row_lanes;
                    dk.extend((0..kw).map(|kx| dk_t[row + kx * g.c + ci]));
                }
            }
        }
        Ok(dk)
    }

    /// The bias gradient `db [o]`: each channel's sum of the gradients of its windows that
    /// have a winner, in f64, image by image, each image in a fixed order of eight running sums.
    pub fn bias_grad(
        &self,
        threads: &dyn Threads,
        dy: &[f32],
        winners: &[u32],
    ) -> Result<Vec<f32>> {
        self.check_pooled(dy, winners)?;
        let (o, windows) = (self.conv.o, self.pool.oh * self.pool.ow);
        let mut db = vec![0f32; o];
        for_each_chunk(threads, &mut db, 1, |channel, db| {
            let sum: f64 = (0..self.conv.n)
                .map(|image| {
                    let from = (image * o + channel) * windows;
                    winner_sum(&dy[from..][..windows], &winners[from..][..windows])
                })
                .sum();
            db[0] = sum as f32;
        });
        Ok(db)
    }

    /// The input gradient `dx [n, c, h, w]` from the pooled output's gradient
    /// `dy [n, o, ph, pw]`, the winners and `kernel [o, c, kh, kw]`: without padding summed
    /// over the winners (module docs), else [`Conv2dShape::input_grad`] of
    /// [`Self::conv_output_grad`].
    pub fn input_grad(
        &self,
        threads: &dyn Threads,
        dy: &[f32],
        winners: &[u32],
        kernel: &[f32],
    ) -> Result<Vec<f32>> {
        self.check_pooled(dy, winners)?;
        check_len(OP, "kernel", kernel.len(), self.conv.o * self.conv.patch())?;
        if !self.sums_winners() {
            let dz = self.conv_output_grad(threads, dy, winners)?;
            return self.conv.input_grad(threads, &dz, kernel);
        }
        let g = self.patches();
        let [kh, kw] = [g.kh, g.kw];
        // The kernel by patch row, `[o, kh, row_lanes]`, zero past each row's `kw·c` values.
        let mut by_row = vec![0f32; g.o * g.patch_lanes() + LANES];
        let by_row = aligned(&mut by_row, g.o * g.patch_lanes());
        for (oc, kernel) in kernel.chunks_exact(g.c * kh * kw).enumerate() {
            for (ci, kernel) in kernel.chunks_exact(kh * kw).enumerate() {
                for (ky, kernel) in kernel.chunks_exact(kw).enumerate() {
                    let row = (oc * kh + ky) * g.row_lanes;
                    for (kx, &weight) in kernel.iter().enumerate() {
                        by_row[row + kx * g.c + ci] = weight;
                    }
                }
            }
        }
        let starts = self.patch_starts();
        let plane = self.conv.h * self.conv.w;
        let per_image = g.o * g.windows;
        Ok(zeroed_chunks(
            threads,
            g.n * g.image,
            g.image,
            |image, dx| {
                let from = image * per_image;
                let (dy, winners) = (&dy[from..][..per_image], &winners[from..][..per_image]);
                with_scratch(g.image + OVERHANG + LANES, |buffer| {
                    let dx_t = aligned(buffer, g.image + OVERHANG);
                    dx_t.fill(0.0);
                    input_grad_image(&g, dy, winners, &starts, by_row, dx_t);
                    transpose(dx_t, [plane, g.c], dx);
                });
            },
        ))
    }
}

/// `x [n, c, h, w]` laid out by position into `x_t` (`[n, h·w, c]`), and zeros after it.
fn by_position(threads: &dyn Threads, conv: &Conv2dShape, x: &[f32], x_t: &mut [f32]) {
    let (c, image, plane) = (conv.c, conv.image(), conv.h * conv.w);
    for_each_chunk(threads, x_t, image, |i, out| {
        if i >= conv.n {
            return out.fill(0.0);
        }
        transpose(&x[i * image..][..image], [c, plane], out);
    });
}

/// `to [cols, rows]` from `from [rows, cols]`, in square blocks of [`LANES`] so that both
/// sides stay in a few cache lines at a time.
fn transpose(from: &[f32], [rows, cols]: [usize; 2], to: &mut [f32]) {
    assert!(from.len() >= rows * cols && to.len() >= rows * cols);
    let (from, to) = (from.as_ptr(), to.as_mut_ptr());
    for r0 in (0..rows).step_by(LANES) {
        let r1 = (r0 + LANES).min(rows);
        for c0 in (0..cols).step_by(LANES) {
            for col in c0..(c0 + LANES).min(cols) {
                for r in r0..r1 {
                    // SAFETY: `r < rows` and `col < cols`, inside both (asserted above).
                    unsafe { *to.add(col * rows + r) = *from.add(r * cols + col) };
                }
            }
        }
    }
}

/// The first `len` values of `buffer` from its first one on a 64-byte boundary (a cache
/// line: a vector that straddles two takes two accesses); `buffer` holds `len +` [`LANES`].
fn aligned(buffer: &mut [f32], len: usize) -> &mut [f32] {
    let skip = buffer.as_ptr().align_offset(64).min(LANES);
    &mut buffer[skip..][..len]
}

/// The sum of the gradients `dy` of one image's channel whose windows have a winner, in f64
/// and a fixed order: eight running sums over the windows in steps of eight (the others
/// adding 0, so the compiler keeps them in one vector register), then the rest, then the
/// eight.
fn winner_sum(dy: &[f32], winners: &[u32]) -> f64 {
    let term = |d: f32, winner: u32| if winner != NO_WINNER { d as f64 } else { 0.0 };
    let mut lanes = [0f64; 8];
    let (grads, won) = (dy.chunks_exact(8), winners.chunks_exact(8));
    let rest: f64 = (grads.remainder().iter().zip(won.remainder()))
        .map(|(&d, &w)| term(d, w))
        .sum();
    for (grads, won) in grads.zip(won) {
        for ((lane, &d), &w) in lanes.iter_mut().zip(grads).zip(won) {
            *lane += term(d, w);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// Each window of one image's channel with a winner, as its [`Term`], into `terms` (which
/// has room for every window); returns how many.
fn gather_terms(dy: &[f32], winners: &[u32], starts: &[usize], terms: &mut [Term]) -> usize {
    let mut count = 0;
    for (&d, &winner) in dy.iter().zip(winners) {
        let won = winner != NO_WINNER;
        terms[count] = (d, starts[if won { winner as usize } else { 0 }]);
        count += won as usize;
    }
    count
}

/// Adds output channels `channels`' kernel gradients to `dk_t` (their rows, `[kh, row_lanes]`
/// each) from the input by position `x_t`, on the widest vector this CPU has.
fn kernel_grad_channels(
    g: &Patches,
    x_t: &[f32],
    dy: &[f32],
    winners: &[u32],
    starts: &[usize],
    channels: Range<usize>,
    dk_t: &mut [f32],
) {
    on_widest_vector!(
        winner_kernel_grad_avx512,
        winner_kernel_grad_avx2,
        winner_kernel_grad_rows(g, x_t, dy, winners, starts, channels, dk_t)
    )
}

/// [`kernel_grad_channels`] on vectors `V`: image by image, each channel's terms gathered and
/// then added [`PATCH_ROWS`] rows by a block of vectors at a time, the rest one by one.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
pub(crate) unsafe fn winner_kernel_grad_rows<V: Vector>(
    g: &Patches,
    x_t: &[f32],
    dy: &[f32],
    winners: &[u32],
    starts: &[usize],
    channels: Range<usize>,
    dk_t: &mut [f32],
) {
    // SAFETY (both): the caller's promise about `V`.
    if V::WIDTH == LANES {
        unsafe { kernel_grad_blocks::<V, 6>(g, x_t, dy, winners, starts, channels, dk_t) }
    } else {
        unsafe { kernel_grad_blocks::<V, 4>(g, x_t, dy, winners, starts, channels, dk_t) }
    }
}

/// [`winner_kernel_grad_rows`] with blocks of `CV` vectors of a patch row.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn kernel_grad_blocks<V: Vector, const CV: usize>(
    g: &Patches,
    x_t: &[f32],
    dy: &[f32],
    winners: &[u32],
    starts: &[usize],
    channels: Range<usize>,
    dk_t: &mut [f32],
) {
    let vectors = g.row_lanes / V::WIDTH;
    let mut terms = vec![(0f32, 0usize); g.windows];
    for image in 0..g.n {
        let x = &x_t[image * g.image..];
        for (i, channel) in channels.clone().enumerate() {
            let from = (image * g.o + channel) * g.windows;
            let (dy, winners) = (&dy[from..][..g.windows], &winners[from..][..g.windows]);
            let count = gather_terms(dy, winners, starts, &mut terms);
            let terms = &terms[..count];
            let dk = &mut dk_t[i * g.patch_lanes()..][..g.patch_lanes()];
            for tile in tiles(g.kh, PATCH_ROWS, vectors, CV) {
                let (row, vector) = (tile.row, tile.vector);
                // SAFETY (all four): the caller's promise about `V`.
                match (tile.whole_rows, tile.whole_vectors) {
                    (true, true) => unsafe {
                        kernel_grad_block::<V, PATCH_ROWS, CV>(g, x, terms, row, vector, dk)
                    },
                    (true, false) => unsafe {
                        kernel_grad_block::<V, PATCH_ROWS, 1>(g, x, terms, row, vector, dk)
                    },
                    (false, true) => unsafe {
                        kernel_grad_block::<V, 1, CV>(g, x, terms, row, vector, dk)
                    },
                    (false, false) => unsafe {
                        kernel_grad_block::<V, 1, 1>(g, x, terms, row, vector, dk)
                    },
                }
            }
        }
    }
}

/// Patch rows `row..row + R` by vectors `vector..vector + CV` of one channel's kernel
/// gradient `dk [kh, row_lanes]`: the running sums loaded, each term's gradient times the
/// input under its patch (`x`, an image by position and whatever follows it) added in order,
/// stored back.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn kernel_grad_block<V: Vector, const R: usize, const CV: usize>(
    g: &Patches,
    x: &[f32],
    terms: &[Term],
    row: usize,
    vector: usize,
    dk: &mut [f32],
) {
    let first = vector * V::WIDTH;
    let rows: [usize; R] = std::array::from_fn(|r| (row + r) * g.stride + first);
    let sums_at: [usize; R] = std::array::from_fn(|r| (row + r) * g.row_lanes + first);
    // A patch starts at most at the image's last position less `(kh−1)` rows and `kw−1`
    // columns, so its row `r` reads up to `(kh−1)·stride + row_lanes` values on: inside
    // the image and its overhang.
    let reach = (g.kh - 1) * g.stride + g.row_lanes;
    assert!(V::WIDTH <= LANES && first + CV * V::WIDTH <= g.row_lanes && row + R <= g.kh);
    assert!(terms.iter().all(|&(_, at)| at + reach <= x.len()));
    assert!(sums_at[R - 1] + CV * V::WIDTH <= dk.len());
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); every load is
    // inside `x` (each term's patch reach asserted above) and every running sum inside `dk`.
    let mut sums: [[V; CV]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|v| unsafe { V::load(dk.as_ptr().add(sums_at[r] + v * V::WIDTH)) })
    });
    for &(grad, at) in terms {
        let grad = unsafe { V::splat(grad) };
        let patch = x.as_ptr().wrapping_add(at);
        for (row, &offset) in sums.iter_mut().zip(&rows) {
            for (v, sum) in row.iter_mut().enumerate() {
                let tap = unsafe { V::load(patch.add(offset + v * V::WIDTH)) };
                *sum = unsafe { V::mul_add(grad, tap, *sum) };
            }
        }
    }
    for (r, row) in sums.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            unsafe { sum.store(dk.as_mut_ptr().add(sums_at[r] + v * V::WIDTH)) };
        }
    }
}

/// Adds one image's input gradient to `dx_t [h·w, c]` (zeroed, then the overhang) from its
/// pooled output's gradient `dy [o, ph, pw]`, its winners and the kernel by patch row
/// `by_row [o, kh, row_lanes]`, on the widest vector this CPU has.
fn input_grad_image(
    g: &Patches,
    dy: &[f32],
    winners: &[u32],
    starts: &[usize],
    by_row: &[f32],
    dx_t: &mut [f32],
) {
    on_widest_vector!(
        winner_input_grad_avx512,
        winner_input_grad_avx2,
        winner_input_grad_terms(g, dy, winners, starts, by_row, dx_t)
    )
}

/// [`input_grad_image`] on vectors `V`: channel by channel, its terms gathered and each one's
/// gradient times the channel's kernel rows added under its patch, in order.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
pub(crate) unsafe fn winner_input_grad_terms<V: Vector>(
    g: &Patches,
    dy: &[f32],
    winners: &[u32],
    starts: &[usize],
    by_row: &[f32],
    dx_t: &mut [f32],
) {
    let vectors = g.row_lanes / V::WIDTH;
    let reach = (g.kh - 1) * g.stride + g.row_lanes;
    assert!(V::WIDTH <= LANES && by_row.len() >= g.o * g.patch_lanes());
    assert!(dy.len() >= g.o * g.windows && winners.len() >= g.o * g.windows);
    let mut terms = vec![(0f32, 0usize); g.windows];
    for channel in 0..g.o {
        let from = channel * g.windows;
        let (dy, winners) = (&dy[from..][..g.windows], &winners[from..][..g.windows]);
        let count = gather_terms(dy, winners, starts, &mut terms);
        let terms = &terms[..count];
        assert!(terms.iter().all(|&(_, at)| at + reach <= dx_t.len()));
        let weights = by_row[channel * g.patch_lanes()..].as_ptr();
        for &(grad, at) in terms {
            // SAFETY (all below): the CPU has `V`'s features (the caller's promise); every
            // running sum is inside `dx_t` (each term's patch reach asserted above), every
            // weight inside this channel's `patch_lanes` values of `by_row`.
            let grad = unsafe { V::splat(grad) };
            for row in 0..g.kh {
                let (sums, weights) = unsafe {
                    (
                        dx_t.as_mut_ptr().add(at + row * g.stride),
                        weights.add(row * g.row_lanes),
                    )
                };
                for v in 0..vectors {
                    unsafe {
                        let (sum, weight) = (sums.add(v * V::WIDTH), weights.add(v * V::WIDTH));
                        V::mul_add(grad, V::load(weight), V::load(sum)).store(sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Conv2d;
    use crate::pool::MaxPool2d;
    #[cfg(target_arch = "x86_64")]
    use crate::testing::on_this_cpu;
    use crate::testing::{assert_all_close, random, POOLS};
    use crate::Serial;

    /// One test shape: see [`CASES`].
    type Case = (
        [usize; 4],
        [usize; 4],
        [usize; 4],
        [usize; 2],
        [usize; 2],
        [usize; 2],
    );

    /// `(input [n, c, h, w], kernel [o, c, kh, kw], padding, strides, pool size, pool strides)`:
    /// one input channel (a first layer: the dense sums, and a patch row of one vector in the
    /// vector test); a patch row of whole vectors; rows past a whole block of patch rows and
    /// of vectors; rows that end inside a vector, overlapping windows, a stride of 2; padding
    /// (the dense sums again).
    const CASES: [Case; 6] = [
        ([3, 1, 12, 11], [5, 1, 3, 3], [0; 4], [1, 1], [2, 2], [2, 2]),
        ([2, 32, 9, 9], [6, 32, 3, 3], [0; 4], [1, 1], [2, 2], [2, 2]),
        ([2, 40, 8, 7], [3, 40, 5, 3], [0; 4], [1, 1], [2, 2], [2, 2]),
        ([2, 6, 13, 12], [4, 6, 3, 3], [0; 4], [2, 1], [3, 3], [1, 1]),
        ([3, 8, 10, 9], [4, 8, 3, 2], [0; 4], [1, 1], [2, 3], [1, 2]),
        (
            [2, 4, 9, 8],
            [3, 4, 3, 3],
            [1, 0, 2, 1],
            [1, 1],
            [2, 2],
            [2, 2],
        ),
    ];

    /// The gradients summed over the winners are those of the scattered output gradient (to
    /// rounding: the terms are added in another order), the same bit for bit on every pool.
    #[test]
    fn match_the_gradients_of_the_scattered_output_gradient() {
        let mut from_winners = 0;
        for (seed, (input, kernel_dims, pad, strides, size, pool_strides)) in
            CASES.into_iter().enumerate()
        {
            let seed = seed as u64;
            let conv = Conv2d::new(pad, strides)
                .shape(&input, &kernel_dims)
                .unwrap();
            let s = ConvReluMaxPoolShape::new(conv, MaxPool2d::new(size, pool_strides)).unwrap();
            let what = format!("input {input:?}, kernel {kernel_dims:?}, pad {pad:?}");
            from_winners += s.sums_winners() as usize;
            let x = random(conv.n * conv.image(), seed);
            let kernel = random(conv.o * conv.patch(), seed + 10);
            let mut bias = random(conv.o, seed + 20);
            bias[0] = -100.0;
            let (y, winners) = s.forward_with_winners(&Serial, &x, &kernel, &bias).unwrap();
            assert!(
                winners.contains(&NO_WINNER),
                "{what}: every window has a winner"
            );
            let dy = random(y.len(), seed + 30);
            let dz = s.conv_output_grad(&Serial, &dy, &winners).unwrap();
            let expected = [
                conv.kernel_grad(&Serial, &x, &dz).unwrap(),
                conv.input_grad(&Serial, &dz, &kernel).unwrap(),
                conv.bias_grad(&Serial, &dz).unwrap(),
            ];
            let found = |threads: &dyn Threads| {
                [
                    s.kernel_grad(threads, &x, &dy, &winners).unwrap(),
                    s.input_grad(threads, &dy, &winners, &kernel).unwrap(),
                    s.bias_grad(threads, &dy, &winners).unwrap(),
                ]
            };
            let serial = found(&Serial);
            let checks: Vec<_> = serial
                .iter()
                .zip(&expected)
                .map(|(f, e)| (f.clone(), &e[..], 1e-5))
                .collect();
            assert_all_close(&what, &checks);
            for &threads in POOLS {
                assert_eq!(found(threads), serial, "{what}: another pool");
            }
        }
        assert_eq!(from_winners, 4, "the cases summed over the winners");
    }

    /// One vector's [`winner_kernel_grad_rows`].
    type KernelGradRows =
        unsafe fn(&Patches, &[f32], &[f32], &[u32], &[usize], Range<usize>, &mut [f32]);
    /// One vector's [`winner_input_grad_terms`].
    type InputGradTerms = unsafe fn(&Patches, &[f32], &[u32], &[usize], &[f32], &mut [f32]);

    /// Every vector this CPU has gives the portable lanes' sums bit for bit, over running
    /// sums that start at 0.5 (so the lanes past a patch row's end are written too).
    #[test]
    fn every_vector_gives_the_same_sums() {
        #[cfg(target_arch = "x86_64")]
        let (kernel_grads, input_grads): (Vec<KernelGradRows>, Vec<InputGradTerms>) = (
            on_this_cpu(
                winner_kernel_grad_rows::<Portable>,
                x86::winner_kernel_grad_avx2,
                x86::winner_kernel_grad_avx512,
            ),
            on_this_cpu(
                winner_input_grad_terms::<Portable>,
                x86::winner_input_grad_avx2,
                x86::winner_input_grad_avx512,
            ),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (kernel_grads, input_grads): (Vec<KernelGradRows>, Vec<InputGradTerms>) = (
            vec![winner_kernel_grad_rows::<Portable>],
            vec![winner_input_grad_terms::<Portable>],
        );
        for (input, kernel_dims, pad, strides, size, pool_strides) in &CASES[..5] {
            let conv = Conv2d::new(*pad, *strides)
                .shape(input, kernel_dims)
                .unwrap();
            let s = ConvReluMaxPoolShape::new(conv, MaxPool2d::new(*size, *pool_strides)).unwrap();
            let g = s.patches();
            let (x, kernel) = (
                random(conv.n * conv.image(), 1),
                random(conv.o * conv.patch(), 2),
            );
            let (y, winners) = s
                .forward_with_winners(&Serial, &x, &kernel, &random(conv.o, 3))
                .unwrap();
            let dy = random(y.len(), 4);
            let mut x_t = vec![0.0; conv.n * conv.image() + OVERHANG];
            by_position(&Serial, &conv, &x, &mut x_t);
            let starts = s.patch_starts();
            let by_row = random(g.o * g.patch_lanes(), 5);
            let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let dks: Vec<_> = (kernel_grads.iter())
                .map(|&rows| {
                    let mut dk_t = vec![0.5; (g.o - 1) * g.patch_lanes()];
                    // SAFETY: each vector was listed only where the CPU has its features.
                    unsafe { rows(&g, &x_t, &dy, &winners, &starts, 1..g.o, &mut dk_t) };
                    bits(dk_t)
                })
                .collect();
            assert!(dks.iter().all(|dk| dk == &dks[0]), "{kernel_dims:?}");
            let per_image = g.o * g.windows;
            let dxs: Vec<_> = (input_grads.iter())
                .map(|&terms| {
                    let mut dx_t = vec![0.5; g.image + OVERHANG];
                    let (dy, winners) = (&dy[per_image..], &winners[per_image..]);
                    // SAFETY: as above.
                    unsafe { terms(&g, dy, winners, &starts, &by_row, &mut dx_t) };
                    bits(dx_t)
                })
                .collect();
            assert!(dxs.iter().all(|dx| dx == &dxs[0]), "{kernel_dims:?}");
        }
    }

    #[test]
    fn operands_of_the_wrong_length_are_refused() {
        let conv = Conv2d::new([0; 4], [1, 1])
            .shape(&[2, 3, 8, 8], &[4, 3, 3, 3])
            .unwrap();
        let s = ConvReluMaxPoolShape::new(conv, MaxPool2d::new([2, 2], [2, 2])).unwrap();
        let (x, kernel) = (vec![0.0; 2 * 3 * 64], vec![0.0; 4 * 27]);
        let (dy, winners) = (vec![0.0; 2 * 4 * 9], vec![NO_WINNER; 2 * 4 * 9]);
        let message = |e: crate::Error| e.to_string();
        assert!(
            message(s.kernel_grad(&Serial, &x[1..], &dy, &winners).unwrap_err())
                .contains("expected 384 values for the input, found 383")
        );
        assert!(message(
            s.input_grad(&Serial, &dy, &winners[1..], &kernel)
                .unwrap_err()
        )
        .contains("expected 72 values for the winners, found 71"));
        assert!(
            message(s.bias_grad(&Serial, &dy[1..], &winners).unwrap_err())
                .contains("expected 72 values for the output gradient, found 71")
        );
        assert!(message(
            s.input_grad(&Serial, &dy, &winners, &kernel[1..])
                .unwrap_err()
        )
        .contains("expected 108 values for the kernel, found 107"));
    }
}
