//! The agreement and speed report over several runs ([`Comparison`]): `compare.md`,
//! `compare.json` and `compare.csv`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{is_pytorch, EngineRun};
use crate::checkpoint::Checkpoint;
use crate::plot::Figure;
use crate::tolerance;
use crate::{Error, Result};

/// One agreement check of one engine against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub engine: String,
    pub check: String,
    pub value: f64,
    pub tolerance: f64,
    pub pass: bool,
}

/// An engine that a comparison did not run, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeftOut {
    pub engine: String,
    pub reason: String,
}

/// onnxruntime's inference rate on convkit's own ONNX export of the compared model: the
/// inference yardstick beside the engines' own.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct OnnxRuntimeInference {
    /// onnxruntime's version.
    pub version: String,
    /// Threads onnxruntime was given (intra-op), as many as the engines use.
    pub threads: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Test images per second over the whole test split, the best of a few passes.
    pub images_per_second: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub runs: Vec<EngineRun>,
    pub reference: Option<String>,
    pub checks: Vec<Check>,
    /// Compiled-in engines that did not run: their device is missing, or they are left out
    /// unless asked for ([`crate::backend::Backend::left_out_by_default`]).
    pub left_out: Vec<LeftOut>,
    /// FP32 peak of this machine, GFLOP/s, as measured by the harness: fused multiply-adds
    /// on every thread ([`crate::compare::machine_peak_gflops`]).
    pub machine_peak_gflops: f64,
    pub peak_method: String,
    /// onnxruntime on the same model, or why it did not run.
    pub onnxruntime: std::result::Result<OnnxRuntimeInference, String>,
}

fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

impl Comparison {
    /// Compare every successful run with the reference (`tch-cpu` when present, else the
    /// first successful engine; never a PyTorch row, which is checked like an engine).
    pub fn new(runs: Vec<EngineRun>, machine_peak_gflops: f64, peak_method: &str) -> Result<Self> {
        let ok: Vec<&EngineRun> = runs.iter().filter(|r| r.error.is_none()).collect();
        let reference = ok
            .iter()
            .find(|r| r.backend == "tch-cpu")
            .or(ok.iter().find(|r| !is_pytorch(&r.backend)))
            .copied();
        let mut checks = Vec::new();
        if let Some(r) = reference {
            let r_step = Checkpoint::load(&r.one_step_weights)?;
            for e in ok.iter().filter(|e| e.backend != r.backend) {
                let mut check = |name: &str, value: f64, tolerance: f64, pass: bool| {
                    checks.push(Check {
                        engine: e.backend.clone(),
                        check: name.into(),
                        value,
                        tolerance,
                        pass,
                    })
                };
                let d = max_abs(&e.init_probabilities, &r.init_probabilities);
                check(
                    "forward at init (max abs)",
                    d,
                    tolerance::FORWARD,
                    d <= tolerance::FORWARD,
                );
                let step = Checkpoint::load(&e.one_step_weights)?;
                let d = step
                    .weights
                    .max_abs_diff(&r_step.weights)?
                    .into_iter()
                    .map(|(_, d)| d as f64)
                    .fold(0.0, f64::max);
                check(
                    "weights after one SGD step (max abs)",
                    d,
                    tolerance::ONE_STEP,
                    d <= tolerance::ONE_STEP,
                );
                let d = e
                    .epoch_loss
                    .iter()
                    .zip(&r.epoch_loss)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                check(
                    "loss per epoch (max abs)",
                    d,
                    tolerance::EPOCH_LOSS,
                    d <= tolerance::EPOCH_LOSS,
                );
                let d = (e.test_accuracy - r.test_accuracy).abs();
                check(
                    "final test accuracy (abs)",
                    d,
                    tolerance::ACCURACY,
                    d <= tolerance::ACCURACY,
                );
                let n = e.predicted.len().max(1) as f64;
                let same = e
                    .predicted
                    .iter()
                    .zip(&r.predicted)
                    .filter(|(a, b)| a == b)
                    .count() as f64
                    / n;
                check(
                    "test predictions agreeing (share)",
                    same,
                    tolerance::PREDICTION_AGREEMENT,
                    same >= tolerance::PREDICTION_AGREEMENT,
                );
                let moved: u64 = e
                    .confusion_matrix
                    .iter()
                    .flatten()
                    .zip(r.confusion_matrix.iter().flatten())
                    .map(|(a, b)| a.abs_diff(*b))
                    .sum();
                let share = moved as f64 / 2.0 / n;
                check(
                    "confusion-matrix counts moved (share)",
                    share,
                    tolerance::CONFUSION_MOVED,
                    share <= tolerance::CONFUSION_MOVED,
                );
            }
        }
        Ok(Comparison {
            reference: reference.map(|r| r.backend.clone()),
            runs,
            checks,
            left_out: Vec::new(),
            machine_peak_gflops,
            peak_method: peak_method.into(),
            onnxruntime: Err(
                "not measured in this comparison (`convkit compare` measures it)".into(),
            ),
        })
    }

