//! A convolution, its ReLU and the max pooling after it as one kernel. Each group of images'
//! convolution output is made in the thread's working memory and pooled and rectified from
//! there while it is in cache, so the full-size output is never written, read back, rectified
//! and pooled in three more passes over memory. The backward needs only each window's winner:
//! the gradient at the convolution's output is zero but at the winners, so the kernel, input
//! and bias gradients are sums over the winners ([`ConvReluMaxPoolShape::kernel_grad`] and
//! its siblings, in `winner_grads`); one scatter gives that gradient itself
//! ([`ConvReluMaxPoolShape::conv_output_grad`]). The forward's results are those of the three
//! kernels run one after the other ([`crate::conv`], [`crate::relu`], [`crate::pool`]), bit
//! for bit; the gradients theirs to rounding (the same terms, added in another order).

use crate::conv::{Conv2dShape, OutputRows};
use crate::pool::{first_max4, MaxPool2d, MaxPool2dShape};
use crate::relu::rectify;
use crate::scratch::with_scratch;
use crate::threads::{zeroed_chunk_pair, zeroed_chunks, Threads};
use crate::{check_len, shape_error, Result};

/// The name errors give the op.
const OP: &str = "convkit conv2d+relu+max_pool2d";

/// A window's winner where its maximum is not positive: ReLU's gradient, so the window's, is
/// 0 there.
pub const NO_WINNER: u32 = u32::MAX;

/// The sizes of a convolution followed by ReLU and max pooling: input `[n, c, h, w]`, the
/// convolution's output `[n, o, oh, ow]`, the pooled output `[n, o, ph, pw]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvReluMaxPoolShape {
    pub conv: Conv2dShape,
    pub pool: MaxPool2dShape,
}

impl ConvReluMaxPoolShape {
    /// `pool` over the output of `conv`.
    pub fn new(conv: Conv2dShape, pool: MaxPool2d) -> Result<Self> {
        if !u32::try_from(conv.positions()).is_ok_and(|p| p != NO_WINNER) {
            return Err(shape_error(
                OP,
                format!(
                    "an output plane of {} positions is too large",
                    conv.positions()
                ),
            ));
        }
        Ok(ConvReluMaxPoolShape {
            conv,
            pool: pool.shape(&conv.output())?,
        })
    }

    /// The pooled output's dims, `[n, o, ph, pw]`.
    pub fn output(&self) -> [usize; 4] {
        self.pool.output()
    }

    /// Values of one image's pooled output.
    fn pooled(&self) -> usize {
        self.conv.o * self.pool.oh * self.pool.ow
    }

    /// `y [n, o, ph, pw] = max_pool(relu(conv(x)))` from `x [n, c, h, w]`, `kernel
    /// [o, c, kh, kw]` and `bias [o]`, for inference: no winners kept.
    pub fn forward(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
    ) -> Result<Vec<f32>> {
        self.conv.check_operands(x, kernel, bias)?;
        let (len, group) = (self.conv.n * self.pooled(), self.conv.forward_group());
        Ok(zeroed_chunks(
            threads,
            len,
            group * self.pooled(),
            |g, y| self.group_forward(x, kernel, bias, g, y, None),
        ))
    }

    /// [`Self::forward`] and each output's winner for the backward: the position in its
    /// convolution output plane (`y·ow + x`) of its window's first maximum, [`NO_WINNER`]
    /// where that maximum is not positive (0 or NaN).
    pub fn forward_with_winners(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        self.conv.check_operands(x, kernel, bias)?;
        let len = self.conv.n * self.pooled();
        let chunk = self.conv.forward_group() * self.pooled();
        Ok(zeroed_chunk_pair(
            threads,
            (len, chunk),
            (len, chunk),
            |g, y, winners| self.group_forward(x, kernel, bias, g, y, Some(winners)),
        ))
    }

