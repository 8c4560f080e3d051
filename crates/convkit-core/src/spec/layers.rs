//! The layer types, and what each knows about itself ([`LayerRules`]): its Keras names, the
//! shape it gives, the weights it declares, its cost and its operation in the plan. Adding a
//! layer type is a struct (or a unit variant of [`LayerKind`]) and one implementation of
//! [`LayerRules`] here, its forward in `exec.rs` and its ONNX nodes in `onnx.rs`.

use serde::{Deserialize, Serialize};

pub use crate::op::Activation;
use crate::op::{PlannedOp, PoolKind, Role, BATCH_NORM_ROLES};
use crate::{Error, Result};

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

/// Keras' `RandomCrop(height, width)`: in training, a `height×width` window at a random place
/// in each image (drawn by core, so every engine crops the same windows); at inference, the
/// centre window. (Keras resizes the image before its centre crop at inference, keeping the
/// largest window of the target's aspect ratio; convkit crops without resizing.) It must be
/// the model's first layer: convkit crops on the host, before the batch reaches the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomCrop {
    pub height: usize,
    pub width: usize,
}

impl RandomCrop {
    pub fn new(height: usize, width: usize) -> Self {
        RandomCrop { height, width }
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
    RandomCrop(RandomCrop),
}

impl LayerKind {
    /// A stack of layers as text: a JSON array of layers (the spec format's `layers`), or
    /// comma-separated `Dense UNITS [ACTIVATION]`, `Dropout RATE`, `BatchNormalization`,
    /// `Flatten`, `GlobalAveragePooling2D`, `GlobalMaxPooling2D`, e.g.
    /// `Dense 256 relu, Dropout 0.5, Dense 2 softmax`.
    pub fn parse_stack(text: &str) -> Result<Vec<LayerKind>> {
        let text = text.trim();
        if text.starts_with('[') {
            return serde_json::from_str(text)
                .map_err(|e| Error::config("layers", format!("not a JSON array of layers: {e}")));
        }
        let forms = "Dense UNITS [ACTIVATION], Dropout RATE, BatchNormalization, Flatten, GlobalAveragePooling2D or GlobalMaxPooling2D";
        text.split(',')
            .map(|item| {
                let words: Vec<&str> = item.split_whitespace().collect();
                let bad = |why: &str| {
                    Error::config(
                        "layers",
                        format!("`{}`: {why}; expected {forms}", item.trim()),
                    )
                };
                let number = |word: &str| -> Result<f64> {
                    word.parse()
                        .map_err(|_| bad(&format!("`{word}` is not a number")))
                };
                let kind = words.first().map(|w| w.to_ascii_lowercase());
                match (kind.as_deref(), &words[1.min(words.len())..]) {
                    (Some("dense"), [units, rest @ ..]) if rest.len() <= 1 => {
                        let units = number(units)?;
                        if units < 1.0 || units.fract() != 0.0 {
                            return Err(bad("units must be a whole number ≥ 1"));
                        }
                        let activation = match rest.first() {
                            Some(a) => a.parse()?,
                            None => Activation::Linear,
                        };
                        Ok(LayerKind::Dense(
                            Dense::new(units as usize).activation(activation),
                        ))
                    }
                    (Some("dropout"), [rate]) => {
                        let rate = number(rate)?;
                        if !(0.0..1.0).contains(&rate) {
                            return Err(bad("the rate must be in [0, 1)"));
                        }
                        Ok(LayerKind::Dropout(Dropout::new(rate as f32)))
                    }
                    (Some("batchnormalization"), []) => {
                        Ok(LayerKind::BatchNormalization(BatchNormalization::new()))
                    }
                    (Some("flatten"), []) => Ok(LayerKind::Flatten),
                    (Some("globalaveragepooling2d"), []) => Ok(LayerKind::GlobalAveragePooling2D),
                    (Some("globalmaxpooling2d"), []) => Ok(LayerKind::GlobalMaxPooling2D),
                    (None, _) => Err(bad("an empty layer")),
                    _ => Err(bad("not a layer this form takes")),
                }
            })
            .collect()
    }

