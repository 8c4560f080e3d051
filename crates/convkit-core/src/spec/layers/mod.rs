//! The layer types, one family per file, each with what it knows about itself
//! ([`LayerRules`]): its Keras names, the shape it gives, the weights it declares, its cost,
//! its operation in the plan and its PyTorch mapping. This file is their index: the
//! [`LayerKind`] enum, each kind's rules, and the text form of a stack of layers. A layer built
//! from existing planned operations is a file here plus its entries in the index (see
//! docs/design-notes.md, "Adding a layer").

mod activation;
mod batch_norm;
mod conv;
mod dense;
mod dropout;
mod flatten;
mod pooling;
mod random_crop;
mod rules;

use serde::{Deserialize, Serialize};

pub use crate::op::Activation;
use crate::op::PoolKind;
use crate::{Error, Result};

pub use activation::{ActivationLayer, ReLU, Softmax};
pub use batch_norm::BatchNormalization;
pub use conv::{Conv2D, Padding};
pub use dense::Dense;
pub use dropout::Dropout;
use flatten::Flattening;
pub use pooling::Pool2D;
use pooling::{GlobalPooling, Pooling};
pub use random_crop::RandomCrop;
pub(crate) use rules::{checked_params, FeatureOrder, LayerRules};
pub use rules::{Regularizer, Shape};

/// What a layer does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LayerKind {
    Conv2D(Conv2D),
    MaxPooling2D(Pool2D),
    AveragePooling2D(Pool2D),
    /// The maximum of each channel over the whole image: `H×W×C` → `C`.
    #[serde(deserialize_with = "rules::no_fields")]
    GlobalMaxPooling2D,
    /// The mean of each channel over the whole image: `H×W×C` → `C`.
    #[serde(deserialize_with = "rules::no_fields")]
    GlobalAveragePooling2D,
    #[serde(deserialize_with = "rules::no_fields")]
    Flatten,
    Dense(Dense),
    /// An activation on its own (Keras' `Activation` layer).
    Activation(ActivationLayer),
    ReLU(ReLU),
    Softmax(Softmax),
    Dropout(Dropout),
    BatchNormalization(BatchNormalization),
    RandomCrop(RandomCrop),
}

impl LayerKind {
    /// A stack of layers as text: a JSON array of layers (the spec format's `layers`), or
    /// comma-separated `Dense UNITS [ACTIVATION]`, `Activation ACTIVATION`, `Dropout RATE`,
    /// `BatchNormalization`, `Flatten`, `GlobalAveragePooling2D`, `GlobalMaxPooling2D`, e.g.
    /// `Dense 256 relu, Dropout 0.5, Dense 2 softmax`.
    pub fn parse_stack(text: &str) -> Result<Vec<LayerKind>> {
        let text = text.trim();
        if text.starts_with('[') {
            let layers: Vec<Layer> = serde_json::from_str(text)
                .map_err(|e| Error::config("layers", format!("not a JSON array of layers: {e}")))?;
            return (layers.into_iter().enumerate())
                .map(|(i, layer)| match layer {
                    Layer { name: None, kind, trainable: true } => Ok(kind),
                    _ => Err(Error::config(
                        "layers",
                        format!("layer {i}: new layers are trainable and take Keras' automatic names; drop its `name` and `trainable`"),
                    )),
                })
                .collect();
        }
        let forms = "Dense UNITS [ACTIVATION], Activation ACTIVATION, Dropout RATE, BatchNormalization, Flatten, GlobalAveragePooling2D or GlobalMaxPooling2D";
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
                    (Some("activation"), [activation]) => Ok(LayerKind::Activation(
                        ActivationLayer::new(activation.parse()?),
                    )),
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
            LayerKind::Activation(activation) => Box::new(*activation),
            LayerKind::ReLU(relu) => Box::new(*relu),
            LayerKind::Softmax(softmax) => Box::new(*softmax),
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
            LayerKind::Activation(ActivationLayer::new(Activation::Relu)),
            LayerKind::ReLU(ReLU::new()),
            LayerKind::Softmax(Softmax::new()),
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
                | LayerKind::Activation(_)
                | LayerKind::ReLU(_)
                | LayerKind::Softmax(_)
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
        self.rules().flattens()
    }

    /// The activation it ends with, for a layer that can end a classifier (Dense, the
    /// activation layers); `None` for the others.
    pub fn classifier_activation(&self) -> Option<Activation> {
        self.rules().classifier_activation()
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
            | LayerKind::Activation(_)
            | LayerKind::ReLU(_)
            | LayerKind::Softmax(_)
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
impl From<ActivationLayer> for LayerKind {
    fn from(activation: ActivationLayer) -> Self {
        LayerKind::Activation(activation)
    }
}
impl From<ReLU> for LayerKind {
    fn from(relu: ReLU) -> Self {
        LayerKind::ReLU(relu)
    }
}
impl From<Softmax> for LayerKind {
    fn from(softmax: Softmax) -> Self {
        LayerKind::Softmax(softmax)
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
