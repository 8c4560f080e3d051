//! Max pooling as one pass forward and one scatter backward. Keras (TensorFlow) and PyTorch give
//! all of a window's gradient to its first maximum, in row-major order within the window; so
//! does this, for any window and stride. A NaN that comes first in its window stays the
//! maximum, and a later NaN never wins.

use crate::threads::{collect_chunks, zeroed_chunks, Threads};
use crate::{check_len, shape_error, Result};

/// The name errors give the op.
const OP: &str = "convkit max_pool2d";

/// Max pooling of NCHW input over `size` `[kh, kw]` windows at `strides` `[sh, sw]`, no
/// padding; rows and columns that do not fill a window are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    pub size: [usize; 2],
    pub strides: [usize; 2],
}

/// The sizes of one max pooling: input `[n, c, h, w]`, output `[n, c, oh, ow]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2dShape {
    pub pool: MaxPool2d,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

impl MaxPool2d {
    pub fn new(size: [usize; 2], strides: [usize; 2]) -> Self {
        MaxPool2d { size, strides }
    }

    /// The sizes of this pooling over an NCHW input of `dims`.
    pub fn shape(&self, dims: &[usize]) -> Result<MaxPool2dShape> {
        let (&[n, c, h, w], [kh, kw], [sh, sw]) = (dims, self.size, self.strides) else {
            return Err(shape_error(
                OP,
                format!("expected a 4-D input, found {dims:?}"),
            ));
        };
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || kh > h || kw > w {
            return Err(shape_error(
                OP,
                format!(
                    "window {:?} at strides {:?} does not fit {dims:?}",
                    self.size, self.strides
                ),
            ));
        }
        Ok(MaxPool2dShape {
            pool: *self,
            n,
            c,
            h,
            w,
            oh: (h - kh) / sh + 1,
            ow: (w - kw) / sw + 1,
        })
    }

    /// The index within a `w`-wide plane of the first maximum of output `(y, x)`'s window: an
    /// entry replaces the best so far only when greater. The common 2×2 window is unrolled.
    pub(crate) fn first_max(&self, plane: &[f32], w: usize, y: usize, x: usize) -> usize {
        let ([kh, kw], [sh, sw]) = (self.size, self.strides);
        let corner = y * sh * w + x * sw;
        if (kh, kw) == (2, 2) {
            let (upper, lower) = (&plane[corner..][..2], &plane[corner + w..][..2]);
            let (best, _) = first_max4([upper[0], upper[1], lower[0], lower[1]]);
            return corner + best / 2 * w + best % 2;
        }
        let (mut best, mut top) = (corner, plane[corner]);
        for ky in 0..kh {
            let row = corner + ky * w;
            for (i, &v) in plane[row..row + kw].iter().enumerate() {
                if v > top {
                    (best, top) = (row + i, v);
                }
            }
        }
        best
    }
}

impl MaxPool2dShape {
    /// The output's dims, `[n, c, oh, ow]`.
    pub fn output(&self) -> [usize; 4] {
        [self.n, self.c, self.oh, self.ow]
    }

    /// `y [n, c, oh, ow]`: each window's maximum of `x [n, c, h, w]`.
    pub fn forward(&self, threads: &dyn Threads, x: &[f32]) -> Result<Vec<f32>> {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        check_len(OP, "input", x.len(), self.n * self.c * h * w)?;
        if self.is_halving() {
            // Row by row, each output from two pairs of neighbours.
            return Ok(collect_chunks(
                threads,
                self.n * self.c * oh * ow,
                ow,
                |r| {
                    let (p, oy) = (r / oh, r % oh);
                    let upper = &x[(p * h + 2 * oy) * w..][..2 * ow];
                    let lower = &x[(p * h + 2 * oy + 1) * w..][..2 * ow];
                    upper
                        .chunks_exact(2)
                        .zip(lower.chunks_exact(2))
                        .map(|(u, l)| first_max4([u[0], u[1], l[0], l[1]]).1)
                },
            ));
        }
        Ok(collect_chunks(
            threads,
            self.n * self.c * oh * ow,
            oh * ow,
            |p| {
                let plane = &x[p * h * w..][..h * w];
                (0..oh).flat_map(move |oy| {
                    (0..ow).map(move |ox| plane[self.pool.first_max(plane, w, oy, ox)])
                })
            },
        ))
    }

    /// `dx [n, c, h, w]`: each output's gradient `dy [n, c, oh, ow]` added to its window's
    /// first maximum in `x`.
    pub fn backward(&self, threads: &dyn Threads, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        check_len(OP, "input", x.len(), self.n * self.c * h * w)?;
        check_len(OP, "output gradient", dy.len(), self.n * self.c * oh * ow)?;
        let halving = self.is_halving();
        let dx = zeroed_chunks(threads, x.len(), h * w, |p, dx| {
            let (plane, dy) = (&x[p * h * w..][..h * w], &dy[p * oh * ow..][..oh * ow]);
            for (oy, dy) in dy.chunks_exact(ow).enumerate() {
                if halving {
                    // The windows tile the plane: each of their entries is written once.
                    let (upper, lower) = dx[2 * oy * w..][..2 * w].split_at_mut(w);
                    let x_rows = &plane[2 * oy * w..][..2 * w];
                    let (x_upper, x_lower) = x_rows.split_at(w);
                    for ((((d, u), l), xu), xl) in dy
                        .iter()
                        .zip(upper.chunks_exact_mut(2))
                        .zip(lower.chunks_exact_mut(2))
                        .zip(x_upper.chunks_exact(2))
                        .zip(x_lower.chunks_exact(2))
                    {
                        // Which entry is the first maximum, as masks rather than
                        // `first_max4`'s index, so the loop has no branches (a quarter faster
                        // on the first layer's output): a later entry wins only when greater.
                        let b_wins = xu[1] > xu[0];
                        let top = if b_wins { xu[1] } else { xu[0] };
                        let c_wins = xl[0] > top;
                        let d_wins = xl[1] > if c_wins { xl[0] } else { top };
                        let c_first = c_wins && !d_wins;
                        let b_first = b_wins && !c_wins && !d_wins;
                        let a_first = !b_wins && !c_wins && !d_wins;
                        let share = |first: bool| if first { *d } else { 0.0 };
                        (u[0], u[1], l[0], l[1]) = (
                            share(a_first),
                            share(b_first),
                            share(c_first),
                            share(d_wins),
                        );
                    }
                    continue;
                }
                for (ox, &d) in dy.iter().enumerate() {
                    dx[self.pool.first_max(plane, w, oy, ox)] += d;
                }
            }
        });
        Ok(dx)
    }

