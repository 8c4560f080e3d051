//! One knob for every engine's compute threads: `--threads N` or `CONVKIT_THREADS`, which sets
//! candle's pool, rayon's (burn, convkit's kernels) and libtorch's alike. Without it, a process
//! that an MPI launcher started takes the cores it sees divided by the ranks on its node (as
//! torchrun sets `OMP_NUM_THREADS`), so that ranks sharing a machine do not fight over its
//! cores; a process started alone leaves every engine its default, all the cores.
//!
//! [`configure`] applies the choice; call it at the start of `main`, on the thread that runs
//! the engines and before any engine starts a thread (candle and rayon size their pools once,
//! from the environment). That thread becomes one of rayon's.

use std::sync::OnceLock;

use crate::{Error, Result};

/// How many compute threads each engine of this process uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadChoice {
    /// `None`: each engine's default (every core the process sees).
    pub threads: Option<usize>,
    /// Where the number came from, in words.
    pub why: String,
}

impl ThreadChoice {
    /// The number of threads: the chosen one, else the cores this process sees.
    pub fn count(&self) -> usize {
        self.threads.unwrap_or_else(cores)
    }
}

static CHOSEN: OnceLock<ThreadChoice> = OnceLock::new();

/// Choose this process's threads from `requested` (`--threads`), `CONVKIT_THREADS` or the
/// launcher, and set every engine to it. The first call decides; later calls return its
/// choice. An unparsable or zero count is an error naming where it came from.
pub fn configure(requested: Option<usize>) -> Result<&'static ThreadChoice> {
    if let Some(chosen) = CHOSEN.get() {
        return Ok(chosen);
    }
    let choice = choose(requested, |name| std::env::var(name).ok(), cores())?;
    if let Some(n) = choice.threads {
        // Read once by candle's pool and rayon's global pool when they start.
        for name in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS", "CONVKIT_THREADS"] {
            std::env::set_var(name, n.to_string());
        }
    }
    join_rayon_pool(rayon_threads(&choice));
    Ok(CHOSEN.get_or_init(|| choice))
}

/// The size of rayon's global pool under `choice`: the chosen count, else `RAYON_NUM_THREADS`
/// as rayon reads it, else every core.
fn rayon_threads(choice: &ThreadChoice) -> usize {
    choice.threads.unwrap_or_else(|| {
        (std::env::var("RAYON_NUM_THREADS").ok())
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(cores)
    })
}

/// Starts rayon's global pool with the calling thread as one of its `threads` (beside
/// `threads - 1` workers), so that a parallel operation the caller starts (burn-flex's own,
/// convkit's kernels under burn-flex, image decoding) runs partly on it. Otherwise rayon hands
/// each operation to its workers and the caller sleeps until they are done: a wake-up of a
/// worker and then of the caller per operation, about 170 context switches per training step
/// on burn-flex, 27 this way (docs/measurements.md). With one thread the pool is left to rayon:
/// a pool of only the caller would never run work handed to it from another thread. Returns
/// whether it started the pool (not when something had started it before).
fn join_rayon_pool(threads: usize) -> bool {
    threads >= 2
        && (rayon::ThreadPoolBuilder::new().num_threads(threads))
            .use_current_thread()
            .build_global()
            .is_ok()
}

/// The choice [`configure`] made, or (never configured: a library user) the one it would make
/// without `--threads`; an invalid `CONVKIT_THREADS` then leaves the engines' defaults.
pub fn chosen() -> ThreadChoice {
    CHOSEN.get().cloned().unwrap_or_else(|| {
        choose(None, |name| std::env::var(name).ok(), cores()).unwrap_or_else(|e| ThreadChoice {
            threads: None,
            why: format!("every core: {e}"),
        })
    })
}

