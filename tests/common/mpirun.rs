//! `mpirun` as convkit's tests and `cargo xtask scaling` start it (xtask includes this file).

use std::process::Command;

/// `mpirun -np <ranks>` kept to this machine's loopback interface (TCP between the ranks, no
/// other network), allowed as root too, with one compute thread per rank (rayon's pool for
/// candle and burn, `CONVKIT_THREADS` for libtorch).
pub fn loopback_mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string()])
        .args(["--oversubscribe", "--bind-to", "none"])
        .args(["--mca", "btl", "self,tcp"])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .args(["--mca", "oob_tcp_if_include", "lo"])
        // What `--allow-run-as-root` says, accepted by runs as another user too.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("CONVKIT_THREADS", "1");
    c
}

/// `c` without the thread variables [`loopback_mpirun`] sets: each process takes convkit's own
/// choice of threads, as a user who sets none gets.
pub fn with_default_threads(c: &mut Command) -> &mut Command {
    for name in ["RAYON_NUM_THREADS", "OMP_NUM_THREADS", "CONVKIT_THREADS"] {
        c.env_remove(name);
    }
    c
}
