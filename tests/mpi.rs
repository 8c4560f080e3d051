//! Data-parallel training and distributed search under `mpirun`, on the loopback interface
//! only. Built with the `mpi` feature; needs Open MPI's `mpirun` (`cargo xtask setup`).
//!
//! The library tests start this test binary itself under `mpirun`, running only
//! [`data_parallel_worker`] (ignored otherwise) on each rank; each rank writes what it ended
//! with, and the launching test compares the ranks with each other and with one process.

#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use convkit::prelude::*;
use convkit::Weights;

/// [`common::mpirun::loopback_mpirun`] with the tests' datasets, offline.
fn mpirun(ranks: usize) -> Command {
    let mut c = common::mpirun::loopback_mpirun(ranks);
    c.env("CONVKIT_DATA", common::data_dir())
        .env("CONVKIT_OFFLINE", "1");
    c
}

fn output(c: &mut Command) -> Output {
    c.output().unwrap_or_else(|e| {
        panic!("cannot start mpirun ({e}): install Open MPI (`cargo xtask setup` does, from Debian's openmpi-bin)")
    })
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// 21 training images in batches of 10: the last global batch has one image, so rank 0's
/// share of it is empty. 7 validation images split 3 and 4.
fn data() -> (Dataset, Dataset) {
    let all = synthetic(28, ImageShape::new(8, 8, 1), 3, 5)
        .unwrap()
        .normalise(Normalisation::Rescale);
    let indices: Vec<usize> = (0..28).collect();
    (all.select(&indices[..21]), all.select(&indices[21..]))
}

/// A model without batch normalisation or dropout, which one process and two ranks train
/// alike to rounding.
fn spec() -> Sequential {
    Sequential::new(8, 8, 1)
        .add(Conv2D::new(4, 3).activation(Activation::Relu))
        .max_pool(2)
        .flatten()
        .add(Dense::new(3).activation(Activation::Softmax))
}

/// [`spec`] with BatchNormalization after the convolution, Dropout before the head, and
/// flips: what each rank computes from its own share and streams.
fn spec_with_statistics_and_streams() -> Sequential {
    Sequential::new(8, 8, 1)
        .add(Conv2D::new(4, 3).activation(Activation::Relu))
        .add(BatchNormalization::new())
        .max_pool(2)
        .flatten()
        .add(Dropout::new(0.3))
        .add(Dense::new(3).activation(Activation::Softmax))
}

/// Three epochs of `engine` with `group`, on [`spec`] (`plain`) or on
/// [`spec_with_statistics_and_streams`] with flips: the weights and the History as JSON.
fn train(
    engine: &str,
    group: Option<std::rc::Rc<dyn convkit::collective::Collective>>,
    plain: bool,
) -> (Weights, String) {
    let backend = convkit::backend(engine).unwrap();
    let mut model = Model::new(
        if plain {
            spec()
        } else {
            spec_with_statistics_and_streams()
        },
        Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy),
        backend.as_ref(),
        11,
    )
    .unwrap();
    if let Some(group) = group {
        model.distribute(group);
    }
    let (train, validation) = data();
    let mut fit = model
        .fit(&train)
        .epochs(3)
        .batch_size(10)
        .seed(4)
        .validation_data(&validation)
        .verbosity(Verbosity::Silent);
    if !plain {
        fit = fit.augment(Augment::parse("flip").unwrap());
    }
    let history = fit.run().unwrap();
    let history = serde_json::to_string(&history).unwrap();
    (model.weights().unwrap(), history)
}

