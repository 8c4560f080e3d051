//! Model specification: a Keras-style `Sequential` stack of layers, with shape inference,
//! parameter counts, `summary()`, JSON round trip and the tutorial presets.
//!
//! Shapes follow Keras' channels-last view: images are `H×W×C`; `Flatten` flattens in
//! `(H, W, C)` order on every engine, so a Dense kernel's input index is `(h·W + w)·C + c`.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Element-wise activation applied after a Conv2D or Dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Linear,
    Relu,
    Sigmoid,
    Softmax,
    Tanh,
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).map_err(|_| {
            Error::config(
                "activation",
                format!("expected relu, sigmoid, softmax, tanh or linear, found `{s}`"),
            )
        })
    }
}

/// Convolution padding, as in Keras: `valid` (none) or `same` (output = ceil(input / stride)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    #[default]
    Valid,
    Same,
}

/// 2-D convolution (`Conv2D`). Kernel stored canonically as `[filters, in_channels, kh, kw]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv2D {
    pub filters: usize,
    pub kernel_size: [usize; 2],
    #[serde(default = "one_by_one")]
    pub strides: [usize; 2],
    #[serde(default)]
    pub padding: Padding,
    #[serde(default)]
    pub activation: Activation,
    /// Keras' `kernel_regularizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_regularizer: Option<Regularizer>,
}

fn one_by_one() -> [usize; 2] {
    [1, 1]
}

impl Conv2D {
    /// `filters` output channels with a square `kernel`×`kernel` window, stride 1, valid padding.
    pub fn new(filters: usize, kernel: usize) -> Self {
        Conv2D {
            filters,
            kernel_size: [kernel, kernel],
            strides: [1, 1],
            padding: Padding::Valid,
            activation: Activation::Linear,
            kernel_regularizer: None,
        }
    }
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
    /// Penalise the kernel: `Conv2D::new(32, 3).kernel_regularizer(Regularizer::l2(0.01))`.
    pub fn kernel_regularizer(mut self, regularizer: Regularizer) -> Self {
        self.kernel_regularizer = Some(regularizer);
        self
    }
    pub fn strides(mut self, sh: usize, sw: usize) -> Self {
        self.strides = [sh, sw];
        self
    }
    pub fn padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }

    /// Zero padding `[top, bottom, left, right]` for an input of `h`×`w`, as Keras/TensorFlow
    /// pad for `same` (the odd extra row/column goes at the bottom/right).
    pub fn pad_amounts(&self, h: usize, w: usize) -> [usize; 4] {
        match self.padding {
            Padding::Valid => [0; 4],
            Padding::Same => {
                let total = |n: usize, k: usize, s: usize| {
                    let out = n.div_ceil(s);
                    ((out - 1) * s + k).saturating_sub(n)
                };
                let th = total(h, self.kernel_size[0], self.strides[0]);
                let tw = total(w, self.kernel_size[1], self.strides[1]);
                [th / 2, th - th / 2, tw / 2, tw - tw / 2]
            }
        }
    }
}

/// 2-D pooling window (`MaxPooling2D` / `AveragePooling2D`), valid padding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pool2D {
    pub pool_size: [usize; 2],
    /// Defaults to `pool_size`, as in Keras.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strides: Option<[usize; 2]>,
}

impl Pool2D {
    pub fn new(size: usize) -> Self {
        Pool2D {
            pool_size: [size, size],
            strides: None,
        }
    }
    pub fn strides(&self) -> [usize; 2] {
        self.strides.unwrap_or(self.pool_size)
    }
}

/// Fully connected layer (`Dense`). Kernel stored canonically as `[units, in_features]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dense {
    pub units: usize,
    #[serde(default)]
    pub activation: Activation,
    /// Keras' `kernel_regularizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_regularizer: Option<Regularizer>,
}

impl Dense {
    pub fn new(units: usize) -> Self {
        Dense {
            units,
            activation: Activation::Linear,
            kernel_regularizer: None,
        }
    }
    pub fn activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
    /// Penalise the kernel: `Dense::new(64).kernel_regularizer(Regularizer::l1(1e-4))`.
    pub fn kernel_regularizer(mut self, regularizer: Regularizer) -> Self {
        self.kernel_regularizer = Some(regularizer);
        self
    }
}

/// Keras' kernel regularisers: `l1·Σ|w| + l2·Σw²` over a layer's kernel (not its bias) is
/// added to the loss, so the gradient gains `l1·sign(w) + 2·l2·w`. Keras' defaults are 0.01.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
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

/// Randomly zeroes a fraction `rate` of its inputs during training (inverted dropout);
/// the identity at inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    pub rate: f32,
}

impl Dropout {
    pub fn new(rate: f32) -> Self {
        Dropout { rate }
    }
}

/// Keras' `BatchNormalization` over the last axis (channels of an image, features of a flat
/// vector): `γ·(x − μ)/√(σ² + ε) + β`. In training, μ and σ² are the batch's (σ² biased) and
/// the moving statistics become `moving·momentum + batch·(1 − momentum)`; at inference, and
/// whenever the layer is frozen (Keras' rule), the moving statistics are used. Its weights are
/// `gamma` and `beta` (trained) and `moving_mean` and `moving_variance` (never trained), each
/// `[channels]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchNormalization {
    #[serde(default = "default_bn_momentum")]
    pub momentum: f32,
    #[serde(default = "default_bn_epsilon")]
    pub epsilon: f32,
}