    /// The comparison with onnxruntime's inference rate on the same model, or why there is none.
    pub fn with_onnxruntime(
        mut self,
        onnxruntime: std::result::Result<OnnxRuntimeInference, String>,
    ) -> Self {
        self.onnxruntime = onnxruntime;
        self
    }

    /// The comparison, noting the engines that did not run and why.
    pub fn with_left_out(mut self, left_out: Vec<LeftOut>) -> Self {
        self.left_out = left_out;
        self
    }

    /// Each run's median seconds per epoch over the fastest PyTorch row's (eager or tuned) in
    /// the same comparison, when one ran.
    pub fn ratio_to_pytorch(&self, run: &EngineRun) -> Option<f64> {
        let fastest = self
            .runs
            .iter()
            .filter(|r| is_pytorch(&r.backend) && r.error.is_none())
            .map(EngineRun::median_epoch_seconds)
            .min_by(f64::total_cmp)?;
        (run.error.is_none()).then(|| run.median_epoch_seconds() / fastest)
    }

    /// Whether every check passed and no engine failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass) && self.runs.iter().all(|r| r.error.is_none())
    }

    /// [`Error::ChecksFailed`] naming the report written to `dir` ([`Comparison::write`])
    /// unless every check passed.
    pub fn require_pass(&self, dir: &Path) -> Result<()> {
        match self.passed() {
            true => Ok(()),
            false => Err(Error::ChecksFailed {
                report: dir.join("compare.md"),
            }),
        }
    }

    /// The speed table as a DataFrame, one row per engine.
    pub fn to_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let ok: Vec<&EngineRun> = self.runs.iter().collect();
        let f = |g: &dyn Fn(&EngineRun) -> f64| {
            ok.iter()
                .map(|r| if r.error.is_some() { None } else { Some(g(r)) })
                .collect::<Vec<Option<f64>>>()
        };
        DataFrame::new_infer_height(vec![
            Column::new(
                "engine".into(),
                ok.iter().map(|r| r.backend.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "device".into(),
                ok.iter().map(|r| r.device.clone()).collect::<Vec<_>>(),
            ),
            Column::new("seconds_per_epoch".into(), f(&|r| r.median_epoch_seconds())),
            Column::new(
                "ratio_to_pytorch".into(),
                ok.iter()
                    .map(|r| self.ratio_to_pytorch(r))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "train_images_per_s".into(),
                f(&|r| r.train_images_per_second()),
            ),
            Column::new(
                "inference_images_per_s".into(),
                f(&|r| r.inference_images_per_second),
            ),
            Column::new(
                "peak_rss_mib".into(),
                f(&|r| r.peak_rss_bytes as f64 / 1048576.0),
            ),
            Column::new("gflops".into(), f(&|r| r.gflops())),
            Column::new(
                "share_of_peak".into(),
                f(&|r| r.gflops() / self.machine_peak_gflops),
            ),
            Column::new("test_accuracy".into(), f(&|r| r.test_accuracy)),
            Column::new(
                "error".into(),
                ok.iter().map(|r| r.error.clone()).collect::<Vec<_>>(),
            ),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let first = self.runs.iter().find(|r| r.error.is_none());
        let _ = writeln!(s, "# convkit compare\n");
        if let Some(r) = first {
            let _ = writeln!(
                s,
                "Model `{}` on `{}`: {} training and {} test images, batch {}, {}, build profile `{}`. FLOPs per training image (forward + backward ≈ 3 × forward): {}.\n",
                r.model, r.dataset, r.train_images, r.test_images, r.batch_size, r.optimizer, r.build_profile, r.flops_per_training_image
            );
        }
        let _ = writeln!(
            s,
            "Machine FP32 peak: {:.1} GFLOP/s ({}).\n",
            self.machine_peak_gflops, self.peak_method
        );
        let _ = writeln!(
            s,
            "## Agreement (reference: {})\n",
            self.reference.as_deref().unwrap_or("none")
        );
        let _ = writeln!(
            s,
            "| engine | check | value | tolerance | result |\n|---|---|---|---|---|"
        );
        for c in &self.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3e} | {:.0e} | {} |",
                c.engine,
                c.check,
                c.value,
                c.tolerance,
                if c.pass { "PASS" } else { "FAIL" }
            );
        }
        if self.checks.is_empty() {
            let _ = writeln!(s, "| — | fewer than two engines ran | | | |");
        }
        let _ = writeln!(s, "\n## Speed\n");
        let _ = writeln!(
            s,
            "Times are against the fastest PyTorch row of this run (`pytorch`: eager, NCHW; `pytorch-tuned`: channels_last, a fused optimizer and torch.compile, compile time not counted). The share of peak is the epoch's FLOPs over its time, against the peak above. Inference is the best of three passes over the test images after an untimed one, probabilities out, each batch normalised before its clock starts: onnxruntime's yardstick below is measured the same way.\n"
        );
        let _ = writeln!(s, "| engine | device | s / epoch (median) | × fastest PyTorch | train img/s | inference img/s (batch 256) | peak RSS MiB | GFLOP/s | share of peak | test accuracy |\n|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.runs {
            match &r.error {
                Some(e) => {
                    let _ = writeln!(
                        s,
                        "| {} | FAILED: {} | | | | | | | | |",
                        r.backend,
                        e.replace('\n', " ").replace('|', "/")
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1}% | {:.4} |",
                        r.backend,
                        r.device,
                        r.median_epoch_seconds(),
                        self.ratio_to_pytorch(r)
                            .map_or("—".to_string(), |x| format!("{x:.2}×")),
                        r.train_images_per_second(),
                        r.inference_images_per_second,
                        r.peak_rss_bytes as f64 / 1048576.0,
                        r.gflops(),
                        100.0 * r.gflops() / self.machine_peak_gflops,
                        r.test_accuracy
                    );
                }
            }
        }
        let _ = match &self.onnxruntime {
            Ok(o) => writeln!(
                s,
                "\nInference yardstick: onnxruntime {} on convkit's ONNX export of the same model, {:.0} images/s (batch {}, {} threads).",
                o.version, o.images_per_second, o.batch_size, o.threads
            ),
            Err(why) => writeln!(s, "\nInference yardstick: onnxruntime did not run: {why}"),
        };
        if !self.left_out.is_empty() {
            let _ = writeln!(
                s,
                "\nNot run (name an engine, or `--backends all`, to run it anyway):\n"
            );
            for l in &self.left_out {
                let _ = writeln!(s, "- {}: {}", l.engine, l.reason.replace('\n', " "));
            }
        }
        let _ = writeln!(
            s,
            "\nOverall: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        s
    }

    /// Write `compare.md`, `compare.json`, `compare.csv`, `throughput.png`, `loss.png` and
    /// `accuracy.png` into `dir`, atomically each.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::io::write_bytes_atomic(&dir.join("compare.md"), self.markdown().as_bytes())?;
        let json = serde_json::to_string_pretty(self).expect("serialisable");
        crate::io::write_bytes_atomic(&dir.join("compare.json"), json.as_bytes())?;
        crate::table::write_csv(&mut self.to_dataframe()?, &dir.join("compare.csv"))?;
        self.throughput_chart().save(&dir.join("throughput.png"))?;
        self.accuracy_chart().save(&dir.join("accuracy.png"))?;
        self.loss_chart().save(&dir.join("loss.png"))?;
        Ok(())
    }

    /// The agreement checks as a DataFrame, one row per engine and check.
    pub fn checks_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let c = &self.checks;
        DataFrame::new_infer_height(vec![
            Column::new(
                "engine".into(),
                c.iter().map(|c| c.engine.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "check".into(),
                c.iter().map(|c| c.check.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "value".into(),
                c.iter().map(|c| c.value).collect::<Vec<_>>(),
            ),
            Column::new(
                "tolerance".into(),
                c.iter().map(|c| c.tolerance).collect::<Vec<_>>(),
            ),
            Column::new("pass".into(), c.iter().map(|c| c.pass).collect::<Vec<_>>()),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }

    pub(super) fn succeeded(&self) -> Vec<&EngineRun> {
        self.runs.iter().filter(|r| r.error.is_none()).collect()
    }
}