/// One rank of [`two_ranks_train_as_one_process_does`]: trains on `CONVKIT_TEST_ENGINE`
/// (`CONVKIT_TEST_PLAIN`: 1 for [`spec`], 0 for the model with statistics and streams) and
/// writes its weights and History to `CONVKIT_TEST_OUT/rank<r>.*`.
#[test]
#[ignore = "run by mpirun from the other tests"]
fn data_parallel_worker() {
    let group = convkit::collective::from_environment().unwrap();
    assert_eq!(group.size(), 2, "started outside mpirun -np 2");
    let engine = std::env::var("CONVKIT_TEST_ENGINE").unwrap();
    let out = PathBuf::from(std::env::var_os("CONVKIT_TEST_OUT").unwrap());
    let rank = group.rank();
    let plain = std::env::var("CONVKIT_TEST_PLAIN").unwrap() == "1";
    let (weights, history) = train(&engine, Some(group), plain);
    let bytes = weights.to_safetensors(Default::default()).unwrap();
    std::fs::write(out.join(format!("rank{rank}.safetensors")), bytes).unwrap();
    std::fs::write(out.join(format!("rank{rank}.json")), history).unwrap();
}

/// The weights and History [`data_parallel_worker`] ends with on two ranks, checked to be
/// the very same on both.
fn two_ranks(engine: &str, plain: bool) -> (Weights, String) {
    let dir = tempfile::tempdir().unwrap();
    let o = output(
        mpirun(2)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "data_parallel_worker",
                "--ignored",
                "--nocapture",
            ])
            .env("CONVKIT_TEST_ENGINE", engine)
            .env("CONVKIT_TEST_PLAIN", if plain { "1" } else { "0" })
            .env("CONVKIT_TEST_OUT", dir.path()),
    );
    assert!(o.status.success(), "{engine}: {}", text(&o));
    let [(w0, h0), (w1, h1)] = [0, 1].map(|rank| {
        let path = dir.path().join(format!("rank{rank}.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        let (weights, _) = Weights::from_safetensors(&path, &bytes).unwrap();
        let history = std::fs::read_to_string(dir.path().join(format!("rank{rank}.json")));
        (weights, history.unwrap())
    });
    assert_eq!(w0, w1, "{engine}: the ranks' weights differ");
    assert_eq!(h0, h1, "{engine}: the ranks' Histories differ");
    (w0, h0)
}

#[test]
fn ranks_stay_identical_with_batch_normalisation_dropout_and_augmentation() {
    for engine in common::end_to_end_engines() {
        let engine = engine.name();
        let (w0, _) = two_ranks(engine, false);
        // The moving statistics moved, from the sum of both ranks' shares.
        let (alone, _) = train(engine, None, false);
        let moved = w0.get("batch_normalization.moving_mean").unwrap();
        assert!(moved.data.iter().any(|&m| m != 0.0), "{engine}: {moved:?}");
        // Each rank draws its own masks and flips, so the run is not one process's.
        assert!(alone != w0, "{engine}: two ranks drew one process's masks");
    }
}

#[test]
fn two_ranks_train_as_one_process_does() {
    for engine in common::end_to_end_engines() {
        let engine = engine.name();
        let (w0, h0) = two_ranks(engine, true);
        // One process on the same global batches ends where the two ranks did, to rounding.
        let (alone, history) = train(engine, None, true);
        for (name, diff) in alone.max_abs_diff(&w0).unwrap() {
            assert!(
                diff <= 1e-5,
                "{engine}: {name} differs by {diff} from one process"
            );
        }
        let epochs = |h: &str| -> Vec<serde_json::Value> {
            let v: serde_json::Value = serde_json::from_str(h).unwrap();
            v["epochs"].as_array().unwrap().clone()
        };
        for (one, two) in epochs(&history).iter().zip(epochs(&h0)) {
            for key in ["loss", "accuracy", "val_loss", "val_accuracy"] {
                let (a, b) = (one[key].as_f64().unwrap(), two[key].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-5,
                    "{engine}: {key} {a} alone, {b} on two ranks"
                );
            }
        }
    }
}

fn convkit_bin() -> &'static str {
    env!("CARGO_BIN_EXE_convkit")
}