    /// The gradient at the convolution's output, `dz [n, o, oh, ow]`, from the pooled
    /// output's `dy [n, o, ph, pw]` and [`Self::forward_with_winners`]'s winners: each
    /// output's gradient added at its winner, nothing where it has none.
    pub fn conv_output_grad(
        &self,
        threads: &dyn Threads,
        dy: &[f32],
        winners: &[u32],
    ) -> Result<Vec<f32>> {
        let len = self.conv.n * self.pooled();
        check_len(OP, "output gradient", dy.len(), len)?;
        check_len(OP, "winners", winners.len(), len)?;
        let (plane, pooled) = (self.conv.positions(), self.pool.oh * self.pool.ow);
        let len = self.conv.n * self.conv.o * plane;
        let dz = zeroed_chunks(threads, len, plane, |p, dz| {
            let (dy, winners) = (
                &dy[p * pooled..][..pooled],
                &winners[p * pooled..][..pooled],
            );
            for (&d, &winner) in dy.iter().zip(winners) {
                if winner != NO_WINNER {
                    dz[winner as usize] += d;
                }
            }
        });
        Ok(dz)
    }

    /// Group `g` of [`Conv2dShape::forward_group`] images' pooled outputs `y [images, o, ph,
    /// pw]` and, when asked for, their `winners`.
    ///
    /// The windows are pooled before the ReLU, which gives the same values and winners:
    /// ReLU keeps order, so a window's first maximum after it is its first maximum before it
    /// wherever that is positive, and where it is not the output is 0 (NaN stays NaN) with no
    /// winner either way.
    fn group_forward(
        &self,
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
        g: usize,
        y: &mut [f32],
        mut winners: Option<&mut [u32]>,
    ) {
        let (conv, rows) = (&self.conv, self.conv.output_rows());
        let images = conv.group_images(g);
        let (ph, pw) = (self.pool.oh, self.pool.ow);
        let cols_len = conv.group_scratch(images.len());
        let z_len = conv.o * images.len() * rows.plane;
        with_scratch(cols_len + z_len, |scratch| {
            let (cols, z) = scratch.split_at_mut(cols_len);
            conv.group_forward(x, images.clone(), kernel, bias, cols, z);
            for (i, y) in y.chunks_exact_mut(self.pooled()).enumerate() {
                let mut winners = (winners.as_deref_mut())
                    .map(|winners| &mut winners[i * self.pooled()..][..self.pooled()]);
                for (channel, y) in y.chunks_exact_mut(ph * pw).enumerate() {
                    let plane = conv.group_plane(z, images.len(), channel, i);
                    let winners = (winners.as_deref_mut())
                        .map(|winners| &mut winners[channel * ph * pw..][..ph * pw]);
                    self.pool_plane(plane, rows, y, winners);
                }
            }
        });
    }

    /// One image's channel: its pooled outputs `y [ph, pw]` and, when asked for, their
    /// `winners`, from its convolution output `plane` laid out as `rows` say.
    fn pool_plane(
        &self,
        plane: &[f32],
        rows: OutputRows,
        y: &mut [f32],
        mut winners: Option<&mut [u32]>,
    ) {
        let (pw, ow) = (self.pool.ow, self.conv.ow);
        if self.pool.is_halving() {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, checked just above.
                return unsafe { x86::halving_plane(plane, rows.row, ow, y, pw, winners) };
            }
            return halving_plane(plane, rows.row, ow, y, pw, winners);
        }
        // A position in `plane` as the winner's, in the output [oh, ow].
        let compact = |at: usize| at / rows.row * ow + at % rows.row;
        for (oy, y) in y.chunks_exact_mut(pw).enumerate() {
            let winners = winners.as_deref_mut().map(|w| &mut w[oy * pw..][..pw]);
            let first_max = |ox| self.pool.pool.first_max(plane, rows.row, oy, ox);
            fill_row(y, winners, plane, (0..pw).map(first_max), compact);
        }
    }
}

