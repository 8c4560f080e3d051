//! Weights from PyTorch: the `state_dict` of a `torch.nn.Sequential` whose layers match a
//! convkit spec, saved with `safetensors.torch.save_file(model.state_dict(), path)`. Layers
//! with weights are matched by position (the first Conv2d with the spec's first Conv2D, ...),
//! every shape is checked, and the first tensor that does not fit is named.
//!
//! | convkit | PyTorch module | tensors |
//! |---|---|---|
//! | `Conv2D` | `Conv2d` (with bias) | `weight` `[out, in, kh, kw]`, `bias` |
//! | `Dense` | `Linear` | `weight` `[out, in]`, `bias` |
//! | `BatchNormalization` | `BatchNorm1d`/`BatchNorm2d` | `weight`→`gamma`, `bias`→`beta`, `running_mean`→`moving_mean`, `running_var`→`moving_variance` (`num_batches_tracked` is ignored) |
//!
//! PyTorch's `nn.Flatten` on an NCHW batch orders features (C, H, W); Keras and convkit use
//! (H, W, C). With [`FlattenOrder::ChannelsFirst`] the features between the Flatten and the
//! first Dense (that Dense's kernel columns, and a BatchNormalization on the flat vector) are
//! reordered, so the imported model computes what the PyTorch one did.

use std::collections::BTreeMap;
use std::path::Path;

use crate::spec::{FeatureOrder, LayerKind, Sequential, Shape};
use crate::weights::{Tensor, Weights};
use crate::{Error, Result};

/// How the PyTorch model flattened images before its first `Linear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlattenOrder {
    /// `nn.Flatten()` on NCHW: (C, H, W), what a model written in PyTorch does.
    ChannelsFirst,
    /// (H, W, C), as Keras, convkit and `python/convkit_torch.py` do.
    ChannelsLast,
}

impl std::str::FromStr for FlattenOrder {
    type Err = Error;
    /// `chw` or `hwc`.
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "chw" => Ok(FlattenOrder::ChannelsFirst),
            "hwc" => Ok(FlattenOrder::ChannelsLast),
            other => Err(Error::config(
                "flatten order",
                format!("expected chw or hwc, found `{other}`"),
            )),
        }
    }
}

/// The PyTorch tensors a convkit layer's weights come from, in convkit's order: (the torch
/// module's attribute, convkit's weight suffix), from the layer's rules.
/// `python/convkit_torch.py` keeps the same table (`TORCH_PARTS`), checked against this one
/// by `tests/interop.rs`.
pub fn torch_parts(kind: &LayerKind) -> Vec<(&'static str, &'static str)> {
    (kind.rules().torch_parts().iter())
        .map(|part| (part.attribute, part.suffix))
        .collect()
}

/// `(C, H, W)`-ordered features reordered to `(H, W, C)`, for every row of `t` (the last axis).
fn channels_last(t: &Tensor, (h, w, c): (usize, usize, usize)) -> Tensor {
    let features = h * w * c;
    let mut data = vec![0f32; t.data.len()];
    for (row, out) in t
        .data
        .chunks_exact(features)
        .zip(data.chunks_exact_mut(features))
    {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    out[(y * w + x) * c + ch] = row[(ch * h + y) * w + x];
                }
            }
        }
    }
    Tensor {
        shape: t.shape.clone(),
        data,
    }
}