/// The cores this process may run on (its CPU affinity and cgroup quota), at least 1.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// [`configure`]'s choice from the environment `env` gives and `cores`.
fn choose(
    requested: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
    cores: usize,
) -> Result<ThreadChoice> {
    let positive = |n: usize, from: &str| -> Result<ThreadChoice> {
        if n == 0 {
            return Err(Error::config(
                "threads",
                format!("{from}: expected at least 1 thread, found 0"),
            ));
        }
        Ok(ThreadChoice {
            threads: Some(n),
            why: from.to_string(),
        })
    };
    let count = |name: &str| -> Result<Option<usize>> {
        let Some(value) = env(name) else {
            return Ok(None);
        };
        value.trim().parse::<usize>().map(Some).map_err(|_| {
            Error::config(
                "threads",
                format!("{name}: expected a number of threads, found {value:?}"),
            )
        })
    };
    if let Some(n) = requested {
        return positive(n, &format!("--threads {n}"));
    }
    if let Some(n) = count("CONVKIT_THREADS")? {
        return positive(n, &format!("CONVKIT_THREADS={n}"));
    }
    let launched = crate::collective::launched_by(&env).is_some_and(|(_, size)| size > 1);
    if launched {
        if let Some(n) = count("SLURM_CPUS_PER_TASK")? {
            return positive(n, &format!("SLURM_CPUS_PER_TASK={n}"));
        }
        let local = [
            "OMPI_COMM_WORLD_LOCAL_SIZE",
            "MPI_LOCALNRANKS",
            "SLURM_NTASKS_PER_NODE",
        ]
        .into_iter()
        .find_map(|name| Some((name, env(name)?.trim().parse::<usize>().ok()?)))
        .or_else(|| {
            let tasks = env("SLURM_STEP_TASKS_PER_NODE")?;
            Some(("SLURM_STEP_TASKS_PER_NODE", uniform_tasks_per_node(&tasks)?))
        });
        if let Some((name, ranks)) = local.filter(|(_, ranks)| *ranks > 0) {
            let n = (cores / ranks).max(1);
            return Ok(ThreadChoice {
                threads: Some(n),
                why: format!("{cores} cores / {ranks} processes on this node, from {name}"),
            });
        }
    }
    Ok(ThreadChoice {
        threads: None,
        why: "every core this process sees; set --threads or CONVKIT_THREADS to change".into(),
    })
}

/// Slurm's tasks per node when every node has as many: `4` or `4(x3)`; `None` for a list
/// such as `2(x3),1`.
fn uniform_tasks_per_node(value: &str) -> Option<usize> {
    let value = value.trim();
    let count = match value.split_once('(') {
        Some((count, rest)) if rest.starts_with('x') && rest.ends_with(')') => count,
        Some(_) => return None,
        None => value,
    };
    count.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            (vars.iter())
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_flag_wins_then_the_variable_then_the_launcher() {
        const BOTH: [(&str, &str); 3] = [
            ("CONVKIT_THREADS", "3"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ];
        let flag = choose(Some(5), env(&BOTH), 16).unwrap();
        assert_eq!((flag.threads, flag.why.as_str()), (Some(5), "--threads 5"));
        let var = choose(None, env(&BOTH), 16).unwrap();
        assert_eq!(
            (var.threads, var.why.as_str()),
            (Some(3), "CONVKIT_THREADS=3")
        );
    }

    #[test]
    fn ranks_on_one_node_share_its_cores() {
        const OPEN_MPI: [(&str, &str); 3] = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        let c = choose(None, env(&OPEN_MPI), 16).unwrap();
        assert_eq!(c.threads, Some(8));
        assert!(
            c.why.contains("16 cores / 2 processes on this node"),
            "{c:?}"
        );
        // More ranks than cores: one thread each.
        assert_eq!(choose(None, env(&OPEN_MPI), 1).unwrap().threads, Some(1));
        const SRUN: [(&str, &str); 3] = [
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ];
        assert_eq!(choose(None, env(&SRUN), 16).unwrap().threads, Some(4));
        const SRUN_CPUS: [(&str, &str); 3] = [
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_CPUS_PER_TASK", "6"),
        ];
        assert_eq!(choose(None, env(&SRUN_CPUS), 16).unwrap().threads, Some(6));
    }

    #[test]
    fn alone_every_engine_keeps_its_default() {
        let c = choose(None, env(&[]), 4).unwrap();
        assert_eq!((c.threads, c.count()), (None, cores()));
        // A local size without a launcher (a stray variable) changes nothing.
        let stray = choose(None, env(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]), 4).unwrap();
        assert_eq!(stray.threads, None);
    }

    #[test]
    fn bad_counts_are_errors_naming_their_source() {
        let err = choose(Some(0), env(&[]), 4).unwrap_err().to_string();
        assert!(err.contains("--threads 0: expected at least 1"), "{err}");
        let err = choose(None, env(&[("CONVKIT_THREADS", "many")]), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CONVKIT_THREADS: expected a number of threads, found \"many\""),
            "{err}"
        );
    }

    #[test]
    fn one_thread_leaves_rayons_pool_alone() {
        assert!(!join_rayon_pool(1));
        assert!(!join_rayon_pool(0));
        let one = ThreadChoice {
            threads: Some(1),
            why: String::new(),
        };
        assert_eq!(rayon_threads(&one), 1);
    }

    #[test]
    fn slurm_tasks_per_node_is_read_when_uniform() {
        assert_eq!(uniform_tasks_per_node("4"), Some(4));
        assert_eq!(uniform_tasks_per_node("4(x3)"), Some(4));
        assert_eq!(uniform_tasks_per_node("2(x3),1"), None);
    }
}
