//! # convkit
//!
//! The classic Keras CNN tutorials in Rust: load MNIST or CIFAR-10, normalise, stack
//! Conv2D / MaxPooling2D / Flatten / Dense, compile, fit, evaluate, predict, read the
//! confusion matrix and classification report, plot the curves — one pipeline, written once
//! against [`Backend`], run on the engine a cargo feature picks.
//!
//! ```no_run
//! use convkit::prelude::*;
//!
//! let backend = convkit::backend("candle-cpu")?;
//! let locator = Locator::from_env();
//! let full = locator.load(DatasetName::Mnist, Split::Train, None)?.normalise(Normalisation::Rescale);
//! let (train, val) = full.holdout(0.1, 42)?; // validation: a seeded tenth of train, never test
//! let test = locator.load(DatasetName::Mnist, Split::Test, None)?.normalise(Normalisation::Rescale);
//!
//! let spec = Sequential::preset("tutorial-mnist")?;
//! println!("{}", spec.summary()?);
//! let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
//! let mut model = Model::new(spec, compile, backend.as_ref(), 42)?;
//! let history = model.fit(&train).epochs(5).batch_size(32).validation_data(&val).run()?;
//!
//! let scored = Scored::new(model.evaluate(&test, 256)?)?;
//! println!("{}", scored.text());
//! TrainingCurves(&history).save("history.png".as_ref())?;
//! # Ok::<(), convkit::Error>(())
//! ```
//!
//! Engines (features): `candle` (default, `candle-cpu`), `candle-cuda`, `tch` (`tch-cpu`,
//! `tch-cuda`), `burn-flex`, `burn-ndarray`, `burn-wgpu`, `burn-cuda`.

pub use convkit_core::*;

#[cfg(any(
    feature = "burn-flex",
    feature = "burn-ndarray",
    feature = "burn-wgpu",
    feature = "burn-cuda"
))]
pub use convkit_burn;
#[cfg(feature = "candle")]
pub use convkit_candle;
#[cfg(feature = "tch")]
pub use convkit_tch;

/// README.md's Rust examples, compiled as doctests so that they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

/// Everything a tutorial needs, in one import.
pub mod prelude {
    pub use convkit_core::artifacts::Scored;
    pub use convkit_core::augment::Augment;
    pub use convkit_core::checkpoint::{Checkpoint, CheckpointMeta};
    pub use convkit_core::data::{one_hot, random_soft, synthetic, DatasetName, Locator, Split};
    #[cfg(feature = "evcxr")]
    pub use convkit_core::display::{Rich, Table};
    pub use convkit_core::onnx::OnnxExport;
    pub use convkit_core::plot::{ConfusionHeatmap, Figure, SampleGrid, TrainingCurves};
    /// The model spec and every layer type.
    pub use convkit_core::spec::*;
    pub use convkit_core::{
        Backend, Compile, CsvLogger, Dataset, EarlyStopping, EarlyStoppingRule, ImageShape,
        LearningRateScheduler, Loss, Model, ModelCheckpoint, Monitor, Normalisation, Optimizer,
        PlateauRule, ReduceLrOnPlateau, Schedule, Verbosity,
    };
}

/// Make glibc's allocator keep freed blocks of up to 32 MiB for reuse, and up to 256 MiB of
/// freed memory in the process, instead of returning each block to the kernel.
///
/// The engines allocate a fresh tensor for nearly every operation, and an activation of a
/// batch is megabytes. With glibc's defaults each such block is its own `mmap`, unmapped when
/// freed, so its pages fault in again on every step: measured here, a fifth of a candle-cpu
/// epoch went to page faults (docs/measurements.md). The `convkit` binary calls this first
/// thing; a program of your own can too. It does nothing where the C library is not glibc.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of the allocator's tuning parameters; called before the
    // program's threads start allocating, as the binary does, it races with nothing.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Starts an engine on its device.
type Constructor = fn() -> Result<Box<dyn Backend>>;

/// Every engine compiled into this build: its `--backend` name and how to start it. A new
/// engine is one line here (and its cargo feature).
const ENGINES: &[(&str, Constructor)] = &[
    #[cfg(feature = "candle")]
    ("candle-cpu", || {
        Ok(Box::new(convkit_candle::CandleBackend::cpu()))
    }),
    #[cfg(feature = "candle-cuda")]
    ("candle-cuda", || {
        Ok(Box::new(convkit_candle::CandleBackend::cuda(0)?))
    }),
    #[cfg(feature = "tch")]
    ("tch-cpu", || Ok(Box::new(convkit_tch::TchBackend::cpu()))),
    #[cfg(feature = "tch")]
    ("tch-cuda", || {
        Ok(Box::new(convkit_tch::TchBackend::cuda(0)?))
    }),
    #[cfg(feature = "burn-flex")]
    ("burn-flex", || {
        Ok(Box::new(convkit_burn::BurnBackend::flex()))
    }),
    #[cfg(feature = "burn-ndarray")]
    ("burn-ndarray", || {
        Ok(Box::new(convkit_burn::BurnBackend::ndarray()))
    }),
    #[cfg(feature = "burn-wgpu")]
    ("burn-wgpu", || {
        Ok(Box::new(convkit_burn::BurnBackend::wgpu()?))
    }),
    #[cfg(feature = "burn-cuda")]
    ("burn-cuda", || {
        Ok(Box::new(convkit_burn::BurnBackend::cuda(0)?))
    }),
];

/// One line per compiled-in engine, as `convkit backends` prints them: its name and device,
/// and why `compare` leaves it out by default; or why it is unavailable here.
pub fn describe_backends() -> Vec<String> {
    let describe = |name: &str| match backend(name) {
        Ok(b) => match b.left_out_by_default() {
            Some(why) => format!(
                "{name:<14} {} (compare runs it only when named: {why})",
                b.device()
            ),
            None => format!("{name:<14} {}", b.device()),
        },
        Err(e) => format!("{name:<14} unavailable: {e}"),
    };
    backend_names().into_iter().map(describe).collect()
}

/// The engine used when none is named: the first compiled in (`none` in a build without one).
pub fn default_backend_name() -> &'static str {
    backend_names().first().copied().unwrap_or("none")
}

/// Names of the engines compiled into this build (whether or not their device is present).
pub fn backend_names() -> Vec<&'static str> {
    ENGINES.iter().map(|(name, _)| *name).collect()
}

/// Every engine compiled into this build, for the requests that start engines by name
/// ([`compare::CompareRequest`](convkit_core::compare::CompareRequest)).
pub fn engines() -> compare::Engines {
    compare::Engines {
        names: backend_names,
        start: backend,
    }
}

/// The engine called `name` (see [`backend_names`]); an error names the compiled-in ones, or
/// says why the device is unavailable.
pub fn backend(name: &str) -> Result<Box<dyn Backend>> {
    match ENGINES.iter().find(|(n, _)| *n == name) {
        Some((_, start)) => start(),
        None => Err(Error::UnknownBackend {
            name: name.into(),
            available: {
                let names = backend_names();
                if names.is_empty() {
                    "none (build with a feature such as `candle`)".into()
                } else {
                    names.join(", ")
                }
            },
        }),
    }
}