fn default_bn_momentum() -> f32 {
    0.99
}
fn default_bn_epsilon() -> f32 {
    1e-3
}

impl Default for BatchNormalization {
    fn default() -> Self {
        BatchNormalization::new()
    }
}

impl BatchNormalization {
    /// Keras' defaults: momentum 0.99, epsilon 0.001.
    pub fn new() -> Self {
        BatchNormalization {
            momentum: default_bn_momentum(),
            epsilon: default_bn_epsilon(),
        }
    }
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }
    pub fn epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }
}

/// What a layer does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LayerKind {
    Conv2D(Conv2D),
    MaxPooling2D(Pool2D),
    AveragePooling2D(Pool2D),
    /// The maximum of each channel over the whole image: `H×W×C` → `C`.
    GlobalMaxPooling2D,
    /// The mean of each channel over the whole image: `H×W×C` → `C`.
    GlobalAveragePooling2D,
    Flatten,
    Dense(Dense),
    Dropout(Dropout),
    BatchNormalization(BatchNormalization),
}

impl LayerKind {
    /// Keras' class name.
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerKind::Conv2D(_) => "Conv2D",
            LayerKind::MaxPooling2D(_) => "MaxPooling2D",
            LayerKind::AveragePooling2D(_) => "AveragePooling2D",
            LayerKind::GlobalMaxPooling2D => "GlobalMaxPooling2D",
            LayerKind::GlobalAveragePooling2D => "GlobalAveragePooling2D",
            LayerKind::Flatten => "Flatten",
            LayerKind::Dense(_) => "Dense",
            LayerKind::Dropout(_) => "Dropout",
            LayerKind::BatchNormalization(_) => "BatchNormalization",
        }
    }

    /// Keras' automatic name stem (`conv2d`, `max_pooling2d`, ...).
    fn name_stem(&self) -> &'static str {
        match self {
            LayerKind::Conv2D(_) => "conv2d",
            LayerKind::MaxPooling2D(_) => "max_pooling2d",
            LayerKind::AveragePooling2D(_) => "average_pooling2d",
            LayerKind::GlobalMaxPooling2D => "global_max_pooling2d",
            LayerKind::GlobalAveragePooling2D => "global_average_pooling2d",
            LayerKind::Flatten => "flatten",
            LayerKind::Dense(_) => "dense",
            LayerKind::Dropout(_) => "dropout",
            LayerKind::BatchNormalization(_) => "batch_normalization",
        }
    }
}

impl LayerKind {
    /// The kernel regulariser of a layer with a kernel (Conv2D, Dense).
    pub fn kernel_regularizer(&self) -> Option<Regularizer> {
        match self {
            LayerKind::Conv2D(conv) => conv.kernel_regularizer,
            LayerKind::Dense(dense) => dense.kernel_regularizer,
            LayerKind::MaxPooling2D(_)
            | LayerKind::AveragePooling2D(_)
            | LayerKind::GlobalMaxPooling2D
            | LayerKind::GlobalAveragePooling2D
            | LayerKind::Flatten
            | LayerKind::Dropout(_)
            | LayerKind::BatchNormalization(_) => None,
        }
    }

    fn kernel_regularizer_mut(&mut self) -> Option<&mut Option<Regularizer>> {
        match self {
            LayerKind::Conv2D(conv) => Some(&mut conv.kernel_regularizer),
            LayerKind::Dense(dense) => Some(&mut dense.kernel_regularizer),
            LayerKind::MaxPooling2D(_)
            | LayerKind::AveragePooling2D(_)
            | LayerKind::GlobalMaxPooling2D
            | LayerKind::GlobalAveragePooling2D
            | LayerKind::Flatten
            | LayerKind::Dropout(_)
            | LayerKind::BatchNormalization(_) => None,
        }
    }
}

impl From<Conv2D> for LayerKind {
    fn from(l: Conv2D) -> Self {
        LayerKind::Conv2D(l)
    }
}
impl From<Dense> for LayerKind {
    fn from(l: Dense) -> Self {
        LayerKind::Dense(l)
    }
}
impl From<Dropout> for LayerKind {
    fn from(l: Dropout) -> Self {
        LayerKind::Dropout(l)
    }
}
impl From<BatchNormalization> for LayerKind {
    fn from(l: BatchNormalization) -> Self {
        LayerKind::BatchNormalization(l)
    }
}

/// One layer of a [`Sequential`]: what it does, an optional explicit name, and whether its
/// weights are trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub kind: LayerKind,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub trainable: bool,
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

