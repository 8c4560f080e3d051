//! The f32 values of candle's CPU storage, as convkit's custom ops read and write them, and
//! the GEMM they multiply them with.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

use crate::threads::for_each_share;

/// The values of a contiguous f32 CPU tensor; `op` and `what` name it in an error (`convkit
/// conv2d`, `kernel`).
pub(crate) fn values<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: the {what} must be contiguous"),
        (other, _) => {
            candle_core::bail!("{op}: the {what} must be f32, found {:?}", other.dtype())
        }
    }
}

/// [`values`], to change in place.
pub(crate) fn values_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a mut [f32]> {
    let dtype = storage.dtype();
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: the {what} must be contiguous"),
        _ => candle_core::bail!("{op}: the {what} must be f32, found {dtype:?}"),
    }
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, every matrix given by its row and column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: gemm::Parallelism,
) {
    debug_assert!(dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    debug_assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the three slices cover every element the strides reach (checked above in
    // debug builds, and by construction: each caller passes whole matrices), `dst` does not
    // overlap the inputs (it is a separate `&mut`), and gemm reads and writes nothing else.
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
            parallelism,
        )
    }
}

/// `out [m×n] (+)= lhs [m×k] · rhs [k×n]` with `out` contiguous and its rows shared out
/// between candle's CPU threads ([`for_each_share`]): every sum runs whole on one thread, so
/// the result does not depend on the number of threads or their timing.
pub(crate) fn matmul_by_rows(
    out: &mut [f32],
    (n, k): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    for_each_share(out, n, |rows, out| {
        matmul(
            (rows.len(), n, k),
            out,
            (n, 1),
            accumulate,
            &lhs[rows.start * lhs_rs..],
            (lhs_rs, lhs_cs),
            rhs,
            rhs_strides,
            gemm::Parallelism::None,
        );
    });
}
