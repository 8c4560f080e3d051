//! `cargo xtask scaling`: data-parallel training's throughput on this machine, 1 rank against
//! N ranks, per engine, from a release build with `mpi`, each with convkit's default threads:
//! one process takes every core, N ranks on one machine share its cores
//! (`convkit_core::threads`).

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::{build_env, cargo, data_dir, run, target_dir};

// The tests' loopback `mpirun`, so the benchmark runs as they do.
#[path = "../../tests/common/mpirun.rs"]
mod mpirun;

/// What to measure: `--backends a,b`, `--ranks N` (against 1), `--limit` training images,
/// `--batch-size` (the global batch), `--repeat` (runs of each, the fastest counts).
struct Settings {
    backends: Vec<String>,
    ranks: usize,
    limit: usize,
    batch_size: usize,
    repeat: usize,
}

fn settings(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        backends: ["candle-cpu", "tch-cpu", "burn-flex"]
            .map(String::from)
            .to_vec(),
        ranks: 2,
        limit: 20_000,
        batch_size: 64,
        repeat: 3,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| {
                    format!("{flag}: expected a positive whole number, found `{value}`")
                })
        };
        match flag.as_str() {
            "--backends" => s.backends = value.split(',').map(String::from).collect(),
            "--ranks" => s.ranks = number()?,
            "--limit" => s.limit = number()?,
            "--batch-size" => s.batch_size = number()?,
            "--repeat" => s.repeat = number()?,
            other => bail!("unknown flag `{other}` (expected --backends, --ranks, --limit, --batch-size, --repeat)"),
        }
    }
    Ok(s)
}

/// The number of images a run trained on, from its metrics.json.
fn train_images(out: &Path) -> Result<f64> {
    let path = out.join("metrics.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let metrics: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    metrics["train_images"]
        .as_f64()
        .with_context(|| format!("{}: no train_images", path.display()))
}

/// Seconds of the one epoch a run's history.csv records.
fn epoch_seconds(out: &Path) -> Result<f64> {
    let path = out.join("history.csv");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let column = header
        .iter()
        .position(|h| *h == "seconds")
        .with_context(|| format!("{}: no seconds column", path.display()))?;
    let row: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    row.get(column)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{}: no epoch's seconds", path.display()))
}

pub fn scaling(args: &[String]) -> Result<()> {
    let s = settings(args)?;
    run(&mut cargo(&[
        "build",
        "--release",
        "--features",
        "candle,tch,burn-flex,mpi",
        "--bin",
        "convkit",
    ]))?;
    let convkit = target_dir().join("release/convkit");
    let scratch = tempfile_dir()?;
    let mut rows = Vec::new();
    for backend in &s.backends {
        let mut per_rank_count = Vec::new();
        let mut images = 0.0;
        for ranks in [1, s.ranks] {
            let mut fastest = f64::INFINITY;
            for _ in 0..s.repeat {
                let out = scratch.join(format!("{backend}-{ranks}"));
                let mut c = mpirun::loopback_mpirun(ranks);
                mpirun::with_default_threads(&mut c);
                c.arg(&convkit).args([
                    "train",
                    "--dataset",
                    "fashion-mnist",
                    "--model",
                    "tutorial-mnist",
                    "--epochs",
                    "1",
                    "--quiet",
                    // Each repeat starts over in the same folder.
                    "--overwrite",
                ]);
                c.args(["--limit", &s.limit.to_string()])
                    .args(["--batch-size", &s.batch_size.to_string()])
                    .args(["--backend", backend])
                    .arg("--out")
                    .arg(&out);
                build_env(&mut c);
                if let Some(d) = data_dir() {
                    c.env("CONVKIT_DATA", d);
                }
                run(&mut c)?;
                fastest = fastest.min(epoch_seconds(&out)?);
                images = train_images(&out)?;
            }
            per_rank_count.push((ranks, fastest));
        }
        let (_, one) = per_rank_count[0];
        let (n, many) = per_rank_count[1];
        let (rate_one, rate_many) = (images / one, images / many);
        rows.push(format!(
            "| {backend} | {one:.2} | {rate_one:.0} | {many:.2} | {rate_many:.0} | {:.2}× | {:.0}% |",
            rate_many / rate_one,
            100.0 * rate_many / (n as f64 * rate_one)
        ));
    }
    println!(
        "\nOne epoch of tutorial-mnist on the first {} Fashion-MNIST training images less the tenth held out for validation, global batch {}, convkit's default threads (one process: every core; N ranks: the cores shared between them), the fastest of {} runs each:\n",
        s.limit, s.batch_size, s.repeat
    );
    println!(
        "| engine | 1 rank (s) | images/s | {n} ranks (s) | images/s | speed-up | efficiency |",
        n = s.ranks
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// A fresh folder for the runs' outputs, under the target dir.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = target_dir().join(format!("scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
