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
//!
//! The gradients of such a convolution (stride 1, no padding, a larger kernel) are summed
//! straight from their operands too, without im2col, col2im or GEMM packing: the kernel
//! gradient ([`Conv2dShape::wide_kernel_grad`]) one vector of output channels at a time, from
//! the output gradient laid out by position and each tap's input value broadcast; the input
//! gradient ([`Conv2dShape::wide_input_grad`]) one vector of input channels at a time, from the
//! kernel laid out by tap and each output gradient value broadcast, added into an image laid
//! out by position. Every sum runs in a fixed order over its terms, the same on every vector
//! and any number of threads.

use crate::conv::{first_columns, Conv2dShape};
use crate::scratch::with_scratch;
use crate::threads::{for_each_share, zeroed_chunks, Threads};

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
pub(crate) const LANES: usize = 16;
/// Output channels made at once: enough running sums to keep two FMA units busy.
const CHANNELS: usize = 8;

/// What one image's output rows need to know.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
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

/// Kernel entries the wide kernel gradient sums at once, each for a block of output-channel
/// vectors ([`Conv2dShape::wide_kernel_grad`]); output-gradient positions the wide input
/// gradient takes at once, each for a block of input-channel vectors
/// ([`Conv2dShape::wide_input_grad`]). With four AVX-512 vectors (two of eight lanes) in a
/// block, 24 (12) running sums, the most the registers hold beside the operands.
const GRAD_ROWS: usize = 6;
const GRAD_PIXELS: usize = 12;

impl Conv2dShape {
    /// Whether the gradients are summed straight from their operands (module docs): stride 1,
    /// no padding, a kernel of more than [`DIRECT_PATCH`] values. The kernel gradient also
    /// needs a vector's worth of output channels, the input gradient of input channels
    /// ([`Conv2dShape::has_wide_kernel_grad`], [`Conv2dShape::has_wide_input_grad`]): fewer
    /// are padded to one, which would multiply zeros.
    fn has_wide_gradients(&self) -> bool {
        !self.is_direct() && self.strides == [1, 1] && self.pad == [0; 4]
    }

    /// Whether [`Conv2dShape::wide_kernel_grad`] computes the kernel gradient.
    pub(crate) fn has_wide_kernel_grad(&self) -> bool {
        self.has_wide_gradients() && self.o >= LANES
    }

    /// Whether [`Conv2dShape::wide_input_grad`] computes the input gradient.
    pub(crate) fn has_wide_input_grad(&self) -> bool {
        self.has_wide_gradients() && self.c >= LANES
    }

    /// Values in a row of the wide kernel gradient's `dy` by position: the output channels
    /// padded to whole [`LANES`].
    fn output_lanes(&self) -> usize {
        self.o.next_multiple_of(LANES)
    }

    /// Values in a row of the wide input gradient's kernel by tap and image by position: the
    /// input channels padded to whole [`LANES`].
    fn input_lanes(&self) -> usize {
        self.c.next_multiple_of(LANES)
    }

    /// The kernel gradient `dW [o, c, kh, kw]` from `x [n, c, h, w]` and `dy [n, o, oh, ow]`
    /// where [`Conv2dShape::has_wide_kernel_grad`]: `dy` laid out by position
    /// (`[n, oh·ow, o]`, channels padded with zeros to whole [`LANES`]), then each thread
    /// takes a share of the kernel entries and sums, image by image, [`GRAD_ROWS`] entries by
    /// a block of channel vectors at a time, each position's output gradient vector times the
    /// entry's tap broadcast. Each sum runs over the images and then the positions in raster
    /// order, one fused multiply-add each, whatever the vector or the number of threads.
    pub(crate) fn wide_kernel_grad(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        dy: &[f32],
    ) -> Vec<f32> {
        let (o, patch, positions) = (self.o, self.patch(), self.positions());
        let lanes = self.output_lanes();
        let by_position = zeroed_chunks(
            threads,
            self.n * positions * lanes,
            positions * lanes,
            |image, out| {
                let planes = &dy[image * o * positions..][..o * positions];
                for (channel, plane) in planes.chunks_exact(positions).enumerate() {
                    for (at, &g) in out[channel..].iter_mut().step_by(lanes).zip(plane) {
                        *at = g;
                    }
                }
            },
        );
        // dWᵀ `[patch, lanes]`: a share of kernel entries is a share of its rows.
        let mut dk_t = vec![0f32; patch * lanes];
        for_each_share(threads, &mut dk_t, lanes, |entries, dk_t| {
            self.kernel_grad_entries(x, &by_position, entries, dk_t)
        });
        first_columns(&dk_t, lanes, o)
    }

