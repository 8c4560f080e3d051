//! A trained model in one safetensors file: its weights, plus the model spec, the compile
//! settings, the class names and the input normalisation in the metadata, so a file trained on
//! one engine loads on any other (and in PyTorch).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::compile::Compile;
use crate::data::Normalisation;
use crate::spec::{Sequential, SizeLimits};
use crate::weights::Weights;
use crate::{Error, Result};

/// Everything needed to rebuild and use a trained model, stored in one safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub spec: Sequential,
    pub compile: Compile,
    pub weights: Weights,
    pub meta: CheckpointMeta,
}

/// What the checkpoint knows about the data the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CheckpointMeta {
    /// Class names, in output order.
    pub classes: Vec<String>,
    /// How the model's inputs were normalised.
    pub normalisation: Normalisation,
    /// The engine it was trained on (informational).
    #[serde(default)]
    pub backend: String,
}

impl CheckpointMeta {
    /// `None` when `classes` is empty (unknown) or names each of the `spec`'s classes once;
    /// else what is wrong.
    fn mismatch(&self, spec: &Sequential) -> Result<Option<String>> {
        if self.classes.is_empty() {
            return Ok(None);
        }
        let expected = spec.class_count()?;
        if self.classes.len() != expected {
            return Ok(Some(format!(
                "metadata `{META_DATA}` names {} classes ({:?}), but the model's output ({}) tells {expected} apart",
                self.classes.len(),
                self.classes,
                spec.output_shape()?
            )));
        }
        let mut seen = BTreeSet::new();
        Ok(self
            .classes
            .iter()
            .find(|c| !seen.insert(c.as_str()))
            .map(|c| format!("metadata `{META_DATA}` names class `{c}` twice")))
    }
}

const META_SPEC: &str = "convkit.spec";
const META_COMPILE: &str = "convkit.compile";
const META_DATA: &str = "convkit.data";

/// Names of the tensors a resumable backup ([`crate::train::Fit::backup`]) keeps beside the
/// model's own start with this; [`Checkpoint::load`] leaves them out.
pub const FIT_PREFIX: &str = "fit/";

