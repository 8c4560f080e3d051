//! convkit models in and out of other frameworks, each round trip to 1e-5 for every preset and
//! every layer type:
//! - to PyTorch: `python/convkit_torch.py` builds the equivalent `torch.nn.Sequential`;
//! - from PyTorch: a `state_dict` saved as safetensors loads into a convkit spec;
//! - to ONNX: `convkit export --onnx` runs in onnxruntime (`python/convkit_onnx.py`).
//!
//! Runs the project's `.venv` python (torch, safetensors, onnx and onnxruntime, which
//! `cargo xtask setup` installs), or `$CONVKIT_PYTHON`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use convkit::prelude::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A python with torch, safetensors, onnx and onnxruntime.
fn python() -> PathBuf {
    let python = std::env::var_os("CONVKIT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run `cargo xtask setup` (it installs torch, safetensors, onnx and onnxruntime into .venv), or set CONVKIT_PYTHON to a python that has them",
        python.display()
    );
    python
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A trained model, saved, with a few images and convkit's probabilities for them.
struct Trained {
    name: String,
    checkpoint: PathBuf,
    /// `[n, H, W, C]` normalised images, raw little-endian f32.
    inputs: PathBuf,
    /// The same images' pixel values 0–255.
    pixels: PathBuf,
    probabilities: convkit::ndarray::Array2<f32>,
}

/// Every preset and every small spec (all layer types), trained for one epoch of SGD so biases
/// and moving statistics are not their initial values, on the first end-to-end engine. Half
/// the models were trained on `x / 255`, half on per-channel mean/std.
fn trained_models(dir: &Path) -> Vec<Trained> {
    let engine = common::end_to_end_engines().remove(0);
    let mut specs: Vec<Sequential> = convkit::spec::PRESETS
        .iter()
        .map(|p| Sequential::preset(p).unwrap())
        .collect();
    specs.extend(common::small_specs());
    let mut trained = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let [h, w, c] = spec.input_shape;
        let classes = spec.class_count().unwrap();
        let normalisation = if i % 2 == 0 {
            Normalisation::Rescale
        } else {
            Normalisation::MeanStd {
                mean: (0..c).map(|k| 0.4 + 0.05 * k as f32).collect(),
                std: (0..c).map(|k| 0.2 + 0.03 * k as f32).collect(),
            }
        };
        let raw = synthetic(16, ImageShape::new(h, w, c), classes.max(2), i as u64).unwrap();
        let data = raw.clone().normalise(normalisation.clone());
        let loss = Loss::default_for(spec).unwrap();
        let compile = Compile::new(Optimizer::sgd().with_learning_rate(0.05), loss);
        let mut model = Model::new(spec.clone(), compile, engine.as_ref(), 7).unwrap();
        model
            .fit(&data)
            .epochs(1)
            .batch_size(8)
            .verbosity(Verbosity::Silent)
            .run()
            .unwrap();
        let checkpoint = dir.join(format!("{i}.safetensors"));
        let meta = CheckpointMeta {
            normalisation,
            ..CheckpointMeta::default()
        };
        model.checkpoint(meta).unwrap().save(&checkpoint).unwrap();
        let probe = [0, 5, 10, 15];
        let batch = |ds: &Dataset| {
            let mut x = convkit::ndarray::Array4::zeros((probe.len(), h, w, c));
            ds.select(&probe)
                .fill_batch(&[0, 1, 2, 3], x.view_mut())
                .unwrap();
            x
        };
        let (inputs, pixels) = (dir.join(format!("{i}.in")), dir.join(format!("{i}.pixels")));
        std::fs::write(&inputs, f32_bytes(batch(&data).as_slice().unwrap())).unwrap();
        std::fs::write(&pixels, f32_bytes(batch(&raw).as_slice().unwrap())).unwrap();
        let probabilities = model.predict(&data.select(&probe), 4).unwrap();
        trained.push(Trained {
            name: format!("{} on {}", spec.name, engine.name()),
            checkpoint,
            inputs,
            pixels,
            probabilities,
        });
    }
    trained
}

