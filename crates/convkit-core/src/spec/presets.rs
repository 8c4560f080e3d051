//! The tutorial presets and the spec's JSON form.

use std::path::Path;

use super::{Activation, Conv2D, Dense, Sequential, SizeLimits};
use crate::{Error, Result};

/// Names of the built-in presets, one per tutorial seed model.
pub const PRESETS: [&str; 6] = [
    "tutorial-random",
    "tutorial-mnist-3conv",
    "tutorial-cifar10-ann",
    "tutorial-cifar10-cnn",
    "tutorial-64x64",
    "tutorial-mnist",
];

impl Sequential {
    /// A built-in preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        use Activation::*;
        let conv = |f| Conv2D::new(f, 3).activation(Relu);
        let spec = match name {
            "tutorial-random" => Sequential::new(100, 100, 3)
                .add(conv(32))
                .max_pool(2)
                .flatten()
                .add(Dense::new(1).activation(Sigmoid)),
            "tutorial-mnist-3conv" => Sequential::new(28, 28, 1)
                .add(conv(32))
                .max_pool(2)
                .add(conv(64))
                .max_pool(2)
                .add(conv(64))
                .flatten()
                .add(Dense::new(64).activation(Relu))
                .add(Dense::new(10).activation(Softmax)),
            "tutorial-cifar10-ann" => Sequential::new(32, 32, 3)
                .flatten()
                .add(Dense::new(3000).activation(Relu))
                .add(Dense::new(1000).activation(Relu))
                .add(Dense::new(10).activation(Softmax)),
            "tutorial-cifar10-cnn" => Sequential::new(32, 32, 3)
                .add(conv(32))
                .max_pool(2)
                .add(conv(64))
                .max_pool(2)
                .flatten()
                .add(Dense::new(64).activation(Relu))
                .add(Dense::new(10).activation(Softmax)),
            "tutorial-64x64" => Sequential::new(64, 64, 3)
                .add(conv(32))
                .max_pool(2)
                .add(conv(64))
                .max_pool(2)
                .flatten()
                .add(Dense::new(128).activation(Relu))
                .add(Dense::new(10).activation(Softmax)),
            "tutorial-mnist" => Sequential::new(28, 28, 1)
                .add(conv(32))
                .max_pool(2)
                .add(conv(64))
                .max_pool(2)
                .flatten()
                .add(Dense::new(128).activation(Relu))
                .add(Dense::new(10).activation(Softmax)),
            other => {
                return Err(Error::config(
                    "model",
                    format!(
                        "unknown preset `{other}`; expected one of {} or a path to a spec .json",
                        PRESETS.join(", ")
                    ),
                ))
            }
        };
        Ok(spec.named(name))
    }

    /// A preset name, or a path to a JSON spec (checked against [`SizeLimits::default`]).
    pub fn from_preset_or_file(name_or_path: &str) -> Result<Self> {
        Sequential::from_preset_or_file_within(name_or_path, &SizeLimits::default())
    }

    /// A preset name, or a path to a JSON spec checked against `limits`.
    pub fn from_preset_or_file_within(name_or_path: &str, limits: &SizeLimits) -> Result<Self> {
        if PRESETS.contains(&name_or_path) {
            return Sequential::preset(name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "json") || path.exists() {
            return Sequential::load_json_within(path, limits);
        }
        Sequential::preset(name_or_path)
    }

    /// Read a spec from JSON and check it, its size against [`SizeLimits::default`].
    pub fn load_json(path: &Path) -> Result<Self> {
        Sequential::load_json_within(path, &SizeLimits::default())
    }

    /// Read a spec from JSON and check it, its size against `limits`. Files over 16 MiB are
    /// refused unread: a spec is a few kilobytes.
    pub fn load_json_within(path: &Path, limits: &SizeLimits) -> Result<Self> {
        let text = crate::io::read_to_string_capped(path, 16 << 20)?;
        let spec: Sequential = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.into(),
            message: e.to_string(),
        })?;
        spec.check_size(limits).map_err(|e| match e {
            Error::Config { what, message } => Error::Config {
                what,
                message: format!("{message} (in {})", path.display()),
            },
            other => other,
        })?;
        Ok(spec)
    }

    /// The spec as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a spec always serialises")
    }

    /// Write the spec as JSON, atomically.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        crate::io::write_bytes_atomic(path, self.to_json().as_bytes())
    }
}