    /// What this layer type knows about itself (see [`LayerRules`]).
    pub(crate) fn rules(&self) -> Box<dyn LayerRules> {
        match self {
            LayerKind::Conv2D(conv) => Box::new(conv.clone()),
            LayerKind::MaxPooling2D(pool) => Box::new(Pooling {
                kind: PoolKind::Max,
                pool: pool.clone(),
            }),
            LayerKind::AveragePooling2D(pool) => Box::new(Pooling {
                kind: PoolKind::Average,
                pool: pool.clone(),
            }),
            LayerKind::GlobalMaxPooling2D => Box::new(GlobalPooling(PoolKind::Max)),
            LayerKind::GlobalAveragePooling2D => Box::new(GlobalPooling(PoolKind::Average)),
            LayerKind::Flatten => Box::new(Flattening),
            LayerKind::Dense(dense) => Box::new(dense.clone()),
            LayerKind::Dropout(dropout) => Box::new(dropout.clone()),
            LayerKind::BatchNormalization(bn) => Box::new(bn.clone()),
            LayerKind::RandomCrop(crop) => Box::new(*crop),
        }
    }

    /// Keras' class name.
    pub fn type_name(&self) -> &'static str {
        self.rules().type_name()
    }

    /// Keras' automatic name stem (`conv2d`, `max_pooling2d`, ...).
    pub fn name_stem(&self) -> &'static str {
        self.rules().name_stem()
    }

    /// One layer of each type, for what must cover them all (the PyTorch mapping's test).
    pub fn one_of_each() -> Vec<LayerKind> {
        let all = vec![
            LayerKind::Conv2D(Conv2D::new(1, 1)),
            LayerKind::MaxPooling2D(Pool2D::new(2)),
            LayerKind::AveragePooling2D(Pool2D::new(2)),
            LayerKind::GlobalMaxPooling2D,
            LayerKind::GlobalAveragePooling2D,
            LayerKind::Flatten,
            LayerKind::Dense(Dense::new(1)),
            LayerKind::Dropout(Dropout::new(0.5)),
            LayerKind::BatchNormalization(BatchNormalization::new()),
            LayerKind::RandomCrop(RandomCrop::new(1, 1)),
        ];
        for kind in &all {
            // A new layer type stops compiling here until it is listed above.
            match kind {
                LayerKind::Conv2D(_)
                | LayerKind::MaxPooling2D(_)
                | LayerKind::AveragePooling2D(_)
                | LayerKind::GlobalMaxPooling2D
                | LayerKind::GlobalAveragePooling2D
                | LayerKind::Flatten
                | LayerKind::Dense(_)
                | LayerKind::Dropout(_)
                | LayerKind::BatchNormalization(_)
                | LayerKind::RandomCrop(_) => {}
            }
        }
        all
    }

    /// Whether the layer turns an image into a flat vector (Flatten, global pooling): where a
    /// model's convolutional part ends and its fully connected classifier starts.
    pub fn flattens(&self) -> bool {
        match self {
            LayerKind::Flatten
            | LayerKind::GlobalAveragePooling2D
            | LayerKind::GlobalMaxPooling2D => true,
            LayerKind::Conv2D(_)
            | LayerKind::MaxPooling2D(_)
            | LayerKind::AveragePooling2D(_)
            | LayerKind::Dense(_)
            | LayerKind::Dropout(_)
            | LayerKind::BatchNormalization(_)
            | LayerKind::RandomCrop(_) => false,
        }
    }

    /// The kernel regulariser of a layer with a kernel (Conv2D, Dense).
    pub fn kernel_regularizer(&self) -> Option<Regularizer> {
        self.rules().kernel_regularizer()
    }

    pub(crate) fn kernel_regularizer_mut(&mut self) -> Option<&mut Option<Regularizer>> {
        match self {
            LayerKind::Conv2D(conv) => Some(&mut conv.kernel_regularizer),
            LayerKind::Dense(dense) => Some(&mut dense.kernel_regularizer),
            LayerKind::MaxPooling2D(_)
            | LayerKind::AveragePooling2D(_)
            | LayerKind::GlobalMaxPooling2D
            | LayerKind::GlobalAveragePooling2D
            | LayerKind::Flatten
            | LayerKind::Dropout(_)
            | LayerKind::BatchNormalization(_)
            | LayerKind::RandomCrop(_) => None,
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
impl From<RandomCrop> for LayerKind {
    fn from(l: RandomCrop) -> Self {
        LayerKind::RandomCrop(l)
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

/// One layer of a [`super::Sequential`]: what it does, an optional explicit name, and whether its
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
    /// Whether the layer can only come first (it works on the host batch).
    fn first_only(&self) -> bool {
        false
    }
}

/// The parameter count of `weights`, or `None` when it overflows `usize`.
pub(crate) fn checked_params(weights: &[(Role, Vec<usize>)]) -> Option<usize> {
    weights.iter().try_fold(0usize, |total, (_, shape)| {
        total.checked_add(shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?)
    })
}

/// The activation a layer applies: none for the head's softmax/sigmoid, which the loss and
/// `predict` apply from the logits.
fn unless_head(activation: Activation, head: bool) -> Activation {
    match activation {
        Activation::Softmax | Activation::Sigmoid if head => Activation::Linear,
        other => other,
    }
}

/// `(H, W, C)` of an image input, or why a flat one does not do.
fn image(what: &str, input: Shape) -> std::result::Result<(usize, usize, usize), String> {
    match input {
        Shape::Image { h, w, c } => Ok((h, w, c)),
        Shape::Flat(n) => Err(format!(
            "{what} expects an image input (H×W×C), found a flat vector of {n}"
        )),
    }
}

/// The output length of a window of `k` at stride `s` over `n` values, valid padding.
fn window(
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
fn channels(shape: Shape) -> usize {
    match shape {
        Shape::Image { c, .. } => c,
        Shape::Flat(n) => n,
    }
}

impl LayerRules for Conv2D {
    fn type_name(&self) -> &'static str {
        "Conv2D"
    }
    fn name_stem(&self) -> &'static str {
        "conv2d"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let (h, w, _) = image("Conv2D", input)?;
        if self.filters == 0 {
            return Err("Conv2D needs at least one filter".into());
        }
        let [kh, kw] = self.kernel_size;
        let [sh, sw] = self.strides;
        let (oh, ow) = match self.padding {
            Padding::Valid => (
                window("Conv2D", h, kh, sh, "height")?,
                window("Conv2D", w, kw, sw, "width")?,
            ),
            Padding::Same => {
                if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
                    return Err("Conv2D window and strides must be positive".into());
                }
                (h.div_ceil(sh), w.div_ceil(sw))
            }
        };
        Ok(Shape::Image {
            h: oh,
            w: ow,
            c: self.filters,
        })
    }
    fn weights(&self, input: Shape) -> Vec<(Role, Vec<usize>)> {
        let [kh, kw] = self.kernel_size;
        vec![
            (Role::Kernel, vec![self.filters, channels(input), kh, kw]),
            (Role::Bias, vec![self.filters]),
        ]
    }
    fn flops(&self, input: Shape, output: Shape) -> u64 {
        let [kh, kw] = self.kernel_size;
        2 * (output.numel() * kh * kw * channels(input)) as u64
    }
    fn op(&self, input: Shape, weights: &[usize], head: bool) -> PlannedOp {
        let (h, w) = match input {
            Shape::Image { h, w, .. } => (h, w),
            Shape::Flat(_) => (1, 1),
        };
        PlannedOp::Conv2D {
            kernel: weights[0],
            bias: weights[1],
            pad: self.pad_amounts(h, w),
            strides: self.strides,
            activation: unless_head(self.activation, head),
        }
    }
    fn kernel_regularizer(&self) -> Option<Regularizer> {
        self.kernel_regularizer
    }
}

/// MaxPooling2D and AveragePooling2D: one [`Pool2D`] window, two reductions.
struct Pooling {
    kind: PoolKind,
    pool: Pool2D,
}

impl LayerRules for Pooling {
    fn type_name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "MaxPooling2D",
            PoolKind::Average => "AveragePooling2D",
        }
    }
    fn name_stem(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "max_pooling2d",
            PoolKind::Average => "average_pooling2d",
        }
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let what = self.type_name();
        let (h, w, c) = image(what, input)?;
        let [kh, kw] = self.pool.pool_size;
        let [sh, sw] = self.pool.strides();
        Ok(Shape::Image {
            h: window(what, h, kh, sh, "height")?,
            w: window(what, w, kw, sw, "width")?,
            c,
        })
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// Comparisons and additions, no multiply-accumulates.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Pool2D {
            kind: self.kind,
            size: self.pool.pool_size,
            strides: self.pool.strides(),
        }
    }
}

