//! `convkit compare`'s arguments: the same model, initial weights and batches on every engine,
//! each in its own process (`convkit compare-worker`), then the agreement and speed report
//! ([`CompareRequest`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use convkit::compare::{CompareRequest, RunSettings};

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

/// Runs every engine in its own process and writes the report; fails when a check fails.
pub fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let request = CompareRequest {
        settings: args.settings(),
        backends: args.backends,
        out: args.out,
        worker: std::env::current_exe().context("locating the convkit binary")?,
    };
    let comparison = request.run(&convkit::engines())?;
    println!("{}", comparison.markdown());
    println!("wrote {}", request.out.display());
    Ok(comparison.require_pass(&request.out)?)
}

/// One engine, in this process; writes `OUT/<engine>.json` even when it fails.
pub fn worker(args: CompareArgs) -> anyhow::Result<()> {
    let name = args
        .backends
        .first()
        .context("compare-worker needs --backends NAME")?;
    Ok(convkit::compare::worker(
        name,
        &args.settings(),
        &args.out,
        &convkit::engines(),
    )?)
}
