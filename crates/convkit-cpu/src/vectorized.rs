//! Plain loops compiled for the widest vectors the CPU has, picked at run time.

/// A loop to compile for wide vectors ([`vectorized`]). Implementations mark `run`
/// `#[inline(always)]`, and what it calls too, so that the loop is compiled where it is
/// inlined: inside a body with the CPU's vector features. (A closure would not do: the
/// compiler leaves a large one out of line, compiled without them.)
pub trait Vectorize {
    type Output;
    /// The loop.
    fn run(self) -> Self::Output;
}

/// Runs `job` compiled with AVX-512F, or AVX2 and FMA, where the CPU has them (checked at run
/// time), as it is otherwise: a loop written element by element is vectorised over 16 or 8
/// lanes instead of SSE2's 4. The results are the same on each: the compiler never fuses a
/// multiply and an add nor reorders a sum of floats, and each lane of a vector operation
/// rounds as the scalar one does.
#[inline(always)]
pub fn vectorized<V: Vectorize>(job: V) -> V::Output {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { x86::avx512(job) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { x86::avx2(job) };
        }
    }
    job.run()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vectorize;

    /// `job` inlined into a body compiled with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) fn avx512<V: Vectorize>(job: V) -> V::Output {
        job.run()
    }

    /// `job` inlined into a body compiled with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn avx2<V: Vectorize>(job: V) -> V::Output {
        job.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roundings of the kinds the optimizer update makes, element by element.
    struct Roundings<'a> {
        x: &'a [f32],
        out: &'a mut [f32],
    }

    impl Vectorize for Roundings<'_> {
        type Output = ();
        #[inline(always)]
        fn run(self) {
            for (o, &x) in self.out.iter_mut().zip(self.x) {
                *o = ((x as f64 * 0.1 + 1e-7) as f32).abs().sqrt() / (x * x + 0.5);
            }
        }
    }

    /// A loop of roundings gives, bit for bit, what it gives unvectorised.
    #[test]
    fn gives_the_plain_loops_results() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let (mut wide, mut plain) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        vectorized(Roundings {
            x: &x,
            out: &mut wide,
        });
        Roundings {
            x: &x,
            out: &mut plain,
        }
        .run();
        assert_eq!(
            wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
