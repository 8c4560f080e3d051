//! Model specification: a Keras-style `Sequential` stack of layers, with shape inference,
//! parameter counts, `summary()`, JSON round trip and the tutorial presets.
//!
//! Shapes follow Keras' channels-last view: images are `H×W×C`; `Flatten` flattens in
//! `(H, W, C)` order on every engine, so a Dense kernel's input index is `(h·W + w)·C + c`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod layers;
mod presets;
mod summary;
/// Every layer type, with [`LayerKind`], [`Layer`], [`Shape`] and [`Regularizer`]: whatever
/// the index in `spec/layers/mod.rs` makes public.
pub use layers::*;
pub use presets::PRESETS;

/// A linear stack of layers on an `H×W×C` input, as Keras' `Sequential`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sequential {
    #[serde(default = "default_name")]
    pub name: String,
    /// `[height, width, channels]`.
    pub input_shape: [usize; 3],
    pub layers: Vec<Layer>,
}

thread_local! {
    static OUTPUT_SHAPES_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has run [`Sequential::output_shapes`]: a test's proof that a
/// model is checked once ([`crate::plan::Compiled`]).
#[doc(hidden)]
pub fn output_shapes_calls() -> usize {
    OUTPUT_SHAPES_CALLS.with(std::cell::Cell::get)
}

/// `1234567` → `"1,234,567"`.
pub(crate) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn default_name() -> String {
    "sequential".into()
}

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
    /// `LayerKind::Flatten`): Keras' `model.add`, not `std::ops::Add`.
    #[allow(clippy::should_implement_trait)]
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
        OUTPUT_SHAPES_CALLS.with(|calls| calls.set(calls.get() + 1));
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
            if i > 0 && layer.kind.rules().first_only() {
                return Err(self.layer_error(
                    i,
                    format!(
                        "{} must be the model's first layer (convkit applies it to the batch on the host, before the engine)",
                        layer.kind.type_name()
                    ),
                ));
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
        let rules = kind.rules();
        if let Some(r) = rules.kernel_regularizer() {
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
        rules
            .output(input)
            .map_err(|message| self.layer_error(i, message))
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
    /// every Dense but the classifier (the last of them, which an activation layer may
    /// follow), where there is none yet (the CLI's `--batch-norm`).
    pub fn with_batch_normalization(&self) -> Self {
        let mut spec = self.clone();
        spec.layers.clear();
        let classifier = (self.layers.iter()).rposition(|l| l.kind.rules().normalised_by_default());
        for (i, layer) in self.layers.iter().enumerate() {
            spec.layers.push(layer.clone());
            let normalised = matches!(
                self.layers.get(i + 1).map(|l| &l.kind),
                Some(LayerKind::BatchNormalization(_))
            );
            let wants = layer.kind.rules().normalised_by_default() && Some(i) != classifier;
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

    /// Multiply-accumulate operations of one forward pass of one image, ×2 (FLOPs).
    pub fn forward_flops(&self) -> Result<u64> {
        let shapes = self.output_shapes()?;
        let mut input = self.input();
        let mut flops = 0u64;
        for (layer, &output) in self.layers.iter().zip(&shapes) {
            flops += layer.kind.rules().flops(input, output);
            input = output;
        }
        Ok(flops)
    }
}

/// A layer's parameter count on `input`, or `None` when it overflows `usize`.
fn layer_params(kind: &LayerKind, input: Shape) -> Option<usize> {
    layers::checked_params(&kind.rules().weights(input))
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

    /// This model with a RandomCrop of `height×width` as its first layer (replacing one it
    /// has): the rest of the model then sees the windows.
    pub fn with_random_crop(&self, height: usize, width: usize) -> Result<Sequential> {
        let mut spec = self.clone();
        if matches!(
            spec.layers.first().map(|l| &l.kind),
            Some(LayerKind::RandomCrop(_))
        ) {
            spec.layers.remove(0);
        }
        spec.layers.insert(0, RandomCrop::new(height, width).into());
        spec.output_shapes()?;
        Ok(spec)
    }

    /// How many layers at the end make the fully connected classifier: every layer after the
    /// last Flatten or global pooling (all of them when there is none).
    pub fn classifier_len(&self) -> usize {
        let body = (self.layers.iter()).rposition(|layer| layer.kind.flattens());
        self.layers.len() - body.map_or(0, |i| i + 1)
    }

    /// This model with its last `remove` layers taken off and `head` appended: the guide's
    /// fine-tuning, "remove the last fully connected layers … add new fully connected layers".
    /// The new layers are trainable and named `head_<i>_<kind>`, so that
    /// [`crate::init::transfer`] gives them fresh weights; the result's shapes are checked.
    pub fn with_head(&self, remove: usize, head: &[LayerKind]) -> Result<Sequential> {
        if remove > self.layers.len() {
            return Err(Error::config(
                "new head",
                format!(
                    "cannot remove the last {remove} layers of a model of {}",
                    self.layers.len()
                ),
            ));
        }
        if head.is_empty() {
            return Err(Error::config("new head", "needs at least one layer"));
        }
        let mut spec = self.clone();
        spec.layers.truncate(self.layers.len() - remove);
        for (i, kind) in head.iter().enumerate() {
            spec.layers.push(Layer {
                name: Some(format!("head_{}_{}", i + 1, kind.name_stem())),
                kind: kind.clone(),
                trainable: true,
            });
        }
        spec.output_shapes()?;
        Ok(spec)
    }

    /// This model with its classifier sized for `classes` (the tutorials' `Dense(num_classes)`):
    /// itself when its output already tells that many apart (one sigmoid unit tells 2) or
    /// `classes` < 2, else with its last Dense layer replaced ([`Sequential::with_new_head`]).
    pub fn with_classes(&self, classes: usize) -> Result<Sequential> {
        if classes < 2 || self.class_count()? == classes {
            return Ok(self.clone());
        }
        self.with_new_head(classes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_head_of_layers() {
        let mnist = Sequential::preset("tutorial-mnist").unwrap();
        assert_eq!(mnist.classifier_len(), 2);
        let head = LayerKind::parse_stack("Dense 256 relu, dropout 0.5, Dense 2 softmax").unwrap();
        assert_eq!(
            head,
            vec![
                Dense::new(256).activation(Activation::Relu).into(),
                LayerKind::Dropout(Dropout::new(0.5)),
                Dense::new(2).activation(Activation::Softmax).into(),
            ]
        );
        let json = r#"[{"type":"Dense","units":256,"activation":"relu"},{"type":"Dropout","rate":0.5},{"type":"Dense","units":2,"activation":"softmax"}]"#;
        assert_eq!(LayerKind::parse_stack(json).unwrap(), head);
        let tuned = mnist.with_head(mnist.classifier_len(), &head).unwrap();
        assert_eq!(tuned.layers.len(), 8);
        assert_eq!(tuned.output_shape().unwrap().numel(), 2);
        assert_eq!(
            tuned.layer_names()[5..],
            ["head_1_dense", "head_2_dropout", "head_3_dense"]
        );
        for (text, says) in [
            ("Dense", "not a layer this form takes"),
            ("Dense 0", "units must be a whole number"),
            ("Dense 2 swish", "found `swish`"),
            ("Dropout 1.5", "the rate must be in [0, 1)"),
            ("Dense 2,", "an empty layer"),
            ("[{\"type\":\"Dense\"}]", "not a JSON array of layers"),
        ] {
            let err = LayerKind::parse_stack(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        assert!(mnist.with_head(8, &head).is_err());
        assert!(mnist.with_head(2, &[]).is_err());
        // A head that does not fit what is left: Dense on an image needs a Flatten first.
        let err = mnist.with_head(3, &head).unwrap_err().to_string();
        assert!(err.contains("head_1_dense"), "{err}");
    }

    #[test]
    fn a_classifier_sized_for_the_data() {
        let mnist = Sequential::preset("tutorial-mnist").unwrap();
        assert_eq!(mnist.with_classes(10).unwrap(), mnist);
        assert_eq!(mnist.with_classes(1).unwrap(), mnist);
        let two = mnist.with_classes(2).unwrap();
        assert_eq!(two.output_shape().unwrap().numel(), 2);
        assert_eq!(two.layers.len(), mnist.layers.len());
        // One sigmoid unit already tells two classes apart.
        let random = Sequential::preset("tutorial-random").unwrap();
        assert_eq!(random.with_classes(2).unwrap(), random);
        assert_eq!(random.with_classes(3).unwrap().class_count().unwrap(), 3);
    }

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
    fn an_activation_layer_follows_keras() {
        // Keras' Conv2D → BatchNormalization → Activation("relu").
        let spec = Sequential::new(6, 6, 1)
            .add(Conv2D::new(4, 3))
            .add(BatchNormalization::new())
            .add(ActivationLayer::new(Activation::Relu))
            .flatten()
            .add(Dense::new(3).activation(Activation::Softmax));
        assert_eq!(
            spec.output_shapes().unwrap()[2],
            Shape::Image { h: 4, w: 4, c: 4 }
        );
        assert_eq!(spec.param_counts().unwrap(), vec![40, 16, 0, 0, 195]);
        assert_eq!(spec.layer_names()[2], "activation");
        let summary = spec.summary().unwrap();
        assert!(summary.contains("activation (Activation)"), "{summary}");
        let plan = crate::plan::Compiled::new(
            spec.clone(),
            crate::Compile::new(
                crate::Optimizer::adam(),
                crate::Loss::SparseCategoricalCrossentropy,
            ),
        )
        .unwrap();
        assert_eq!(
            plan.plan().ops[2],
            crate::op::PlannedOp::Activation(Activation::Relu)
        );
        // JSON as Keras names it, and the text form of a stack.
        let layer: Layer =
            serde_json::from_str(r#"{"type": "Activation", "activation": "relu"}"#).unwrap();
        assert_eq!(layer.kind, spec.layers[2].kind);
        let back: Sequential = serde_json::from_str(&spec.to_json()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(
            LayerKind::parse_stack("Dense 8, Activation tanh").unwrap()[1],
            ActivationLayer::new(Activation::Tanh).into()
        );
        let e = LayerKind::parse_stack("Activation swish")
            .unwrap_err()
            .to_string();
        assert!(e.contains("found `swish`"), "{e}");
    }

    #[test]
    fn keras_relu_and_softmax_layers_and_a_classifier_that_ends_in_an_activation() {
        use crate::op::PlannedOp;
        use crate::{Compile, Head, Loss, Optimizer};
        let head = |spec: &Sequential, loss| Compile::new(Optimizer::adam(), loss).check(spec);
        // cifar10_cnn.py's Dense(num_classes) → Activation('softmax'), the TF tutorial's
        // Softmax() after logits, and ReLU() as a layer.
        let layers: Vec<LayerKind> = serde_json::from_str(
            r#"[{"type": "Dense", "units": 8}, {"type": "ReLU"}, {"type": "Dense", "units": 3},
                {"type": "Softmax"}]"#,
        )
        .unwrap();
        let spec = layers
            .into_iter()
            .fold(Sequential::new(2, 2, 1).flatten(), Sequential::add);
        assert_eq!(spec.layer_names()[2..], ["re_lu", "dense_1", "softmax"]);
        assert_eq!(spec.layers[2].kind.type_name(), "ReLU");
        assert_eq!(
            head(&spec, Loss::SparseCategoricalCrossentropy).unwrap(),
            Head::Softmax
        );
        let compiled = crate::plan::Compiled::new(
            spec.clone(),
            Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy),
        )
        .unwrap();
        // The head's softmax is the loss's and predict's, as a Dense's softmax is.
        let ops = &compiled.plan().ops;
        assert_eq!(ops[2], PlannedOp::Activation(Activation::Relu));
        assert_eq!(ops[4], PlannedOp::Activation(Activation::Linear));
        let back: Sequential = serde_json::from_str(&spec.to_json()).unwrap();
        assert_eq!(back, spec);
        // --batch-norm leaves the classifier alone when an activation layer follows it.
        let normalised = spec.with_batch_normalization();
        assert_eq!(normalised.layers.len(), spec.layers.len() + 1);
        assert!(matches!(
            normalised.layers[2].kind,
            LayerKind::BatchNormalization(_)
        ));
        let binary = Sequential::new(2, 2, 1)
            .flatten()
            .add(Dense::new(1))
            .add(ActivationLayer::new(Activation::Sigmoid));
        assert_eq!(
            head(&binary, Loss::BinaryCrossentropy).unwrap(),
            Head::Sigmoid
        );

        // What convkit cannot do is an error that names the layer, never a silent difference.
        for (json, expected) in [
            (
                r#"{"type": "ReLU", "max_value": 6}"#,
                "ReLU supports max(x, 0) only",
            ),
            (
                r#"{"type": "ReLU", "negative_slope": 0.1}"#,
                "negative_slope: 0.1",
            ),
            (r#"{"type": "Softmax", "axis": 1}"#, "found axis 1"),
        ] {
            let layer: Layer = serde_json::from_str(json).unwrap();
            let bad = Sequential::new(2, 2, 1).flatten().add(layer.kind);
            let e = bad.output_shapes().unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains("layer 1"), "{e}");
        }
        let e = head(
            &Sequential::new(2, 2, 1).flatten().add(ReLU::new()),
            Loss::BinaryCrossentropy,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("found 4 unit(s) with Relu"), "{e}");
        let image = Sequential::new(2, 2, 3).add(Softmax::new());
        let e = head(&image, Loss::SparseCategoricalCrossentropy)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a flat vector of class scores") && e.contains("(None, 2, 2, 3)"),
            "{e}"
        );
        let e = head(
            &Sequential::new(2, 2, 1).flatten(),
            Loss::SparseCategoricalCrossentropy,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ends in a Dense or an activation layer, found Flatten"),
            "{e}"
        );
    }

    #[test]
    fn settings_convkit_does_not_know_are_errors_not_ignored() {
        // Keras settings convkit has no equivalent for would change what the model computes.
        for (json, field) in [
            (
                r#"{"type": "Conv2D", "filters": 2, "kernel_size": [3, 3], "dilation_rate": [2, 2]}"#,
                "dilation_rate",
            ),
            (
                r#"{"type": "Dense", "units": 2, "use_bias": false}"#,
                "use_bias",
            ),
            (
                r#"{"type": "Flatten", "data_format": "channels_first"}"#,
                "data_format",
            ),
            (
                r#"{"type": "GlobalAveragePooling2D", "keepdims": true}"#,
                "keepdims",
            ),
            (
                r#"{"type": "MaxPooling2D", "pool_size": [2, 2], "padding": "same"}"#,
                "padding",
            ),
            (
                r#"{"type": "Dense", "units": 2, "kernel_regularizer": {"l3": 1}}"#,
                "l3",
            ),
        ] {
            let e = serde_json::from_str::<Layer>(json).unwrap_err().to_string();
            assert!(
                e.contains(&format!("unknown field `{field}`")),
                "{json}: {e}"
            );
        }
        let e = serde_json::from_str::<Sequential>(
            r#"{"input_shape": [2, 2, 1], "layers": [{"type": "Flatten"}], "optimizer": "adam"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `optimizer`"), "{e}");
        // name and trainable belong to every layer; a head's layers are fresh and unnamed.
        let layer: Layer =
            serde_json::from_str(r#"{"type": "Flatten", "name": "f", "trainable": false}"#)
                .unwrap();
        assert_eq!((layer.name.as_deref(), layer.trainable), (Some("f"), false));
        let e = LayerKind::parse_stack(r#"[{"type": "Dense", "units": 2, "name": "out"}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0: new layers are trainable"), "{e}");
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