impl<K: Into<LayerKind>> From<K> for Layer {
    fn from(kind: K) -> Self {
        Layer {
            name: None,
            kind: kind.into(),
            trainable: true,
        }
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

/// A linear stack of layers on an `H×W×C` input, as Keras' `Sequential`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequential {
    #[serde(default = "default_name")]
    pub name: String,
    /// `[height, width, channels]`.
    pub input_shape: [usize; 3],
    pub layers: Vec<Layer>,
}

fn default_name() -> String {
    "sequential".into()
}

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
    /// An empty stack on an `h`×`w`×`c` input.
    pub fn new(h: usize, w: usize, c: usize) -> Self {
        Sequential {
            name: default_name(),
            input_shape: [h, w, c],
            layers: Vec::new(),
        }
    }

    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Append a layer (`Conv2D`, `Dense`, `Dropout`, or a [`LayerKind`] such as
    /// `LayerKind::Flatten`).
    pub fn add(mut self, layer: impl Into<Layer>) -> Self {
        self.layers.push(layer.into());
        self
    }

    /// Append a `MaxPooling2D` with a square window `size` (stride = size).
    pub fn max_pool(self, size: usize) -> Self {
        self.add(LayerKind::MaxPooling2D(Pool2D::new(size)))
    }

    /// Append a `Flatten`.
    pub fn flatten(self) -> Self {
        self.add(LayerKind::Flatten)
    }

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

    /// The input shape as a [`Shape`].
    pub fn input(&self) -> Shape {
        let [h, w, c] = self.input_shape;
        Shape::Image { h, w, c }
    }

    /// Each layer's name: its explicit name, or Keras' automatic one (`conv2d`, `conv2d_1`, ...).
    pub fn layer_names(&self) -> Vec<String> {
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        self.layers
            .iter()
            .map(|layer| {
                let stem = layer.kind.name_stem();
                let n = counts.entry(stem).or_default();
                let auto = if *n == 0 {
                    stem.to_string()
                } else {
                    format!("{stem}_{n}")
                };
                *n += 1;
                layer.name.clone().unwrap_or(auto)
            })
            .collect()
    }

    pub(crate) fn layer_error(&self, index: usize, message: impl Into<String>) -> Error {
        Error::Layer {
            index,
            name: self.layer_names()[index].clone(),
            message: message.into(),
        }
    }

    /// The output shape of every layer, checking that each layer fits its input.
    pub fn output_shapes(&self) -> Result<Vec<Shape>> {
        let [h, w, c] = self.input_shape;
        if h == 0 || w == 0 || c == 0 {
            return Err(Error::config(
                "model",
                format!("input shape must be positive, found {h}×{w}×{c}"),
            ));
        }
        if self.layers.is_empty() {
            return Err(Error::config("model", "the model has no layers"));
        }
        let mut shape = self.input();
        if shape.checked_numel().is_none() {
            return Err(Error::config(
                "model",
                format!("input shape {h}×{w}×{c} has more values than this machine can count"),
            ));
        }
        let mut shapes = Vec::with_capacity(self.layers.len());
        let mut names = std::collections::HashSet::new();
        for (i, (layer, name)) in self.layers.iter().zip(self.layer_names()).enumerate() {
            if !names.insert(name.clone()) {
                return Err(self.layer_error(i, "duplicate layer name"));
            }
            let output = self.layer_output(i, &layer.kind, shape)?;
            if output.checked_numel().is_none() || layer_params(&layer.kind, shape).is_none() {
                return Err(self.layer_error(
                    i,
                    "its output or parameter count has more values than this machine can count",
                ));
            }
            shape = output;
            shapes.push(shape);
        }
        Ok(shapes)
    }

    /// Check the spec's size against `limits` (after [`Sequential::output_shapes`]): a small
    /// spec file cannot ask for tens of gigabytes of weights or activations.
    pub fn check_size(&self, limits: &SizeLimits) -> Result<()> {
        let shapes = self.output_shapes()?;
        let input = self.input().numel() as u64;
        if input > limits.max_input_values {
            let [h, w, c] = self.input_shape;
            return Err(Error::config(
                "model",
                format!(
                    "input {h}×{w}×{c} has {input} values per image, more than the limit of {}{}",
                    limits.max_input_values,
                    SizeLimits::OVERRIDE
                ),
            ));
        }
        if let Some((i, shape)) = shapes
            .iter()
            .enumerate()
            .find(|(_, s)| s.numel() as u64 > limits.max_activations)
        {
            return Err(self.layer_error(
                i,
                format!(
                    "its output {shape} has {} values per image, more than the limit of {}{}",
                    shape.numel(),
                    limits.max_activations,
                    SizeLimits::OVERRIDE
                ),
            ));
        }
        let params: u64 = self.param_counts()?.iter().map(|&n| n as u64).sum();
        if params > limits.max_parameters {
            return Err(Error::config(
                "model",
                format!(
                    "{} parameters, more than the limit of {}{}",
                    thousands(params as usize),
                    thousands(limits.max_parameters as usize),
                    SizeLimits::OVERRIDE
                ),
            ));
        }
        Ok(())
    }

    fn layer_output(&self, i: usize, kind: &LayerKind, input: Shape) -> Result<Shape> {
        let image = |what: &str| match input {
            Shape::Image { h, w, c } => Ok((h, w, c)),
            Shape::Flat(n) => Err(self.layer_error(
                i,
                format!("{what} expects an image input (H×W×C), found a flat vector of {n}"),
            )),
        };
        let window = |what: &str, n: usize, k: usize, s: usize, axis: &str| {
            if k == 0 || s == 0 {
                return Err(
                    self.layer_error(i, format!("{what} window and strides must be positive"))
                );
            }
            if k > n {
                return Err(self.layer_error(
                    i,
                    format!("{what} window of {k} does not fit an input {axis} of {n} (use a smaller window, `same` padding, or fewer pooling layers)"),
                ));
            }
            Ok((n - k) / s + 1)
        };
        let regularizer = kind.kernel_regularizer();
        if let Some(r) = regularizer {
            if !(r.l1.is_finite() && r.l2.is_finite() && r.l1 >= 0.0 && r.l2 >= 0.0) {
                return Err(self.layer_error(
                    i,
                    format!(
                        "kernel regularizer factors must be finite and non-negative, found l1 = {}, l2 = {}",
                        r.l1, r.l2
                    ),
                ));
            }
        }
        Ok(match kind {
            LayerKind::Conv2D(conv) => {
                let (h, w, _) = image("Conv2D")?;
                if conv.filters == 0 {
                    return Err(self.layer_error(i, "Conv2D needs at least one filter"));
                }
                let [kh, kw] = conv.kernel_size;
                let [sh, sw] = conv.strides;
                let (oh, ow) = match conv.padding {
                    Padding::Valid => (
                        window("Conv2D", h, kh, sh, "height")?,
                        window("Conv2D", w, kw, sw, "width")?,
                    ),
                    Padding::Same => {
                        if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
                            return Err(
                                self.layer_error(i, "Conv2D window and strides must be positive")
                            );
                        }
                        (h.div_ceil(sh), w.div_ceil(sw))
                    }
                };
                Shape::Image {
                    h: oh,
                    w: ow,
                    c: conv.filters,
                }
            }
            LayerKind::MaxPooling2D(pool) | LayerKind::AveragePooling2D(pool) => {
                let what = kind.type_name();
                let (h, w, c) = image(what)?;
                let [kh, kw] = pool.pool_size;
                let [sh, sw] = pool.strides();
                Shape::Image {
                    h: window(what, h, kh, sh, "height")?,
                    w: window(what, w, kw, sw, "width")?,
                    c,
                }
            }
            LayerKind::GlobalMaxPooling2D | LayerKind::GlobalAveragePooling2D => {
                let (_, _, c) = image(kind.type_name())?;
                Shape::Flat(c)
            }
            LayerKind::Flatten => Shape::Flat(input.numel()),
            LayerKind::Dense(dense) => {
                if let Shape::Image { h, w, c } = input {
                    return Err(self.layer_error(
                        i,
                        format!("Dense expects a flat input, found {h}×{w}×{c}; add a Flatten layer before it"),
                    ));
                }
                if dense.units == 0 {
                    return Err(self.layer_error(i, "Dense needs at least one unit"));
                }
                Shape::Flat(dense.units)
            }
            LayerKind::Dropout(d) => {
                if !(0.0..1.0).contains(&d.rate) {
                    return Err(self.layer_error(
                        i,
                        format!("Dropout rate must be in [0, 1), found {}", d.rate),
                    ));
                }
                input
            }
            LayerKind::BatchNormalization(bn) => {
                if !(0.0..=1.0).contains(&bn.momentum) {
                    return Err(self.layer_error(
                        i,
                        format!(
                            "BatchNormalization momentum must be in [0, 1], found {}",
                            bn.momentum
                        ),
                    ));
                }
                if !(bn.epsilon.is_finite() && bn.epsilon > 0.0) {
                    return Err(self.layer_error(
                        i,
                        format!(
                            "BatchNormalization epsilon must be positive and finite, found {}",
                            bn.epsilon
                        ),
                    ));
                }
                input
            }
        })
    }