    /// Adds kernel entries `entries`' gradients (see [`Conv2dShape::wide_kernel_grad`]) to
    /// `dk_t` (their rows of `[patch, lanes]`), on the widest vector this CPU has.
    fn kernel_grad_entries(
        &self,
        x: &[f32],
        by_position: &[f32],
        entries: std::ops::Range<usize>,
        dk_t: &mut [f32],
    ) {
        on_widest_vector!(
            wide_kernel_grad_avx512,
            wide_kernel_grad_avx2,
            wide_kernel_grad_rows(self, x, by_position, entries, dk_t)
        )
    }

    /// The input gradient `dx [n, c, h, w]` from `dy [n, o, oh, ow]` and `kernel [o, c, kh, kw]`
    /// where [`Conv2dShape::has_wide_input_grad`]: the kernel laid out by tap
    /// (`[kh·kw, o, c]`, input channels padded with zeros to whole [`LANES`]), then image by
    /// image (one per task) an image laid out by position (`[h·w, c]`) into which each tap
    /// adds, [`GRAD_PIXELS`] output-gradient positions by a block of channel vectors at a
    /// time, each output channel's weight vector times its gradient value broadcast. Each
    /// value sums the taps in kernel order, each over the output channels in order, one fused
    /// multiply-add each, whatever the vector or the number of threads.
    pub(crate) fn wide_input_grad(
        &self,
        threads: &dyn Threads,
        dy: &[f32],
        kernel: &[f32],
    ) -> Vec<f32> {
        let (o, taps, positions) = (self.o, self.kh * self.kw, self.positions());
        let lanes = self.input_lanes();
        let mut by_tap = vec![0f32; taps * o * lanes];
        for (oc, kernel) in kernel.chunks_exact(self.patch()).take(o).enumerate() {
            for (ci, kernel) in kernel.chunks_exact(taps).enumerate() {
                for (tap, &weight) in kernel.iter().enumerate() {
                    by_tap[(tap * o + oc) * lanes + ci] = weight;
                }
            }
        }
        let plane = self.h * self.w;
        zeroed_chunks(threads, self.n * self.image(), self.image(), |image, dx| {
            let dy = &dy[image * o * positions..][..o * positions];
            with_scratch(plane * lanes, |dx_t| {
                dx_t.fill(0.0);
                self.input_grad_image(dy, &by_tap, dx_t);
                for (ci, dx) in dx.chunks_exact_mut(plane).enumerate() {
                    for (v, &g) in dx.iter_mut().zip(dx_t[ci..].iter().step_by(lanes)) {
                        *v = g;
                    }
                }
            });
        })
    }

    /// One image's input gradient by position, `dx_t [h·w, lanes]` (zeroed), from its
    /// `dy [o, oh, ow]` and the kernel by tap (see [`Conv2dShape::wide_input_grad`]), on the
    /// widest vector this CPU has.
    fn input_grad_image(&self, dy: &[f32], by_tap: &[f32], dx_t: &mut [f32]) {
        on_widest_vector!(
            wide_input_grad_avx512,
            wide_input_grad_avx2,
            wide_input_grad_taps(self, dy, by_tap, dx_t)
        )
    }
}

