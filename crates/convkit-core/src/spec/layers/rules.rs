//! What every layer type answers about itself ([`LayerRules`]), the shapes between layers,
//! the kernel regulariser two layer types share, and the helpers their rules use.

use serde::{Deserialize, Serialize};

use crate::op::{Activation, PlannedOp, Role};
use crate::{Error, Result};

/// Keras' kernel regularisers: `l1·Σ|w| + l2·Σw²` over a layer's kernel (not its bias) is
/// added to the loss, so the gradient gains `l1·sign(w) + 2·l2·w`. Keras' defaults are 0.01.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regularizer {
    #[serde(default)]
    pub l1: f32,
    #[serde(default)]
    pub l2: f32,
}

impl Regularizer {
    /// `keras.regularizers.L1(l1)`.
    pub fn l1(l1: f32) -> Self {
        Regularizer { l1, l2: 0.0 }
    }
    /// `keras.regularizers.L2(l2)`.
    pub fn l2(l2: f32) -> Self {
        Regularizer { l1: 0.0, l2 }
    }
    /// `keras.regularizers.L1L2(l1, l2)`.
    pub fn l1_l2(l1: f32, l2: f32) -> Self {
        Regularizer { l1, l2 }
    }
    /// Parses `l1=F`, `l2=F` or `l1=F,l2=F` (the CLI's `--kernel-regularizer`).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |found: &str| {
            Error::config(
                "kernel regularizer",
                format!("expected l1=F, l2=F or l1=F,l2=F with F ≥ 0, found `{found}`"),
            )
        };
        let mut r = Regularizer::default();
        for part in text.split(',').map(str::trim) {
            let (key, value) = part.split_once('=').ok_or_else(|| bad(part))?;
            let value: f32 = value.trim().parse().map_err(|_| bad(part))?;
            if !(value.is_finite() && value >= 0.0) {
                return Err(bad(part));
            }
            match key.trim() {
                "l1" => r.l1 = value,
                "l2" => r.l2 = value,
                _ => return Err(bad(part)),
            }
        }
        Ok(r)
    }

    /// The penalty `l1·Σ|w| + l2·Σw²` of a kernel's values.
    pub fn penalty(&self, kernel: &[f32]) -> f64 {
        let (l1, l2) = (self.l1 as f64, self.l2 as f64);
        kernel
            .iter()
            .map(|&w| l1 * (w as f64).abs() + l2 * (w as f64) * (w as f64))
            .sum()
    }
}

/// Shape of the activations between layers (batch dimension omitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `height × width × channels`.
    Image { h: usize, w: usize, c: usize },
    /// A flat feature vector.
    Flat(usize),
}

impl Shape {
    /// Values in the shape. Shapes from [`Sequential::output_shapes`] never overflow.
    pub fn numel(&self) -> usize {
        self.checked_numel()
            .expect("checked by Sequential::output_shapes")
    }

    /// An `H×W×C` image (not a flat vector).
    pub fn is_image(&self) -> bool {
        matches!(self, Shape::Image { .. })
    }

    /// Values in the shape, or `None` when the count overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        match *self {
            Shape::Image { h, w, c } => h.checked_mul(w)?.checked_mul(c),
            Shape::Flat(n) => Some(n),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Image { h, w, c } => write!(f, "(None, {h}, {w}, {c})"),
            Shape::Flat(n) => write!(f, "(None, {n})"),
        }
    }
}

