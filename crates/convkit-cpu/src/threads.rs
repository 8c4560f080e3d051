//! How the kernels share work out between threads: each engine supplies its own pool.

use std::mem::MaybeUninit;
use std::ops::Range;

/// A pool the kernels run their work on.
pub trait Threads: Sync {
    /// How many threads share the work out, the caller's included (at least 1).
    fn count(&self) -> usize;

    /// Calls `task` with ranges that together cover `0..tasks` once each, spread over the
    /// threads; returns when every call has returned. A panic in `task` reaches the caller.
    fn run(&self, tasks: usize, task: &(dyn Fn(Range<usize>) + Sync));

    /// Calls `task(i)` once for every `i in 0..count()`, the calls at once where the pool can
    /// give each its own thread (for a static split of equal shares); returns when all have.
    fn each(&self, task: &(dyn Fn(usize) + Sync)) {
        self.run(self.count(), &|range| range.for_each(task))
    }
}

/// Everything on the calling thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl Threads for Serial {
    fn count(&self) -> usize {
        1
    }
    fn run(&self, tasks: usize, task: &(dyn Fn(Range<usize>) + Sync)) {
        if tasks > 0 {
            task(0..tasks)
        }
    }
}

/// rayon's global pool: what burn's Flex backend runs its own operations on.
#[cfg(feature = "rayon")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Rayon;

#[cfg(feature = "rayon")]
impl Threads for Rayon {
    fn count(&self) -> usize {
        rayon::current_num_threads()
    }
    fn run(&self, tasks: usize, task: &(dyn Fn(Range<usize>) + Sync)) {
        // A few ranges per thread, so one slow thread does not hold the others up.
        let parts = tasks.min(4 * self.count()).max(1);
        let per_part = tasks.div_ceil(parts);
        use rayon::prelude::*;
        (0..parts).into_par_iter().for_each(|part| {
            let range = (part * per_part).min(tasks)..((part + 1) * per_part).min(tasks);
            if !range.is_empty() {
                task(range)
            }
        });
    }
}

/// While alive, rayon's other threads wait for work spinning rather than asleep.
///
/// Between two parallel operations rayon puts an idle thread to sleep after a few dozen
/// yields, and the next operation wakes it with a system call: on 2 cores a tenth of a
/// burn-flex training step went to that (docs/measurements.md). Held over a step, each of the
/// pool's threads but the caller's runs a job that takes any work that comes (through
/// `rayon::yield_now`) and spins in between, as candle's own pool does, for up to a
/// millisecond without work. Dropping it lets them sleep again. Costs the idle threads' cycles
/// while held, so hold it over work, not waits.
/// How long a thread kept awake by [`RayonAwake`] spins without work before it gives up: longer
/// than the gaps between a training step's operations, short enough that a thread taken away
/// from a wait (see [`RayonAwake::new`]) costs little.
#[cfg(feature = "rayon")]
const RAYON_AWAKE_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

#[cfg(feature = "rayon")]
#[must_use = "the threads sleep again when this is dropped"]
#[derive(Debug)]
pub struct RayonAwake {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(feature = "rayon")]
impl RayonAwake {
    /// Keeps the calling thread's rayon pool (the global one, outside any other) awake until
    /// the value is dropped.
    pub fn new() -> Self {
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The caller's own job returns at once: spinning there would wait for itself.
        let caller = rayon::current_thread_index();
        let flag = done.clone();
        rayon::spawn_broadcast(move |thread| {
            if Some(thread.index()) == caller {
                return;
            }
            // A thread may take this job while it waits inside another (for the rest of a
            // split it began), and what it waits for cannot go on until the job returns. So
            // the job also returns after `RAYON_AWAKE_IDLE` without work: with nothing to run
            // for that long, it may be holding up the caller.
            let mut idle_since = None;
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle_since = None;
                    continue;
                }
                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > RAYON_AWAKE_IDLE {
                    return;
                }
                std::hint::spin_loop();
            }
        });
        Self { done }
    }
}