#[test]
fn mpirun_convkit_train_writes_one_run_from_rank_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut launch = mpirun(2);
    common::mpirun::with_default_threads(&mut launch);
    let o = output(launch.arg(convkit_bin()).args([
        "train",
        "--dataset",
        "synthetic",
        "--limit",
        "64",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--model",
        "tutorial-mnist",
        "--out",
        out.to_str().unwrap(),
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("data-parallel on 2 processes").count(), 1, "{t}");
    // Left to itself, each rank takes its share of the node's cores, and says so.
    assert!(
        t.contains("threads: ")
            && t.contains("2 processes on this node, from OMPI_COMM_WORLD_LOCAL_SIZE"),
        "{t}"
    );
    assert_eq!(
        t.matches("Epoch 2/2").count(),
        1,
        "only rank 0 reports: {t}"
    );
    for file in [
        "model.safetensors",
        "history.csv",
        "metrics.json",
        "history.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing: {t}");
    }
    // The backup continues on as many ranks, and refuses another count.
    let o = output(Command::new(convkit_bin()).args(["train", "--resume", out.to_str().unwrap()]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("made by 2 processes, this fit runs on 1"), "{t}");
}

/// `root/<class>/<i>.png` for two classes, three 8×8 grey images each, pixel values from
/// `shade`.
fn write_classes(root: &Path, shade: u8) {
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3u8 {
            let value = shade.wrapping_add(40 * i + if class == "a" { 0 } else { 100 });
            image::GrayImage::from_pixel(8, 8, image::Luma([value]))
                .save(root.join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
}

#[test]
fn ranks_with_other_data_stop_at_fit_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    // As many images on each rank, other pixels: only the data's hash tells them apart.
    write_classes(&dir.path().join("data-0"), 0);
    write_classes(&dir.path().join("data-1"), 7);
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, r#"{"name":"tiny","input_shape":[8,8,1],"layers":[{"type":"Flatten"},{"type":"Dense","units":2,"activation":"softmax"}]}"#).unwrap();
    let started = Instant::now();
    let o = output(mpirun(2).args(["sh", "-c"]).arg(format!(
        "exec {} train --dataset {}/data-$OMPI_COMM_WORLD_RANK --model {} --validation-split 0 --epochs 1 --out {}/run",
        convkit_bin(),
        dir.path().display(),
        spec.display(),
        dir.path().display()
    )));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("rank 1 has other training data than rank 0: 6 images of 8×8×1, SHA-256"),
        "{t}"
    );
    assert!(started.elapsed() < Duration::from_secs(60), "{t}");
}

#[test]
fn a_nan_loss_under_mpi_stops_every_rank_after_rank_0_saved() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = output(mpirun(2).arg(convkit_bin()).args([
        "train",
        "--dataset",
        "synthetic",
        "--limit",
        "64",
        "--epochs",
        "2",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "3e38",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert_eq!(
        t.matches("training loss became").count(),
        1,
        "reported once: {t}"
    );
    assert!(t.contains("saved the last finite weights to"), "{t}");
    assert!(
        !t.contains("MPI_ABORT"),
        "the ranks stop together, not by abort: {t}"
    );
    let o = output(Command::new(convkit_bin()).args([
        "evaluate",
        "--weights",
        out.to_str().unwrap(),
        "--dataset",
        "synthetic",
        "--limit",
        "16",
    ]));
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_plain_srun_that_mpi_does_not_see_is_refused() {
    // What `srun -n 2` without an MPI plugin gives each task: Slurm's variables, and an MPI
    // that sees one process.
    let dir = tempfile::tempdir().unwrap();
    let o = output(
        Command::new(convkit_bin())
            .current_dir(dir.path())
            .env("SLURM_PROCID", "1")
            .env("SLURM_STEP_NUM_TASKS", "2")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args([
                "train",
                "--dataset",
                "synthetic",
                "--limit",
                "16",
                "--epochs",
                "1",
            ]),
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("as rank 1 of 2, but MPI sees 1 process") && t.contains("srun --mpi=pmix"),
        "{t}"
    );
}

/// The process that `mpirun` (a child of the test) started as `rank`, found by the marker in
/// its environment.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    let wanted = [
        format!("CONVKIT_TEST_MARK={marker}"),
        format!("OMPI_COMM_WORLD_RANK={rank}"),
    ];
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let env = std::fs::read(entry.path().join("environ")).ok()?;
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            wanted
                .iter()
                .all(|w| vars.contains(&w.as_bytes()))
                .then_some(pid)
        })
}

