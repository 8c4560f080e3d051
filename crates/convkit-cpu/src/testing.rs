//! Helpers for the kernels' tests.

use crate::Threads;

/// Every pool the kernels are tested on: serial; one task per index on rayon's pool (the
/// finest interleaving); and the `rayon` feature's [`crate::Rayon`] where it is compiled.
pub(crate) const POOLS: &[&dyn Threads] = &[
    &crate::Serial,
    &Pool,
    #[cfg(feature = "rayon")]
    &crate::Rayon,
];

/// One task per index on rayon's global pool.
struct Pool;

impl Threads for Pool {
    fn count(&self) -> usize {
        rayon::current_num_threads().max(2)
    }
    fn run(&self, tasks: usize, task: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(|i| task(i..i + 1));
    }
}

/// `len` values in [-1, 1) from a small seeded generator (a 64-bit LCG).
pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Every value within `tolerance` of `expected`, relative to its magnitude where that is over 1.
pub(crate) fn assert_close(found: &[f32], expected: &[f32], tolerance: f32, what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}: lengths");
    for (i, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= tolerance * e.abs().max(1.0),
            "{what}: value {i} is {f}, expected {e}"
        );
    }
}

/// [`assert_close`] for each `(found, expected, tolerance)`: a kernel's outputs and gradients.
pub(crate) fn assert_all_close(what: &str, checks: &[(Vec<f32>, &[f32], f32)]) {
    for (i, (found, expected, tolerance)) in checks.iter().enumerate() {
        assert_close(found, expected, *tolerance, &format!("{what}, output {i}"));
    }
}

/// The portable version of a loop and those of the x86 vectors this CPU has.
#[cfg(target_arch = "x86_64")]
pub(crate) fn on_this_cpu<F>(portable: F, avx2: F, avx512: F) -> Vec<F> {
    use std::arch::is_x86_feature_detected as has;
    let mut vectors = vec![portable];
    if has!("avx2") && has!("fma") {
        vectors.push(avx2);
    }
    if has!("avx512f") {
        vectors.push(avx512);
    }
    vectors
}
