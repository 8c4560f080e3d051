//! Processes that train or search together: a [`Collective`] (rank, size, all-reduce sum,
//! broadcast), with [`Solo`] for one process and, behind the `mpi` feature, MPI through rsmpi
//! ([`from_environment`] picks it when `mpirun` or `srun` started the process).
//!
//! Data-parallel training ([`crate::Model::distribute`]) sums every step's gradients over the
//! collective once; search splits its trials between the ranks. See docs/distributed.md.

use std::rc::Rc;

use crate::{Error, Result};

/// A group of processes, each knowing its rank. Every method is collective: every rank calls
/// it, in the same order, with buffers of the same length (for broadcast, the root's length
/// wins). A call that waits longer than [`timeout`] for the other ranks stops this rank with
/// an error naming the wait ([`Collective::barrier`] excepted).
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Element-wise sum over every rank, in place; every rank ends with the same values.
    fn all_reduce_f32(&self, values: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_f32`] for `f64` (metrics, counts).
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// `root`'s bytes on every rank (each rank's `bytes` is replaced, length and all).
    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Wait until every rank gets here, for as long as it takes: after work whose length
    /// differs between the ranks (a search's trials), before the next collective call, which
    /// [`timeout`] limits. A rank that dies meanwhile still ends the job (the launcher sees it).
    fn barrier(&self) -> Result<()>;

    /// Every rank's `mine`, in rank order, on every rank.
    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut all = Vec::with_capacity(self.size());
        for root in 0..self.size() {
            let mut bytes = if root == self.rank() {
                mine.clone()
            } else {
                Vec::new()
            };
            self.broadcast(&mut bytes, root)?;
            all.push(bytes);
        }
        Ok(all)
    }
    /// Whether this process writes the run's files and prints its progress (rank 0).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Stop every process of the group at once with exit status `code` (the caller prints why
    /// first): what a rank that failed does, so that the others do not wait for it. A group of
    /// one process just returns.
    fn abort(&self, _code: i32) {}
}

/// One process alone: rank 0 of 1; reductions and broadcasts leave the values as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// How long one collective call may wait for the other ranks before this rank stops with an
/// error: `CONVKIT_COLLECTIVE_TIMEOUT` seconds, 300 by default. Long enough for a slow step
/// or an epoch's validation, short enough that a stuck rank never hangs a job for good.
pub fn timeout() -> std::time::Duration {
    std::env::var("CONVKIT_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(std::time::Duration::from_secs(300), |s| {
            std::time::Duration::from_secs_f64(s)
        })
}

/// The launcher's rank and size when this process was started by `mpirun` (Open MPI, MPICH)
/// or by `srun` (Slurm: with PMIx, PMI-2, or none); `None` for a process started alone. A
/// Slurm batch script's own process (no job step) counts as started alone.
pub fn launched_by_mpi() -> Option<(usize, usize)> {
    launched_by(|name| std::env::var(name).ok())
}

/// [`launched_by_mpi`] from the environment variables `env` gives.
pub(crate) fn launched_by(env: impl Fn(&str) -> Option<String>) -> Option<(usize, usize)> {
    let var = |name: &str| env(name).and_then(|v| v.trim().parse::<usize>().ok());
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "SLURM_STEP_NUM_TASKS"),
        ("PMI_RANK", "PMI_SIZE"),
        // A plain `srun` (no MPI plugin) sets only Slurm's own variables.
        ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ]
    .into_iter()
    .find_map(|(rank, size)| Some((var(rank)?, var(size).unwrap_or(1))))
}

/// The collective this process belongs to: MPI's world when a launcher started it (and convkit
/// was built with the `mpi` feature), [`Solo`] otherwise. A process that a launcher started as
/// one of several, in a build without MPI, is an error: each would train alone and overwrite
/// the others' files.
pub fn from_environment() -> Result<Rc<dyn Collective>> {
    match joining(launched_by_mpi(), cfg!(feature = "mpi"))? {
        Joining::Alone => Ok(Rc::new(Solo)),
        Joining::Mpi { rank, size } => join_mpi(rank, size),
    }
}

/// How this process joins its group.
#[derive(Debug, PartialEq)]
enum Joining {
    Alone,
    /// Through MPI, as the launcher's `rank` of `size`.
    Mpi {
        rank: usize,
        size: usize,
    },
}

/// [`from_environment`]'s decision from the launcher's rank and size (if any) and whether this
/// build has MPI.
fn joining(launched: Option<(usize, usize)>, mpi_built: bool) -> Result<Joining> {
    match launched {
        Some((rank, size)) if mpi_built => Ok(Joining::Mpi { rank, size }),
        Some((rank, size)) if size > 1 => Err(Error::config(
            "launch",
            format!(
                "this process was started by an MPI launcher as rank {rank} of {size}, but this convkit was built without the `mpi` feature (cargo build --features mpi); each rank would train alone"
            ),
        )),
        _ => Ok(Joining::Alone),
    }
}

/// MPI's world, checked to hold the `size` processes the launcher started.
#[cfg(feature = "mpi")]
fn join_mpi(rank: usize, size: usize) -> Result<Rc<dyn Collective>> {
    let world = mpi_world::MpiWorld::initialize()?;
    if world.size() != size {
        return Err(Error::config(
            "launch",
            format!(
                "the launcher started this process as rank {rank} of {size}, but MPI sees {} process{}: the launcher and MPI do not meet (under Slurm, start with `srun --mpi=pmix` or `--mpi=pmi2`, as your MPI was built); each rank would train alone",
                world.size(),
                if world.size() == 1 { "" } else { "es" }
            ),
        ));
    }
    Ok(Rc::new(world))
}

/// Never reached: [`joining`] refuses a launcher in a build without MPI.
#[cfg(not(feature = "mpi"))]
fn join_mpi(rank: usize, size: usize) -> Result<Rc<dyn Collective>> {
    Err(Error::config(
        "launch",
        format!("rank {rank} of {size}: this convkit was built without the `mpi` feature"),
    ))
}

/// The most elements one MPI call takes: its counts are C `int`s.
#[cfg(any(test, feature = "mpi"))]
const MPI_COUNT_MAX: usize = i32::MAX as usize;

/// `0..len` in consecutive ranges of at most `most` elements (one empty range for `len` 0,
/// so that every rank still makes the call): how a buffer too long for one MPI call is sent.
#[cfg(any(test, feature = "mpi"))]
fn pieces(len: usize, most: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let most = most.max(1);
    (0..len.div_ceil(most).max(1)).map(move |k| k * most..((k + 1) * most).min(len))
}

/// `values`' bytes, little-endian, for a broadcast.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of [`f32_bytes`]; `what` names the values in the error for a length that is not
/// a multiple of four.
pub fn f32_values(bytes: &[u8], what: &str) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::config(
            "broadcast",
            format!("{what}: {} bytes is not a whole number of f32", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(feature = "mpi")]
mod mpi_world {
    //! MPI's world communicator through rsmpi, with a watchdog that stops a rank whose
    //! collective call waits past [`super::timeout`].

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, Process, SimpleCommunicator};
    use mpi::traits::*;

    use super::{pieces, Collective, MPI_COUNT_MAX};
    use crate::{Error, Result};

    /// MPI's world. Dropping it finalizes MPI.
    pub struct MpiWorld {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        watchdog: Watchdog,
        // Last: finalizes MPI when dropped, after the communicator.
        _universe: mpi::environment::Universe,
    }

    impl MpiWorld {
        pub fn initialize() -> Result<Self> {
            let universe = mpi::initialize().ok_or_else(|| {
                Error::config("MPI", "MPI was initialised already in this process")
            })?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Ok(MpiWorld {
                watchdog: Watchdog::start(rank, size),
                world,
                rank,
                size,
                _universe: universe,
            })
        }

        /// `MPI_Allreduce` with `MPI_SUM`, into `values` (rsmpi has no in-place form), in
        /// calls of at most [`MPI_COUNT_MAX`] values.
        fn sum<T: Equivalence + Clone>(&self, values: &mut [T]) -> Result<()> {
            for range in pieces(values.len(), MPI_COUNT_MAX) {
                let piece = &mut values[range];
                let send = piece.to_vec();
                self.watchdog.guard("an all-reduce", || {
                    self.world
                        .all_reduce_into(&send[..], piece, SystemOperation::sum())
                });
            }
            Ok(())
        }

        fn root(&self, root: usize) -> Result<Process<'_>> {
            if root >= self.size {
                return Err(Error::config(
                    "broadcast root",
                    format!("rank {root} in a group of {}", self.size),
                ));
            }
            Ok(self.world.process_at_rank(root as i32))
        }
    }

    impl Collective for MpiWorld {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_f32(&self, values: &mut [f32]) -> Result<()> {
            self.sum(values)
        }
        fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
            self.sum(values)
        }
        fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
            let process = self.root(root)?;
            let mut len = bytes.len() as u64;
            self.watchdog
                .guard("a broadcast", || process.broadcast_into(&mut len));
            bytes.resize(len as usize, 0);
            for range in pieces(bytes.len(), MPI_COUNT_MAX) {
                self.watchdog
                    .guard("a broadcast", || process.broadcast_into(&mut bytes[range]));
            }
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            // No watchdog: the wait is the other ranks' work.
            self.world.barrier();
            Ok(())
        }
        fn abort(&self, code: i32) {
            self.world.abort(code)
        }
    }

    /// A thread that ends this process, naming its rank and the call, when a collective call
    /// waits longer than the timeout. Ending the process (instead of waiting for ever) makes
    /// the launcher stop the other ranks and exit non-zero.
    struct Watchdog {
        /// Milliseconds since `epoch` at which the current call started; 0 when none runs.
        started: Arc<AtomicU64>,
        what: Arc<std::sync::Mutex<&'static str>>,
        epoch: Instant,
    }

    impl Watchdog {
        fn start(rank: usize, size: usize) -> Self {
            let started = Arc::new(AtomicU64::new(0));
            let what = Arc::new(std::sync::Mutex::new(""));
            let epoch = Instant::now();
            let limit = super::timeout();
            let (s, w) = (started.clone(), what.clone());
            std::thread::Builder::new()
                .name("convkit-mpi-watchdog".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(500).min(limit));
                    let at = s.load(Ordering::Acquire);
                    if at == 0 {
                        continue;
                    }
                    let waited = epoch.elapsed().saturating_sub(Duration::from_millis(at));
                    if waited > limit {
                        let what = *w.lock().unwrap_or_else(|e| e.into_inner());
                        eprintln!(
                            "convkit: rank {rank} of {size} waited {:.1} s in {what} for the other ranks (CONVKIT_COLLECTIVE_TIMEOUT is {} s): one of them is stuck or gone; stopping",
                            waited.as_secs_f64(),
                            limit.as_secs_f64()
                        );
                        std::process::exit(1);
                    }
                })
                .expect("the watchdog thread starts");
            Watchdog {
                started,
                what,
                epoch,
            }
        }

        fn guard<T>(&self, what: &'static str, call: impl FnOnce() -> T) -> T {
            *self.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
            let now = self.epoch.elapsed().as_millis() as u64;
            self.started.store(now.max(1), Ordering::Release);
            let out = call();
            self.started.store(0, Ordering::Release);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solo_is_rank_zero_of_one_and_changes_nothing() {
        let solo = Solo;
        let mut v = vec![1.5f32, -2.0];
        solo.all_reduce_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let gathered = solo.all_gather(vec![7, 8]).unwrap();
        assert_eq!(gathered, vec![vec![7, 8]]);
        assert!(solo.is_root());
    }

    #[test]
    fn launchers_are_recognised_by_their_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(launched_by(env(&[])), None);
        const OPEN_MPI: [(&str, &str); 2] =
            [("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")];
        assert_eq!(launched_by(env(&OPEN_MPI)), Some((1, 4)));
        const SLURM: [(&str, &str); 2] = [("PMIX_RANK", "3"), ("SLURM_STEP_NUM_TASKS", "8")];
        assert_eq!(launched_by(env(&SLURM)), Some((3, 8)));
        // A plain srun, without an MPI plugin.
        const PLAIN_SRUN: [(&str, &str); 3] = [
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_NTASKS", "2"),
        ];
        assert_eq!(launched_by(env(&PLAIN_SRUN)), Some((1, 2)));
        // A batch script's own process: the allocation's task count, but no step.
        const BATCH: [(&str, &str); 2] = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")];
        assert_eq!(launched_by(env(&BATCH)), Some((0, 1)));
        assert_eq!(launched_by(env(&[("PMI_RANK", "0")])), Some((0, 1)));
        assert_eq!(launched_by(env(&[("PMI_RANK", "x")])), None);
    }

    #[test]
    fn a_launcher_without_mpi_built_in_is_refused() {
        assert_eq!(joining(None, false).unwrap(), Joining::Alone);
        assert_eq!(joining(Some((0, 1)), false).unwrap(), Joining::Alone);
        let err = joining(Some((1, 2)), false).unwrap_err().to_string();
        assert!(
            err.contains("rank 1 of 2") && err.contains("built without the `mpi` feature"),
            "{err}"
        );
        assert_eq!(
            joining(Some((1, 2)), true).unwrap(),
            Joining::Mpi { rank: 1, size: 2 }
        );
    }

    #[test]
    fn long_buffers_go_in_pieces_an_mpi_count_can_hold() {
        let all = |len, most| pieces(len, most).collect::<Vec<_>>();
        assert_eq!(all(0, 4), vec![0..0]);
        assert_eq!(all(4, 4), vec![0..4]);
        assert_eq!(all(9, 4), [0..4, 4..8, 8..9]);
        // Over 2^31 values: two calls, each under MPI's count limit.
        let long = all(MPI_COUNT_MAX + 10, MPI_COUNT_MAX);
        assert_eq!(long, [0..MPI_COUNT_MAX, MPI_COUNT_MAX..MPI_COUNT_MAX + 10]);
    }

    #[test]
    fn f32_bytes_round_trip_and_odd_lengths_are_errors() {
        let v = [0.1f32, f32::MIN_POSITIVE, -3.0];
        assert_eq!(f32_values(&f32_bytes(&v), "w").unwrap(), v);
        let err = f32_values(&[1, 2, 3], "weights").unwrap_err().to_string();
        assert!(err.contains("weights: 3 bytes"), "{err}");
    }
}