impl Checkpoint {
    /// Save as safetensors, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with(path, Weights::default(), HashMap::new())
    }

    /// [`Checkpoint::save`] with `extra` tensors (named under [`FIT_PREFIX`]) and `extra`
    /// metadata beside the checkpoint's own.
    pub(crate) fn save_with(
        &self,
        path: &Path,
        extra: Weights,
        extra_metadata: HashMap<String, String>,
    ) -> Result<()> {
        self.weights.check(&self.spec)?;
        if let Some(message) = self.meta.mismatch(&self.spec)? {
            return Err(Error::data(path, message));
        }
        let mut metadata = HashMap::new();
        metadata.insert(
            META_SPEC.into(),
            serde_json::to_string(&self.spec).expect("serialisable"),
        );
        metadata.insert(
            META_COMPILE.into(),
            serde_json::to_string(&self.compile).expect("serialisable"),
        );
        metadata.insert(
            META_DATA.into(),
            serde_json::to_string(&self.meta).expect("serialisable"),
        );
        metadata.insert("format".into(), "pt".into());
        metadata.extend(extra_metadata);
        let bytes = if extra.tensors.is_empty() {
            self.weights.to_safetensors(metadata)?
        } else {
            debug_assert!(extra.tensors.keys().all(|k| k.starts_with(FIT_PREFIX)));
            let mut all = self.weights.clone();
            all.tensors.extend(extra.tensors);
            all.to_safetensors(metadata)?
        };
        crate::io::write_bytes_atomic(path, &bytes)
    }

    /// Load a checkpoint written by [`Checkpoint::save`]; a directory means `DIR/model.safetensors`.
    /// Names and shapes are checked against the stored spec, its size against
    /// [`SizeLimits::default`].
    pub fn load(path: &Path) -> Result<Self> {
        Checkpoint::load_within(path, &SizeLimits::default())
    }

    /// [`Checkpoint::load`] with the stored spec's size checked against `limits`.
    pub fn load_within(path: &Path, limits: &SizeLimits) -> Result<Self> {
        Checkpoint::load_with_extras(path, limits).map(|(checkpoint, _, _)| checkpoint)
    }

    /// [`Checkpoint::load_within`], and what [`Checkpoint::save_with`] kept beside the
    /// checkpoint: the tensors under [`FIT_PREFIX`] and every metadata entry.
    pub(crate) fn load_with_extras(
        path: &Path,
        limits: &SizeLimits,
    ) -> Result<(Self, Weights, HashMap<String, String>)> {
        let path = if path.is_dir() {
            path.join("model.safetensors")
        } else {
            path.to_path_buf()
        };
        let bytes = crate::io::read_capped(&path, u64::MAX)?;
        Checkpoint::from_bytes_with_extras(&path, &bytes, limits)
    }

    /// [`Checkpoint::load_with_extras`] of a file's `bytes` read already (`path` names it in
    /// errors): what ranks that were sent rank 0's copy read.
    pub(crate) fn from_bytes_with_extras(
        path: &Path,
        bytes: &[u8],
        limits: &SizeLimits,
    ) -> Result<(Self, Weights, HashMap<String, String>)> {
        let path = path.to_path_buf();
        let (mut weights, metadata) = Weights::from_safetensors(&path, bytes)?;
        let (extra, own) = std::mem::take(&mut weights.tensors)
            .into_iter()
            .partition(|(name, _)| name.starts_with(FIT_PREFIX));
        weights.tensors = own;
        let extra = Weights { tensors: extra };
        let field = |key: &str| {
            metadata.get(key).ok_or_else(|| {
                Error::data(
                    &path,
                    format!("safetensors metadata has no `{key}`: not a convkit checkpoint (load raw weights with Weights::from_safetensors)"),
                )
            })
        };
        let json = |key: &str, text: &String| Error::Json {
            path: path.clone(),
            message: format!("metadata `{key}`: {text}"),
        };
        let spec: Sequential =
            serde_json::from_str(field(META_SPEC)?).map_err(|e| json(META_SPEC, &e.to_string()))?;
        let compile: Compile = serde_json::from_str(field(META_COMPILE)?)
            .map_err(|e| json(META_COMPILE, &e.to_string()))?;
        let meta: CheckpointMeta = match metadata.get(META_DATA) {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| json(META_DATA, &e.to_string()))?
            }
            None => CheckpointMeta::default(),
        };
        spec.check_size(limits).map_err(|e| match e {
            Error::Config { message, .. } => Error::data(&path, format!("stored model: {message}")),
            Error::Layer {
                index,
                name,
                message,
            } => Error::data(
                &path,
                format!("stored model, layer {index} ({name}): {message}"),
            ),
            other => other,
        })?;
        if let Some(message) = meta.mismatch(&spec)? {
            return Err(Error::data(&path, message));
        }
        weights.check(&spec).map_err(|e| match e {
            Error::Weights { tensor, message } => Error::Weights {
                tensor,
                message: format!("{message} (in {})", path.display()),
            },
            other => other,
        })?;
        let checkpoint = Checkpoint {
            spec,
            compile,
            weights,
            meta,
        };
        Ok((checkpoint, extra, metadata))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Loss, Optimizer};
    use crate::spec::{Activation, Dense, LayerKind};

    /// A one-unit sigmoid classifier (two classes) and its seeded weights.
    fn binary_checkpoint(classes: &[&str]) -> Checkpoint {
        let spec = Sequential::new(4, 4, 1)
            .flatten()
            .add(Dense::new(1).activation(Activation::Sigmoid));
        Checkpoint {
            weights: crate::init::glorot_uniform(&spec, 1).unwrap(),
            spec,
            compile: Compile::new(Optimizer::adam(), Loss::BinaryCrossentropy),
            meta: CheckpointMeta {
                classes: classes.iter().map(|c| c.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    /// Writes `checkpoint` the way `save` does, but without its checks: a crafted file.
    fn write_unchecked(checkpoint: &Checkpoint, path: &Path) {
        let metadata = HashMap::from([
            (
                META_SPEC.to_string(),
                serde_json::to_string(&checkpoint.spec).unwrap(),
            ),
            (
                META_COMPILE.to_string(),
                serde_json::to_string(&checkpoint.compile).unwrap(),
            ),
            (
                META_DATA.to_string(),
                serde_json::to_string(&checkpoint.meta).unwrap(),
            ),
        ]);
        std::fs::write(path, checkpoint.weights.to_safetensors(metadata).unwrap()).unwrap();
    }

    #[test]
    fn non_finite_weights_are_refused_with_tensor_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoint = binary_checkpoint(&[]);
        let name = "dense.weight";
        let mut tensor = checkpoint.weights.get(name).unwrap().clone();
        tensor.data[3] = f32::NAN;
        checkpoint.weights.insert(name, tensor);
        let path = dir.path().join("nan.safetensors");
        write_unchecked(&checkpoint, &path);
        let message = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(
            message.contains(name) && message.contains("found NaN at index 3"),
            "{message}"
        );
    }

    #[test]
    fn a_small_checkpoint_cannot_declare_a_huge_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut checkpoint = binary_checkpoint(&[]);
        // A 50,000 × 50,000 input, pooled down to the same 4×4 the stored weights fit.
        checkpoint.spec.input_shape = [50_000, 50_000, 1];
        checkpoint.spec.layers.insert(
            0,
            LayerKind::MaxPooling2D(crate::spec::Pool2D::new(12_500)).into(),
        );
        let path = dir.path().join("huge-input.safetensors");
        write_unchecked(&checkpoint, &path);
        let message = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(
            message.contains("huge-input.safetensors")
                && message.contains("stored model: input 50000×50000×1"),
            "{message}"
        );
        let loaded = Checkpoint::load_within(&path, &SizeLimits::NONE).unwrap();
        assert_eq!(loaded.spec.input_shape, [50_000, 50_000, 1]);
    }

    #[test]
    fn a_sigmoid_checkpoint_names_two_classes_or_none() {
        let dir = tempfile::tempdir().unwrap();
        for good in [&[][..], &["cat", "dog"][..]] {
            let path = dir.path().join("good.safetensors");
            binary_checkpoint(good).save(&path).unwrap();
            assert_eq!(
                Checkpoint::load(&path).unwrap().meta.classes.len(),
                good.len()
            );
        }
        // Once a panic in `convkit predict` (it read the second class name).
        for (i, (bad, needle)) in [
            (
                &["only"][..],
                "names 1 classes ([\"only\"]), but the model's output",
            ),
            (&["a", "b", "c"][..], "names 3 classes"),
            (&["cat", "cat"][..], "names class `cat` twice"),
        ]
        .into_iter()
        .enumerate()
        {
            let checkpoint = binary_checkpoint(bad);
            let path = dir.path().join(format!("bad{i}.safetensors"));
            let refused = checkpoint.save(&path).unwrap_err().to_string();
            assert!(refused.contains(needle), "{refused}");
            assert!(!path.exists(), "a refused save wrote {}", path.display());
            write_unchecked(&checkpoint, &path);
            let message = Checkpoint::load(&path).unwrap_err().to_string();
            assert!(
                message.contains(needle) && message.contains(&format!("bad{i}.safetensors")),
                "{message}"
            );
        }
    }
}
