//! convkit checkpoints in PyTorch: `python/convkit_torch.py` builds the equivalent
//! `torch.nn.Sequential`, which gives the probabilities convkit gives, for every preset and
//! every layer type (1e-5). Runs the project's `.venv` python (torch and safetensors, which
//! `cargo xtask setup` installs), or `$CONVKIT_PYTHON`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use convkit::prelude::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A python with torch and safetensors.
fn python() -> PathBuf {
    let python = std::env::var_os("CONVKIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run `cargo xtask setup` (it installs torch and safetensors into .venv), or set CONVKIT_PYTHON to a python that has both",
        python.display()
    );
    python
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn checkpoints_load_into_pytorch_with_the_same_probabilities() {
    let engine = common::end_to_end_engines().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let mut specs: Vec<Sequential> = convkit::spec::PRESETS
        .iter()
        .map(|p| Sequential::preset(p).unwrap())
        .collect();
    specs.extend(common::small_specs());
    let mut args = vec![root().join("python/convkit_torch.py")];
    let mut expected = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let [h, w, c] = spec.input_shape;
        let classes = spec.class_count().unwrap();
        let data = synthetic(16, ImageShape::new(h, w, c), classes.max(2), i as u64)
            .unwrap()
            .normalise(Normalisation::Rescale);
        let loss = if spec.output_shape().unwrap().numel() == 1 {
            Loss::BinaryCrossentropy
        } else {
            Loss::SparseCategoricalCrossentropy
        };
        // One epoch of SGD, so biases and moving statistics are not their initial values.
        let compile = Compile::new(Optimizer::sgd().with_learning_rate(0.05), loss);
        let mut model = Model::new(spec.clone(), compile, engine.as_ref(), 7).unwrap();
        model
            .fit(&data)
            .epochs(1)
            .batch_size(8)
            .verbosity(Verbosity::Silent)
            .run()
            .unwrap();
        let checkpoint = dir.path().join(format!("{i}.safetensors"));
        model
            .checkpoint(CheckpointMeta::default())
            .unwrap()
            .save(&checkpoint)
            .unwrap();
        let probe = data.select(&[0, 5, 10, 15]);
        let mut x = convkit::ndarray::Array4::zeros((probe.len(), h, w, c));
        probe
            .fill_batch(&(0..probe.len()).collect::<Vec<_>>(), x.view_mut())
            .unwrap();
        let inputs = dir.path().join(format!("{i}.in"));
        std::fs::write(&inputs, f32_bytes(x.as_slice().unwrap())).unwrap();
        let probabilities = model.predict(&probe, 4).unwrap();
        expected.push((spec.name.clone(), probabilities));
        args.extend([checkpoint, inputs, dir.path().join(format!("{i}.out"))]);
    }
    let out = Command::new(python()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "convkit_torch.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, (name, want)) in expected.iter().enumerate() {
        let bytes = std::fs::read(dir.path().join(format!("{i}.out"))).unwrap();
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: output size");
        let worst = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "{name} on {}: PyTorch's probabilities differ by {worst:e}",
            engine.name()
        );
    }
}
