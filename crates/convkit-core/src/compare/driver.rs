//! `convkit compare` as a request: each engine in a process of its own (a worker, started from
//! the `convkit` binary), PyTorch's rows through its script, onnxruntime's inference yardstick,
//! then the report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::{
    machine_peak_gflops, pytorch_cannot_run, run_engine, write_pytorch_inputs, Comparison,
    EngineRun, LeftOut, OnnxRuntimeInference, RunSettings, PYTORCH, PYTORCH_TUNED,
};
use crate::backend::Backend;
use crate::{Error, Result};

/// The engines a build has: their names, and how to start one by name (the `convkit` crate's
/// `backend_names` and `backend`).
#[derive(Clone, Copy)]
pub struct Engines {
    pub names: fn() -> Vec<&'static str>,
    pub start: fn(&str) -> Result<Box<dyn Backend>>,
}

/// A comparison of engines on the same work, written to `out`: `compare.md`, `.json`, `.csv`,
/// charts, and each row's `<engine>.json`.
#[derive(Debug, Clone)]
pub struct CompareRequest {
    pub settings: RunSettings,
    /// Engines (and `pytorch`, `pytorch-tuned`) by name, or `["all"]`; empty: every engine
    /// whose device is here, less those left out by default, then both PyTorch rows.
    pub backends: Vec<String>,
    pub out: PathBuf,
    /// The program whose `compare-worker` command runs one engine: the `convkit` binary.
    pub worker: PathBuf,
}

impl CompareRequest {
    /// Every row, one after another, and the report (written to `out`); the report says
    /// whether the engines agree ([`Comparison::passed`]).
    pub fn run(&self, engines: &Engines) -> Result<Comparison> {
        let (names, left_out) = self.rows(engines)?;
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        let start = Instant::now();
        let mut runs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let eta = match i {
                0 => String::new(),
                _ => format!(
                    ", about {:.0} s left",
                    start.elapsed().as_secs_f64() / i as f64 * (names.len() - i) as f64
                ),
            };
            eprintln!("compare: [{}/{}] {name}{eta}", i + 1, names.len());
            let run = self.worker_run(name)?;
            if let Some(e) = &run.error {
                eprintln!("compare: {name} failed: {e}");
            }
            runs.push(run);
        }
        let onnxruntime =
            onnxruntime_inference(&self.settings, &self.out).map_err(|e| e.to_string());
        if let Err(why) = &onnxruntime {
            eprintln!("compare: onnxruntime did not run: {why}");
        }
        let (peak, method) = machine_peak_gflops();
        let comparison = Comparison::new(runs, peak, &method)?
            .with_left_out(left_out)
            .with_onnxruntime(onnxruntime);
        comparison.write(&self.out)?;
        Ok(comparison)
    }

    /// The rows to run, in order (PyTorch's last, the yardstick), and those left out, why.
    fn rows(&self, engines: &Engines) -> Result<(Vec<String>, Vec<LeftOut>)> {
        let (mut names, mut left_out) = chosen_engines(&self.backends, engines);
        let by_default = self.backends.is_empty() || self.backends == ["all"];
        let torch_rows: Vec<&str> = [PYTORCH, PYTORCH_TUNED]
            .into_iter()
            .filter(|row| by_default || names.iter().any(|n| n == row))
            .collect();
        names.retain(|n| n != PYTORCH && n != PYTORCH_TUNED);
        if torch_rows.is_empty() {
            return Ok((names, left_out));
        }
        match pytorch_missing(&self.settings)? {
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
        Ok((names, left_out))
    }

    /// Row `name`, from a worker process of its own; a worker that ends without a result is
    /// a failed row.
    fn worker_run(&self, name: &str) -> Result<EngineRun> {
        let json = self.out.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&json);
        let status = Command::new(&self.worker)
            .arg("compare-worker")
            .arg("--backends")
            .arg(name)
            .args(self.settings.worker_flags())
            .arg("--out")
            .arg(&self.out)
            .status()
            .map_err(|e| Error::io(&self.worker, e))?;
        let text = std::fs::read_to_string(&json).ok();
        Ok(match text.and_then(|t| serde_json::from_str::<EngineRun>(&t).ok()) {
            Some(run) => run,
            None => EngineRun::failed(name, format!("the worker process ended with {status} without a result (see its messages above)")),
        })
    }
}