/// What one layer type knows about itself, in one place. Every property of a layer that
/// core derives (parameter counts, initial weights, checkpoints' tensors, the summary, FLOPs,
/// the executor's plan, the ONNX graph) comes from these methods, so a weight that is not
/// declared in [`LayerRules::weights`] does not exist anywhere.
pub(crate) trait LayerRules {
    /// Keras' class name (`Conv2D`).
    fn type_name(&self) -> &'static str;
    /// Keras' automatic name stem (`conv2d`).
    fn name_stem(&self) -> &'static str;
    /// The output shape on `input`, or why the layer does not fit it.
    fn output(&self, input: Shape) -> std::result::Result<Shape, String>;
    /// Role and canonical shape of each weight on `input`, in order.
    fn weights(&self, input: Shape) -> Vec<(Role, Vec<usize>)>;
    /// FLOPs (2 per multiply-accumulate) of one image's forward pass at inference.
    fn flops(&self, input: Shape, output: Shape) -> u64;
    /// The plan's operation on `input`, given the indices of the weights declared by
    /// [`LayerRules::weights`], in that order. `head` is true for the last layer, whose
    /// softmax or sigmoid the loss and `predict` apply.
    fn op(&self, input: Shape, weights: &[usize], head: bool) -> PlannedOp;
    /// The regulariser of its kernel, for a layer with one.
    fn kernel_regularizer(&self) -> Option<Regularizer> {
        None
    }
    /// The activation it ends with, for a layer that can end a classifier (Dense, the
    /// activation layers): the head's softmax or sigmoid, or `linear` for logits.
    fn classifier_activation(&self) -> Option<Activation> {
        None
    }
    /// Whether the layer can only come first (it works on the host batch).
    fn first_only(&self) -> bool {
        false
    }
    /// Whether `--batch-norm` puts a BatchNormalization after it (unless it is the last
    /// layer): Keras' habit after each Conv2D and Dense.
    fn normalised_by_default(&self) -> bool {
        false
    }
    /// Whether it turns an image into a flat vector, see [`super::LayerKind::flattens`].
    fn flattens(&self) -> bool {
        false
    }
    /// The PyTorch tensors its weights come from, in the order of [`LayerRules::weights`];
    /// none for a layer without weights. `python/convkit_torch.py` keeps the same table
    /// (`TORCH_PARTS`), checked against this one by `tests/interop.rs`.
    fn torch_parts(&self) -> &'static [TorchPart] {
        &[]
    }
    /// What the layer does to the order of a flattened image's features (PyTorch's
    /// `nn.Flatten` takes them channels-first, Keras channels-last).
    fn feature_order(&self) -> FeatureOrder {
        FeatureOrder::Kept
    }
}

/// One PyTorch tensor a layer's weight comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TorchPart {
    /// The torch module's attribute (`weight`, `running_mean`).
    pub attribute: &'static str,
    /// convkit's weight suffix (`weight`, `moving_mean`, see [`Role::suffix`]).
    pub suffix: &'static str,
    /// Whether an axis of it runs over the layer's input features, whose order a flatten
    /// before the layer decides: a Dense kernel's inputs, each batch normalisation vector.
    pub indexed_by_features: bool,
}

impl TorchPart {
    /// `attribute` for the weight with `suffix`, indexed by features or not.
    pub(crate) const fn new(
        attribute: &'static str,
        suffix: &'static str,
        indexed_by_features: bool,
    ) -> Self {
        TorchPart {
            attribute,
            suffix,
            indexed_by_features,
        }
    }
}

/// What a layer does to the order of features a Flatten made from an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FeatureOrder {
    /// Passes them on in their order (pooling, dropout, batch normalisation).
    Kept,
    /// Makes them from an image: channels-first in PyTorch, `(H, W, C)` in convkit.
    Flattens,
    /// Mixes them into new features, whose order no flatten decides (Dense).
    Mixes,
}

/// A layer type without settings (Flatten, global pooling) read from a spec: any field but
/// `type`, `name` and `trainable` is an error, as for the layers with settings
/// (`deny_unknown_fields`), so that Keras' `data_format` or `keepdims` is never ignored.
pub(super) fn no_fields<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<(), D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoFields {}
    NoFields::deserialize(deserializer).map(|_| ())
}

/// The parameter count of `weights`, or `None` when it overflows `usize`.
pub(crate) fn checked_params(weights: &[(Role, Vec<usize>)]) -> Option<usize> {
    weights.iter().try_fold(0usize, |total, (_, shape)| {
        total.checked_add(shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?)
    })
}

/// The activation a layer applies: none for the head's softmax/sigmoid, which the loss and
/// `predict` apply from the logits.
pub(super) fn unless_head(activation: Activation, head: bool) -> Activation {
    match activation {
        Activation::Softmax | Activation::Sigmoid if head => Activation::Linear,
        other => other,
    }
}

/// `(H, W, C)` of an image input, or why a flat one does not do.
pub(super) fn image(
    what: &str,
    input: Shape,
) -> std::result::Result<(usize, usize, usize), String> {
    match input {
        Shape::Image { h, w, c } => Ok((h, w, c)),
        Shape::Flat(n) => Err(format!(
            "{what} expects an image input (H×W×C), found a flat vector of {n}"
        )),
    }
}

/// The output length of a window of `k` at stride `s` over `n` values, valid padding.
pub(super) fn window(
    what: &str,
    n: usize,
    k: usize,
    s: usize,
    axis: &str,
) -> std::result::Result<usize, String> {
    if k == 0 || s == 0 {
        return Err(format!("{what} window and strides must be positive"));
    }
    if k > n {
        return Err(format!("{what} window of {k} does not fit an input {axis} of {n} (use a smaller window, `same` padding, or fewer pooling layers)"));
    }
    Ok((n - k) / s + 1)
}

/// The size of the last axis: an image's channels, a flat vector's length.
pub(super) fn channels(shape: Shape) -> usize {
    match shape {
        Shape::Image { c, .. } => c,
        Shape::Flat(n) => n,
    }
}
