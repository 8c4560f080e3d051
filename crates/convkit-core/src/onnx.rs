//! ONNX export: a checkpoint as an ONNX inference graph that onnxruntime, OpenCV, TensorRT
//! or a browser runtime can run.
//!
//! The graph (opset [`OPSET`]) takes `input`, a float32 batch `[batch, H, W, C]` (channels
//! last, as convkit and Keras take it; `batch` is dynamic), and gives `probabilities`
//! `[batch, classes]` (a softmax over the classes), or `[batch, 1]` for a binary model (one
//! sigmoid unit: the probability of the second class). Dropout is the identity
//! at inference and has no node; batch normalisation uses the moving statistics. By default
//! the input is normalised as the checkpoint's data was (`x / 255` for the tutorials); with
//! [`OnnxExport::pixels`] the normalisation is part of the graph and the input is pixel
//! values 0–255. The model's metadata names the classes (`convkit.classes`, a JSON array),
//! the normalisation (`convkit.normalisation`) and what the input is (`convkit.input`).
//!
//! | convkit | ONNX |
//! |---|---|
//! | `Conv2D` | `Conv` (`pads` as Keras' `same`), then `Relu` / `Sigmoid` / `Tanh` / `Softmax` |
//! | `MaxPooling2D`, `AveragePooling2D` | `MaxPool`, `AveragePool` |
//! | `Flatten` | `Transpose` to channels last, then `Flatten` (Keras' `(H, W, C)` order) |
//! | `Dense` | `Gemm` (`transB = 1`), then its activation |
//! | `BatchNormalization` | `BatchNormalization` (inference) |
//! | `Dropout` | nothing |
//!
//! Images run channels-first inside the graph (what every ONNX runtime's convolutions take):
//! one `Transpose` after the input and one before `Flatten`.

use std::path::Path;

use onnx_protobuf as pb;
use pb::tensor_shape_proto::{dimension, Dimension};
use protobuf::{Enum as _, Message as _, MessageField};

use crate::checkpoint::Checkpoint;
use crate::compile::Head;
use crate::data::Normalisation;
use crate::plan::{PlannedOp, PoolKind};
use crate::spec::{Activation, Shape};
use crate::{Error, Result};

/// The ONNX operator set the graph is written for (onnxruntime ≥ 1.12, onnx ≥ 1.12).
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with [`OPSET`].
const IR_VERSION: i64 = 8;
/// Name of the graph's input.
pub const INPUT: &str = "input";
/// Name of the graph's output.
pub const OUTPUT: &str = "probabilities";
/// protobuf messages, and so ONNX files without external data, hold at most 2 GiB.
const MAX_PROTOBUF_BYTES: usize = i32::MAX as usize;

/// Writes a checkpoint as an ONNX model: `OnnxExport::new().pixels(true).save(&checkpoint, path)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnnxExport {
    pixels: bool,
}

impl OnnxExport {
    /// The graph takes normalised input, as `Model::predict_batch` does.
    pub fn new() -> Self {
        OnnxExport::default()
    }

    /// With `true`, the graph starts with the checkpoint's normalisation and takes pixel
    /// values 0–255 (as float32), so a deployed model needs no preprocessing but decoding.
    pub fn pixels(mut self, yes: bool) -> Self {
        self.pixels = yes;
        self
    }

    /// What the graph's input is, in words (also stored as the `convkit.input` metadata).
    pub fn input_description(&self, checkpoint: &Checkpoint) -> String {
        let [h, w, c] = checkpoint.spec.input_shape;
        let values = match (&checkpoint.meta.normalisation, self.pixels) {
            (Normalisation::None, _) => "pixel values 0–255".to_string(),
            (_, true) => "pixel values 0–255 (the graph normalises them)".to_string(),
            (Normalisation::Rescale, false) => "pixel values / 255".to_string(),
            (Normalisation::MeanStd { mean, std }, false) => {
                format!("(pixel values / 255 − mean) / std per channel, mean {mean:?}, std {std:?}")
            }
        };
        format!("float32 [batch, {h}, {w}, {c}] (channels last): {values}")
    }

    /// The ONNX model, serialised.
    pub fn to_bytes(&self, checkpoint: &Checkpoint) -> Result<Vec<u8>> {
        let model = self.model(checkpoint)?;
        let size = model.compute_size() as usize;
        if size > MAX_PROTOBUF_BYTES {
            return Err(Error::config(
                "ONNX export",
                format!("the model needs {size} bytes, but an ONNX file without external data holds at most {MAX_PROTOBUF_BYTES}"),
            ));
        }
        model
            .write_to_bytes()
            .map_err(|e| Error::config("ONNX export", e.to_string()))
    }