    /// Whether the windows are 2×2 at stride 2, the common case, run on its own path.
    pub(crate) fn is_halving(&self) -> bool {
        (self.pool.size, self.pool.strides) == ([2, 2], [2, 2])
    }
}

/// Which of four values, in order, is the first maximum (an entry wins only when greater than
/// the best so far), and its value.
pub(crate) fn first_max4([a, b, c, d]: [f32; 4]) -> (usize, f32) {
    // Selects, not branches: the winner of random data is unpredictable.
    let (mut best, mut top) = (0, a);
    for (i, v) in [(1, b), (2, c), (3, d)] {
        let wins = v > top;
        best = if wins { i } else { best };
        top = if wins { v } else { top };
    }
    (best, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::POOLS;

    #[test]
    fn the_gradient_goes_to_the_first_maximum_of_each_window() {
        // One 4×4 plane; windows 2×2 at stride 2. The top-left window ties (all 1): its
        // gradient goes to its first entry. Overlapping windows (stride 1) share entries.
        let plane = [
            1.0, 1.0, 0.0, 5.0, //
            1.0, 1.0, 2.0, 0.0, //
            0.0, 3.0, 0.0, 0.0, //
            9.0, 0.0, 0.0, 4.0f32,
        ];
        for &threads in POOLS {
            let s = MaxPool2d::new([2, 2], [2, 2]).shape(&[1, 1, 4, 4]).unwrap();
            assert_eq!(s.forward(threads, &plane).unwrap(), [1.0, 5.0, 9.0, 4.0]);
            let dx = s.backward(threads, &plane, &[1.0; 4]).unwrap();
            let mut expected = [0f32; 16];
            for i in [0, 3, 12, 15] {
                expected[i] = 1.0;
            }
            assert_eq!(dx, expected);

            let s = MaxPool2d::new([2, 2], [1, 1]).shape(&[1, 1, 4, 4]).unwrap();
            assert_eq!(s.output(), [1, 1, 3, 3]);
            let dx = s.backward(threads, &plane, &[1.0; 9]).unwrap();
            // 9 windows, 9 units of gradient: the 3 at (2, 1) wins three windows, the 2 at
            // (1, 2) two, the tied top-left window goes to its first 1, and the 5, 9 and 4 one
            // each.
            let mut expected = [0f32; 16];
            for (i, g) in [(0, 1.0), (3, 1.0), (6, 2.0), (9, 3.0), (12, 1.0), (15, 1.0)] {
                expected[i] = g;
            }
            assert_eq!(dx, expected);
        }
    }

    /// Forward and backward against a plain row-major scan, on planes full of ties and NaNs,
    /// for the unrolled 2×2 window and the general loop.
    #[test]
    fn forward_and_backward_match_a_plain_scan_with_ties_and_nans() {
        let (n, c, h, w) = (2, 3, 9, 8);
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| {
                if i % 13 == 5 {
                    f32::NAN
                } else {
                    ((i * 7) % 4) as f32
                }
            })
            .collect();
        for (size, strides) in [
            ([2, 2], [2, 2]),
            ([2, 2], [1, 1]),
            ([3, 3], [2, 2]),
            ([2, 3], [1, 2]),
        ] {
            let s = MaxPool2d::new(size, strides).shape(&[n, c, h, w]).unwrap();
            let dy: Vec<f32> = (0..n * c * s.oh * s.ow)
                .map(|i| (i % 5) as f32 + 0.5)
                .collect();
            let (mut y_ref, mut dx_ref) = (Vec::new(), vec![0f32; x.len()]);
            for p in 0..n * c {
                for oy in 0..s.oh {
                    for ox in 0..s.ow {
                        let mut best = None::<usize>;
                        for ky in 0..size[0] {
                            for kx in 0..size[1] {
                                let i =
                                    p * h * w + (oy * strides[0] + ky) * w + ox * strides[1] + kx;
                                if best.is_none_or(|b| x[i] > x[b]) {
                                    best = Some(i);
                                }
                            }
                        }
                        y_ref.push(x[best.unwrap()]);
                        dx_ref[best.unwrap()] += dy[y_ref.len() - 1];
                    }
                }
            }
            for &threads in POOLS {
                let y = s.forward(threads, &x).unwrap();
                let same = y
                    .iter()
                    .zip(&y_ref)
                    .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
                assert!(same, "{size:?} {strides:?}: {y:?} against {y_ref:?}");
                assert_eq!(
                    s.backward(threads, &x, &dy).unwrap(),
                    dx_ref,
                    "{size:?} {strides:?}"
                );
            }
        }
    }
}
