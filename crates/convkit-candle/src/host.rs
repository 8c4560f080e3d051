//! The f32 values of candle's CPU storage, as convkit's custom ops read and write them, and
//! convkit-cpu's errors as candle's.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// A convkit-cpu kernel's result as a candle one.
pub(crate) fn kernel_result<T>(result: convkit_cpu::Result<T>) -> Result<T> {
    result.map_err(candle_core::Error::wrap)
}

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
