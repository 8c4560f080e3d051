//! Per-thread working memory for values a kernel writes before it reads them (im2col's
//! columns, a transposed gradient): kept between calls, so a training step does not allocate
//! and zero megabytes that are overwritten at once.

use std::cell::Cell;

/// The most values a thread keeps between calls (16 MiB); a larger request gets memory of its
/// own, freed when it returns.
const KEPT: usize = 4 << 20;

thread_local! {
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Calls `f` with `len` values of working memory whose contents are unspecified (what an
/// earlier call left): `f` must write every value before it reads it. The buffer this thread
/// keeps, taken out for the call and put back after it; a call made while it is out (a pool
/// running another task on a waiting thread) or asking for more than [`KEPT`] gets fresh
/// memory.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if len > KEPT {
        return f(&mut vec![0.0; len]);
    }
    let mut buffer = SCRATCH.take();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let result = f(&mut buffer[..len]);
    SCRATCH.set(buffer);
    result
}

/// Fills this thread's kept buffer with NaN, so a test sees any value a kernel reads before
/// writing it.
#[cfg(test)]
pub(crate) fn poison() {
    SCRATCH.set(vec![f32::NAN; KEPT]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_call_gets_its_own_memory_and_the_buffer_is_kept() {
        let outer = with_scratch(8, |a| {
            a.fill(1.0);
            let inner = with_scratch(8, |b| {
                b.fill(2.0);
                b.as_ptr() as usize
            });
            assert!(
                a.iter().all(|&v| v == 1.0),
                "the nested call wrote into the outer's memory"
            );
            assert_ne!(inner, a.as_ptr() as usize);
            a.as_ptr() as usize
        });
        // The next call reuses the kept buffer: same memory, the old values still there.
        with_scratch(4, |a| {
            assert_eq!(a.as_ptr() as usize, outer);
            assert_eq!(a, [1.0; 4]);
        });
        // More than is kept: memory of its own.
        with_scratch(KEPT + 1, |a| assert_ne!(a.as_ptr() as usize, outer));
    }
}
