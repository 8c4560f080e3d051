//! The machine's FP32 ceiling, measured with the kernel the engines multiply with.

use std::time::Instant;

use crate::gemm::matmul_by_rows;
use crate::threads::Threads;

/// A measured FP32 matrix-multiply peak.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    /// Best rate seen, GFLOP/s (2·m·n·k per product).
    pub gflops: f64,
    /// The SIMD instruction set gemm picked on this CPU at run time, e.g. `AVX-512 (x86-64-v4)`.
    pub instruction_set: &'static str,
    /// The CPU's model name, where the OS says (`/proc/cpuinfo` on Linux).
    pub cpu: Option<String>,
    /// Threads the products were shared out on.
    pub threads: usize,
    /// How it was measured, in a sentence.
    pub method: String,
}

/// The SIMD instruction set gemm 0.19 (with `x86-v4`) runs its f32 kernels with on this CPU.
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

/// The best of `rounds` products of two `size`×`size` f32 matrices, their output rows shared
/// out on `threads` as the engines' GEMMs are ([`matmul_by_rows`]).
pub fn measure(threads: &dyn Threads, size: usize, rounds: usize) -> Peak {
    let a: Vec<f32> = (0..size * size)
        .map(|i| ((i * 7) % 13) as f32 / 13.0)
        .collect();
    let b: Vec<f32> = (0..size * size)
        .map(|i| ((i * 3) % 11) as f32 / 11.0)
        .collect();
    let mut c = vec![0f32; size * size];
    let mut best = 0f64;
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
        best = best.max(2.0 * (size * size * size) as f64 / secs / 1e9);
    }
    let (instruction_set, count) = (instruction_set(), threads.count());
    Peak {
        gflops: best,
        instruction_set,
        cpu: cpu_model(),
        threads: count,
        method: format!(
            "best of {rounds} products of {size}×{size} f32 matrices with gemm's {instruction_set} kernel, rows shared out on {count} threads"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_product_gives_a_positive_rate_and_names_its_kernel() {
        let peak = measure(&crate::Serial, 64, 2);
        assert!(peak.gflops > 0.0 && peak.gflops.is_finite());
        assert_eq!(peak.threads, 1);
        assert!(
            peak.method.contains(peak.instruction_set),
            "{}",
            peak.method
        );
    }
}