/// One tile of a grid of rows by vectors (see [`tiles`]): its first row and vector, and
/// whether it spans a whole block of rows (else one row) and of vectors (else one vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tile {
    pub(crate) row: usize,
    pub(crate) vector: usize,
    pub(crate) whole_rows: bool,
    pub(crate) whole_vectors: bool,
}

/// The tiles covering `rows × vectors` in blocks of `row_block` rows by `vector_block`
/// vectors, row by row of blocks: the rows (vectors) past the last whole block one at a time.
pub(crate) fn tiles(
    rows: usize,
    row_block: usize,
    vectors: usize,
    vector_block: usize,
) -> impl Iterator<Item = Tile> {
    let starts = |len: usize, block: usize| {
        let whole = len / block * block;
        (0..whole)
            .step_by(block)
            .map(|start| (start, true))
            .chain((whole..len).map(|start| (start, false)))
    };
    starts(rows, row_block).flat_map(move |(row, whole_rows)| {
        starts(vectors, vector_block).map(move |(vector, whole_vectors)| Tile {
            row,
            vector,
            whole_rows,
            whole_vectors,
        })
    })
}

/// Adds kernel entries `entries`' gradients to `dk_t` (their rows, each `lanes` values: the
/// output channels padded to whole [`LANES`]), from `x [n, c, h, w]` and the output gradient
/// by position `by_position [n, oh·ow, lanes]`, on vectors `V`: [`GRAD_ROWS`] entries by a
/// block of channel vectors at a time, the rest one by one.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn wide_kernel_grad_rows<V: Vector>(
    conv: &Conv2dShape,
    x: &[f32],
    by_position: &[f32],
    entries: std::ops::Range<usize>,
    dk_t: &mut [f32],
) {
    // SAFETY (both): the caller's promise about `V`.
    if V::WIDTH == LANES {
        unsafe { kernel_grad_blocks::<V, 4>(conv, x, by_position, entries, dk_t) }
    } else {
        unsafe { kernel_grad_blocks::<V, 2>(conv, x, by_position, entries, dk_t) }
    }
}

/// [`wide_kernel_grad_rows`] with blocks of `CV` channel vectors.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn kernel_grad_blocks<V: Vector, const CV: usize>(
    conv: &Conv2dShape,
    x: &[f32],
    by_position: &[f32],
    entries: std::ops::Range<usize>,
    dk_t: &mut [f32],
) {
    let (positions, lanes) = (conv.positions(), conv.output_lanes());
    let vectors = lanes / V::WIDTH;
    assert!(dk_t.len() >= entries.len() * lanes);
    assert!(by_position.len() >= conv.n * positions * lanes);
    for image in 0..conv.n {
        let x = conv.input_image(x, image);
        let dy = &by_position[image * positions * lanes..][..positions * lanes];
        for tile in tiles(entries.len(), GRAD_ROWS, vectors, CV) {
            let (q, vector) = (entries.start + tile.row, tile.vector);
            let dk_t = &mut dk_t[tile.row * lanes..];
            // SAFETY (all four): the caller's promise about `V`.
            match (tile.whole_rows, tile.whole_vectors) {
                (true, true) => unsafe {
                    kernel_grad_block::<V, GRAD_ROWS, CV>(conv, x, dy, q, vector, dk_t)
                },
                (true, false) => unsafe {
                    kernel_grad_block::<V, GRAD_ROWS, 1>(conv, x, dy, q, vector, dk_t)
                },
                (false, true) => unsafe {
                    kernel_grad_block::<V, 1, CV>(conv, x, dy, q, vector, dk_t)
                },
                (false, false) => unsafe {
                    kernel_grad_block::<V, 1, 1>(conv, x, dy, q, vector, dk_t)
                },
            }
        }
    }
}