/// [`ConvReluMaxPoolShape::pool_plane`] for 2×2 windows at stride 2, window by window: `plane`'s
/// rows are `row` values apart, output rows `ow`; `y` is `[ph, pw]`, `winners` too.
fn halving_plane(
    plane: &[f32],
    row: usize,
    ow: usize,
    y: &mut [f32],
    pw: usize,
    mut winners: Option<&mut [u32]>,
) {
    for (oy, y) in y.chunks_exact_mut(pw).enumerate() {
        let upper = &plane[2 * oy * row..][..2 * pw];
        let lower = &plane[(2 * oy + 1) * row..][..2 * pw];
        let windows = upper.chunks_exact(2).zip(lower.chunks_exact(2));
        // Without winners (inference) only the maxima are needed.
        let Some(winners) = winners.as_deref_mut() else {
            for (y, (u, l)) in y.iter_mut().zip(windows) {
                *y = rectify(first_max4([u[0], u[1], l[0], l[1]]).1);
            }
            continue;
        };
        let winners = &mut winners[oy * pw..][..pw];
        for (ox, ((y, w), (u, l))) in y
            .iter_mut()
            .zip(winners.iter_mut())
            .zip(windows)
            .enumerate()
        {
            let (best, top) = first_max4([u[0], u[1], l[0], l[1]]);
            let at = (2 * oy + best / 2) * ow + 2 * ox + best % 2;
            (*y, *w) = (rectify(top), winner(at, top));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::NO_WINNER;

    /// [`super::halving_plane`] sixteen windows at a time: the same values and winners,
    /// as AVX-512's compares and selects order NaNs and ties as [`super::first_max4`],
    /// [`super::rectify`] and [`super::winner`] do.
    #[target_feature(enable = "avx512f")]
    pub(super) fn halving_plane(
        plane: &[f32],
        row: usize,
        ow: usize,
        y: &mut [f32],
        pw: usize,
        mut winners: Option<&mut [u32]>,
    ) {
        let ph = y.len() / pw;
        // Every load below reads inside windows' rows: up to column 2·pw of row 2·ph − 1.
        assert!(ph == 0 || (2 * ph - 1) * row + 2 * pw <= plane.len());
        assert!(winners.as_ref().is_none_or(|w| w.len() == y.len()));
        assert!(u32::try_from(2 * ph * ow).is_ok());
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
        let (zero, no_winner) = (_mm512_setzero_ps(), _mm512_set1_epi32(NO_WINNER as i32));
        let (one, ow_i32) = (_mm512_set1_epi32(1), _mm512_set1_epi32(ow as i32));
        for oy in 0..ph {
            let (upper, lower) = (2 * oy * row, (2 * oy + 1) * row);
            for ox in (0..pw).step_by(16) {
                let count = (pw - ox).min(16);
                let (first, second) = (
                    mask((2 * count).min(16)),
                    mask((2 * count).saturating_sub(16)),
                );
                // The window row's 2·count values from `at` on, evens and odds apart.
                let split = |at: usize| {
                    // SAFETY: `at + 2·count ≤ plane.len()` (asserted above); masked lanes are
                    // not read.
                    let (a, b) = unsafe {
                        let from = plane.as_ptr().add(at);
                        (
                            _mm512_maskz_loadu_ps(first, from),
                            _mm512_maskz_loadu_ps(second, from.add(16)),
                        )
                    };
                    (
                        _mm512_permutex2var_ps(a, evens, b),
                        _mm512_permutex2var_ps(a, odds, b),
                    )
                };
                let ((a, b), (c, d)) = (split(upper + 2 * ox), split(lower + 2 * ox));
                // The window's first maximum in the order a, b, c, d; `best` its position in
                // the output [oh, ow].
                let at_a =
                    _mm512_add_epi32(_mm512_set1_epi32((2 * oy * ow + 2 * ox) as i32), evens);
                let (mut top, mut best) = (a, at_a);
                for (v, at) in [
                    (b, _mm512_add_epi32(at_a, one)),
                    (c, _mm512_add_epi32(at_a, ow_i32)),
                    (d, _mm512_add_epi32(_mm512_add_epi32(at_a, ow_i32), one)),
                ] {
                    let wins = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, top);
                    top = _mm512_mask_blend_ps(wins, top, v);
                    best = _mm512_mask_blend_epi32(wins, best, at);
                }
                let keep = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(top, zero);
                let out = mask(count);
                // SAFETY: `oy·pw + ox + count ≤ y.len()`; masked lanes are not written.
                unsafe {
                    let to = y.as_mut_ptr().add(oy * pw + ox);
                    _mm512_mask_storeu_ps(to, out, _mm512_maskz_mov_ps(keep, top));
                }
                if let Some(winners) = winners.as_deref_mut() {
                    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(top, zero);
                    let won = _mm512_mask_blend_epi32(positive, no_winner, best);
                    // SAFETY: as for `y`, which `winners` is as long as (asserted).
                    unsafe {
                        let to = winners.as_mut_ptr().add(oy * pw + ox);
                        _mm512_mask_storeu_epi32(to.cast(), out, won);
                    }
                }
            }
        }
    }

    /// The first `lanes` lanes, `lanes ≤ 16`.
    #[inline(always)]
    fn mask(lanes: usize) -> __mmask16 {
        debug_assert!(lanes <= 16);
        ((1u32 << lanes) - 1) as __mmask16
    }
}

/// The winner of a window whose first maximum `top` is at `at`: none unless `top` is positive.
fn winner(at: usize, top: f32) -> u32 {
    if top > 0.0 {
        at as u32
    } else {
        NO_WINNER
    }
}

/// One row of pooled outputs `y` and, where kept, their `winners`, from each window's first
/// maximum given as its position `at` in the convolution output `plane`, which `compact`
/// turns into the winner's position in the output `[oh, ow]`.
fn fill_row(
    y: &mut [f32],
    winners: Option<&mut [u32]>,
    plane: &[f32],
    at: impl Iterator<Item = usize>,
    compact: impl Fn(usize) -> usize,
) {
    match winners {
        Some(winners) => {
            for ((y, w), at) in y.iter_mut().zip(winners).zip(at) {
                (*y, *w) = (rectify(plane[at]), winner(compact(at), plane[at]));
            }
        }
        None => {
            for (y, at) in y.iter_mut().zip(at) {
                *y = rectify(plane[at]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Conv2d;
    use crate::testing::POOLS;

    /// Small integers with exact zeros, negatives and NaNs, so the convolution's outputs tie,
    /// rectify to 0 and carry NaN.
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| match (i * 7 + seed) % 11 {
                10 if (i + seed) % 10 == 4 => f32::NAN,
                v => v as f32 - 5.0,
            })
            .collect()
    }

    /// Bitwise equality, NaN equal to NaN.
    fn assert_same(found: &[f32], expected: &[f32], what: &str) {
        assert_eq!(found.len(), expected.len(), "{what}: lengths");
        for (i, (f, e)) in found.iter().zip(expected).enumerate() {
            assert!(
                f.to_bits() == e.to_bits() || (f.is_nan() && e.is_nan()),
                "{what}: value {i} is {f}, expected {e}"
            );
        }
    }

    #[test]
    fn matches_convolution_relu_and_pooling_run_one_after_the_other() {
        // Planes wide enough that the forward multiplies two images at once, then one. Two
        // input channels make the forward direct at stride 1, four im2col + GEMM. The wider
        // planes have more than sixteen 2×2 windows to a row.
        let (n, h, o) = (3, 20, 3);
        let mut partial_group = false;
        for w in [19, 37] {
            for (seed, c, pad, strides, size, pool_strides) in [
                (0, 2, [0; 4], [1, 1], [2, 2], [2, 2]),
                (1, 2, [1; 4], [1, 1], [2, 2], [2, 2]),
                (2, 2, [0, 1, 0, 1], [1, 2], [2, 2], [1, 1]),
                (4, 2, [1; 4], [2, 1], [3, 3], [2, 2]),
                (5, 2, [0; 4], [1, 1], [2, 3], [1, 2]),
                (6, 4, [0; 4], [1, 1], [2, 2], [2, 2]),
                (7, 4, [1; 4], [1, 1], [2, 3], [1, 2]),
            ] {
                let what = format!("width {w}, seed {seed}, pool {size:?} at {pool_strides:?}");
                let conv = Conv2d::new(pad, strides)
                    .shape(&[n, c, h, w], &[o, c, 3, 3])
                    .unwrap();
                let pool = MaxPool2d::new(size, pool_strides);
                let fused = ConvReluMaxPoolShape::new(conv, pool).unwrap();
                partial_group |= !n.is_multiple_of(conv.forward_group());
                let (x, mut kernel) = (values(n * c * h * w, seed), values(o * c * 9, seed + 1));
                // The first channel all exact zeros: every window's maximum is 0, with no winner.
                kernel[..c * 9].fill(0.0);
                let bias = [0.0, -1.0, 2.0];
                for &threads in POOLS {
                    let z = conv.forward(threads, &x, &kernel, &bias).unwrap();
                    let r = crate::relu::forward(threads, &z);
                    let ps = pool.shape(&conv.output()).unwrap();
                    let expected = ps.forward(threads, &r).unwrap();
                    let (y, winners) = fused
                        .forward_with_winners(threads, &x, &kernel, &bias)
                        .unwrap();
                    assert_same(&y, &expected, &what);
                    let inference = fused.forward(threads, &x, &kernel, &bias).unwrap();
                    assert_same(&inference, &expected, &what);
                    assert!(
                        winners.contains(&NO_WINNER),
                        "{what}: no window without a winner"
                    );

                    let dy: Vec<f32> = (0..y.len()).map(|i| (i % 7) as f32 - 2.5).collect();
                    let dr = ps.backward(threads, &r, &dy).unwrap();
                    let dz = crate::relu::backward(threads, &dr, &r).unwrap();
                    let found = fused.conv_output_grad(threads, &dy, &winners).unwrap();
                    assert_same(&found, &dz, &what);
                }
            }
        }
        assert!(partial_group, "no case ends in a smaller group");
    }

    /// The AVX-512 pooling gives the portable one's values and winners, bit for bit: planes
    /// with ties, zeros, negatives and NaNs; wide rows (`row > ow`) and compact ones; output
    /// rows of fewer, exactly and more than sixteen windows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_vector_pools_alike() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for (seed, (oh, ow, row)) in [(5, 7, 7), (6, 9, 12), (4, 32, 32), (7, 45, 47), (3, 33, 33)]
            .into_iter()
            .enumerate()
        {
            let (ph, pw) = (oh / 2, ow / 2);
            let plane = values((oh - 1) * row + ow, seed);
            let mut portable = (vec![0f32; ph * pw], vec![0u32; ph * pw]);
            halving_plane(&plane, row, ow, &mut portable.0, pw, Some(&mut portable.1));
            let mut avx512 = (vec![0f32; ph * pw], vec![0u32; ph * pw]);
            // SAFETY: the CPU has AVX-512F, checked above.
            unsafe { x86::halving_plane(&plane, row, ow, &mut avx512.0, pw, Some(&mut avx512.1)) };
            let what = format!("{oh}×{ow} rows {row} apart");
            assert_same(&avx512.0, &portable.0, &what);
            assert_eq!(avx512.1, portable.1, "{what}: winners");
            let mut inference = vec![0f32; ph * pw];
            // SAFETY: as above.
            unsafe { x86::halving_plane(&plane, row, ow, &mut inference, pw, None) };
            assert_same(&inference, &portable.0, &what);
        }
    }

    #[test]
    fn operands_of_the_wrong_length_are_refused() {
        let conv = Conv2d::new([0; 4], [1, 1])
            .shape(&[1, 1, 4, 4], &[1, 1, 3, 3])
            .unwrap();
        let fused = ConvReluMaxPoolShape::new(conv, MaxPool2d::new([2, 2], [2, 2])).unwrap();
        let e = fused.forward(&crate::Serial, &[0.0; 15], &[0.0; 9], &[0.0]);
        assert!(e.unwrap_err().to_string().contains("input"));
        let e = fused.conv_output_grad(&crate::Serial, &[0.0], &[]);
        assert!(e.unwrap_err().to_string().contains("winners"));
        let too_large = MaxPool2d::new([5, 5], [1, 1]);
        assert!(ConvReluMaxPoolShape::new(conv, too_large).is_err());
    }
}