impl RunSettings {
    /// The flags of `convkit compare-worker` that give these settings.
    fn worker_flags(&self) -> Vec<String> {
        let mut flags: Vec<String> = [
            ("--dataset", self.dataset.clone()),
            ("--model", self.model.clone()),
            ("--epochs", self.epochs.to_string()),
            ("--batch-size", self.batch_size.to_string()),
            ("--optimizer", self.optimizer.clone()),
            ("--repeat", self.repeat.to_string()),
            ("--seed", self.seed.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
        if let Some(n) = self.limit {
            flags.extend(["--limit".to_string(), n.to_string()]);
        }
        flags
    }
}

/// The engines `requested` names, and the compiled-in ones left out with the reason: the
/// names as given; else every engine whose device is here, less those left out by default
/// (with `all`, only those whose device is missing).
pub fn chosen_engines(requested: &[String], engines: &Engines) -> (Vec<String>, Vec<LeftOut>) {
    let all = requested.len() == 1 && requested[0] == "all";
    if !requested.is_empty() && !all {
        return (requested.to_vec(), Vec::new());
    }
    let mut left_out = Vec::new();
    let mut names = Vec::new();
    for name in (engines.names)() {
        let reason = match (engines.start)(name) {
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

/// Row `name` in this process, written to `out/<name>.json` even when it fails (then also
/// returned as the error).
pub fn worker(name: &str, settings: &RunSettings, out: &Path, engines: &Engines) -> Result<()> {
    let run = match name {
        PYTORCH | PYTORCH_TUNED => pytorch_run(settings, out, name == PYTORCH_TUNED),
        _ => (engines.start)(name).and_then(|backend| run_engine(backend.as_ref(), settings, out)),
    }
    .unwrap_or_else(|e| EngineRun::failed(name, e.to_string()));
    let json = serde_json::to_string(&run).expect("an engine run serialises");
    crate::io::write_bytes_atomic(&out.join(format!("{name}.json")), json.as_bytes())?;
    match run.error {
        Some(message) => Err(Error::engine(name, message)),
        None => Ok(()),
    }
}

/// The checkout's root: python scripts and `.venv` live there.
fn checkout() -> &'static Path {
    let core = Path::new(env!("CARGO_MANIFEST_DIR"));
    core.ancestors().nth(2).unwrap_or(core)
}

/// The python that runs PyTorch's rows and onnxruntime: `$CONVKIT_PYTHON`, else the
/// checkout's `.venv`.
fn python() -> PathBuf {
    std::env::var_os("CONVKIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| checkout().join(".venv/bin/python"))
}

/// Why PyTorch's rows cannot run here, if they cannot.
fn pytorch_missing(settings: &RunSettings) -> Result<Option<String>> {
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

/// A PyTorch row, eager or `tuned`: the inputs every engine trains from, written for
/// `python/convkit_compare_torch.py`, which trains and writes its run.
fn pytorch_run(settings: &RunSettings, out: &Path, tuned: bool) -> Result<EngineRun> {
    let row = if tuned { PYTORCH_TUNED } else { PYTORCH };
    let inputs = out.join(format!("{row}-input"));
    write_pytorch_inputs(settings, &inputs)?;
    let result = out.join(format!("{row}-run.json"));
    let _ = std::fs::remove_file(&result);
    let script = checkout().join("python/convkit_compare_torch.py");
    let status = Command::new(python())
        .arg(&script)
        .arg(&inputs)
        .arg(&result)
        .args(tuned.then_some("--tuned"))
        .status()
        .map_err(|e| Error::io(python(), e))?;
    if !status.success() {
        return Err(Error::engine(
            row,
            format!(
                "{} ended with {status} (see its messages above)",
                script.display()
            ),
        ));
    }
    let text = crate::io::read_to_string_capped(&result, 64 << 20)?;
    let run = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: result.clone(),
        message: format!("not a compare run: {e}"),
    })?;
    std::fs::remove_dir_all(&inputs).map_err(|e| Error::io(&inputs, e))?;
    Ok(run)
}

/// onnxruntime's inference rate (batch 256, as the engines' figure) on convkit's ONNX export
/// of the compared model with its initial weights, the test images as every engine gets them.
fn onnxruntime_inference(settings: &RunSettings, out: &Path) -> Result<OnnxRuntimeInference> {
    let dir = out.join("onnxruntime-input");
    write_pytorch_inputs(settings, &dir)?;
    let checkpoint = crate::checkpoint::Checkpoint::load(&dir.join("initial.safetensors"))?;
    let model = dir.join("model.onnx");
    crate::onnx::OnnxExport::new().save(&checkpoint, &model)?;
    let threads = crate::threads::chosen().count();
    let script = checkout().join("python/convkit_onnx.py");
    let output = Command::new(python())
        .arg(&script)
        .arg("--bench")
        .arg(&model)
        .arg(dir.join("test.u8"))
        .arg(threads.to_string())
        .arg(super::run::INFERENCE_BATCH.to_string())
        .output()
        .map_err(|e| Error::io(python(), e))?;
    if !output.status.success() {
        return Err(Error::engine(
            "onnxruntime",
            format!(
                "{} ended with {}: {}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).map_err(|e| {
        Error::engine(
            "onnxruntime",
            format!(
                "{}: expected one JSON line, found `{}`: {e}",
                script.display(),
                line.trim()
            ),
        )
    })
}
