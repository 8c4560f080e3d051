//! Cross-engine comparison: one engine's run ([`run_engine`] with [`RunSettings`]) and what it
//! records ([`EngineRun`]), and the agreement and speed report over several runs
//! ([`Comparison`]): `compare.md`, `compare.json`, `compare.csv` and PNG charts.

mod charts;
mod driver;
mod report;
mod run;

pub use driver::{chosen_engines, worker, CompareRequest, Engines};
pub use report::{Check, Comparison, LeftOut, OnnxRuntimeInference};
pub use run::{
    is_pytorch, machine_peak_gflops, pytorch_cannot_run, run_engine, write_pytorch_inputs,
    EngineRun, RunSettings, PYTORCH, PYTORCH_TUNED,
};
