//! `convkit compare`: the same model, initial weights and batches on every engine, each in its
//! own process (`convkit compare-worker`), one after another; then the agreement and speed
//! report.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use convkit::compare::{
    machine_peak_gflops, pytorch_cannot_run, run_engine, write_pytorch_inputs, Comparison,
    EngineRun, LeftOut, OnnxRuntimeInference, RunSettings, PYTORCH, PYTORCH_TUNED,
};

#[derive(Args, Clone)]
pub struct CompareArgs {
    /// Comma-separated engines (and `pytorch`, `pytorch-tuned`), or `all`. Default: every
    /// compiled-in engine whose device is here, less those too slow here to finish in minutes
    /// (burn-ndarray, wgpu on a software device: the report says which and why), then PyTorch
    /// itself, eager (`pytorch`) and tuned (`pytorch-tuned`: channels_last, fused optimizer,
    /// torch.compile unless CONVKIT_TORCH_COMPILE=0), when a python with torch is found
    /// (`$CONVKIT_PYTHON`, else the checkout's `.venv`); `all` runs the slow ones too.
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    #[arg(long, default_value = "tutorial-mnist")]
    pub model: String,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Use at most N images of each split: a seeded sample with the classes in equal shares.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// Train this many times; seconds per epoch is the median over all of them.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value = "target/compare")]
    pub out: PathBuf,
}

impl CompareArgs {
    fn settings(&self) -> RunSettings {
        RunSettings {
            dataset: self.dataset.clone(),
            model: self.model.clone(),
            epochs: self.epochs,
            limit: self.limit,
            batch_size: self.batch_size,
            optimizer: self.optimizer.clone(),
            repeat: self.repeat,
            seed: self.seed,
        }
    }
}

/// The engines `--backends` asks for, and the compiled-in ones left out with the reason: the
/// names as given; else every engine whose device is here, less those left out by default
/// (with `all`, only those whose device is missing).
fn chosen_engines(requested: &[String]) -> (Vec<String>, Vec<LeftOut>) {
    let all = requested.len() == 1 && requested[0] == "all";
    if !requested.is_empty() && !all {
        return (requested.to_vec(), Vec::new());
    }
    let mut left_out = Vec::new();
    let mut names = Vec::new();
    for name in convkit::backend_names() {
        let reason = match convkit::backend(name) {
            Ok(_) if all => None,
            Ok(engine) => engine.left_out_by_default(),
            Err(e) => Some(e.to_string()),
        };
        match reason {
            Some(reason) => {
                eprintln!("compare: not running {name}: {reason}");
                left_out.push(LeftOut {
                    engine: name.to_string(),
                    reason,
                });
            }
            None => names.push(name.to_string()),
        }
    }
    (names, left_out)
}

/// The python that runs PyTorch's row: `$CONVKIT_PYTHON`, else the checkout's `.venv`.
fn python() -> PathBuf {
    std::env::var_os("CONVKIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python")))
}

/// The script that trains PyTorch's row.
const PYTORCH_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/python/convkit_compare_torch.py"
);

/// Why PyTorch's row cannot run here, if it cannot.
fn pytorch_missing(settings: &RunSettings) -> anyhow::Result<Option<String>> {
    if let Some(reason) = pytorch_cannot_run(settings)? {
        return Ok(Some(reason));
    }
    let python = python();
    let found = Command::new(&python)
        .args(["-c", "import torch, safetensors, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    Ok((!found).then(|| {
        format!(
            "no python with torch, safetensors and numpy at {} (`cargo xtask setup` installs them into .venv; or set CONVKIT_PYTHON)",
            python.display()
        )
    }))
}