/// GlobalMaxPooling2D and GlobalAveragePooling2D: each channel reduced over the whole image.
struct GlobalPooling(PoolKind);

impl LayerRules for GlobalPooling {
    fn type_name(&self) -> &'static str {
        match self.0 {
            PoolKind::Max => "GlobalMaxPooling2D",
            PoolKind::Average => "GlobalAveragePooling2D",
        }
    }
    fn name_stem(&self) -> &'static str {
        match self.0 {
            PoolKind::Max => "global_max_pooling2d",
            PoolKind::Average => "global_average_pooling2d",
        }
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let (_, _, c) = image(self.type_name(), input)?;
        Ok(Shape::Flat(c))
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// Comparisons and additions, no multiply-accumulates.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        let size = match input {
            Shape::Image { h, w, .. } => [h, w],
            Shape::Flat(n) => [1, n],
        };
        PlannedOp::GlobalPool2D { kind: self.0, size }
    }
}

/// Flatten, in Keras' `(H, W, C)` order.
struct Flattening;

impl LayerRules for Flattening {
    fn type_name(&self) -> &'static str {
        "Flatten"
    }
    fn name_stem(&self) -> &'static str {
        "flatten"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        Ok(Shape::Flat(input.numel()))
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Flatten
    }
}

impl LayerRules for Dense {
    fn type_name(&self) -> &'static str {
        "Dense"
    }
    fn name_stem(&self) -> &'static str {
        "dense"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if let Shape::Image { h, w, c } = input {
            return Err(format!(
                "Dense expects a flat input, found {h}×{w}×{c}; add a Flatten layer before it"
            ));
        }
        if self.units == 0 {
            return Err("Dense needs at least one unit".into());
        }
        Ok(Shape::Flat(self.units))
    }
    fn weights(&self, input: Shape) -> Vec<(Role, Vec<usize>)> {
        vec![
            (Role::Kernel, vec![self.units, input.numel()]),
            (Role::Bias, vec![self.units]),
        ]
    }
    fn flops(&self, input: Shape, _output: Shape) -> u64 {
        2 * (input.numel() * self.units) as u64
    }
    fn op(&self, _input: Shape, weights: &[usize], head: bool) -> PlannedOp {
        PlannedOp::Dense {
            kernel: weights[0],
            bias: weights[1],
            activation: unless_head(self.activation, head),
        }
    }
    fn kernel_regularizer(&self) -> Option<Regularizer> {
        self.kernel_regularizer
    }
}

