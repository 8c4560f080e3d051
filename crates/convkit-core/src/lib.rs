//! Engine-neutral core of convkit: datasets, the model spec and its plan, Keras-default
//! initialisation, compile settings and the optimizer rules, the one executor (forward,
//! backward, optimizer steps) written over a small operations surface, the one training loop,
//! metrics, plots, engine-neutral weights, and the run layer ([`run`]) that the command line
//! is a thin shell over. Engines implement [`Backend`] and supply the operations
//! ([`primitives::Ops`]); nothing here knows which engines exist.

pub mod artifacts;
pub mod augment;
pub mod backend;
pub mod checkpoint;
pub mod collective;
pub mod compare;
pub mod compile;
pub mod composite;
pub mod data;
#[cfg(feature = "evcxr")]
pub mod display;
mod error;
pub mod exec;
pub mod init;
pub mod io;
pub mod metrics;
pub mod onnx;
pub mod op;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod primitives;
pub mod pytorch;
pub mod run;
pub mod search;
pub mod spec;
pub mod table;
pub mod threads;
pub mod tolerance;
pub mod train;
pub mod weights;

pub use backend::{Backend, Network, StepStats, Targets};
pub use checkpoint::{Checkpoint, CheckpointMeta};
pub use compile::{Compile, Head, Loss, Optimizer};
pub use data::{Dataset, ImageShape, Normalisation};
pub use error::{Error, Result};
pub use metrics::{ClassificationReport, ConfusionMatrix};
pub use plan::Compiled;
pub use spec::*;
pub use train::backup;
pub use train::{
    Callback, Control, CsvLogger, EarlyStopping, EarlyStoppingRule, Evaluation, History,
    LearningRateScheduler, Model, ModelCheckpoint, Monitor, PlateauRule, ReduceLrOnPlateau,
    Schedule, ScheduleRule, Verbosity,
};
pub use weights::{Tensor, Weights};

/// Re-exported so downstream crates use the same versions.
pub use ndarray;
pub use polars;