    /// Every Conv2D and Dense kernel penalised by `regularizer` (the CLI's
    /// `--kernel-regularizer`), replacing any regulariser already set.
    pub fn with_kernel_regularizer(mut self, regularizer: Regularizer) -> Self {
        for layer in &mut self.layers {
            if let Some(slot) = layer.kind.kernel_regularizer_mut() {
                *slot = Some(regularizer);
            }
        }
        self
    }

    /// The kernel regulariser of layer `layer`, if it has one.
    pub fn kernel_regularizer(&self, layer: usize) -> Option<Regularizer> {
        self.layers.get(layer)?.kind.kernel_regularizer()
    }

    /// What Keras adds to the loss for these weights: the sum of every kernel's penalty.
    pub fn kernel_penalty(&self, weights: &crate::weights::Weights) -> Result<f64> {
        let mut total = 0.0;
        for w in self.plan()?.weights {
            if let (true, Some(r)) = (w.role.is_regularised(), self.kernel_regularizer(w.layer)) {
                total += r.penalty(&weights.get(&w.name)?.data);
            }
        }
        Ok(total)
    }

    /// The shape of the model's output.
    pub fn output_shape(&self) -> Result<Shape> {
        Ok(*self.output_shapes()?.last().expect("checked non-empty"))
    }

    /// How many classes the model tells apart: one per output unit, and two for a single
    /// (sigmoid) unit.
    pub fn class_count(&self) -> Result<usize> {
        Ok(self.output_shape()?.numel().max(2))
    }