    /// Write the ONNX model to `path`, atomically.
    pub fn save(&self, checkpoint: &Checkpoint, path: &Path) -> Result<()> {
        crate::io::write_bytes_atomic(path, &self.to_bytes(checkpoint)?)
    }

    fn model(&self, checkpoint: &Checkpoint) -> Result<pb::ModelProto> {
        let spec = &checkpoint.spec;
        checkpoint.weights.check(spec)?;
        let head = checkpoint.compile.check(spec)?;
        let shapes = spec.output_shapes()?;
        let names = spec.layer_names();
        let [h, w, c] = spec.input_shape;
        // Class scores: one per class, or one sigmoid unit for two classes.
        let outputs = spec.output_shape()?.numel();

        let mut graph = Graph::default();
        let mut x = INPUT.to_string();
        if self.pixels {
            x = graph.normalise(&x, &checkpoint.meta.normalisation, c)?;
        }
        let mut layout = Layout::ChannelsLast;
        let plan = spec.plan()?;
        let weight = |i: usize| plan.weights[i].name.as_str();
        for (i, op) in plan.ops.iter().cloned().enumerate() {
            let name = &names[i];
            let image_op = |layout: Layout, graph: &mut Graph, x: &str| match layout {
                Layout::ChannelsLast => graph.node(
                    "Transpose",
                    &format!("{name}/to_nchw"),
                    &[x],
                    vec![ints("perm", &[0, 3, 1, 2])],
                ),
                _ => x.to_string(),
            };
            match op {
                PlannedOp::Conv2D {
                    kernel,
                    bias,
                    pad: [top, bottom, left, right],
                    strides,
                    activation,
                } => {
                    x = image_op(layout, &mut graph, &x);
                    layout = Layout::ChannelsFirst;
                    let (kernel, bias) = (weight(kernel), weight(bias));
                    let shape = graph.weight_and_bias(checkpoint, kernel, bias)?;
                    x = graph.node(
                        "Conv",
                        name,
                        &[&x, kernel, bias],
                        vec![
                            ints("kernel_shape", &shape[2..]),
                            ints("strides", &strides),
                            ints("pads", &[top, left, bottom, right]),
                        ],
                    );
                    x = graph.activation(name, activation, &x);
                }
                PlannedOp::Pool2D {
                    kind,
                    size,
                    strides,
                } => {
                    let op_type = match kind {
                        PoolKind::Max => "MaxPool",
                        PoolKind::Average => "AveragePool",
                    };
                    x = image_op(layout, &mut graph, &x);
                    layout = Layout::ChannelsFirst;
                    x = graph.node(
                        op_type,
                        name,
                        &[&x],
                        vec![ints("kernel_shape", &size), ints("strides", &strides)],
                    );
                }
                PlannedOp::GlobalPool2D { kind, .. } => {
                    let op_type = match kind {
                        PoolKind::Max => "GlobalMaxPool",
                        PoolKind::Average => "GlobalAveragePool",
                    };
                    x = image_op(layout, &mut graph, &x);
                    x = graph.node(op_type, name, &[&x], vec![]);
                    // [n, C, 1, 1] → [n, C]: one position, so channel order is Keras' too.
                    x = graph.node(
                        "Flatten",
                        &format!("{name}/flatten"),
                        &[&x],
                        vec![int("axis", 1)],
                    );
                    layout = Layout::Flat;
                }
                PlannedOp::Flatten => {
                    if layout == Layout::ChannelsFirst {
                        x = graph.node(
                            "Transpose",
                            &format!("{name}/to_nhwc"),
                            &[&x],
                            vec![ints("perm", &[0, 2, 3, 1])],
                        );
                    }
                    if layout != Layout::Flat {
                        x = graph.node("Flatten", name, &[&x], vec![int("axis", 1)]);
                    }
                    layout = Layout::Flat;
                }
                PlannedOp::Dense {
                    kernel,
                    bias,
                    activation,
                } => {
                    if layout != Layout::Flat {
                        return Err(spec.layer_error(
                            i,
                            "ONNX export: Dense needs a flat input (add a Flatten before it)",
                        ));
                    }
                    let (kernel, bias) = (weight(kernel), weight(bias));
                    graph.weight_and_bias(checkpoint, kernel, bias)?;
                    x = graph.node("Gemm", name, &[&x, kernel, bias], vec![int("transB", 1)]);
                    x = graph.activation(name, activation, &x);
                }
                PlannedOp::Dropout { .. } => {}
                // At inference a RandomCrop takes the centre window.
                PlannedOp::Crop {
                    from: [h, w],
                    size: [ch, cw],
                } => {
                    let axes = match layout {
                        Layout::ChannelsLast => [1, 2],
                        Layout::ChannelsFirst => [2, 3],
                        Layout::Flat => {
                            return Err(spec.layer_error(i, "ONNX export: a crop needs an image"))
                        }
                    };
                    let (top, left) = ((h - ch) / 2, (w - cw) / 2);
                    let parts = [
                        ("starts", [top, left]),
                        ("ends", [top + ch, left + cw]),
                        ("axes", axes),
                    ]
                    .map(|(part, values)| {
                        let part = format!("{name}/{part}");
                        graph.int64_initializer(&part, &values);
                        part
                    });
                    x = graph.node(
                        "Slice",
                        name,
                        &[&x, &parts[0], &parts[1], &parts[2]],
                        vec![],
                    );
                }
                PlannedOp::BatchNorm {
                    gamma,
                    beta,
                    moving_mean,
                    moving_variance,
                    epsilon,
                    ..
                } => {
                    if layout != Layout::Flat {
                        x = image_op(layout, &mut graph, &x);
                        layout = Layout::ChannelsFirst;
                    }
                    let parts = [gamma, beta, moving_mean, moving_variance].map(weight);
                    for part in parts {
                        let t = checkpoint.weights.get(part)?;
                        graph.initializer(part, t.shape.clone(), &t.data);
                    }
                    x = graph.node(
                        "BatchNormalization",
                        name,
                        &[&x, parts[0], parts[1], parts[2], parts[3]],
                        vec![float("epsilon", epsilon as f32)],
                    );
                }
            }
        }
        if layout != Layout::Flat || shapes.last() != Some(&Shape::Flat(outputs)) {
            return Err(Error::config(
                "ONNX export",
                format!("the model must end in a flat vector of {outputs} class scores"),
            ));
        }
        match head {
            Head::Softmax => graph.node_to("Softmax", "head", &[&x], vec![int("axis", 1)], OUTPUT),
            Head::Sigmoid => graph.node_to("Sigmoid", "head", &[&x], vec![], OUTPUT),
        }

        let mut g = graph.proto;
        g.name = spec.name.clone();
        g.doc_string = format!(
            "{} ({} layers), exported by convkit",
            spec.name,
            spec.layers.len()
        );
        g.input
            .push(value_info(INPUT, &[None, Some(h), Some(w), Some(c)]));
        g.output.push(value_info(OUTPUT, &[None, Some(outputs)]));

        let entry = |key: &str, value: String| pb::StringStringEntryProto {
            key: key.into(),
            value,
            ..Default::default()
        };
        Ok(pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
                ..Default::default()
            }],
            producer_name: "convkit".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: self.input_description(checkpoint),
            graph: MessageField::some(g),
            metadata_props: vec![
                entry(
                    "convkit.classes",
                    serde_json::to_string(&checkpoint.meta.classes).expect("serialisable"),
                ),
                entry(
                    "convkit.normalisation",
                    serde_json::to_string(&checkpoint.meta.normalisation).expect("serialisable"),
                ),
                entry("convkit.input", self.input_description(checkpoint)),
            ],
            ..Default::default()
        })
    }
}

