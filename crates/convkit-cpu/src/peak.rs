//! The machine's FP32 ceiling: the rate its cores issue fused multiply-adds at, and beside it
//! what the engines' matrix-multiply kernel reaches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::direct::fma_rounds;
use crate::gemm::matmul_by_rows;
use crate::threads::Threads;

/// Fused multiply-adds each thread issues on each running sum in one timed round of
/// [`measure`]'s ceiling: about 8 ms on a core with two AVX-512 FMA units.
const FMA_ROUNDS: usize = 4_000_000;

/// A measured FP32 ceiling.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    /// The ceiling, GFLOP/s: fused multiply-adds (2 FLOPs a lane) issued on every thread at
    /// once, on the widest vectors, with nothing else to wait for. No kernel passes it.
    pub gflops: f64,
    /// gemm's best rate on a product of two square matrices, GFLOP/s (2·m·n·k per product):
    /// what the kernel the engines multiply with reaches, for comparison.
    pub matmul_gflops: f64,
    /// The SIMD instruction set both ran with on this CPU, picked at run time, e.g.
    /// `AVX-512 (x86-64-v4)`.
    pub instruction_set: &'static str,
    /// The CPU's model name, where the OS says (`/proc/cpuinfo` on Linux).
    pub cpu: Option<String>,
    /// Threads the work was shared out on.
    pub threads: usize,
    /// How it was measured, in a sentence.
    pub method: String,
}

/// The SIMD instruction set gemm 0.19 (with `x86-v4`) and convkit's kernels run f32 work with on
/// this CPU.
pub fn instruction_set() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return "AVX-512 (x86-64-v4)";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "AVX2 + FMA (x86-64-v3)";
        }
        "SSE2 (x86-64)"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON (aarch64)"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// The CPU's model name from `/proc/cpuinfo`; `None` where there is none.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

/// The ceiling on `threads`: the best of `rounds` timed rounds of fused multiply-adds on every
/// thread at once (four million on each of a dozen independent sums), and the best of
/// `rounds` products of two `size`×`size` f32 matrices, their output rows shared out on
/// `threads` as the engines' GEMMs are ([`matmul_by_rows`]).
pub fn measure(threads: &dyn Threads, size: usize, rounds: usize) -> Peak {
    let count = threads.count();
    let mut gflops = 0f64;
    for _ in 0..rounds.max(1) {
        let flops = AtomicU64::new(0);
        let start = Instant::now();
        threads.each(&|_| {
            let (done, value) = fma_rounds(FMA_ROUNDS);
            std::hint::black_box(value);
            flops.fetch_add(done as u64, Ordering::Relaxed);
        });
        let secs = start.elapsed().as_secs_f64();
        gflops = gflops.max(flops.into_inner() as f64 / secs / 1e9);
    }
    let a: Vec<f32> = (0..size * size)
        .map(|i| ((i * 7) % 13) as f32 / 13.0)
        .collect();
    let b: Vec<f32> = (0..size * size)
        .map(|i| ((i * 3) % 11) as f32 / 11.0)
        .collect();
    let mut c = vec![0f32; size * size];
    let mut matmul_gflops = 0f64;
    for _ in 0..rounds.max(1) {
        let start = Instant::now();
        matmul_by_rows(
            threads,
            &mut c,
            (size, size),
            false,
            &a,
            (size, 1),
            &b,
            (size, 1),
        );
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(&c);
        matmul_gflops = matmul_gflops.max(2.0 * (size * size * size) as f64 / secs / 1e9);
    }
    let instruction_set = instruction_set();
    Peak {
        gflops,
        matmul_gflops,
        instruction_set,
        cpu: cpu_model(),
        threads: count,
        method: format!(
            "fused multiply-adds on {count} threads at once, {instruction_set}, a dozen independent sums on each, the best of {rounds} rounds; gemm's {instruction_set} kernel reaches {matmul_gflops:.1} GFLOP/s of it on {size}×{size} f32 matrices, rows shared out on the same threads"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_rates_are_positive_and_the_method_names_the_kernel() {
        // Which is faster is a timing, not tested here: beside other tests on a busy machine
        // either can be slowed. `compare`'s report shows both.
        let peak = measure(&crate::Serial, 64, 2);
        for rate in [peak.gflops, peak.matmul_gflops] {
            assert!(rate > 0.0 && rate.is_finite(), "{peak:?}");
        }
        assert_eq!(peak.threads, 1);
        assert!(
            peak.method.contains(peak.instruction_set),
            "{}",
            peak.method
        );
    }

    #[test]
    fn the_fma_rounds_count_two_operations_a_lane() {
        let (flops, value) = crate::direct::fma_rounds(10);
        let lanes = flops / (2.0 * 10.0 * 12.0);
        assert!([8.0, 16.0].contains(&lanes), "{flops} FLOPs");
        // Twelve sums of `lanes` values, each 1 scaled by 0.999999 and shifted ten times.
        let one = (0..10).fold(1f32, |v, _| 0.999_999f32.mul_add(v, 1e-7));
        assert!((value - 12.0 * lanes as f32 * one).abs() < 1e-3, "{value}");
    }
}