/// Runs python with `args`; its stdout, or a panic with its stderr when it fails.
fn run_python(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(python()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "python {:?} failed:\n{}",
        args.first(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `python/SCRIPT` with `args`; its stdout.
fn run_script(script: &str, args: &[PathBuf]) -> Vec<u8> {
    let path = root().join("python").join(script);
    let mut all = vec![path.as_os_str()];
    all.extend(args.iter().map(|a| a.as_os_str()));
    run_python(&all)
}

#[test]
fn checkpoints_load_into_pytorch_with_the_same_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let models = trained_models(dir.path());
    let mut args = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let out = dir.path().join(format!("{i}.torch"));
        args.extend([m.checkpoint.clone(), m.inputs.clone(), out]);
    }
    run_script("convkit_torch.py", &args);
    for (i, m) in models.iter().enumerate() {
        let got = read_f32(&dir.path().join(format!("{i}.torch")));
        let worst = max_abs_diff(m.probabilities.iter(), &got);
        assert!(
            worst <= 1e-5,
            "{}: PyTorch's probabilities differ by {worst:e}",
            m.name
        );
    }
}

#[test]
fn onnx_exports_run_in_onnxruntime_with_the_same_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let models = trained_models(dir.path());
    let mut args = Vec::new();
    for (i, m) in models.iter().enumerate() {
        // From Rust: the graph takes normalised images, as `predict_batch` does.
        let checkpoint = Checkpoint::load(&m.checkpoint).unwrap();
        let normalised = dir.path().join(format!("{i}.onnx"));
        OnnxExport::new().save(&checkpoint, &normalised).unwrap();
        args.extend([
            normalised,
            m.inputs.clone(),
            dir.path().join(format!("{i}.ort")),
        ]);
        // From the command line, with the normalisation in the graph: it takes pixel values.
        let pixels = dir.path().join(format!("{i}-pixels.onnx"));
        let out = Command::new(env!("CARGO_BIN_EXE_convkit"))
            .args(["export", "--pixels", "--onnx"])
            .arg(&pixels)
            .arg("--weights")
            .arg(&m.checkpoint)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("pixel values 0–255 (the graph normalises"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        args.extend([
            pixels,
            m.pixels.clone(),
            dir.path().join(format!("{i}.ort-pixels")),
        ]);
    }
    run_script("convkit_onnx.py", &args);
    for (i, m) in models.iter().enumerate() {
        for suffix in ["ort", "ort-pixels"] {
            let got = read_f32(&dir.path().join(format!("{i}.{suffix}")));
            let worst = max_abs_diff(m.probabilities.iter(), &got);
            assert!(
                worst <= 1e-5,
                "{} ({suffix}): onnxruntime's probabilities differ by {worst:e}",
                m.name
            );
        }
    }

    // A file that is not a checkpoint is named, and nothing is written.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x10\0\0\0\0\0\0\0{\"a\": 1}").unwrap();
    let target = dir.path().join("bad.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_convkit"))
        .args(["export", "--onnx"])
        .arg(&target)
        .arg("--weights")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("bad.safetensors"),
        "{stderr}"
    );
    assert!(!target.exists(), "no ONNX file for a bad checkpoint");
}

/// PyTorch models written the PyTorch way (nn.Flatten on NCHW), their state_dicts saved with
/// safetensors, inputs and probabilities written beside them.
const TORCH_MODELS: &str = r#"
import struct, sys, torch
from torch import nn
from safetensors.torch import save_file
torch.manual_seed(0)
out = sys.argv[1]
models = {
    "mnist": (nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10),
                            nn.Softmax(dim=1)), (28, 28, 1)),
    "batchnorm": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3, eps=1e-3), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(12, 4), nn.Tanh(), nn.BatchNorm1d(4, eps=1e-2),
                                nn.Linear(4, 3), nn.Softmax(dim=1)), (6, 6, 2)),
}
for name, (model, (h, w, c)) in models.items():
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    save_file(model.state_dict(), f"{out}/{name}.safetensors")
    x = torch.rand(4, h, w, c)
    with torch.no_grad():
        p = model(x.permute(0, 3, 1, 2))
    for suffix, t in (("in", x), ("out", p)):
        v = t.flatten().tolist()
        open(f"{out}/{name}.{suffix}", "wb").write(struct.pack(f"<{len(v)}f", *v))
state = models["mnist"][0].state_dict()
save_file({("features." + k): v for k, v in state.items()}, f"{out}/renamed.safetensors")
save_file({k: v.double() for k, v in state.items()}, f"{out}/double.safetensors")
"#;