/// Runs every engine in its own process and writes the report; fails when a check fails.
pub fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let (mut names, mut left_out) = chosen_engines(&args.backends);
    // PyTorch itself, last, eager and tuned: the yardstick every engine's time is given
    // against. By default both rows; naming one runs that one.
    let by_default = args.backends.is_empty() || args.backends == ["all"];
    let torch_rows: Vec<&str> = [PYTORCH, PYTORCH_TUNED]
        .into_iter()
        .filter(|row| by_default || names.iter().any(|n| n == row))
        .collect();
    names.retain(|n| n != PYTORCH && n != PYTORCH_TUNED);
    if !torch_rows.is_empty() {
        match pytorch_missing(&args.settings())? {
            None => names.extend(torch_rows.iter().map(|r| r.to_string())),
            Some(reason) => {
                for row in torch_rows {
                    eprintln!("compare: not running {row}: {reason}");
                    left_out.push(LeftOut {
                        engine: row.into(),
                        reason: reason.clone(),
                    });
                }
            }
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let exe = std::env::current_exe().context("locating the convkit binary")?;
    let start = Instant::now();
    let mut runs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let eta = if i > 0 {
            format!(
                ", about {:.0} s left",
                start.elapsed().as_secs_f64() / i as f64 * (names.len() - i) as f64
            )
        } else {
            String::new()
        };
        eprintln!("compare: [{}/{}] {name}{eta}", i + 1, names.len());
        let json = args.out.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&json);
        let mut cmd = Command::new(&exe);
        cmd.arg("compare-worker").arg("--backends").arg(name);
        for (flag, value) in [
            ("--dataset", args.dataset.clone()),
            ("--model", args.model.clone()),
            ("--epochs", args.epochs.to_string()),
            ("--batch-size", args.batch_size.to_string()),
            ("--optimizer", args.optimizer.clone()),
            ("--repeat", args.repeat.to_string()),
            ("--seed", args.seed.to_string()),
        ] {
            cmd.arg(flag).arg(value);
        }
        if let Some(n) = args.limit {
            cmd.arg("--limit").arg(n.to_string());
        }
        cmd.arg("--out").arg(&args.out);
        let status = cmd
            .status()
            .with_context(|| format!("starting the {name} worker"))?;
        let run = match std::fs::read_to_string(&json).ok().and_then(|t| serde_json::from_str::<EngineRun>(&t).ok()) {
            Some(run) => run,
            None => EngineRun::failed(name, format!("the worker process ended with {status} without a result (see its messages above)")),
        };
        if let Some(e) = &run.error {
            eprintln!("compare: {name} failed: {e}");
        }
        runs.push(run);
    }
    let onnxruntime = onnxruntime_inference(&args).map_err(|e| format!("{e:#}"));
    if let Err(why) = &onnxruntime {
        eprintln!("compare: onnxruntime did not run: {why}");
    }
    let (peak, method) = machine_peak_gflops();
    let comparison = Comparison::new(runs, peak, &method)?
        .with_left_out(left_out)
        .with_onnxruntime(onnxruntime);
    comparison.write(&args.out)?;
    println!("{}", comparison.markdown());
    println!("wrote {}", args.out.display());
    if !comparison.passed() {
        bail!(
            "the engines disagree or one failed (see {})",
            args.out.join("compare.md").display()
        );
    }
    Ok(())
}

/// One engine, in this process; writes `OUT/<engine>.json` even when it fails.
pub fn worker(args: CompareArgs) -> anyhow::Result<()> {
    let name = args
        .backends
        .first()
        .cloned()
        .context("compare-worker needs --backends NAME")?;
    let json = args.out.join(format!("{name}.json"));
    let run = match worker_run(&name, &args) {
        Ok(run) => run,
        Err(e) => EngineRun::failed(&name, format!("{e:#}")),
    };
    let failed = run.error.clone();
    convkit::io::write_bytes_atomic(&json, serde_json::to_string(&run)?.as_bytes())?;
    match failed {
        Some(e) => bail!(e),
        None => Ok(()),
    }
}