    /// `(name, shape)` of every weight tensor in canonical layout, in layer order:
    /// conv `weight` `[out, in, kh, kw]`, dense `weight` `[out, in]`, `bias` `[out]`;
    /// batch normalisation `gamma`, `beta`, `moving_mean`, `moving_variance`, each `[channels]`
    /// (see [`crate::plan::WeightSpec`] for their roles).
    pub fn weight_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(self
            .plan()?
            .weights
            .into_iter()
            .map(|w| (w.name, w.shape))
            .collect())
    }

    /// Number of parameters of each layer.
    pub fn param_counts(&self) -> Result<Vec<usize>> {
        let shapes = self.output_shapes()?;
        let mut input = self.input();
        Ok(self
            .layers
            .iter()
            .zip(&shapes)
            .map(|(layer, shape)| {
                let n = layer_params(&layer.kind, input).expect("checked by output_shapes");
                input = *shape;
                n
            })
            .collect())
    }

    /// Number of each layer's parameters that are not trained: all of a frozen layer's, and
    /// a batch normalisation's moving statistics (half its parameters), as Keras counts them.
    pub fn non_trainable_counts(&self) -> Result<Vec<usize>> {
        let mut counts = vec![0; self.layers.len()];
        for w in self.plan()?.weights {
            if !self.layers[w.layer].trainable || !w.role.is_optimized() {
                counts[w.layer] += w.numel();
            }
        }
        Ok(counts)
    }

    /// The same model with a `BatchNormalization` (Keras' defaults) after every Conv2D and
    /// every Dense but the last, where there is none yet (the CLI's `--batch-norm`).
    pub fn with_batch_normalization(&self) -> Self {
        let mut spec = self.clone();
        spec.layers.clear();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            spec.layers.push(layer.clone());
            let normalised = matches!(
                self.layers.get(i + 1).map(|l| &l.kind),
                Some(LayerKind::BatchNormalization(_))
            );
            let wants = match layer.kind {
                LayerKind::Conv2D(_) => true,
                LayerKind::Dense(_) => i != last,
                LayerKind::MaxPooling2D(_)
                | LayerKind::AveragePooling2D(_)
                | LayerKind::GlobalMaxPooling2D
                | LayerKind::GlobalAveragePooling2D
                | LayerKind::Flatten
                | LayerKind::Dropout(_)
                | LayerKind::BatchNormalization(_) => false,
            };
            if wants && !normalised {
                spec.layers.push(BatchNormalization::new().into());
            }
        }
        spec
    }

    /// Index of the layer with this name, or an error listing the names.
    pub fn layer_index(&self, name: &str) -> Result<usize> {
        let names = self.layer_names();
        names.iter().position(|n| n == name).ok_or_else(|| {
            Error::config(
                "layer name",
                format!("no layer named `{name}`; layers are {}", names.join(", ")),
            )
        })
    }

    /// A Keras-style summary: layers, output shapes, parameter counts, trainable and
    /// non-trainable totals.
    pub fn summary(&self) -> Result<String> {
        let shapes = self.output_shapes()?;
        let params = self.param_counts()?;
        let names = self.layer_names();
        let fixed = self.non_trainable_counts()?;
        let rows: Vec<[String; 3]> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                [
                    format!("{} ({})", names[i], layer.kind.type_name()),
                    shapes[i].to_string(),
                    thousands(params[i]),
                ]
            })
            .collect();
        // Columns as wide as Keras' (34, 26) or their longest entry plus two spaces.
        let header = ["Layer (type)", "Output Shape", "Param #"];
        let width = |col: usize, least: usize| {
            rows.iter()
                .map(|r| r[col].chars().count() + 2)
                .chain([least])
                .max()
                .unwrap_or(least)
        };
        let (w0, w1) = (width(0, 34), width(1, 26));
        let total = (1 + w0 + w1 + width(2, 10)).max(71);
        let line = |cells: [&str; 3]| format!(" {:<w0$}{:<w1$}{}", cells[0], cells[1], cells[2]);
        let mut s = String::new();
        let rule = "_".repeat(total);
        let _ = writeln!(s, "Model: \"{}\"", self.name);
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(s, "{}", line(header));
        let _ = writeln!(s, "{}", "=".repeat(total));
        let (mut trainable, mut frozen) = (0, 0);
        for (i, row) in rows.iter().enumerate() {
            let _ = writeln!(s, "{}", line([&row[0], &row[1], &row[2]]));
            trainable += params[i] - fixed[i];
            frozen += fixed[i];
        }
        let _ = writeln!(s, "{}", "=".repeat(total));
        let _ = writeln!(s, "Total params: {}", thousands(trainable + frozen));
        let _ = writeln!(s, "Trainable params: {}", thousands(trainable));
        let _ = writeln!(s, "Non-trainable params: {}", thousands(frozen));
        let _ = write!(s, "{rule}");
        Ok(s)
    }

    /// Multiply-accumulate operations of one forward pass of one image, ×2 (FLOPs).
    pub fn forward_flops(&self) -> Result<u64> {
        let shapes = self.output_shapes()?;
        let mut input = self.input();
        let mut flops = 0u64;
        for (layer, shape) in self.layers.iter().zip(&shapes) {
            flops += match &layer.kind {
                LayerKind::Conv2D(conv) => {
                    let Shape::Image { c, .. } = input else {
                        unreachable!()
                    };
                    2 * (shape.numel() * conv.kernel_size[0] * conv.kernel_size[1] * c) as u64
                }
                LayerKind::Dense(dense) => 2 * (input.numel() * dense.units) as u64,
                // one multiply-add per value at inference
                LayerKind::BatchNormalization(_) => 2 * shape.numel() as u64,
                // comparisons and additions, no multiply-accumulates
                LayerKind::MaxPooling2D(_)
                | LayerKind::AveragePooling2D(_)
                | LayerKind::GlobalMaxPooling2D
                | LayerKind::GlobalAveragePooling2D
                | LayerKind::Flatten
                | LayerKind::Dropout(_) => 0,
            };
            input = *shape;
        }
        Ok(flops)
    }
}

/// A layer's parameter count on `input`, or `None` when it overflows `usize`.
fn layer_params(kind: &LayerKind, input: Shape) -> Option<usize> {
    match kind {
        LayerKind::Conv2D(conv) => {
            let c = channels(input);
            conv.kernel_size[0]
                .checked_mul(conv.kernel_size[1])?
                .checked_mul(c)?
                .checked_mul(conv.filters)?
                .checked_add(conv.filters)
        }
        LayerKind::Dense(dense) => input
            .checked_numel()?
            .checked_mul(dense.units)?
            .checked_add(dense.units),
        LayerKind::BatchNormalization(_) => crate::plan::BATCH_NORM_ROLES
            .len()
            .checked_mul(channels(input)),
        LayerKind::MaxPooling2D(_)
        | LayerKind::AveragePooling2D(_)
        | LayerKind::GlobalMaxPooling2D
        | LayerKind::GlobalAveragePooling2D
        | LayerKind::Flatten
        | LayerKind::Dropout(_) => Some(0),
    }
}