#[cfg(feature = "rayon")]
impl Default for RayonAwake {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "rayon")]
impl Drop for RayonAwake {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Chunk `i` of `size` values (the last one shorter) of the `len` values at `base`.
///
/// # Safety
/// `base` is the address of `len` values that stay alive and unaliased while the chunk is
/// used, and no other chunk `i` is made at the same time.
unsafe fn chunk<'a, T>(base: usize, len: usize, size: usize, i: usize) -> &'a mut [T] {
    let start = i * size;
    let end = len.min(start + size);
    // SAFETY: `start..end` lies inside the `len` values (the caller's promise for `base`).
    unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), end - start) }
}

/// Runs `fill(i, chunk)` for every `chunk = out.chunks_mut(size)[i]` on `threads`.
pub fn for_each_chunk(
    threads: &dyn Threads,
    out: &mut [f32],
    size: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) {
    let (len, size) = (out.len(), size.max(1));
    // The address as an integer, so the closure is `Sync`; every chunk is derived from it.
    let base = out.as_mut_ptr() as usize;
    threads.run(len.div_ceil(size), &|range| {
        for i in range {
            // SAFETY: `run` hands out each index once, so the chunks are disjoint, inside
            // `out` and not aliased while `out` is mutably borrowed here, which lasts until
            // every thread has finished.
            fill(i, unsafe { chunk(base, len, size, i) });
        }
    });
}

/// Runs `f(start, chunks)` on `threads` for each chunk of `size` values (the last one shorter)
/// of `slices`, all as long: `chunks` holds the values from `start` of each slice, in order.
/// For element-wise updates of several arrays at once (a weight and its optimizer's slots).
pub fn for_each_chunk_across(
    threads: &dyn Threads,
    slices: &mut [&mut [f32]],
    size: usize,
    f: impl Fn(usize, &mut [&mut [f32]]) + Sync,
) {
    let (size, len) = (size.max(1), slices.first().map_or(0, |s| s.len()));
    assert!(
        slices.iter().all(|s| s.len() == len),
        "slices of one length, found {:?}",
        slices.iter().map(|s| s.len()).collect::<Vec<_>>()
    );
    let bases: Vec<usize> = slices.iter_mut().map(|s| s.as_mut_ptr() as usize).collect();
    threads.run(len.div_ceil(size), &|range| {
        for i in range {
            // SAFETY: as in `for_each_chunk`, for each slice: `run` hands out each index once,
            // and the slices are distinct `&mut` borrows held until every thread has finished.
            let mut chunks: Vec<&mut [f32]> = (bases.iter())
                .map(|&base| unsafe { chunk(base, len, size, i) })
                .collect();
            f(i * size, &mut chunks);
        }
    });
}

/// Chunk `i` of [`chunk`]'s, still uninitialised, with every value set to `T::default()`.
///
/// # Safety
/// As for [`chunk`], over the spare capacity of a vector of at least `len` values.
unsafe fn default_chunk<'a, T: Copy + Default>(
    base: usize,
    len: usize,
    size: usize,
    i: usize,
) -> &'a mut [T] {
    // SAFETY: the caller's promise, passed on.
    let chunk: &mut [MaybeUninit<T>] = unsafe { chunk(base, len, size, i) };
    chunk.fill(MaybeUninit::new(T::default()));
    // SAFETY: every value was just written; `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// A vector of `len` values, zero (`T::default()`) at first, that `fill(i, chunk)` then