/// Kernel entries `q..q + R` by channel vectors `vector..vector + CV` (see
/// [`wide_kernel_grad_rows`]) for one image `x [c, h, w]` with output gradient
/// `dy [oh·ow, lanes]`: each running sum loaded from `dk_t` (rows from entry `q`, `lanes`
/// values each), every position's gradient vector times the entry's tap added in raster
/// order, stored back.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn kernel_grad_block<V: Vector, const R: usize, const CV: usize>(
    conv: &Conv2dShape,
    x: &[f32],
    dy: &[f32],
    q: usize,
    vector: usize,
    dk_t: &mut [f32],
) {
    let (oh, ow, w) = (conv.oh, conv.ow, conv.w);
    let lanes = conv.output_lanes();
    let first = vector * V::WIDTH;
    let taps: [usize; R] = std::array::from_fn(|j| conv.entry_offset(q + j));
    // The last tap read is `taps[R−1] + (oh−1)·w + ow−1`, inside the image (no padding).
    assert!(V::WIDTH <= LANES && first + CV * V::WIDTH <= lanes);
    assert!(taps[R - 1] + (oh - 1) * w + ow <= x.len() && dy.len() >= oh * ow * lanes);
    assert!(dk_t.len() >= (R - 1) * lanes + first + CV * V::WIDTH);
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); every load and
    // store is of `WIDTH` values from `first + v·WIDTH` of a row of `lanes` inside `dy` or
    // `dk_t`, every tap inside `x` (asserted above).
    let mut sums: [[V; CV]; R] = std::array::from_fn(|j| {
        std::array::from_fn(|v| unsafe {
            V::load(dk_t.as_ptr().add(j * lanes + first + v * V::WIDTH))
        })
    });
    for y in 0..oh {
        for col in 0..ow {
            let (at, grads) = (
                y * w + col,
                dy.as_ptr().wrapping_add((y * ow + col) * lanes),
            );
            let grads: [V; CV] =
                std::array::from_fn(|v| unsafe { V::load(grads.add(first + v * V::WIDTH)) });
            for (row, &tap) in sums.iter_mut().zip(&taps) {
                let tap = unsafe { V::splat(*x.get_unchecked(tap + at)) };
                for (sum, &grad) in row.iter_mut().zip(&grads) {
                    *sum = unsafe { V::mul_add(tap, grad, *sum) };
                }
            }
        }
    }
    for (j, row) in sums.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            unsafe { sum.store(dk_t.as_mut_ptr().add(j * lanes + first + v * V::WIDTH)) };
        }
    }
}

/// Adds one image's input gradient to `dx_t [h·w, lanes]` (the input channels padded to
/// whole [`LANES`]) from its `dy [o, oh, ow]` and the kernel by tap `by_tap [kh·kw, o, lanes]`,
/// on vectors `V`: tap by tap, [`GRAD_PIXELS`] output-gradient positions by a block of channel
/// vectors at a time, the rest one by one.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn wide_input_grad_taps<V: Vector>(
    conv: &Conv2dShape,
    dy: &[f32],
    by_tap: &[f32],
    dx_t: &mut [f32],
) {
    // SAFETY (both): the caller's promise about `V`.
    if V::WIDTH == LANES {
        unsafe { input_grad_blocks::<V, GRAD_PIXELS, 2>(conv, dy, by_tap, dx_t) }
    } else {
        unsafe { input_grad_blocks::<V, { GRAD_PIXELS / 2 }, 2>(conv, dy, by_tap, dx_t) }
    }
}