/// The largest difference between `a` and `b`, which must be as long.
fn max_abs_diff<'a>(a: impl ExactSizeIterator<Item = &'a f32>, b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "output sizes differ");
    a.zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn pytorch_state_dicts_load_into_convkit_with_the_same_probabilities() {
    use convkit::pytorch::{weights_from_state_dict, FlattenOrder};
    let dir = tempfile::tempdir().unwrap();
    run_python(&["-c".as_ref(), TORCH_MODELS.as_ref(), dir.path().as_os_str()]);
    let batchnorm = common::small_specs()
        .into_iter()
        .find(|s| s.name == "small-batchnorm")
        .unwrap();
    let cases = [
        ("mnist", Sequential::preset("tutorial-mnist").unwrap()),
        ("batchnorm", batchnorm),
    ];
    for engine in common::end_to_end_engines() {
        for (name, spec) in &cases {
            let path = dir.path().join(format!("{name}.safetensors"));
            let weights = weights_from_state_dict(&path, spec, FlattenOrder::ChannelsFirst)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
            let model =
                Model::with_weights(spec.clone(), compile, engine.as_ref(), &weights).unwrap();
            let [h, w, c] = spec.input_shape;
            let x = convkit::ndarray::Array4::from_shape_vec(
                (4, h, w, c),
                read_f32(&dir.path().join(format!("{name}.in"))),
            )
            .unwrap();
            let got = model.predict_batch(x.view()).unwrap();
            let want = read_f32(&dir.path().join(format!("{name}.out")));
            let worst = max_abs_diff(got.iter(), &want);
            assert!(
                worst <= 1e-5,
                "{name} on {}: differs from PyTorch by {worst:e}",
                engine.name()
            );
        }
    }
    // Files that do not fit name the first tensor that does not.
    let mnist = Sequential::preset("tutorial-mnist").unwrap();
    let error = |file: &str, spec: &Sequential| {
        weights_from_state_dict(&dir.path().join(file), spec, FlattenOrder::ChannelsFirst)
            .unwrap_err()
            .to_string()
    };
    let err = error("renamed.safetensors", &mnist);
    assert!(
        err.contains("features.0.") && err.contains("torch.nn.Sequential"),
        "{err}"
    );
    let err = error("double.safetensors", &mnist);
    assert!(err.contains("expected dtype F32, found F64"), "{err}");
    let err = error(
        "mnist.safetensors",
        &Sequential::preset("tutorial-mnist-3conv").unwrap(),
    );
    assert!(
        err.contains("tensor `7.weight`")
            && err
                .contains("expected shape [64, 64, 3, 3] for `conv2d_2.weight`, found [128, 1600]"),
        "{err}"
    );
    let err = error("batchnorm.safetensors", &mnist);
    assert!(err.contains("tensor `0.weight`"), "{err}");

    // From the command line: the PyTorch base, frozen, with a new head, fine-tuned.
    let run = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_convkit"))
        .args(["train", "--model", "tutorial-mnist", "--init-pytorch"])
        .arg(dir.path().join("mnist.safetensors"))
        .args([
            "--freeze",
            "5",
            "--new-head",
            "10",
            "--epochs",
            "1",
            "--limit",
            "64",
        ])
        .args(["--quiet", "--out"])
        .arg(&run)
        .env("CONVKIT_DATA", common::data_dir())
        .env("CONVKIT_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tuned = Checkpoint::load(&run).unwrap();
    let base = weights_from_state_dict(
        &dir.path().join("mnist.safetensors"),
        &mnist,
        FlattenOrder::ChannelsFirst,
    )
    .unwrap();
    assert_eq!(
        tuned.weights.get("conv2d.weight").unwrap(),
        base.get("conv2d.weight").unwrap(),
        "the frozen base keeps PyTorch's weights"
    );
}

#[test]
fn the_python_builder_maps_every_layer_type_as_the_rust_side_does() {
    let stdout = run_script("convkit_torch.py", &["--mapping".into()]);
    let mapping: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let kinds = LayerKind::one_of_each();
    for kind in &kinds {
        let name = kind.type_name();
        let entry = &mapping[name];
        assert!(
            entry.is_object(),
            "python/convkit_torch.py has no mapping for {name} (TORCH_PARTS and STEMS)"
        );
        assert_eq!(entry["stem"], kind.name_stem(), "{name}'s name stem");
        let parts: Vec<(String, String)> = serde_json::from_value(entry["parts"].clone()).unwrap();
        let rust: Vec<(String, String)> = convkit::pytorch::torch_parts(kind)
            .iter()
            .map(|(torch, ours)| (torch.to_string(), ours.to_string()))
            .collect();
        assert_eq!(parts, rust, "{name}'s PyTorch tensors");
    }
    assert_eq!(
        mapping.as_object().unwrap().len(),
        kinds.len(),
        "python/convkit_torch.py maps types the Rust side does not have: {mapping}"
    );
}