/// Start a long `mpirun -np 2 convkit train`, send rank 1 `signal` once the first epoch is
/// done, and wait (at most a minute) for mpirun to end: its status and everything it printed.
fn signal_rank_1_mid_run(signal: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().to_str().unwrap().to_string();
    let mut child = mpirun(2)
        .arg(convkit_bin())
        .args([
            "train",
            "--dataset",
            "synthetic",
            "--limit",
            "2000",
            "--epochs",
            "1000",
            "--out",
            dir.path().join("run").to_str().unwrap(),
        ])
        .env("CONVKIT_TEST_MARK", &marker)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    // Training is under way once the first epoch's history is written.
    let started = Instant::now();
    while !dir.path().join("run/history.csv").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no epoch finished in 2 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "mpirun ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(&marker, 1).expect("rank 1 is running");
    let signalled = Instant::now();
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("mpirun still runs a minute after rank 1 got {signal}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = child.wait_with_output().unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (status, t)
}

#[test]
fn a_rank_killed_mid_run_stops_mpirun_with_an_error() {
    let (status, t) = signal_rank_1_mid_run("-KILL", &[]);
    assert!(!status.success(), "{t}");
    assert!(t.contains("rank 1"), "the message names the rank: {t}");
}

#[test]
fn a_stuck_rank_stops_the_others_after_the_collective_timeout() {
    // Rank 1 stops (SIGSTOP) without dying: rank 0 waits in the step's all-reduce until the
    // watchdog ends it, and mpirun then ends the job.
    let (status, t) = signal_rank_1_mid_run("-STOP", &[("CONVKIT_COLLECTIVE_TIMEOUT", "3")]);
    assert!(!status.success(), "{t}");
    assert!(
        t.contains("rank 0 of 2 waited") && t.contains("one of them is stuck or gone"),
        "{t}"
    );
}

fn space(dir: &Path) -> PathBuf {
    let space = dir.join("space.toml");
    std::fs::write(
        &space,
        "model = \"tutorial-mnist\"\ndataset = \"synthetic\"\nlimit = 400\nvalidation_split = 0.25\n[space]\noptimizer = [\"adam\", \"sgd\"]\nfilters = [4, 64]\nbatch_size = [16]\n",
    )
    .unwrap();
    space
}

/// search.csv without the seconds each trial took.
fn table(out: &Path) -> String {
    let csv = std::fs::read_to_string(out.join("search.csv")).unwrap();
    csv.lines()
        .map(|l| l.rsplit_once(',').unwrap().0)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that two search tables (CSV text) hold the same trials, in the same order, with the
/// same settings and accuracies, and validation losses equal to within 1e-12 relative.
///
/// On a 2-core AMD EPYC without AVX-512 (2026-12-06), a trial's validation loss came out one
/// f64 ulp (4.4e-16) apart depending on which trials the process had run before it: the same
/// at c4509c9, before the CPU kernels moved to convkit-cpu, so not a kernel change. The runs
/// are the same training; the last bit of the loss's f64 sum is not, and the test does not
/// ask for it.
fn assert_same_table(found: &str, expected: &str, what: &str) {
    let rows = |t: &str| -> Vec<Vec<String>> {
        t.lines()
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    };
    let (found_rows, expected_rows) = (rows(found), rows(expected));
    assert_eq!(
        found_rows.len(),
        expected_rows.len(),
        "{what}:\n{found}\n{expected}"
    );
    let header = &expected_rows[0];
    for (f, e) in found_rows.iter().zip(&expected_rows) {
        assert_eq!(f.len(), e.len(), "{what}:\n{found}\n{expected}");
        for ((column, a), b) in header.iter().zip(f).zip(e) {
            let close = match (a.parse::<f64>(), b.parse::<f64>()) {
                (Ok(x), Ok(y)) if column == "val_loss" => (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                _ => a == b,
            };
            assert!(
                close,
                "{what}, {column}: {a} against {b}:\n{found}\n{expected}"
            );
        }
    }
}

/// The chosen trial's record in `best.json`, with its validation loss to within 1e-12
/// relative ([`assert_same_table`] says why).
fn assert_same_best(found: &Path, expected: &Path) {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value::*;
        match (a, b) {
            (Number(x), Number(y)) => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                (x - y).abs() <= 1e-12 * y.abs().max(1.0)
            }
            (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
            (Object(x), Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }
    let (a, b) = (read(found), read(expected));
    assert!(same(&a, &b), "{a}\nagainst\n{b}");
}

#[test]
fn sharded_and_mpi_searches_give_the_one_process_table() {
    let dir = tempfile::tempdir().unwrap();
    let space = space(dir.path());
    let search = |c: &mut Command, out: &str, extra: &[&str]| {
        let o = output(
            c.args([
                "search",
                "--space",
                space.to_str().unwrap(),
                "--trials",
                "4",
            ])
            .args(["--out", dir.path().join(out).to_str().unwrap()])
            .args(extra)
            .env("CONVKIT_DATA", common::data_dir())
            .env("CONVKIT_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "1"),
        );
        assert!(o.status.success(), "{out}: {}", text(&o));
        o
    };
    search(&mut Command::new(convkit_bin()), "one", &[]);
    let alone = table(&dir.path().join("one"));
    assert_eq!(alone.lines().count(), 5, "{alone}");

    // Two shards, as two tasks of a job array, then merged.
    for k in ["1/2", "2/2"] {
        let o = search(
            &mut Command::new(convkit_bin()),
            &format!("shard{}", &k[..1]),
            &["--shard", k],
        );
        assert!(
            text(&o).contains(&format!("shard {k} done: 2 trials")),
            "{}",
            text(&o)
        );
    }
    let shard1 = dir.path().join("shard1");
    let shard2 = dir.path().join("shard2");
    search(
        &mut Command::new(convkit_bin()),
        "merged",
        &[
            "--merge",
            shard1.to_str().unwrap(),
            shard2.to_str().unwrap(),
        ],
    );
    assert_same_table(&table(&dir.path().join("merged")), &alone, "merged shards");
    // A missing shard is named.
    let o = output(Command::new(convkit_bin()).args([
        "search",
        "--space",
        space.to_str().unwrap(),
        "--trials",
        "4",
        "--merge",
        shard1.to_str().unwrap(),
        "--out",
        dir.path().join("half").to_str().unwrap(),
    ]));
    assert!(
        !o.status.success() && text(&o).contains("no log of shard 2/2"),
        "{}",
        text(&o)
    );

    // Two MPI ranks split the trials and rank 0 writes the table. Rank 1 has the larger
    // models (64 filters), so rank 0 waits for it, about 2 s here: longer than a collective call may, which
    // the search's barrier allows.
    search(
        mpirun(2)
            .arg(convkit_bin())
            .env("CONVKIT_COLLECTIVE_TIMEOUT", "0.5"),
        "mpi",
        &[],
    );
    assert_same_table(&table(&dir.path().join("mpi")), &alone, "two MPI ranks");
    assert_same_best(
        &dir.path().join("mpi/best.json"),
        &dir.path().join("one/best.json"),
    );
}