/// How the activations between nodes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[batch, H, W, C]`: the graph's input, before any image layer.
    ChannelsLast,
    /// `[batch, C, H, W]`: inside the convolutional part.
    ChannelsFirst,
    /// `[batch, features]`: after Flatten.
    Flat,
}

/// A graph under construction: nodes in order, initializers, unique value names.
#[derive(Default)]
struct Graph {
    proto: pb::GraphProto,
}

impl Graph {
    /// Adds `op_type` named `name`; its output is called `name` too (node names are unique).
    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<pb::AttributeProto>,
    ) -> String {
        self.node_to(op_type, name, inputs, attribute, name);
        name.to_string()
    }

    fn node_to(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<pb::AttributeProto>,
        output: &str,
    ) {
        self.proto.node.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: name.into(),
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
    }

    /// `activation` after the layer `name`'s output `x`; the identity for `linear`.
    fn activation(&mut self, name: &str, activation: Activation, x: &str) -> String {
        let (op_type, attribute) = match activation {
            Activation::Linear => return x.to_string(),
            Activation::Relu => ("Relu", vec![]),
            Activation::Sigmoid => ("Sigmoid", vec![]),
            Activation::Tanh => ("Tanh", vec![]),
            // Keras' softmax runs over the last axis: channels, which are axis 1 here.
            Activation::Softmax => ("Softmax", vec![int("axis", 1)]),
        };
        self.node(
            op_type,
            &format!("{name}/{}", op_type.to_lowercase()),
            &[x],
            attribute,
        )
    }

    /// A layer's kernel and bias as constants, under their convkit names; the kernel's shape.
    fn weight_and_bias(
        &mut self,
        checkpoint: &Checkpoint,
        weight: &str,
        bias: &str,
    ) -> Result<Vec<usize>> {
        let kernel = checkpoint.weights.get(weight)?;
        self.initializer(weight, kernel.shape.clone(), &kernel.data);
        self.initializer(
            bias,
            vec![kernel.shape[0]],
            &checkpoint.weights.get(bias)?.data,
        );
        Ok(kernel.shape.clone())
    }

    /// An int64 vector constant (a Slice's starts, ends and axes).
    fn int64_initializer(&mut self, name: &str, values: &[usize]) {
        self.proto.initializer.push(pb::TensorProto {
            dims: vec![values.len() as i64],
            data_type: pb::tensor_proto::DataType::INT64.value(),
            name: name.into(),
            raw_data: values
                .iter()
                .flat_map(|&v| (v as i64).to_le_bytes())
                .collect(),
            ..Default::default()
        });
    }

    /// A float32 constant.
    fn initializer(&mut self, name: &str, dims: Vec<usize>, data: &[f32]) {
        self.proto.initializer.push(pb::TensorProto {
            dims: dims.into_iter().map(|d| d as i64).collect(),
            data_type: pb::tensor_proto::DataType::FLOAT.value(),
            name: name.into(),
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
    }

    /// The data pipeline's normalisation of pixel values `x` (`[batch, H, W, C]`), computed in
    /// the same order as convkit's, so the values agree to the last bit.
    fn normalise(
        &mut self,
        x: &str,
        normalisation: &Normalisation,
        channels: usize,
    ) -> Result<String> {
        match normalisation {
            Normalisation::None => Ok(x.to_string()),
            Normalisation::Rescale => {
                self.initializer("normalise/255", vec![], &[255.0]);
                Ok(self.node("Div", "normalise/rescale", &[x, "normalise/255"], vec![]))
            }
            Normalisation::MeanStd { mean, std } => {
                normalisation.check(channels)?;
                self.initializer("normalise/255", vec![], &[255.0]);
                self.initializer("normalise/mean", vec![channels], mean);
                self.initializer("normalise/std", vec![channels], std);
                let x = self.node("Div", "normalise/rescale", &[x, "normalise/255"], vec![]);
                let x = self.node("Sub", "normalise/centre", &[&x, "normalise/mean"], vec![]);
                Ok(self.node("Div", "normalise/scale", &[&x, "normalise/std"], vec![]))
            }
        }
    }
}

fn attribute(name: &str, kind: pb::attribute_proto::AttributeType) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        type_: kind.into(),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[usize]) -> pb::AttributeProto {
    pb::AttributeProto {
        ints: values.iter().map(|&v| v as i64).collect(),
        ..attribute(name, pb::attribute_proto::AttributeType::INTS)
    }
}