fn worker_run(name: &str, args: &CompareArgs) -> anyhow::Result<EngineRun> {
    if name == PYTORCH || name == PYTORCH_TUNED {
        return pytorch_run(args, name == PYTORCH_TUNED);
    }
    let backend = convkit::backend(name)?;
    Ok(run_engine(backend.as_ref(), &args.settings(), &args.out)?)
}

/// A PyTorch row, eager or `tuned`: the inputs every engine trains from, written for the
/// script, which trains and writes its run.
fn pytorch_run(args: &CompareArgs, tuned: bool) -> anyhow::Result<EngineRun> {
    let row = if tuned { PYTORCH_TUNED } else { PYTORCH };
    let inputs = args.out.join(format!("{row}-input"));
    write_pytorch_inputs(&args.settings(), &inputs)?;
    let result = args.out.join(format!("{row}-run.json"));
    let _ = std::fs::remove_file(&result);
    let status = Command::new(python())
        .arg(PYTORCH_SCRIPT)
        .arg(&inputs)
        .arg(&result)
        .args(tuned.then_some("--tuned"))
        .status()
        .with_context(|| format!("starting {}", python().display()))?;
    if !status.success() {
        bail!("{PYTORCH_SCRIPT} ended with {status} (see its messages above)");
    }
    let text = std::fs::read_to_string(&result)
        .with_context(|| format!("reading {}", result.display()))?;
    let run = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a compare run", result.display()))?;
    std::fs::remove_dir_all(&inputs).with_context(|| format!("removing {}", inputs.display()))?;
    Ok(run)
}

/// onnxruntime's inference rate (batch 256, as the engines' figure) on convkit's ONNX export
/// of the compared model with its initial weights, the test images as every engine gets them.
fn onnxruntime_inference(args: &CompareArgs) -> anyhow::Result<OnnxRuntimeInference> {
    let dir = args.out.join("onnxruntime-input");
    write_pytorch_inputs(&args.settings(), &dir)?;
    let checkpoint = convkit::checkpoint::Checkpoint::load(&dir.join("initial.safetensors"))?;
    let model = dir.join("model.onnx");
    convkit::onnx::OnnxExport::new().save(&checkpoint, &model)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let output = Command::new(python())
        .arg(ONNX_SCRIPT)
        .arg("--bench")
        .arg(&model)
        .arg(dir.join("test.u8"))
        .arg(threads.to_string())
        .arg("256")
        .output()
        .with_context(|| format!("starting {}", python().display()))?;
    if !output.status.success() {
        bail!(
            "{ONNX_SCRIPT} ended with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "{ONNX_SCRIPT}: expected one JSON line, found `{}`",
            line.trim()
        )
    })
}

/// The script that times onnxruntime.
const ONNX_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/convkit_onnx.py");

#[cfg(test)]
mod tests {
    use super::chosen_engines;

    #[test]
    fn named_engines_run_as_given_and_all_runs_what_the_default_leaves_out() {
        let named = vec!["candle-cpu".to_string(), "no-such-engine".to_string()];
        assert_eq!(chosen_engines(&named), (named.clone(), Vec::new()));

        let (default, left_out) = chosen_engines(&[]);
        let (all, missing) = chosen_engines(&["all".to_string()]);
        // `all` adds back exactly the engines left out for being slow here; engines whose
        // device is missing stay out either way.
        for l in &left_out {
            assert!(!default.contains(&l.engine), "{l:?}");
            let device_missing = missing.iter().any(|m| m.engine == l.engine);
            assert_eq!(all.contains(&l.engine), !device_missing, "{l:?}");
        }
        assert!(default.iter().all(|n| all.contains(n)));
        assert_eq!(
            all.len() + missing.len(),
            convkit::backend_names().len(),
            "{all:?} {missing:?}"
        );
        if convkit::backend_names().contains(&"burn-ndarray") {
            assert!(left_out.iter().any(|l| l.engine == "burn-ndarray"));
            assert!(all.iter().any(|n| n == "burn-ndarray"));
        }
    }
}