/// completes chunk by chunk on `threads`, as [`for_each_chunk`] over `vec![0; len]` would.
/// Each chunk is zeroed by the thread that fills it, just before: the zeroing is shared out
/// and the chunk is in cache when `fill` writes it, where a zeroed allocation is one pass on
/// the calling thread (the allocator reuses memory, so it cannot hand out fresh zero pages).
pub fn zeroed_chunks<T: Copy + Default + Send>(
    threads: &dyn Threads,
    len: usize,
    size: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let size = size.max(1);
    let mut out = Vec::<T>::with_capacity(len);
    let base = out.spare_capacity_mut().as_mut_ptr() as usize;
    threads.run(len.div_ceil(size), &|range| {
        for i in range {
            // SAFETY: `run` hands out each index once, so the chunks are disjoint and inside
            // the capacity of `out`, which nothing else touches until every thread has
            // finished.
            fill(i, unsafe { default_chunk(base, len, size, i) });
        }
    });
    // SAFETY: every chunk of `0..len` was initialised (a panic in a task reaches this thread
    // before this line), and `run` returned after every task.
    unsafe { out.set_len(len) };
    out
}

/// [`zeroed_chunks`] of two vectors at once: `fill(i, a_chunk, b_chunk)` with chunk `i` of
/// `a` (`a_len` values, `a_size` a chunk) and of `b` (`b_len`, `b_size`), which hold as many
/// chunks.
pub(crate) fn zeroed_chunk_pair<A: Copy + Default + Send, B: Copy + Default + Send>(
    threads: &dyn Threads,
    (a_len, a_size): (usize, usize),
    (b_len, b_size): (usize, usize),
    fill: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) -> (Vec<A>, Vec<B>) {
    let (a_size, b_size) = (a_size.max(1), b_size.max(1));
    let chunks = a_len.div_ceil(a_size);
    assert_eq!(chunks, b_len.div_ceil(b_size), "chunks of the two outputs");
    let (mut a, mut b) = (
        Vec::<A>::with_capacity(a_len),
        Vec::<B>::with_capacity(b_len),
    );
    let (a_base, b_base) = (
        a.spare_capacity_mut().as_mut_ptr() as usize,
        b.spare_capacity_mut().as_mut_ptr() as usize,
    );
    threads.run(chunks, &|range| {
        for i in range {
            // SAFETY: as in `zeroed_chunks`, for each of the two vectors.
            let (a, b) = unsafe {
                (
                    default_chunk(a_base, a_len, a_size, i),
                    default_chunk(b_base, b_len, b_size, i),
                )
            };
            fill(i, a, b);
        }
    });
    // SAFETY: as in `zeroed_chunks`, for each of the two vectors.
    unsafe {
        a.set_len(a_len);
        b.set_len(b_len);
    }
    (a, b)
}

/// A vector of `len` values made chunk by chunk on `threads`, written once (not zeroed
/// first): chunk `i` holds `values(i)`, the values at `i·size..` (`size` each, the last one
/// shorter). Panics if `values(i)` gives fewer values than its chunk holds.
pub fn collect_chunks<I: Iterator<Item = f32>>(
    threads: &dyn Threads,
    len: usize,
    size: usize,
    values: impl Fn(usize) -> I + Sync,
) -> Vec<f32> {
    let size = size.max(1);
    let mut out = Vec::<f32>::with_capacity(len);
    let base = out.spare_capacity_mut().as_mut_ptr() as usize;
    threads.run(len.div_ceil(size), &|range| {
        for i in range {
            // SAFETY: `run` hands out each index once, so the chunks are disjoint and inside
            // the capacity of `out`, which nothing else touches until every thread has
            // finished.
            let chunk: &mut [MaybeUninit<f32>] = unsafe { chunk(base, len, size, i) };
            let mut written = 0;
            for (slot, value) in chunk.iter_mut().zip(values(i)) {
                slot.write(value);
                written += 1;
            }
            assert_eq!(written, chunk.len(), "chunk {i} was given too few values");
        }
    });
    // SAFETY: every chunk of `0..len` was written whole (asserted; a panic in a task reaches
    // this thread before this line), and `run` returned after every task.
    unsafe { out.set_len(len) };
    out
}