/// Caps on the size of a model read from a file (spec JSON, checkpoint): a file of a few bytes
/// cannot make convkit allocate gigabytes. `SizeLimits::default()` suits every tutorial model
/// many times over; [`SizeLimits::NONE`] (the CLI's `--allow-large-model`) lifts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// Weights and moving statistics, in values (f32: 4 bytes each).
    pub max_parameters: u64,
    /// Values per input image (height × width × channels).
    pub max_input_values: u64,
    /// Values per image in any layer's output.
    pub max_activations: u64,
}

impl Default for SizeLimits {
    /// 100 million parameters (400 MB), a 4096×4096×4 input, 64 million values per layer output.
    fn default() -> Self {
        SizeLimits {
            max_parameters: 100_000_000,
            max_input_values: 4096 * 4096 * 4,
            max_activations: 64 << 20,
        }
    }
}

impl SizeLimits {
    /// No caps.
    pub const NONE: SizeLimits = SizeLimits {
        max_parameters: u64::MAX,
        max_input_values: u64::MAX,
        max_activations: u64::MAX,
    };
    const OVERRIDE: &'static str =
        " (pass --allow-large-model, or SizeLimits::NONE, if you mean it)";
}

/// The size of the last axis: an image's channels, a flat vector's length.
fn channels(shape: Shape) -> usize {
    match shape {
        Shape::Image { c, .. } => c,
        Shape::Flat(n) => n,
    }
}

