//! The one error type of convkit-core. Every message says what was expected, what was found,
//! and where (file, byte offset, layer, tensor).

use std::path::PathBuf;

/// Result alias used throughout convkit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in convkit-core (and, through [`Error::Engine`], in an engine).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The OS error is part of the message, not a
    /// `source`, so `{:#}` chains (anyhow) do not print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A data file does not have the expected format.
    #[error("{path}: at byte offset {offset}: {message}")]
    Format {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    /// A file or folder is well-formed but its content is not usable.
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    /// An image could not be decoded.
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
    /// A dataset could not be found in any of the places searched, nor downloaded.
    #[error("dataset `{name}` not found; looked in:\n{searched}\n{hint}")]
    DatasetNotFound {
        name: String,
        searched: String,
        hint: String,
    },
    /// A download failed (HTTP status, truncation, checksum).
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    /// A layer of a model spec is invalid or does not fit its input.
    #[error("layer {index} ({name}): {message}")]
    Layer {
        index: usize,
        name: String,
        message: String,
    },
    /// A model spec, compile setting or fit setting is invalid.
    #[error("invalid {what}: {message}")]
    Config { what: &'static str, message: String },
    /// A weight tensor is missing, unexpected, or has the wrong shape.
    #[error("weights: tensor `{tensor}`: {message}")]
    Weights { tensor: String, message: String },
    /// Input given to a network does not match what it expects.
    #[error("shape mismatch: expected {expected}, found {found}")]
    Shape { expected: String, found: String },
    /// The training or validation loss became NaN or infinite; training stopped (as Keras'
    /// TerminateOnNaN) and the model holds the last weights known to be finite.
    #[error("{what} became {value} at {at}; training stopped and the model keeps {kept}: lower the learning rate, or check the inputs are normalised")]
    NonFinite {
        /// `training loss` or `validation loss`.
        what: &'static str,
        value: f64,
        /// `epoch 3, batch 17 of 1875`.
        at: String,
        /// Which weights the model holds now, e.g. `the weights from the start of epoch 3`.
        kept: String,
    },
    /// An engine failed, or cannot do what was asked.
    #[error("{engine}: {message}")]
    Engine { engine: String, message: String },
    /// A backend name that is not compiled in.
    #[error("unknown backend `{name}`; compiled-in backends: {available}")]
    UnknownBackend { name: String, available: String },
    /// Writing a table (polars) failed.
    #[error("table: {0}")]
    Table(String),
    /// Drawing a plot (plotters) failed.
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
    /// A comparison ran, but the engines disagree or one failed (`convkit` exits with 3).
    #[error("the engines disagree or one failed (see {})", report.display())]
    ChecksFailed { report: PathBuf },
    /// JSON (model spec, metadata) could not be parsed.
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn format(
        path: impl Into<PathBuf>,
        offset: u64,
        message: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.into(),
            offset,
            message: message.into(),
        }
    }

    pub(crate) fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn config(what: &'static str, message: impl Into<String>) -> Self {
        Error::Config {
            what,
            message: message.into(),
        }
    }

    /// An engine-side failure; engines convert their own errors with this.
    pub fn engine(engine: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Engine {
            engine: engine.into(),
            message: message.to_string(),
        }
    }
}
