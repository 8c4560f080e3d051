//! Engine-neutral weights: named f32 tensors in the canonical layout (conv `[out, in, kh, kw]`,
//! dense `[out, in]`, as PyTorch), as safetensors bytes. [`crate::checkpoint`] stores them
//! with the model they belong to.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::spec::Sequential;
use crate::{Error, Result};

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape {
                expected: format!("{n} values for shape {shape:?}"),
                found: format!("{} values", data.len()),
            });
        }
        Ok(Tensor { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Largest absolute element-wise difference; `None` if the shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f32> {
        (self.shape == other.shape).then(|| {
            self.data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        })
    }
}

/// Named tensors of a model, ordered by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Weights {
            tensor: name.into(),
            message: "missing".into(),
        })
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Check names and shapes against a spec: every expected tensor present with the right
    /// shape, and nothing else; every value finite (and moving variances non-negative).
    pub fn check(&self, spec: &Sequential) -> Result<()> {
        self.check_against(&spec.plan()?.weights, &spec.name)
    }

    /// [`Weights::check`] for a model checked already.
    pub fn check_for(&self, model: &crate::plan::Compiled) -> Result<()> {
        self.check_against(&model.plan().weights, &model.spec().name)
    }

    /// Exactly the weights `expected` of model `model_name`, each finite.
    fn check_against(&self, expected: &[crate::plan::WeightSpec], model_name: &str) -> Result<()> {
        for crate::plan::WeightSpec {
            name, shape, role, ..
        } in expected
        {
            let tensor = self.tensors.get(name).ok_or_else(|| Error::Weights {
                tensor: name.clone(),
                message: format!("missing (the model expects shape {shape:?})"),
            })?;
            if &tensor.shape != shape {
                return Err(Error::Weights {
                    tensor: name.clone(),
                    message: format!("expected shape {shape:?}, found {:?}", tensor.shape),
                });
            }
            if let Some((i, v)) = tensor.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::Weights {
                    tensor: name.clone(),
                    message: format!("weights must be finite, found {v} at index {i}"),
                });
            }
            if *role == crate::plan::Role::MovingVariance {
                if let Some((i, v)) = tensor
                    .data
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
                {
                    return Err(Error::Weights {
                        tensor: name.clone(),
                        message: format!(
                            "a variance must be finite and non-negative, found {v} at index {i}"
                        ),
                    });
                }
            }
        }
        if let Some(extra) = self
            .tensors
            .keys()
            .find(|k| !expected.iter().any(|w| &w.name == *k))
        {
            return Err(Error::Weights {
                tensor: extra.clone(),
                message: format!(
                    "not part of model `{}` (expected tensors: {})",
                    model_name,
                    expected
                        .iter()
                        .map(|w| w.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(())
    }

    /// What Keras adds to the loss for these weights of `spec`: the sum of every kernel's
    /// regulariser penalty.
    pub fn kernel_penalty(&self, spec: &Sequential) -> Result<f64> {
        let mut total = 0.0;
        for w in spec.plan()?.weights {
            if let (true, Some(r)) = (w.role.is_regularised(), spec.kernel_regularizer(w.layer)) {
                total += r.penalty(&self.get(&w.name)?.data);
            }
        }
        Ok(total)
    }

    /// Largest difference per tensor against `other` (same names required).
    pub fn max_abs_diff(&self, other: &Weights) -> Result<Vec<(String, f32)>> {
        self.tensors
            .iter()
            .map(|(name, t)| {
                let o = other.get(name)?;
                let d = t.max_abs_diff(o).ok_or_else(|| Error::Weights {
                    tensor: name.clone(),
                    message: format!("shape {:?} vs {:?}", t.shape, o.shape),
                })?;
                Ok((name.clone(), d))
            })
            .collect()
    }

    /// Serialise as safetensors bytes with `metadata`.
    pub fn to_safetensors(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    t.shape.clone(),
                    bytemuck_f32(&t.data),
                )
                .expect("shape checked on construction");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Weights {
            tensor: "*".into(),
            message: e.to_string(),
        })
    }

    /// Parse safetensors bytes read from `path` (used in messages); returns weights and metadata.
    pub fn from_safetensors(path: &Path, bytes: &[u8]) -> Result<(Self, HashMap<String, String>)> {
        let bad = |message: String| Error::format(path, 0, message);
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut weights = Weights::default();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(Error::Weights {
                    tensor: name,
                    message: format!(
                        "expected dtype F32, found {:?} in {}",
                        view.dtype(),
                        path.display()
                    ),
                });
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            weights.insert(name, Tensor::new(view.shape().to_vec(), data)?);
        }
        Ok((weights, metadata))
    }
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; u8 has alignment 1. safetensors is
    // little-endian, as is every platform convkit builds for (checked below).
    const _: () = assert!(cfg!(target_endian = "little"));
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}