/// Weights for `spec` from the PyTorch `state_dict` at `path` (see the module docs).
pub fn weights_from_state_dict(
    path: &Path,
    spec: &Sequential,
    flatten: FlattenOrder,
) -> Result<Weights> {
    let bytes = crate::io::read_capped(path, u64::MAX)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, 0, format!("not a safetensors file: {e}")))?;
    let weights_error = |tensor: &str, message: String| Error::Weights {
        tensor: tensor.into(),
        message: format!("{message} (in {})", path.display()),
    };
    // module index → parameter name → tensor, in the Sequential's order.
    let mut modules: BTreeMap<usize, BTreeMap<String, Tensor>> = BTreeMap::new();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in tensors {
        let parsed = name
            .split_once('.')
            .and_then(|(index, part)| Some((index.parse::<usize>().ok()?, part)))
            .filter(|(_, part)| !part.contains('.'));
        let Some((index, part)) = parsed else {
            return Err(weights_error(
                &name,
                "expected `<index>.<parameter>` names, as a torch.nn.Sequential's state_dict has"
                    .into(),
            ));
        };
        if part == "num_batches_tracked" {
            continue;
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(weights_error(
                &name,
                format!("expected dtype F32, found {:?}", view.dtype()),
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        modules
            .entry(index)
            .or_default()
            .insert(part.to_string(), Tensor::new(view.shape().to_vec(), data)?);
    }
    let expected: BTreeMap<String, Vec<usize>> = spec.weight_shapes()?.into_iter().collect();
    let names = spec.layer_names();
    let shapes = spec.output_shapes()?;
    let mut torch = modules.into_iter();
    let mut weights = Weights::default();
    let mut input = spec.input();
    // The image a Flatten turned into features, until the first Dense after it.
    let mut flattened: Option<(usize, usize, usize)> = None;
    for ((layer, name), output) in spec.layers.iter().zip(&names).zip(&shapes) {
        let rules = layer.kind.rules();
        let order = rules.feature_order();
        if let (FeatureOrder::Flattens, Shape::Image { h, w, c }) = (order, input) {
            flattened = (flatten == FlattenOrder::ChannelsFirst).then_some((h, w, c));
        }
        let parts = rules.torch_parts();
        if !parts.is_empty() {
            let Some((index, mut tensors)) = torch.next() else {
                return Err(weights_error(
                    &format!("{name}.{}", parts[0].suffix),
                    format!("layer `{name}` has no PyTorch module left to take its weights from: the state_dict has fewer layers with weights than the spec"),
                ));
            };
            for part in parts {
                let torch_name = format!("{index}.{}", part.attribute);
                let convkit_name = format!("{name}.{}", part.suffix);
                let tensor = tensors.remove(part.attribute).ok_or_else(|| {
                    weights_error(
                        &torch_name,
                        format!(
                            "missing: layer `{name}` ({}) needs it for `{convkit_name}`",
                            layer.kind.type_name()
                        ),
                    )
                })?;
                let shape = &expected[&convkit_name];
                if &tensor.shape != shape {
                    return Err(weights_error(
                        &torch_name,
                        format!(
                            "expected shape {shape:?} for `{convkit_name}`, found {:?}",
                            tensor.shape
                        ),
                    ));
                }
                // After a flatten, what indexes the flattened features follows its order.
                let tensor = match flattened {
                    Some(image) if part.indexed_by_features => channels_last(&tensor, image),
                    Some(_) | None => tensor,
                };
                weights.insert(convkit_name, tensor);
            }
            if let Some(extra) = tensors.keys().next() {
                return Err(weights_error(
                    &format!("{index}.{extra}"),
                    format!(
                        "not expected: layer `{name}` is a {}",
                        layer.kind.type_name()
                    ),
                ));
            }
        }
        // A Dense reads the flattened order with its kernel, then its units are the features.
        if order == FeatureOrder::Mixes {
            flattened = None;
        }
        input = *output;
    }
    if let Some((index, tensors)) = torch.next() {
        let first = tensors.keys().next().cloned().unwrap_or_default();
        return Err(weights_error(
            &format!("{index}.{first}"),
            "left over: the state_dict has more layers with weights than the spec".into(),
        ));
    }
    weights.check(spec)?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_features_move_from_chw_to_hwc() {
        // Two rows of 2×1×3 (h, w, c) features, each numbered in CHW order.
        let t = Tensor::new(vec![2, 6], (0..12).map(|v| v as f32).collect()).unwrap();
        let hwc = channels_last(&t, (2, 1, 3));
        // (y, x, ch) in HWC takes CHW index (ch·h + y)·w + x.
        assert_eq!(hwc.data[..6], [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
        assert_eq!(hwc.data[6..], [6.0, 8.0, 10.0, 7.0, 9.0, 11.0]);
    }
}
