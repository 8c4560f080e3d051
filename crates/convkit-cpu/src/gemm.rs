//! The GEMM every kernel multiplies with: the `gemm` crate, as candle-core and burn-flex use it.

use crate::threads::{for_each_share, Threads};

/// A matrix's `(row, column)` strides, in values.
pub type Strides = (usize, usize);

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]` on the calling thread, every matrix given by its row
/// and column strides. Panics if a slice is shorter than its strides reach.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): Strides,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): Strides,
    rhs: &[f32],
    (rhs_rs, rhs_cs): Strides,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the three slices cover every element the strides reach (asserted above), `dst`
    // does not overlap the inputs (it is a separate `&mut`), and gemm touches nothing else.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `out [m×n] (+)= lhs [m×k] · rhs [k×n]` with `out` contiguous and its rows shared out
/// between `threads` ([`for_each_share`]): every sum runs whole on one thread, so the result
/// does not depend on the number of threads or their timing.
#[allow(clippy::too_many_arguments)]
pub fn matmul_by_rows(
    threads: &dyn Threads,
    out: &mut [f32],
    (n, k): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): Strides,
    rhs: &[f32],
    rhs_strides: Strides,
) {
    for_each_share(threads, out, n, |rows, out| {
        matmul(
            (rows.len(), n, k),
            out,
            (n, 1),
            accumulate,
            &lhs[rows.start * lhs_rs..],
            (lhs_rs, lhs_cs),
            rhs,
            rhs_strides,
        );
    });
}