/// Splits `out`, rows of `row_len` values, into one contiguous share of rows per thread and
/// runs `fill(rows, share)` for each share: a static split for work of equal cost per row
/// (one GEMM's output rows), where the order of the shares never changes the result.
pub fn for_each_share(
    threads: &dyn Threads,
    out: &mut [f32],
    row_len: usize,
    fill: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    for_each_share_with(threads, out, row_len, &mut [], 0, |rows, out, _| {
        fill(rows, out)
    });
}

/// [`for_each_share`] over `out` (rows of `row_len`) with working memory `work` (as many rows,
/// of `work_row_len` each) split into the same shares: `fill(rows, out_share, work_share)`.
pub fn for_each_share_with(
    threads: &dyn Threads,
    out: &mut [f32],
    row_len: usize,
    work: &mut [f32],
    work_row_len: usize,
    fill: impl Fn(Range<usize>, &mut [f32], &mut [f32]) + Sync,
) {
    let rows = out.len() / row_len.max(1);
    assert!(
        work.len() >= rows * work_row_len,
        "working memory for {rows} rows of {work_row_len}, found {} values",
        work.len()
    );
    let per_share = rows.div_ceil(threads.count().max(1)).max(1);
    let (base, work_base) = (out.as_mut_ptr() as usize, work.as_mut_ptr() as usize);
    threads.each(&|share| {
        let (first, last) = (
            (share * per_share).min(rows),
            ((share + 1) * per_share).min(rows),
        );
        if first < last {
            // SAFETY: each share differs, so the row ranges are disjoint and inside `out` and
            // `work` (asserted above), which stay mutably borrowed until every thread has
            // finished.
            let (part, work_part) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        (base as *mut f32).add(first * row_len),
                        (last - first) * row_len,
                    ),
                    std::slice::from_raw_parts_mut(
                        (work_base as *mut f32).add(first * work_row_len),
                        (last - first) * work_row_len,
                    ),
                )
            };
            fill(first..last, part, work_part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::POOLS;

    /// Sums `0..n` as chunks on rayon's pool.
    #[cfg(feature = "rayon")]
    fn pool_sum(n: usize) -> u64 {
        let values = zeroed_chunks(&Rayon, n, 97, |i, chunk: &mut [u64]| {
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = (i * 97 + j) as u64;
            }
        });
        values.iter().sum()
    }

    #[test]
    #[cfg(feature = "rayon")]
    fn work_runs_while_the_pool_is_kept_awake_and_the_spinning_stops_after() {
        use std::time::{Duration, Instant};
        let expected = 10_000 * 9_999 / 2;
        let awake = RayonAwake::new();
        let spinning = std::sync::Arc::downgrade(&awake.done);
        for _ in 0..50 {
            assert_eq!(pool_sum(10_000), expected);
        }
        // Held again from inside the pool (the caller's own job must not wait for itself),
        // and twice at once.
        let (a, b) = rayon::join(
            || {
                let _inner = RayonAwake::new();
                pool_sum(10_000)
            },
            || pool_sum(10_000),
        );
        assert_eq!((a, b), (expected, expected));
        drop(awake);
        // Each thread's job holds the flag until it has returned.
        let start = Instant::now();
        while spinning.upgrade().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "rayon's threads still spin 20 s after the guard was dropped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(pool_sum(10_000), expected);
    }

    #[test]
    #[cfg(feature = "rayon")]
    fn a_thread_that_takes_the_spinning_job_inside_a_wait_does_not_hold_the_caller_up() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let nap = || std::thread::sleep(Duration::from_millis(40));
        // The caller is one of the pool's threads, as in the `convkit` binary. The other
        // thread takes the second half of a join and splits it again; while it is busy with
        // the first quarter the caller makes a guard, then takes the last quarter, so that
        // the other thread waits inside the caller's half with the spinning job queued for
        // it. That job must give the thread back for the half to finish.
        let pool = (rayon::ThreadPoolBuilder::new().num_threads(2).build()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let quarters = pool.install(|| {
                let started = AtomicBool::new(false);
                let mut awake = None;
                let (_, quarters) = rayon::join(
                    || {
                        while !started.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        awake = Some(RayonAwake::new());
                    },
                    || {
                        started.store(true, Ordering::Release);
                        rayon::join(nap, nap);
                        2
                    },
                );
                drop(awake);
                quarters
            });
            done.send(quarters).unwrap();
        });
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(60)),
            Ok(2),
            "the spinning job held a thread that the caller waited for"
        );
    }

    #[test]
    fn every_chunk_once_with_a_short_last_one() {
        for &threads in POOLS {
            let mut out = vec![0f32; 1000];
            for_each_chunk(threads, &mut out, 64, |i, chunk| {
                for v in chunk.iter_mut() {
                    *v += i as f32 + 1.0;
                }
            });
            for (j, v) in out.iter().enumerate() {
                assert_eq!(*v, (j / 64) as f32 + 1.0);
            }
        }
    }

    #[test]
    fn zeroed_chunks_start_at_zero_and_are_filled_once() {
        for &threads in POOLS {
            let out = zeroed_chunks(threads, 1000, 64, |i, chunk: &mut [f32]| {
                assert!(chunk.iter().all(|&v| v == 0.0));
                assert_eq!(chunk.len(), if i == 15 { 1000 - 15 * 64 } else { 64 });
                chunk[i % chunk.len()] += i as f32 + 1.0;
            });
            let expected: Vec<f32> = (0..1000)
                .map(|j| {
                    if j % 64 == j / 64 {
                        (j / 64) as f32 + 1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            assert_eq!(out, expected);
            let (a, b) = zeroed_chunk_pair(threads, (10, 2), (5, 1), |i, a: &mut [f32], b| {
                assert!(a == [0.0; 2] && b == [0u32]);
                a[1] = i as f32;
                b[0] = 2 * i as u32;
            });
            assert_eq!(a, [0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0]);
            assert_eq!(b, [0, 2, 4, 6, 8]);
            assert!(zeroed_chunks::<f32>(threads, 0, 8, |_, _| panic!("no chunks")).is_empty());
        }
    }

    #[test]
    fn chunks_across_slices_line_up() {
        for &threads in POOLS {
            let (mut a, mut b) = (vec![0f32; 100], vec![0f32; 100]);
            for_each_chunk_across(threads, &mut [&mut a, &mut b], 30, |start, chunks| {
                let [a, b] = chunks else { panic!("two slices") };
                assert_eq!(a.len(), if start == 90 { 10 } else { 30 });
                for (j, (a, b)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                    (*a, *b) = ((start + j) as f32, start as f32);
                }
            });
            assert!(a.iter().enumerate().all(|(j, &v)| v == j as f32));
            assert!(b
                .iter()
                .enumerate()
                .all(|(j, &v)| v == (j / 30 * 30) as f32));
        }
    }

    #[test]
    fn collected_chunks_hold_their_values_and_a_short_one_panics() {
        for &threads in POOLS {
            let out = collect_chunks(threads, 1000, 64, |i| {
                (0..64).map(move |j| (i * 64 + j) as f32)
            });
            let expected: Vec<f32> = (0..1000).map(|j| j as f32).collect();
            assert_eq!(out, expected);
            assert!(collect_chunks(threads, 0, 64, |_| std::iter::empty()).is_empty());
        }
        let short = std::panic::catch_unwind(|| {
            collect_chunks(&crate::Serial, 10, 4, |_| std::iter::repeat_n(1.0, 3))
        });
        assert!(short.is_err());
    }

    #[test]
    fn every_row_in_one_share() {
        for &threads in POOLS {
            for rows in [1, 2, 3, 7, 64] {
                let mut out = vec![0f32; rows * 5];
                for_each_share(threads, &mut out, 5, |rows, share| {
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
}
