//! Work split over candle's own CPU threads, for convkit's custom ops.
//!
//! candle 0.11 runs its element-wise ops on a barrier pool: the calling thread and
//! `threads - 1` workers, which spin for a while after each op before they park. Ops run on
//! rayon's pool instead (two more threads here) found those workers still spinning on the
//! cores rayon's threads wanted: a sixth of a training step's samples were the spin. On the
//! same pool, the caller works too and nothing competes.

use candle_core::utils::barrier_pool;

/// Runs `fill(scratch, i, chunk)` for every `chunk = out.chunks_mut(size)[i]` on candle's
/// CPU threads, each thread with a `scratch` from `init` (made once per run of chunks it
/// takes). Returns when every chunk is done; a panic in `fill` is resumed on the caller.
pub(crate) fn for_each_chunk<S>(
    out: &mut [f32],
    size: usize,
    init: impl Fn() -> S + Sync,
    fill: impl Fn(&mut S, usize, &mut [f32]) + Sync,
) {
    let (len, size) = (out.len(), size.max(1));
    // The address as an integer, so the closure is `Sync`; every chunk is derived from it.
    let base = out.as_mut_ptr() as usize;
    barrier_pool().execute_chunked(len.div_ceil(size), |range| {
        let mut scratch = init();
        for i in range {
            let start = i * size;
            let end = len.min(start + size);
            // SAFETY: `execute_chunked` hands out each index once, so the chunks
            // `start..end` are disjoint, inside `out` and not aliased while `out` is
            // mutably borrowed here, which lasts until every thread has finished.
            let chunk = unsafe {
                std::slice::from_raw_parts_mut((base as *mut f32).add(start), end - start)
            };
            fill(&mut scratch, i, chunk);
        }
    });
}

/// Splits `out`, `rows` rows of `row_len` values, into one contiguous share of rows per
/// thread of candle's pool and runs `fill(rows, share)` for each share at once: a static split
/// for work of equal cost per row (one GEMM's output rows), where the order of the shares
/// never changes the result.
pub(crate) fn for_each_share(
    out: &mut [f32],
    row_len: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let pool = barrier_pool();
    let rows = out.len() / row_len.max(1);
    let per_share = rows.div_ceil(pool.n_workers() + 1).max(1);
    let base = out.as_mut_ptr() as usize;
    pool.execute(|share| {
        let (first, last) = (
            (share * per_share).min(rows),
            ((share + 1) * per_share).min(rows),
        );
        if first < last {
            // SAFETY: each thread's `share` differs, so the row ranges are disjoint and
            // inside `out`, which stays mutably borrowed until every thread has finished.
            let part = unsafe {
                std::slice::from_raw_parts_mut(
                    (base as *mut f32).add(first * row_len),
                    (last - first) * row_len,
                )
            };
            fill(first..last, part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_once_with_a_short_last_one() {
        let mut out = vec![0f32; 1000];
        for_each_chunk(
            &mut out,
            64,
            || 0usize,
            |seen, i, chunk| {
                *seen += 1;
                for v in chunk.iter_mut() {
                    *v += i as f32 + 1.0;
                }
            },
        );
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j / 64) as f32 + 1.0);
        }
    }

    #[test]
    fn every_row_in_one_share() {
        for rows in [1, 2, 3, 7, 64] {
            let mut out = vec![0f32; rows * 5];
            for_each_share(&mut out, 5, |rows, share| {
                assert_eq!(share.len(), rows.len() * 5);
                for (row, values) in rows.zip(share.chunks_mut(5)) {
                    values.iter_mut().for_each(|v| *v += row as f32);
                }
            });
            let expected: Vec<f32> = (0..rows * 5).map(|j| (j / 5) as f32).collect();
            assert_eq!(out, expected);
        }
    }
}
