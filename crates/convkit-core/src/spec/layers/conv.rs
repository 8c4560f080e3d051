//! Conv2D: a kernel and a bias, `same` or `valid` padding, any strides.

use serde::{Deserialize, Serialize};

use super::rules::{
    channels, image, unless_head, window, LayerRules, Regularizer, Shape, TorchPart,
};
use crate::op::{Activation, PlannedOp, Role};

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
#[serde(deny_unknown_fields)]
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
    fn torch_parts(&self) -> &'static [TorchPart] {
        const PARTS: [TorchPart; 2] = [
            TorchPart::new("weight", "weight", false),
            TorchPart::new("bias", "bias", false),
        ];
        &PARTS
    }
    fn normalised_by_default(&self) -> bool {
        true
    }
}
