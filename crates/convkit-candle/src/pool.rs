//! Max pooling on the CPU as one pass forward and one scatter backward, as candle custom ops.
//!
//! candle 0.11.1's own `max_pool2d` backward scales the gradient by the share of maxima in the
//! window, and has none for a stride other than the window. Keras (TensorFlow) and PyTorch
//! give all of a window's gradient to its first maximum, in row-major order within the
//! window; so does this, for any window and stride, without the seven tensor passes the
//! workaround built from candle's own ops took.

use crate::host::values;
use crate::threads::for_each_chunk;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The name errors give the op.
const OP: &str = "convkit max_pool2d";

/// Max pooling of NCHW input over `size` `[kh, kw]` windows at `strides` `[sh, sw]`, no
/// padding; rows and columns that do not fill a window are dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPool2d {
    pub size: [usize; 2],
    pub strides: [usize; 2],
}

impl MaxPool2d {
    /// `(planes, h, w, oh, ow)` of an NCHW input.
    fn geometry(&self, dims: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
        let (&[n, c, h, w], [kh, kw], [sh, sw]) = (dims, self.size, self.strides) else {
            candle_core::bail!("convkit max_pool2d: expected a 4-D input, found {dims:?}")
        };
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || kh > h || kw > w {
            candle_core::bail!(
                "convkit max_pool2d: window {:?} at strides {:?} does not fit {dims:?}",
                self.size,
                self.strides
            )
        }
        Ok((n * c, h, w, (h - kh) / sh + 1, (w - kw) / sw + 1))
    }

    /// The index within a `h`×`w` plane of the first maximum of output `(y, x)`'s window: an
    /// entry replaces the best so far only when greater (so a NaN first stays, and a later
    /// NaN never wins). The common 2×2 window is unrolled.
    fn first_max(&self, plane: &[f32], w: usize, y: usize, x: usize) -> usize {
        let ([kh, kw], [sh, sw]) = (self.size, self.strides);
        let corner = y * sh * w + x * sw;
        let (mut best, mut top) = (corner, plane[corner]);
        if (kh, kw) == (2, 2) {
            let (upper, lower) = (
                &plane[corner..corner + 2],
                &plane[corner + w..corner + w + 2],
            );
            for (i, v) in [
                (corner + 1, upper[1]),
                (corner + w, lower[0]),
                (corner + w + 1, lower[1]),
            ] {
                if v > top {
                    (best, top) = (i, v);
                }
            }
            return best;
        }
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

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "convkit-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h, w, oh, ow) = self.geometry(layout.dims())?;
        let x = values(storage, layout, OP, "input")?;
        let mut y = vec![0f32; x.len() / (h * w) * oh * ow];
        for_each_chunk(
            &mut y,
            oh * ow,
            || (),
            |(), p, y| {
                let plane = &x[p * h * w..][..h * w];
                for (oy, y) in y.chunks_exact_mut(ow).enumerate() {
                    for (ox, y) in y.iter_mut().enumerate() {
                        *y = plane[self.first_max(plane, w, oy, ox)];
                    }
                }
            },
        );
        let dims = layout.dims();
        Ok((CpuStorage::F32(y), Shape::from((dims[0], dims[1], oh, ow))))
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
        let pool = &self.0;
        let (_, h, w, oh, ow) = pool.geometry(xl.dims())?;
        let (x, dy) = (
            values(xs, xl, OP, "input")?,
            values(dys, dyl, OP, "output gradient")?,
        );
        let mut dx = vec![0f32; x.len()];
        for_each_chunk(
            &mut dx,
            h * w,
            || (),
            |(), p, dx| {
                let (plane, dy) = (&x[p * h * w..][..h * w], &dy[p * oh * ow..][..oh * ow]);
                for (oy, dy) in dy.chunks_exact(ow).enumerate() {
                    for (ox, &d) in dy.iter().enumerate() {
                        dx[pool.first_max(plane, w, oy, ox)] += d;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from(xl.dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
        let x = Var::from_tensor(&Tensor::from_slice(&plane, (1, 1, 4, 4), &Device::Cpu).unwrap())
            .unwrap();
        let pool = MaxPool2d {
            size: [2, 2],
            strides: [2, 2],
        };
        let y = x.as_tensor().apply_op1(pool).unwrap();
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

        let overlapping = MaxPool2d {
            size: [2, 2],
            strides: [1, 1],
        };
        let y = x.as_tensor().apply_op1(overlapping).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 3]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        // 9 windows, 9 units of gradient: the 3 at (2, 1) wins three windows, the 2 at (1, 2)
        // two, the tied top-left window goes to its first 1, and the 5, 9 and 4 one each.
        let mut expected = [0f32; 16];
        for (i, g) in [(0, 1.0), (3, 1.0), (6, 2.0), (9, 3.0), (12, 1.0), (15, 1.0)] {
            expected[i] = g;
        }
        assert_eq!(dx.to_vec1::<f32>().unwrap(), expected);
    }

    /// The unrolled 2×2 window and the general loop pick the same entry as a plain row-major
    /// scan, on planes full of ties and with NaNs.
    #[test]
    fn first_maximum_matches_a_plain_scan() {
        let (h, w) = (9, 8);
        // values from a small set: many ties; a NaN every 13 entries
        let plane: Vec<f32> = (0..h * w)
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
            let pool = MaxPool2d { size, strides };
            let (_, _, _, oh, ow) = pool.geometry(&[1, 1, h, w]).unwrap();
            for y in 0..oh {
                for x in 0..ow {
                    let mut best = None::<usize>;
                    for ky in 0..size[0] {
                        for kx in 0..size[1] {
                            let i = (y * strides[0] + ky) * w + x * strides[1] + kx;
                            if best.is_none_or(|b| plane[i] > plane[b]) {
                                best = Some(i);
                            }
                        }
                    }
                    assert_eq!(
                        pool.first_max(&plane, w, y, x),
                        best.unwrap(),
                        "{size:?} {strides:?} ({y}, {x})"
                    );
                }
            }
        }
    }
}
