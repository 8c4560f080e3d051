//! candle's own CPU threads as the pool convkit-cpu's kernels run on.
//!
//! candle 0.11 runs its element-wise ops on a barrier pool: the calling thread and
//! `threads - 1` workers, which spin for a while after each op before they park. Ops run on
//! rayon's pool instead (two more threads here) found those workers still spinning on the
//! cores rayon's threads wanted: a sixth of a training step's samples were the spin. On the
//! same pool, the caller works too and nothing competes.

use std::ops::Range;

use candle_core::utils::barrier_pool;
use convkit_cpu::Threads;

/// candle's barrier pool: the caller and candle's workers.
pub(crate) struct CandleThreads;

impl Threads for CandleThreads {
    fn count(&self) -> usize {
        barrier_pool().n_workers() + 1
    }

    fn run(&self, tasks: usize, task: &(dyn Fn(Range<usize>) + Sync)) {
        barrier_pool().execute_chunked(tasks, task)
    }

    /// One call per thread of the pool, all at once.
    fn each(&self, task: &(dyn Fn(usize) + Sync)) {
        barrier_pool().execute(task)
    }
}
