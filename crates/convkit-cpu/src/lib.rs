//! convkit's CPU kernels: the host code under both pure-Rust engines (candle's custom ops and
//! burn-flex's backend extension), written once.
//!
//! Every kernel reads and writes contiguous row-major `f32` slices whose shapes it states:
//! images are NCHW (`[n, c, h, w]`), convolution kernels `[o, c, kh, kw]`, Dense kernels
//! `[units, inputs]` or `[inputs, units]` ([`dense::KernelLayout`]). Work is shared out
//! between threads through the small [`Threads`] trait, so each engine keeps its own pool:
//! candle its barrier pool, burn-flex rayon's (`Rayon`, with the `rayon` feature). Every sum runs whole on one
//! thread in a fixed order, so results do not depend on the number of threads or their timing.
//!
//! ```
//! use convkit_cpu::{conv::Conv2d, Serial};
//! // one 1×3×3 image, one 2×2 kernel of ones, bias 0.5, no padding, stride 1
//! let conv = Conv2d::new([0; 4], [1, 1]).shape(&[1, 1, 3, 3], &[1, 1, 2, 2])?;
//! let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
//! let y = conv.forward(&Serial, &x, &[1.0; 4], &[0.5])?;
//! assert_eq!(y, [8.5, 12.5, 20.5, 24.5]);
//! # Ok::<(), convkit_cpu::Error>(())
//! ```

pub mod conv;
pub mod conv_relu_pool;
pub mod dense;
#[macro_use]
mod direct;
mod gemm;
pub mod peak;
pub mod pool;
pub mod relu;
mod scratch;
mod threads;
mod vectorized;
mod winner_grads;

pub use gemm::{matmul, matmul_by_rows, Strides};
pub use threads::{
    collect_chunks, for_each_chunk, for_each_chunk_across, for_each_share, zeroed_chunks, Serial,
    Threads,
};
#[cfg(feature = "rayon")]
pub use threads::{Rayon, RayonAwake};
pub use vectorized::{vectorized, Vectorize};

/// What a kernel refuses: shapes or lengths that do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The operands' shapes do not fit the operation.
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
}

/// Shorthand for kernel results.
pub type Result<T> = std::result::Result<T, Error>;

/// A [`Error::Shape`] of `op`.
pub(crate) fn shape_error(op: &'static str, message: impl Into<String>) -> Error {
    Error::Shape {
        op,
        message: message.into(),
    }
}

/// Checks that slice `what` of `op` holds `expected` values.
pub(crate) fn check_len(op: &'static str, what: &str, found: usize, expected: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(shape_error(
            op,
            format!("expected {expected} values for the {what}, found {found}"),
        ))
    }
}

#[cfg(test)]
pub(crate) mod testing;