/// [`wide_input_grad_taps`] with blocks of `P` positions by `CV` channel vectors.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn input_grad_blocks<V: Vector, const P: usize, const CV: usize>(
    conv: &Conv2dShape,
    dy: &[f32],
    by_tap: &[f32],
    dx_t: &mut [f32],
) {
    let (o, w, kw, positions) = (conv.o, conv.w, conv.kw, conv.positions());
    let lanes = conv.input_lanes();
    let vectors = lanes / V::WIDTH;
    for tap in 0..conv.kh * kw {
        let shift = tap / kw * w + tap % kw;
        let weights = &by_tap[tap * o * lanes..][..o * lanes];
        for tile in tiles(positions, P, vectors, CV) {
            let (p, vector) = (tile.row, tile.vector);
            // SAFETY (all four): the caller's promise about `V`.
            match (tile.whole_rows, tile.whole_vectors) {
                (true, true) => unsafe {
                    input_grad_block::<V, P, CV>(conv, dy, weights, p, shift, vector, dx_t)
                },
                (true, false) => unsafe {
                    input_grad_block::<V, P, 1>(conv, dy, weights, p, shift, vector, dx_t)
                },
                (false, true) => unsafe {
                    input_grad_block::<V, 1, CV>(conv, dy, weights, p, shift, vector, dx_t)
                },
                (false, false) => unsafe {
                    input_grad_block::<V, 1, 1>(conv, dy, weights, p, shift, vector, dx_t)
                },
            }
        }
    }
}

