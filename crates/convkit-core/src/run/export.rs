//! [`ExportRequest`]: a checkpoint as an ONNX inference graph.

use std::path::PathBuf;

use crate::checkpoint::Checkpoint;
use crate::onnx::OnnxExport;
use crate::spec::SizeLimits;
use crate::Result;

/// `convkit export`: an ONNX model (opset [`OPSET`](crate::onnx::OPSET)) of saved weights.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// A checkpoint file, or a run folder holding `model.safetensors`.
    pub weights: PathBuf,
    pub size_limits: SizeLimits,
    /// The `.onnx` file written.
    pub onnx: PathBuf,
    /// Put the checkpoint's normalisation in the graph, so that it takes pixel values 0–255.
    pub pixels: bool,
}

/// What an [`ExportRequest`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOutcome {
    /// The `.onnx` file written.
    pub onnx: PathBuf,
    /// The graph's input in words: its shape and the values it takes
    /// ([`OnnxExport::input_description`]).
    pub input: String,
    /// Values per image in the output: classes, or 1 for a binary model.
    pub outputs: usize,
}

impl ExportRequest {
    pub fn new(weights: impl Into<PathBuf>, onnx: impl Into<PathBuf>) -> Self {
        ExportRequest {
            weights: weights.into(),
            size_limits: SizeLimits::default(),
            onnx: onnx.into(),
            pixels: false,
        }
    }

    pub fn run(&self) -> Result<ExportOutcome> {
        let checkpoint = Checkpoint::load_within(&self.weights, &self.size_limits)?;
        let export = OnnxExport::new().pixels(self.pixels);
        export.save(&checkpoint, &self.onnx)?;
        Ok(ExportOutcome {
            onnx: self.onnx.clone(),
            input: export.input_description(&checkpoint),
            outputs: checkpoint.spec.output_shape()?.numel(),
        })
    }
}

/// `wrote FILE (ONNX opset N): input `NAME` …; output `NAME` [batch, K]`.
impl std::fmt::Display for ExportOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::onnx::{INPUT, OPSET, OUTPUT};
        write!(
            f,
            "wrote {} (ONNX opset {OPSET}): input `{INPUT}` {}; output `{OUTPUT}` [batch, {}]",
            self.onnx.display(),
            self.input,
            self.outputs
        )
    }
}