fn int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        i: value,
        ..attribute(name, pb::attribute_proto::AttributeType::INT)
    }
}

fn float(name: &str, value: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        f: value,
        ..attribute(name, pb::attribute_proto::AttributeType::FLOAT)
    }
}

/// A float32 graph input or output; `None` dimensions are the dynamic `batch`.
fn value_info(name: &str, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(n) => dimension::Value::DimValue(*n as i64),
                None => dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = pb::type_proto::Tensor {
        elem_type: pb::tensor_proto::DataType::FLOAT.value(),
        shape: MessageField::some(pb::TensorShapeProto {
            dim,
            ..Default::default()
        }),
        ..Default::default()
    };
    pb::ValueInfoProto {
        name: name.into(),
        type_: MessageField::some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(tensor)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointMeta;
    use crate::compile::{Compile, Loss, Optimizer};
    use crate::spec::Sequential;
    use crate::weights::Tensor;

    fn checkpoint(preset: &str) -> Checkpoint {
        let spec = Sequential::preset(preset).unwrap();
        Checkpoint {
            weights: crate::init::glorot_uniform(&spec, 1).unwrap(),
            spec,
            compile: Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy),
            meta: CheckpointMeta {
                classes: (0..10).map(|c| format!("class {c}")).collect(),
                normalisation: Normalisation::Rescale,
                backend: "test".into(),
            },
        }
    }

    fn decode(bytes: &[u8]) -> pb::ModelProto {
        pb::ModelProto::parse_from_bytes(bytes).unwrap()
    }

    #[test]
    fn the_tutorial_model_becomes_a_channels_first_graph_with_a_dynamic_batch() {
        let cp = checkpoint("tutorial-mnist");
        let model = decode(&OnnxExport::new().to_bytes(&cp).unwrap());
        assert_eq!(
            (model.ir_version, model.opset_import[0].version),
            (IR_VERSION, OPSET)
        );
        let graph = model.graph.as_ref().unwrap();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Transpose",
                "Conv",
                "Relu",
                "MaxPool",
                "Conv",
                "Relu",
                "MaxPool",
                "Transpose",
                "Flatten",
                "Gemm",
                "Relu",
                "Gemm",
                "Softmax"
            ]
        );
        let last = graph.node.last().unwrap();
        assert_eq!(last.output, [OUTPUT]);
        // Every parameter is an initializer with convkit's name and shape.
        assert_eq!(graph.initializer.len(), cp.weights.tensors.len());
        for t in &graph.initializer {
            let w = cp.weights.get(&t.name).unwrap();
            assert_eq!(
                t.dims,
                w.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
            );
            assert_eq!(t.raw_data.len(), 4 * w.data.len());
        }
        let dims = |v: &pb::ValueInfoProto| match &v.type_.value {
            Some(pb::type_proto::Value::TensorType(t)) => t
                .shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(n)) => n.to_string(),
                    Some(dimension::Value::DimParam(p)) => p.clone(),
                    _ => "?".into(),
                })
                .collect::<Vec<_>>(),
            _ => panic!("not a tensor"),
        };
        assert_eq!(dims(&graph.input[0]), ["batch", "28", "28", "1"]);
        assert_eq!(dims(&graph.output[0]), ["batch", "10"]);
        let meta: std::collections::HashMap<_, _> = model
            .metadata_props
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert!(meta["convkit.classes"].starts_with("[\"class 0\""));
        assert_eq!(
            meta["convkit.input"],
            "float32 [batch, 28, 28, 1] (channels last): pixel values / 255"
        );
    }

    #[test]
    fn pixels_put_the_normalisation_in_the_graph() {
        let mut cp = checkpoint("tutorial-mnist");
        let ops = |cp: &Checkpoint| -> Vec<String> {
            let model = decode(&OnnxExport::new().pixels(true).to_bytes(cp).unwrap());
            model
                .graph
                .unwrap()
                .node
                .iter()
                .take(4)
                .map(|n| n.op_type.clone())
                .collect()
        };
        assert_eq!(ops(&cp)[..2], ["Div", "Transpose"]);
        cp.meta.normalisation = Normalisation::MeanStd {
            mean: vec![0.5],
            std: vec![0.25],
        };
        assert_eq!(ops(&cp), ["Div", "Sub", "Div", "Transpose"]);
        cp.meta.normalisation = Normalisation::None;
        assert_eq!(ops(&cp)[0], "Transpose");
    }

    #[test]
    fn a_bad_checkpoint_is_named_not_exported() {
        let mut cp = checkpoint("tutorial-mnist");
        cp.weights.insert("dense.bias", Tensor::zeros(vec![3]));
        let e = OnnxExport::new().to_bytes(&cp).unwrap_err().to_string();
        assert!(e.contains("dense.bias"), "{e}");
        let mut cp = checkpoint("tutorial-mnist");
        cp.meta.normalisation = Normalisation::MeanStd {
            mean: vec![0.5; 3],
            std: vec![1.0; 3],
        };
        let e = OnnxExport::new()
            .pixels(true)
            .to_bytes(&cp)
            .unwrap_err()
            .to_string();
        assert!(e.contains("need 1 values") && e.contains("found 3"), "{e}");
    }
}