/// Output-gradient positions `p..p + P` (in raster order) by channel vectors
/// `vector..vector + CV` of one tap (see [`wide_input_grad_taps`]): the running sums of the
/// input positions they reach (each position's `(y, x)` moved to `(y + ky, x + kx)`, `shift`
/// values on in the image) loaded from `dx_t`, every output channel's weight vector times the
/// position's gradient added in channel order, stored back.
///
/// # Safety
/// The CPU has the features `V`'s operations need.
#[inline(always)]
unsafe fn input_grad_block<V: Vector, const P: usize, const CV: usize>(
    conv: &Conv2dShape,
    dy: &[f32],
    weights: &[f32],
    p: usize,
    shift: usize,
    vector: usize,
    dx_t: &mut [f32],
) {
    let (o, ow, w, positions) = (conv.o, conv.ow, conv.w, conv.positions());
    let lanes = conv.input_lanes();
    let first = vector * V::WIDTH;
    // Where each position's running sums start in `dx_t`: input position `y·w + x + shift`.
    let sums_at: [usize; P] =
        std::array::from_fn(|j| ((p + j) / ow * w + (p + j) % ow + shift) * lanes + first);
    // The last position reaches `(oh−1+ky)·w + ow−1+kx < h·w` (no padding).
    assert!(V::WIDTH <= LANES && first + CV * V::WIDTH <= lanes && p + P <= positions);
    assert!(dy.len() >= o * positions && weights.len() >= o * lanes);
    assert!(sums_at[P - 1] + CV * V::WIDTH <= dx_t.len());
    // SAFETY (all below): the CPU has `V`'s features (the caller's promise); every load and
    // store is of `WIDTH` values inside `weights` or `dx_t` (positions grow with `j`;
    // asserted above), every gradient `dy[oc·positions + p + j]` inside `dy`.
    let mut sums: [[V; CV]; P] = std::array::from_fn(|j| {
        std::array::from_fn(|v| unsafe { V::load(dx_t.as_ptr().add(sums_at[j] + v * V::WIDTH)) })
    });
    for oc in 0..o {
        let row = weights.as_ptr().wrapping_add(oc * lanes + first);
        let taps: [V; CV] = std::array::from_fn(|v| unsafe { V::load(row.add(v * V::WIDTH)) });
        let grads = &dy[oc * positions + p..][..P];
        for (row, &grad) in sums.iter_mut().zip(grads) {
            let grad = unsafe { V::splat(grad) };
            for (sum, &tap) in row.iter_mut().zip(&taps) {
                *sum = unsafe { V::mul_add(grad, tap, *sum) };
            }
        }
    }
    for (j, row) in sums.iter().enumerate() {
        for (v, sum) in row.iter().enumerate() {
            unsafe { sum.store(dx_t.as_mut_ptr().add(sums_at[j] + v * V::WIDTH)) };
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
pub(crate) trait Vector: Copy {
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
pub(crate) struct Portable([f32; 8]);

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
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{
        fma_chains, image_rows, kernel_grad_rows, wide_input_grad_taps, wide_kernel_grad_rows,
        wide_planes, Conv2dShape, Rows, Vector,
    };
    use crate::winner_grads::{winner_input_grad_terms, winner_kernel_grad_rows, Patches};

    /// `$name`: the generic loop `$generic` on `$vector`, compiled with the register's
    /// `$features` (enabled for the function, so the loop inlined into it uses them).
    macro_rules! on_features {
        ($features:literal, $vector:ty,
         $name:ident = $generic:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
            #[doc = concat!("[`", stringify!($generic), "`] on `", stringify!($vector), "` (", $features, ").")]
            #[target_feature(enable = $features)]
            pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: this function runs only where the CPU has the register's features
                // (its target features).
                unsafe { $generic::<$vector>($($arg),*) }
            }
        };
    }

    /// For one x86 register type: `Vector` from its four intrinsics, and each generic loop of
    /// this module on it compiled with the features it needs, under the names given.
    macro_rules! x86_vector {
        ($image:ident, $wide:ident, $kernel_grad:ident, $wide_kernel_grad:ident,
         $wide_input_grad:ident, $winner_kernel_grad:ident, $winner_input_grad:ident,
         $fma_rate:ident, $vector:ty,
         $width:literal, $features:literal, $splat:ident, $load:ident, $fma:ident,
         $store:ident) => {
            on_features!($features, $vector, $fma_rate = fma_chains(rounds: usize) -> (f64, f32));
            on_features!($features, $vector, $wide = wide_planes(
                r: &Rows, image: &[f32], kernel: &[f32], bias: &[f32], z: &mut [f32]));
            on_features!($features, $vector, $kernel_grad = kernel_grad_rows(
                conv: &Conv2dShape, x: &[f32], dy: &[f32], channels: std::ops::Range<usize>,
                cols: &mut [f32], dk: &mut [f32]));
            on_features!($features, $vector, $wide_kernel_grad = wide_kernel_grad_rows(
                conv: &Conv2dShape, x: &[f32], by_position: &[f32],
                entries: std::ops::Range<usize>, dk_t: &mut [f32]));
            on_features!($features, $vector, $wide_input_grad = wide_input_grad_taps(
                conv: &Conv2dShape, dy: &[f32], by_tap: &[f32], dx_t: &mut [f32]));
            on_features!($features, $vector, $winner_kernel_grad = winner_kernel_grad_rows(
                g: &Patches, x_t: &[f32], dy: &[f32], winners: &[u32], starts: &[usize],
                channels: std::ops::Range<usize>, dk_t: &mut [f32]));
            on_features!($features, $vector, $winner_input_grad = winner_input_grad_terms(
                g: &Patches, dy: &[f32], winners: &[u32], starts: &[usize], by_row: &[f32],
                dx_t: &mut [f32]));
            on_features!($features, $vector, $image = image_rows(
                r: &Rows, image: &[f32], kernel: &[f32], bias: &[f32], window: &mut [f32],
                z: &mut [f32]));

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
    x86_vector!(image_avx512, wide_avx512, kernel_grad_avx512, wide_kernel_grad_avx512,
        wide_input_grad_avx512, winner_kernel_grad_avx512, winner_input_grad_avx512,
        fma_rate_avx512, __m512, 16, "avx512f",
        _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_storeu_ps);
    #[rustfmt::skip]
    x86_vector!(image_avx2, wide_avx2, kernel_grad_avx2, wide_kernel_grad_avx2,
        wide_input_grad_avx2, winner_kernel_grad_avx2, winner_input_grad_avx2,
        fma_rate_avx2, __m256, 8, "avx2,fma",
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
    #[cfg(target_arch = "x86_64")]
    use crate::testing::on_this_cpu;
    use crate::testing::random;

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

    /// One vector's [`wide_kernel_grad_rows`].
    type WideKernelGradRows =
        unsafe fn(&Conv2dShape, &[f32], &[f32], std::ops::Range<usize>, &mut [f32]);
    /// One vector's [`wide_input_grad_taps`].
    type WideInputGradTaps = unsafe fn(&Conv2dShape, &[f32], &[f32], &mut [f32]);

    /// Every vector this CPU has gives the portable lanes' gradients straight from the
    /// operands bit for bit (their values against the definition are tested in `conv`): a
    /// share of kernel entries that ends in singles, channels padded to whole vectors, a last
    /// block of positions short of a whole one.
    #[test]
    fn every_vector_gives_the_same_wide_gradients() {
        #[cfg(target_arch = "x86_64")]
        let (kernel_grads, input_grads): (Vec<WideKernelGradRows>, Vec<WideInputGradTaps>) = (
            on_this_cpu(
                wide_kernel_grad_rows::<Portable>,
                x86::wide_kernel_grad_avx2,
                x86::wide_kernel_grad_avx512,
            ),
            on_this_cpu(
                wide_input_grad_taps::<Portable>,
                x86::wide_input_grad_avx2,
                x86::wide_input_grad_avx512,
            ),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (kernel_grads, input_grads): (Vec<WideKernelGradRows>, Vec<WideInputGradTaps>) = (
            vec![wide_kernel_grad_rows::<Portable>],
            vec![wide_input_grad_taps::<Portable>],
        );
        for [h, w, o, c] in [[7, 9, 16, 17], [13, 13, 64, 32], [6, 5, 40, 48]] {
            let s = Conv2d::new([0; 4], [1, 1])
                .shape(&[2, c, h, w], &[o, c, 3, 3])
                .unwrap();
            assert!(s.has_wide_kernel_grad() && s.has_wide_input_grad());
            let (x, dy) = (random(2 * s.image(), 1), random(2 * o * s.positions(), 2));
            let (lanes_out, lanes_in) = (s.output_lanes(), s.input_lanes());
            let by_position = random(2 * s.positions() * lanes_out, 3);
            let by_tap = random(9 * o * lanes_in, 4);
            let entries = 1..s.patch() - 1;
            let dks = kernel_grads.iter().map(|&rows| {
                let mut dk_t = vec![0.5; entries.len() * lanes_out];
                // SAFETY: each vector was listed only where the CPU has its features.
                unsafe { rows(&s, &x, &by_position, entries.clone(), &mut dk_t) };
                dk_t
            });
            assert_alike_and_written(dks, &s);
            let dxs = input_grads.iter().map(|&taps| {
                let mut dx_t = vec![0.5; h * w * lanes_in];
                // SAFETY: as above.
                unsafe { taps(&s, &dy[o * s.positions()..], &by_tap, &mut dx_t) };
                dx_t
            });
            assert_alike_and_written(dxs, &s);
        }
    }

    /// The tiles cover each row and vector once, whole blocks first and then singles.
    #[test]
    fn tiles_cover_the_grid_once() {
        let all: Vec<Tile> = tiles(8, 3, 5, 2).collect();
        let mut covered = [[0; 5]; 8];
        for t in &all {
            let (rows, vectors) = (
                if t.whole_rows { 3 } else { 1 },
                if t.whole_vectors { 2 } else { 1 },
            );
            for row in &mut covered[t.row..t.row + rows] {
                for v in &mut row[t.vector..t.vector + vectors] {
                    *v += 1;
                }
            }
        }
        assert_eq!(covered, [[1; 5]; 8]);
        let row_starts: Vec<(usize, bool)> = all
            .iter()
            .filter(|t| t.vector == 0)
            .map(|t| (t.row, t.whole_rows))
            .collect();
        assert_eq!(row_starts, [(0, true), (3, true), (6, false), (7, false)]);
        assert_eq!(tiles(0, 6, 4, 4).count(), 0);
    }
}