impl LayerRules for RandomCrop {
    fn type_name(&self) -> &'static str {
        "RandomCrop"
    }
    fn name_stem(&self) -> &'static str {
        "random_crop"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        let (h, w, c) = image("RandomCrop", input)?;
        if self.height == 0 || self.width == 0 || self.height > h || self.width > w {
            return Err(format!(
                "RandomCrop takes a window of 1×1 up to the input's {h}×{w}, found {}×{}",
                self.height, self.width
            ));
        }
        Ok(Shape::Image {
            h: self.height,
            w: self.width,
            c,
        })
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// A copy, no arithmetic.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn first_only(&self) -> bool {
        true
    }
    fn op(&self, input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        let [h, w] = match input {
            Shape::Image { h, w, .. } => [h, w],
            Shape::Flat(n) => [n, 1],
        };
        PlannedOp::Crop {
            from: [h, w],
            size: [self.height, self.width],
        }
    }
}

impl LayerRules for Dropout {
    fn type_name(&self) -> &'static str {
        "Dropout"
    }
    fn name_stem(&self) -> &'static str {
        "dropout"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(format!(
                "Dropout rate must be in [0, 1), found {}",
                self.rate
            ));
        }
        Ok(input)
    }
    fn weights(&self, _input: Shape) -> Vec<(Role, Vec<usize>)> {
        Vec::new()
    }
    /// The identity at inference.
    fn flops(&self, _input: Shape, _output: Shape) -> u64 {
        0
    }
    fn op(&self, _input: Shape, _weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::Dropout { rate: self.rate }
    }
}

impl LayerRules for BatchNormalization {
    fn type_name(&self) -> &'static str {
        "BatchNormalization"
    }
    fn name_stem(&self) -> &'static str {
        "batch_normalization"
    }
    fn output(&self, input: Shape) -> std::result::Result<Shape, String> {
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(format!(
                "BatchNormalization momentum must be in [0, 1], found {}",
                self.momentum
            ));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(format!(
                "BatchNormalization epsilon must be positive and finite, found {}",
                self.epsilon
            ));
        }
        Ok(input)
    }
    fn weights(&self, input: Shape) -> Vec<(Role, Vec<usize>)> {
        BATCH_NORM_ROLES
            .iter()
            .map(|&role| (role, vec![channels(input)]))
            .collect()
    }
    /// One multiply-add per value at inference.
    fn flops(&self, _input: Shape, output: Shape) -> u64 {
        2 * output.numel() as u64
    }
    fn op(&self, _input: Shape, weights: &[usize], _head: bool) -> PlannedOp {
        PlannedOp::BatchNorm {
            gamma: weights[0],
            beta: weights[1],
            moving_mean: weights[2],
            moving_variance: weights[3],
            momentum: self.momentum as f64,
            epsilon: self.epsilon as f64,
        }
    }
}