/// `1234567` → `"1,234,567"`.
pub(crate) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_preset_shapes_and_params_match_keras() {
        let spec = Sequential::preset("tutorial-mnist").unwrap();
        let shapes = spec.output_shapes().unwrap();
        assert_eq!(
            shapes[0],
            Shape::Image {
                h: 26,
                w: 26,
                c: 32
            }
        );
        assert_eq!(shapes[3], Shape::Image { h: 5, w: 5, c: 64 });
        assert_eq!(shapes[4], Shape::Flat(1600));
        // Keras reports 225,034 parameters for this model.
        assert_eq!(spec.param_counts().unwrap().iter().sum::<usize>(), 225_034);
        let summary = spec.summary().unwrap();
        assert!(summary.contains("conv2d_1 (Conv2D)"), "{summary}");
        assert!(summary.contains("Total params: 225,034"), "{summary}");
        assert!(summary.contains("(None, 13, 13, 32)"), "{summary}");
    }

    #[test]
    fn sizes_are_checked_without_overflow_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, json: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, json).unwrap();
            path
        };
        // A 200-byte spec asking for a 10-billion-parameter Dense layer.
        let huge = write(
            "huge.json",
            r#"{"name":"huge","input_shape":[100,100,1],"layers":[{"type":"Flatten"},{"type":"Dense","units":1000000}]}"#,
        );
        let err = Sequential::load_json(&huge).unwrap_err().to_string();
        assert!(
            err.contains("10,001,000,000 parameters, more than the limit of 100,000,000")
                && err.contains("--allow-large-model")
                && err.contains("huge.json"),
            "{err}"
        );
        let spec = Sequential::load_json_within(&huge, &SizeLimits::NONE).unwrap();
        assert_eq!(spec.param_counts().unwrap()[1], 10_001_000_000);
        // Sizes that overflow usize are errors, not wrapped numbers or panics.
        let wraps = write(
            "wraps.json",
            r#"{"input_shape":[4294967296,4294967296,16],"layers":[{"type":"Flatten"}]}"#,
        );
        let err = Sequential::load_json_within(&wraps, &SizeLimits::NONE)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more values than this machine can count"),
            "{err}"
        );
        let wide = write(
            "wide.json",
            r#"{"input_shape":[2,2,1],"layers":[{"type":"Flatten"},{"type":"Dense","units":18446744073709551615}]}"#,
        );
        let err = Sequential::load_json_within(&wide, &SizeLimits::NONE)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 1 (dense)") && err.contains("can count"),
            "{err}"
        );
        let big_input = write(
            "input.json",
            r#"{"input_shape":[100000,100000,3],"layers":[{"type":"MaxPooling2D","pool_size":[1000,1000]}]}"#,
        );
        let err = Sequential::load_json(&big_input).unwrap_err().to_string();
        assert!(err.contains("30000000000 values per image"), "{err}");
    }

    #[test]
    fn summary_columns_fit_long_names() {
        let spec = Sequential::new(30, 30, 3)
            .add(LayerKind::AveragePooling2D(Pool2D::new(2)))
            .add(LayerKind::BatchNormalization(BatchNormalization::new()))
            .flatten()
            .add(Layer {
                name: Some("a_rather_long_classifier_layer_name".into()),
                kind: Dense::new(1000).into(),
                trainable: true,
            });
        let summary = spec.summary().unwrap();
        // Every row: name, shape and count separated by at least two spaces, and the shape
        // column starts at the same place on every row.
        let rows: Vec<&str> = summary.lines().filter(|l| l.contains("(None")).collect();
        let starts: Vec<usize> = rows.iter().map(|r| r.find("(None").unwrap()).collect();
        assert!(starts.iter().all(|s| *s == starts[0]), "{summary}");
        assert!(
            rows.iter().all(|r| r[..starts[0]].ends_with("  ")),
            "{summary}"
        );
        assert!(
            summary.contains("a_rather_long_classifier_layer_name (Dense)  (None, 1000)"),
            "{summary}"
        );
        assert!(summary.contains("Total params: 676,012"), "{summary}");
    }

    #[test]
    fn every_preset_is_valid() {
        for name in PRESETS {
            let spec = Sequential::preset(name).unwrap();
            spec.output_shapes().unwrap();
        }
        // Keras: 93,322 for the 3-conv MNIST model; 122,570 for the CIFAR-10 CNN.
        let count = |n| {
            Sequential::preset(n)
                .unwrap()
                .param_counts()
                .unwrap()
                .iter()
                .sum::<usize>()
        };
        assert_eq!(count("tutorial-mnist-3conv"), 93_322);
        assert_eq!(count("tutorial-cifar10-cnn"), 167_562);
    }

    #[test]
    fn pool_on_too_small_map_names_the_layer() {
        let spec = Sequential::new(4, 4, 1)
            .add(Conv2D::new(2, 3))
            .max_pool(2)
            .max_pool(2);
        let err = spec.output_shapes().unwrap_err().to_string();
        assert!(err.contains("layer 2 (max_pooling2d_1)"), "{err}");
        assert!(
            err.contains("window of 2 does not fit an input height of 1"),
            "{err}"
        );
        let spec = Sequential::new(4, 4, 1).max_pool(2).max_pool(2).max_pool(2);
        let err = spec.output_shapes().unwrap_err().to_string();
        assert!(err.contains("layer 2 (max_pooling2d_2)"), "{err}");
        assert!(err.contains("does not fit an input height of 1"), "{err}");
    }

    #[test]
    fn dense_before_flatten_is_rejected() {
        let spec = Sequential::new(8, 8, 1)
            .add(Conv2D::new(2, 3))
            .add(Dense::new(3));
        let err = spec.output_shapes().unwrap_err().to_string();
        assert!(err.contains("layer 1 (dense)"), "{err}");
        assert!(err.contains("add a Flatten"), "{err}");
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        let conv = Conv2D::new(1, 3).padding(Padding::Same).strides(2, 2);
        // 6 -> out 3, total pad = (3-1)*2+3-6 = 1: none on top, one at the bottom.
        assert_eq!(conv.pad_amounts(6, 5), [0, 1, 1, 1]);
        let spec = Sequential::new(6, 5, 1).add(conv);
        assert_eq!(
            spec.output_shape().unwrap(),
            Shape::Image { h: 3, w: 3, c: 1 }
        );
    }

    #[test]
    fn batch_normalization_counts_and_checks_like_keras() {
        let spec = Sequential::preset("tutorial-mnist")
            .unwrap()
            .with_batch_normalization();
        let names = spec.layer_names();
        assert_eq!(names[1], "batch_normalization");
        assert_eq!(names[4], "batch_normalization_1");
        assert_eq!(names[8], "batch_normalization_2");
        assert_eq!(spec.layers.len(), 10, "none after the output layer");
        // applying it twice adds nothing
        assert_eq!(spec.with_batch_normalization(), spec);
        // Keras: 4·C parameters each, half of them (the moving statistics) non-trainable.
        let counts = spec.param_counts().unwrap();
        assert_eq!((counts[1], counts[4], counts[8]), (128, 256, 512));
        let summary = spec.summary().unwrap();
        assert!(summary.contains("Total params: 225,930"), "{summary}");
        assert!(summary.contains("Trainable params: 225,482"), "{summary}");
        assert!(summary.contains("Non-trainable params: 448"), "{summary}");
        let shapes = spec.weight_shapes().unwrap();
        assert!(shapes.contains(&("batch_normalization_2.moving_variance".into(), vec![128])));
        let mut frozen = spec.clone();
        frozen.layers[1].trainable = false;
        assert!(frozen
            .summary()
            .unwrap()
            .contains("Non-trainable params: 512"));
        // JSON: Keras' defaults when left out
        let bn: Layer =
            serde_json::from_str(r#"{"type": "BatchNormalization", "momentum": 0.9}"#).unwrap();
        assert_eq!(
            bn.kind,
            LayerKind::BatchNormalization(BatchNormalization::new().momentum(0.9))
        );
        let back: Sequential = serde_json::from_str(&spec.to_json()).unwrap();
        assert_eq!(back, spec);
        let bad = Sequential::new(4, 4, 1)
            .add(BatchNormalization::new().epsilon(0.0))
            .flatten()
            .add(Dense::new(2));
        let err = bad.output_shapes().unwrap_err().to_string();
        assert!(err.contains("layer 0 (batch_normalization)"), "{err}");
        assert!(err.contains("epsilon must be positive"), "{err}");
        let bad = Sequential::new(4, 4, 1).add(BatchNormalization::new().momentum(1.5));
        let err = bad.output_shapes().unwrap_err().to_string();
        assert!(
            err.contains("momentum must be in [0, 1], found 1.5"),
            "{err}"
        );
    }

    #[test]
    fn global_pooling_follows_keras() {
        let spec = Sequential::new(8, 8, 3)
            .add(Conv2D::new(16, 3).activation(Activation::Relu))
            .add(LayerKind::GlobalAveragePooling2D)
            .add(Dense::new(10).activation(Activation::Softmax));
        // Keras: (None, 16) after the pooling, no parameters of its own.
        assert_eq!(spec.output_shapes().unwrap()[1], Shape::Flat(16));
        assert_eq!(spec.param_counts().unwrap(), vec![448, 0, 170]);
        let summary = spec.summary().unwrap();
        assert!(
            summary.contains("global_average_pooling2d (GlobalAveragePooling2D)"),
            "{summary}"
        );
        assert!(summary.contains("(None, 16)"), "{summary}");
        let mut max = spec.clone();
        max.layers[1].kind = LayerKind::GlobalMaxPooling2D;
        assert_eq!(max.layer_names()[1], "global_max_pooling2d");
        assert!(
            (max.weight_shapes().unwrap()).contains(&("dense.weight".into(), vec![10, 16])),
            "the Dense after it sees the channels"
        );
        // JSON as Keras names it
        let layer: Layer = serde_json::from_str(r#"{"type": "GlobalMaxPooling2D"}"#).unwrap();
        assert_eq!(layer.kind, LayerKind::GlobalMaxPooling2D);
        let back: Sequential = serde_json::from_str(&max.to_json()).unwrap();
        assert_eq!(back, max);
        // it needs an image
        let flat = Sequential::new(4, 4, 1)
            .flatten()
            .add(LayerKind::GlobalMaxPooling2D);
        let e = flat.output_shapes().unwrap_err().to_string();
        assert!(
            e.contains("layer 1 (global_max_pooling2d)") && e.contains("expects an image"),
            "{e}"
        );
    }

    #[test]
    fn json_round_trip() {
        let mut spec = Sequential::preset("tutorial-mnist-3conv").unwrap();
        spec.layers[0].trainable = false;
        spec.layers[1].name = Some("pool_a".into());
        let json = spec.to_json();
        let back: Sequential = serde_json::from_str(&json).unwrap();
        assert_eq!(spec, back);
        assert!(json.contains("\"type\": \"Conv2D\""), "{json}");
        assert_eq!(back.layer_names()[1], "pool_a");
    }

    #[test]
    fn kernel_regularisers_parse_round_trip_and_are_checked() {
        assert_eq!(
            Regularizer::parse("l1=0.01, l2=0.5").unwrap(),
            Regularizer::l1_l2(0.01, 0.5)
        );
        for bad in ["l3=1", "l2", "l2=-1", "l1=x", "l2=inf"] {
            let e = Regularizer::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let spec = Sequential::preset("tutorial-mnist")
            .unwrap()
            .with_kernel_regularizer(Regularizer::l2(0.001));
        let back: Sequential = serde_json::from_str(&spec.to_json()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.kernel_regularizer(0), Some(Regularizer::l2(0.001)));
        assert_eq!(back.kernel_regularizer(1), None, "pooling has no kernel");
        let mut bad = spec.clone();
        if let LayerKind::Dense(d) = &mut bad.layers.last_mut().unwrap().kind {
            d.kernel_regularizer = Some(Regularizer::l1(-1.0));
        }
        let e = bad.output_shapes().unwrap_err().to_string();
        assert!(e.contains("non-negative") && e.contains("dense"), "{e}");
        // Σ|w|·l1 + Σw²·l2 over [1, −2]: 0.5·3 + 0.25·5.
        assert_eq!(Regularizer::l1_l2(0.5, 0.25).penalty(&[1.0, -2.0]), 2.75);
    }

    #[test]
    fn frozen_layers_counted_as_non_trainable() {
        let mut spec = Sequential::preset("tutorial-mnist").unwrap();
        spec.layers[0].trainable = false;
        let summary = spec.summary().unwrap();
        assert!(summary.contains("Non-trainable params: 320"), "{summary}");
    }
}

impl Sequential {
    /// The checked plan the executor runs: weights with their roles, one operation per layer.
    pub fn plan(&self) -> Result<crate::plan::Plan> {
        crate::plan::Plan::new(self)
    }
}

impl Sequential {
    /// The same model with its last Dense layer replaced by a fresh one of `units` outputs
    /// (softmax, or sigmoid for one unit): the classifier head of transfer learning.
    pub fn with_new_head(&self, units: usize) -> Result<Sequential> {
        let last = self
            .layers
            .len()
            .checked_sub(1)
            .ok_or_else(|| Error::config("model", "the model has no layers"))?;
        if !matches!(self.layers[last].kind, LayerKind::Dense(_)) {
            return Err(self.layer_error(
                last,
                format!(
                    "a new head replaces the last Dense layer, found {}",
                    self.layers[last].kind.type_name()
                ),
            ));
        }
        if units == 0 {
            return Err(Error::config("new head", "needs at least one unit"));
        }
        let activation = if units == 1 {
            Activation::Sigmoid
        } else {
            Activation::Softmax
        };
        let mut spec = self.clone();
        spec.layers[last] = Layer {
            name: self.layers[last].name.clone(),
            kind: Dense::new(units).activation(activation).into(),
            trainable: true,
        };
        spec.output_shapes()?;
        Ok(spec)
    }

    /// Freeze the first `n` layers (their weights are not trained; recorded in the spec).
    pub fn freeze_first(&mut self, n: usize) -> Result<()> {
        if n > self.layers.len() {
            return Err(Error::config(
                "freeze",
                format!(
                    "the model has {} layers, cannot freeze the first {n}",
                    self.layers.len()
                ),
            ));
        }
        self.layers
            .iter_mut()
            .take(n)
            .for_each(|l| l.trainable = false);
        Ok(())
    }
}
