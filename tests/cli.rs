//! The `convkit` binary: outputs of a run, and clear errors with a non-zero exit on bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn convkit<A: AsRef<std::ffi::OsStr>>(args: &[A]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convkit"))
        .args(args)
        .env("CONVKIT_DATA", common::data_dir())
        .env("CONVKIT_OFFLINE", "1")
        .output()
        .unwrap()
}

/// The engines `convkit backends` lists as usable on this machine, less those kept to the
/// conformance suite ([`common::CONFORMANCE_ONLY`]).
fn listed_engines() -> Vec<String> {
    let listing = text(&convkit(&["backends"]));
    listing
        .lines()
        .filter(|l| !l.contains("unavailable"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|name| !common::CONFORMANCE_ONLY.contains(&name.as_str()))
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn train_evaluate_predict_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let o = convkit(&[
        "train",
        "--dataset",
        "mnist",
        "--model",
        "tutorial-mnist",
        "--epochs",
        "1",
        "--limit",
        "300",
        "--out",
        out_s,
        "--quiet",
        "--optimizer",
        "rmsprop",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = text(&o);
    assert!(
        stdout.contains("test accuracy:")
            && stdout.contains("macro avg")
            && stdout.contains("true\\pred"),
        "{stdout}"
    );
    for f in [
        "model.safetensors",
        "model.json",
        "history.csv",
        "report.txt",
        "metrics.json",
        "predictions.csv",
        "history.png",
        "history.svg",
        "confusion_matrix.png",
        "confusion_matrix.svg",
        "confusion_matrix_normalized.png",
        "samples.png",
        "samples.svg",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    for key in [
        "test_loss",
        "test_accuracy",
        "classes",
        "confusion_matrix",
        "per_class",
        "epoch_seconds",
    ] {
        assert!(metrics.get(key).is_some(), "metrics.json lacks {key}");
    }
    assert_eq!(metrics["confusion_matrix"].as_array().unwrap().len(), 10);
    let preds = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert!(
        preds.starts_with("index,label,predicted,p_0,p_1"),
        "{}",
        &preds[..80]
    );
    assert_eq!(preds.lines().count(), 301);
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    // evaluate the run folder: same accuracy as the training run reported
    let eval_out = dir.path().join("eval");
    let o = convkit(&[
        "evaluate",
        "--weights",
        out_s,
        "--dataset",
        "mnist",
        "--limit",
        "300",
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_out.join("metrics.json")).unwrap())
            .unwrap();
    assert!(
        (again["test_accuracy"].as_f64().unwrap() - metrics["test_accuracy"].as_f64().unwrap())
            .abs()
            < 1e-9
    );

    // predict on PNGs written from test images
    let img = dir.path().join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (10..18).contains(&x) && y > 4 && y < 24 {
            255
        } else {
            0
        }])
    })
    .save(&img)
    .unwrap();
    let o = convkit(&[
        "predict",
        "--weights",
        &format!("{out_s}/model.safetensors"),
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("digit.png: "), "{}", text(&o));
}

#[test]
fn summary_and_backends() {
    let o = convkit(&["summary", "--model", "tutorial-mnist-3conv"]);
    assert!(o.status.success());
    assert!(text(&o).contains("Total params: 93,322"), "{}", text(&o));
    let o = convkit(&["backends"]);
    assert!(o.status.success());
    assert!(text(&o).contains("candle-cpu"), "{}", text(&o));
    // --help shows the choices: the engines compiled in, optimizers, losses; and the exit
    // statuses and environment.
    let o = convkit(&["train", "--help"]);
    let help = text(&o).split_whitespace().collect::<Vec<_>>().join(" ");
    let names = convkit::backend_names();
    let engines = format!(
        "[default: {}] [possible values: {}]",
        names[0],
        names.join(", ")
    );
    for wanted in [
        engines.as_str(),
        "[possible values: sgd, adam, rmsprop]",
        "binary_crossentropy]",
    ] {
        assert!(help.contains(wanted), "`{wanted}` in {help}");
    }
    let o = convkit(&["--help"]);
    assert!(
        text(&o).contains("3 a compare check failed")
            && text(&o).contains("CONVKIT_DATA")
            && text(&o).contains("--threads <N>"),
        "{}",
        text(&o)
    );
    // Shell completion knows the subcommands and the engines compiled in.
    let o = convkit(&["completions", "bash"]);
    let script = text(&o);
    assert!(o.status.success(), "{script}");
    assert!(
        script.contains("complete -F _convkit")
            && script.contains("evaluate")
            && script.contains(names[0]),
        "{script}"
    );
    // A thread count of 0 is a usage error.
    let o = convkit(&["--threads", "0", "backends"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--threads 0: expected at least 1"),
        "{}",
        text(&o)
    );
}

/// `--batch-norm` trains a model with BatchNormalization layers, saves their moving
/// statistics in the checkpoint, and `evaluate` reproduces the run's accuracy from it.
#[test]
fn batch_norm_trains_saves_and_evaluates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bn");
    let out_s = out.to_str().unwrap();
    let o = convkit(&[
        "train",
        "--dataset",
        "mnist",
        "--model",
        "tutorial-mnist",
        "--batch-norm",
        "--epochs",
        "1",
        "--limit",
        "200",
        "--out",
        out_s,
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let spec = std::fs::read_to_string(out.join("model.json")).unwrap();
    assert_eq!(spec.matches("\"BatchNormalization\"").count(), 3, "{spec}");
    let trained: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let eval_out = dir.path().join("eval");
    let o = convkit(&[
        "evaluate",
        "--weights",
        out_s,
        "--dataset",
        "mnist",
        "--limit",
        "200",
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_out.join("metrics.json")).unwrap())
            .unwrap();
    assert!(
        (again["test_accuracy"].as_f64().unwrap() - trained["test_accuracy"].as_f64().unwrap())
            .abs()
            < 1e-9
    );
    let o = convkit(&[
        "summary",
        "--model",
        out.join("model.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("batch_normalization_2 (BatchNormalization)")
            && text(&o).contains("Non-trainable params: 448"),
        "{}",
        text(&o)
    );
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let o = convkit(args);
    let t = text(&o);
    assert!(!o.status.success(), "expected failure for {args:?}: {t}");
    assert!(!t.contains("panicked"), "{t}");
    for n in needles {
        assert!(t.contains(n), "expected `{n}` in: {t}");
    }
}

#[test]
fn bad_input_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let out_s = out.to_str().unwrap();
    fails_with(
        &["train", "--dataset", "imagenet", "--out", out_s],
        &[
            "expected mnist, fashion-mnist, cifar10, synthetic, random or an image folder",
            "imagenet",
        ],
    );
    fails_with(
        &["train", "--model", "tutorial-nope", "--out", out_s],
        &["unknown preset `tutorial-nope`"],
    );
    fails_with(
        &["train", "--backend", "no-such-engine", "--out", out_s],
        &["no-such-engine", "possible values: candle-cpu"],
    );
    fails_with(
        &["train", "--optimizer", "adagrad", "--out", out_s],
        &["adagrad", "possible values: sgd, adam, rmsprop"],
    );
    fails_with(
        &[
            "train",
            "--dataset",
            "mnist",
            "--model",
            "tutorial-cifar10-cnn",
            "--out",
            out_s,
        ],
        &["32×32×3", "28×28×1"],
    );
    fails_with(
        &[
            "train",
            "--loss",
            "binary_crossentropy",
            "--limit",
            "10",
            "--out",
            out_s,
        ],
        &["binary_crossentropy needs one unit"],
    );
    fails_with(
        &["train", "--lr-schedule", "cosine", "--out", out_s],
        &["expected step=FACTOR/EVERY or exp=RATE, found `cosine`"],
    );
    assert!(!out.exists(), "a failed run left files behind");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    fails_with(
        &["evaluate", "--weights", garbage.to_str().unwrap()],
        &["garbage.safetensors", "not a safetensors file"],
    );
    fails_with(
        &[
            "predict",
            "--weights",
            dir.path().join("missing.safetensors").to_str().unwrap(),
            "x.png",
        ],
        &["missing.safetensors"],
    );
    let bad_spec = dir.path().join("spec.json");
    std::fs::write(&bad_spec, r#"{"input_shape":[4,4,1],"layers":[{"type":"MaxPooling2D","pool_size":[2,2]},{"type":"MaxPooling2D","pool_size":[2,2]},{"type":"MaxPooling2D","pool_size":[2,2]}]}"#).unwrap();
    fails_with(
        &["summary", "--model", bad_spec.to_str().unwrap()],
        &[
            "layer 2 (max_pooling2d_2)",
            "does not fit an input height of 1",
        ],
    );
    fails_with(
        &[
            "train",
            "--batch-size",
            "0",
            "--limit",
            "10",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            out_s,
        ],
        &["batch size"],
    );
}

/// `root/<part>/{dark,light}/<i>.jpg`: six RGB images of mixed sizes per class and part.
fn write_shapes(root: &Path, parts: &[&str]) {
    for part in parts {
        for (class, v) in [("dark", 40u8), ("light", 210u8)] {
            let d = root.join(part).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..6 {
                let img = image::RgbImage::from_fn(50 + i, 37, |x, _| {
                    image::Rgb([v, v.saturating_add((x % 7) as u8), v])
                });
                img.save(d.join(format!("{i}.jpg"))).unwrap();
            }
        }
    }
}

/// Unix paths are bytes: a dataset folder, a run folder and image files whose names are not
/// UTF-8 train, resume, predict, and keep their bytes in command.json.
#[cfg(unix)]
#[test]
fn paths_that_are_not_utf8_work_end_to_end() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let odd = |name: &[u8]| dir.path().join(OsStr::from_bytes(name));
    let data = odd(b"data-\xff");
    write_shapes(&data, &[""]);
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, r#"{"name":"tiny","input_shape":[16,16,3],"layers":[{"type":"Flatten"},{"type":"Dense","units":2,"activation":"softmax"}]}"#).unwrap();
    let out = odd(b"run-\xfe");
    let args: Vec<OsString> = vec![
        "train".into(),
        "--dataset".into(),
        data.clone().into(),
        "--model".into(),
        spec.clone().into(),
        "--epochs".into(),
        "1".into(),
        "--batch-size".into(),
        "4".into(),
        "--out".into(),
        out.clone().into(),
    ];
    let o = convkit(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("model.safetensors").is_file());
    let record = std::fs::read_to_string(out.join("command.json")).unwrap();
    assert!(record.contains("unix_bytes"), "{record}");
    // The saved command line, bytes and all, continues the run.
    let o = convkit(&[
        OsStr::new("train"),
        OsStr::new("--resume"),
        out.as_os_str(),
        OsStr::new("--epochs"),
        OsStr::new("2"),
    ]);
    let said = text(&o);
    assert!(o.status.success() && said.contains("Epoch 2/2"), "{said}");
    let image = data.join("dark").join("0.jpg");
    let o = convkit(&[
        OsStr::new("predict"),
        OsStr::new("--weights"),
        out.as_os_str(),
        image.as_os_str(),
    ]);
    let said = text(&o);
    assert!(o.status.success() && said.contains("dark"), "{said}");
}

#[test]
fn image_folders_as_datasets_ship() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    std::fs::write(&spec, r#"{"name":"tiny","input_shape":[16,16,3],"layers":[{"type":"Conv2D","filters":4,"kernel_size":[3,3],"activation":"relu"},{"type":"MaxPooling2D","pool_size":[2,2]},{"type":"Flatten"},{"type":"Dense","units":2,"activation":"softmax"}]}"#).unwrap();
    let train = |root: &Path, extra: &[&str]| {
        let out = root.with_extension("run");
        let mut args = vec![
            "train",
            "--dataset",
            root.to_str().unwrap(),
            "--model",
            spec.to_str().unwrap(),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = convkit(&args);
        let metrics = std::fs::read_to_string(out.join("metrics.json"))
            .map(|m| serde_json::from_str::<serde_json::Value>(&m).unwrap());
        (o, metrics)
    };
    // train/ + val/ + test/: validation from val/, scored on test/.
    let full = dir.path().join("full");
    write_shapes(&full, &["train", "val", "test"]);
    let (o, metrics) = train(&full, &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("train: 12 images from")
            && out.contains("validation: 12 images from")
            && out.contains("full/val"),
        "{out}"
    );
    assert!(out.contains("scored on the test data"), "{out}");
    // Off a terminal, progress is plain lines on stdout, as Keras prints them.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("Epoch 2/2 - 3/3 - "), "{stdout}");
    let metrics = metrics.unwrap();
    assert_eq!(metrics["classes"], serde_json::json!(["dark", "light"]));
    assert_eq!(metrics["scored_on"], "test");
    assert!(full.with_extension("run").join("samples.png").is_file());

    // train/ + val/ only (the common download layout): scored on val/, and it says so.
    let two = dir.path().join("two");
    write_shapes(&two, &["train", "val"]);
    let (o, metrics) = train(&two, &["--quiet"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("scored on the validation data"),
        "{}",
        text(&o)
    );
    assert_eq!(metrics.unwrap()["scored_on"], "validation");
    // A hold-out beside a val/ folder is ambiguous, and test data is not there to validate on.
    let (o, _) = train(&two, &["--validation-split", "0.5"]);
    assert!(
        !o.status.success() && text(&o).contains("has its own validation data"),
        "{}",
        text(&o)
    );
    let (o, _) = train(&two, &["--validate-on-test"]);
    assert!(
        !o.status.success() && text(&o).contains("no test split"),
        "{}",
        text(&o)
    );

    // One folder of class folders: a seeded hold-out, as image_dataset_from_directory.
    let pool = dir.path().join("pool");
    write_shapes(&pool, &[""]);
    let (o, metrics) = train(
        &pool,
        &["--validation-split", "0.25", "--early-stopping", "1"],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("train: 9 images")
            && out.contains("validation: 3 images held out from the training data (25%, seed 42)"),
        "{out}"
    );
    assert!(
        out.contains("Restoring model weights from the end of the best epoch: "),
        "{out}"
    );
    assert_eq!(metrics.unwrap()["validation_images"], 3);
    // Without any validation the finished model is scored on its training data, said so.
    let (o, metrics) = train(&pool, &["--validation-split", "0", "--overwrite"]);
    assert!(
        o.status.success() && text(&o).contains("scored on the training data"),
        "{}",
        text(&o)
    );
    assert_eq!(metrics.unwrap()["scored_on"], "training");
    // Four images: the default hold-out steps aside, with a line, and the run trains.
    let four = dir.path().join("four");
    write_shapes(&four, &[""]);
    for class in ["dark", "light"] {
        for i in 2..6 {
            std::fs::remove_file(four.join(class).join(format!("{i}.jpg"))).unwrap();
        }
    }
    let (o, _) = train(&four, &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("train: 4 images")
            && out.contains("hold-out of 4 images would leave an empty part"),
        "{out}"
    );
    // Early stopping on val_loss without validation data is refused before any epoch runs.
    let (o, _) = train(&four, &["--early-stopping", "1", "--overwrite"]);
    let out = text(&o);
    assert!(
        !o.status.success()
            && out.contains("EarlyStopping monitors val_loss, but this fit has no validation data")
            && out.contains("or monitor loss instead")
            && !out.contains("Epoch 1/"),
        "{out}"
    );

    // The tutorial's literal validation_data = test, when asked for (in the first run's
    // folder, which it replaces).
    let (o, _) = train(
        &full,
        &["--validate-on-test", "--limit", "4", "--overwrite"],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("model selection sees the test split")
            && out.contains("class-balanced sample"),
        "{out}"
    );
}

#[test]
fn every_engine_trains_from_the_cli_with_the_same_outcome() {
    let names = listed_engines();
    assert!(names.iter().any(|n| n == "candle-cpu"), "{names:?}");
    let dir = tempfile::tempdir().unwrap();
    let mut outcomes = Vec::new();
    for name in &names {
        let out = dir.path().join(name);
        let o = convkit(&[
            "train",
            "--backend",
            name,
            "--epochs",
            "1",
            "--limit",
            "256",
            "--optimizer",
            "sgd",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["backend"], *name);
        let predicted: Vec<String> = std::fs::read_to_string(out.join("predictions.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().to_string())
            .collect();
        outcomes.push((
            name,
            metrics["test_accuracy"].as_f64().unwrap(),
            metrics["test_loss"].as_f64().unwrap(),
            predicted,
        ));
    }
    let (first, acc0, loss0, pred0) = &outcomes[0];
    for (name, acc, loss, pred) in &outcomes[1..] {
        // Same initial weights and batches: the engines may differ only by float rounding.
        assert!(
            (acc - acc0).abs() <= 0.01,
            "{name} accuracy {acc} vs {first} {acc0}"
        );
        assert!(
            (loss - loss0).abs() <= 1e-3,
            "{name} loss {loss} vs {first} {loss0}"
        );
        let same = pred.iter().zip(pred0).filter(|(a, b)| a == b).count();
        assert!(
            same as f64 >= 0.99 * pred.len() as f64,
            "{name} and {first} agree on {same} of {} predictions",
            pred.len()
        );
    }
}

/// `convkit` with `env` set besides [`convkit`]'s.
fn convkit_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convkit"))
        .args(args)
        .env("CONVKIT_DATA", common::data_dir())
        .env("CONVKIT_OFFLINE", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn compare_reports_agreement_and_speed_and_survives_a_failing_engine() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    // torch.compile left out here (a minute of compiling); `the_tuned_pytorch_row_compiles`
    // runs it.
    let o = convkit_with(
        &[
            "compare",
            "--dataset",
            "mnist",
            "--limit",
            "256",
            "--out",
            out.to_str().unwrap(),
        ],
        &[("CONVKIT_TORCH_COMPILE", "0")],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for f in [
        "compare.md",
        "compare.json",
        "compare.csv",
        "throughput.png",
        "loss.png",
        "accuracy.png",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("## Agreement") && md.contains("## Speed") && md.contains("Overall: PASS"),
        "{md}"
    );
    assert!(md.contains("GFLOP/s"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert!(json["machine_peak_gflops"].as_f64().unwrap() > 0.0);
    // By default, engines too slow to finish in minutes are named with the reason, not run.
    let engines_in = |list: &str, key: &str| -> Vec<String> {
        json[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[key].as_str().unwrap().to_string())
            .collect()
    };
    let (left_out, ran) = (
        engines_in("left_out", "engine"),
        engines_in("runs", "backend"),
    );
    if convkit::backend_names().contains(&"burn-ndarray") {
        let ndarray = "burn-ndarray".to_string();
        assert!(
            left_out.contains(&ndarray) && !ran.contains(&ndarray),
            "{md}"
        );
        assert!(
            md.contains("Not run (name an engine, or `--backends all`, to run it anyway)")
                && md.contains("- burn-ndarray: burn deprecates NdArray"),
            "{md}"
        );
    }
    for name in &ran {
        assert!(
            !left_out.contains(name),
            "{name} both ran and was left out: {md}"
        );
    }
    let engines = json["runs"].as_array().unwrap().len();
    if engines > 1 {
        assert!(
            md.contains("weights after one SGD step") && md.contains("PASS"),
            "{md}"
        );
    }
    // PyTorch itself, eager then tuned, are the last rows (the checkout's .venv has torch):
    // checked like engines, and every engine's time is given as a ratio to the faster one.
    assert_eq!(ran[ran.len() - 2..], ["pytorch", "pytorch-tuned"], "{md}");
    assert!(
        md.contains("| pytorch | CPU")
            && md.contains("(PyTorch 2.9.0")
            && md.contains("| pytorch-tuned | CPU")
            && md.contains(
                "channels_last, torch.compile left out (CONVKIT_TORCH_COMPILE=0), fused adam)"
            )
            && md.contains("| 1.00× |")
            && md.contains("× fastest PyTorch"),
        "{md}"
    );
    // onnxruntime runs convkit's ONNX export of the same model as the inference yardstick.
    assert!(
        md.contains("Inference yardstick: onnxruntime 1.32.0 on convkit's ONNX export"),
        "{md}"
    );
    assert!(
        json["onnxruntime"]["Ok"]["images_per_second"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{md}"
    );
    // The peak names the CPU, how it was measured and gemm's rate beside it.
    let method = json["peak_method"].as_str().unwrap();
    assert!(
        method.contains("fused multiply-adds on")
            && method.contains("gemm's")
            && (method.contains("x86-64") || cfg!(not(target_arch = "x86_64"))),
        "{method}"
    );
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["engine"] == "pytorch"
                && c["check"] == "weights after one SGD step (max abs)"),
        "{md}"
    );
    // A model with Dropout: PyTorch would draw its own masks, so its row is left out, saying why.
    let spec = dir.path().join("dropout.json");
    use convkit::{Activation, Dense, Dropout, Sequential};
    Sequential::new(8, 8, 1)
        .flatten()
        .add(Dropout::new(0.5))
        .add(Dense::new(10).activation(Activation::Softmax))
        .save_json(&spec)
        .unwrap();
    let out3 = dir.path().join("cmp3");
    let o = convkit(&[
        "compare",
        "--backends",
        "candle-cpu,pytorch",
        "--dataset",
        "synthetic",
        "--limit",
        "64",
        "--model",
        spec.to_str().unwrap(),
        "--out",
        out3.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let md = std::fs::read_to_string(out3.join("compare.md")).unwrap();
    assert!(md.contains("- pytorch: `sequential` has Dropout"), "{md}");

    // An engine that is not compiled in fails alone: the others' results are still written.
    let out2 = dir.path().join("cmp2");
    let o = convkit(&[
        "compare",
        "--backends",
        "candle-cpu,no-such-engine",
        "--dataset",
        "mnist",
        "--limit",
        "64",
        "--out",
        out2.to_str().unwrap(),
    ]);
    let t = text(&o);
    // Exit status 3: the comparison ran and a check failed (1 is an error, 2 bad arguments).
    assert_eq!(o.status.code(), Some(3), "{t}");
    assert!(t.contains("unknown backend `no-such-engine`"), "{t}");
    let md = std::fs::read_to_string(out2.join("compare.md")).unwrap();
    assert!(
        md.contains("| candle-cpu | CPU")
            && md.contains("no-such-engine | FAILED")
            && md.contains("Overall: FAIL"),
        "{md}"
    );

    // A missing dataset: a clear message, no panic.
    let o = convkit(&[
        "compare",
        "--dataset",
        "cifar10",
        "--backends",
        "candle-cpu",
        "--out",
        dir.path().join("c3").to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(!o.status.success() && !t.contains("panicked"), "{t}");
}

#[test]
fn the_tuned_pytorch_row_compiles_its_model_and_keeps_the_compile_out_of_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned");
    let o = convkit(&[
        "compare",
        "--backends",
        "pytorch-tuned",
        "--dataset",
        "mnist",
        "--limit",
        "128",
        "--out",
        out.to_str().unwrap(),
    ]);
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap_or_default();
    assert!(o.status.success(), "{}\n{md}", text(&o));
    assert!(
        md.contains("| pytorch-tuned | CPU")
            && md.contains("channels_last, torch.compile (")
            && md.contains("s to compile, not counted), fused adam)"),
        "{md}"
    );
}

/// Peak resident memory of one engine's compare worker on `limit` images.
fn worker_peak_rss(engine: &str, limit: usize, dir: &Path) -> f64 {
    let o = convkit(&[
        "compare-worker",
        "--backends",
        engine,
        "--dataset",
        "mnist",
        "--limit",
        &limit.to_string(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{engine}.json"))).unwrap())
            .unwrap();
    run["peak_rss_bytes"].as_f64().unwrap()
}

#[test]
fn training_memory_does_not_grow_with_the_number_of_steps() {
    // A leak once kept every step's autograd graph alive through the optimizer state.
    let dir = tempfile::tempdir().unwrap();
    for engine in listed_engines().iter().map(String::as_str) {
        let short = worker_peak_rss(engine, 320, dir.path());
        let long = worker_peak_rss(engine, 2560, dir.path());
        assert!(
            long < short * 1.3 + 64e6,
            "{engine}: peak memory {:.0} MiB after 80 steps vs {:.0} MiB after 10",
            long / 1048576.0,
            short / 1048576.0
        );
    }
}

#[test]
fn fine_tune_with_frozen_layers_and_a_new_head_on_another_engine() {
    let engines = listed_engines();
    let (first, second) = (engines[0].as_str(), engines.last().unwrap().as_str());
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let o = convkit(&[
        "train",
        "--backend",
        first,
        "--epochs",
        "1",
        "--limit",
        "256",
        "--quiet",
        "--out",
        base.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // A two-class folder of 28×28 grey images of another size and format.
    let root = dir.path().join("bars");
    for split in ["train", "test"] {
        for (class, vertical) in [("horizontal", false), ("vertical", true)] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..8u32 {
                let img = image::GrayImage::from_fn(40, 40, |x, y| {
                    image::Luma([if (if vertical { x } else { y }) / 5 % 2 == i % 2 {
                        230
                    } else {
                        10
                    }])
                });
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    // `train` from the base run on the bars, batches of 4, with `edits`, into `out`.
    let fine_tune = |out: &Path, edits: &[&str]| {
        let start = ["train", "--init-weights", base.to_str().unwrap()];
        let data = ["--dataset", root.to_str().unwrap(), "--batch-size", "4"];
        convkit(&[&start[..], edits, &data, &["--out", out.to_str().unwrap()]].concat())
    };
    let tuned = dir.path().join("tuned");
    let o = fine_tune(
        &tuned,
        &[
            "--backend",
            second,
            "--freeze",
            "4",
            "--new-head",
            "2",
            "--epochs",
            "2",
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("Non-trainable params: 18,816"), "{t}");
    let before = convkit::Checkpoint::load(&base).unwrap();
    let after = convkit::Checkpoint::load(&tuned).unwrap();
    for name in [
        "conv2d.weight",
        "conv2d.bias",
        "conv2d_1.weight",
        "conv2d_1.bias",
    ] {
        assert_eq!(
            before.weights.get(name).unwrap(),
            after.weights.get(name).unwrap(),
            "frozen {name} changed ({first} -> {second})"
        );
    }
    assert_eq!(
        after.weights.get("dense_1.weight").unwrap().shape,
        vec![2, 128]
    );
    assert!(
        !after.spec.layers[0].trainable && after.spec.layers[4].trainable,
        "freezing is saved in the checkpoint"
    );
    assert_eq!(after.meta.classes, vec!["horizontal", "vertical"]);

    // The guide's way: remove the fully connected layers, add new ones, freeze up to a layer.
    let stacked = dir.path().join("stacked");
    let o = fine_tune(
        &stacked,
        &[
            "--backend",
            second,
            "--freeze",
            "max_pooling2d_1",
            "--new-head",
            "Dense 32 relu, Dropout 0.5, Dense 2 softmax",
            "--epochs",
            "1",
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let after = convkit::Checkpoint::load(&stacked).unwrap();
    let kinds: Vec<&str> = after
        .spec
        .layers
        .iter()
        .map(|l| l.kind.type_name())
        .collect();
    assert_eq!(
        kinds,
        [
            "Conv2D",
            "MaxPooling2D",
            "Conv2D",
            "MaxPooling2D",
            "Flatten",
            "Dense",
            "Dropout",
            "Dense"
        ]
    );
    assert_eq!(
        after.weights.get("head_1_dense.weight").unwrap().shape,
        vec![32, 1600]
    );
    assert_eq!(
        after.weights.get("head_3_dense.weight").unwrap().shape,
        vec![2, 32]
    );
    assert!(!after.spec.layers[3].trainable && after.spec.layers[4].trainable);
    assert_eq!(
        before.weights.get("conv2d_1.weight").unwrap(),
        after.weights.get("conv2d_1.weight").unwrap()
    );
    // --remove-layers: keep the trained Dense(128) and add a head after it.
    let kept = dir.path().join("kept");
    let o = fine_tune(
        &kept,
        &[
            "--new-head",
            "Dense 2 softmax",
            "--remove-layers",
            "1",
            "--epochs",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let after = convkit::Checkpoint::load(&kept).unwrap();
    assert_eq!(after.spec.layers.len(), 7);
    assert_eq!(
        after.weights.get("dense.weight").unwrap().shape,
        vec![128, 1600]
    );
    assert_eq!(
        after.weights.get("head_1_dense.weight").unwrap().shape,
        vec![2, 128]
    );

    let out = dir.path().join("never");
    let refused = |edit: [&str; 2], says: &[&str]| {
        let start = ["train", "--init-weights", base.to_str().unwrap()];
        fails_with(
            &[&start[..], &edit, &["--out", out.to_str().unwrap()]].concat(),
            says,
        );
    };
    refused(
        ["--new-head", "Dense 2 softmax, Conv 3"],
        &["`Conv 3`", "expected Dense UNITS [ACTIVATION]"],
    );
    refused(
        ["--freeze", "conv9"],
        &["no layer `conv9`", "conv2d, max_pooling2d"],
    );
    refused(["--new-head", "0"], &["new head", "at least one unit"]);
    refused(["--freeze", "99"], &["cannot freeze the first 99"]);
}

#[test]
fn evaluate_an_ensemble_by_average_and_by_vote() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for seed in ["1", "2", "3"] {
        let out = dir.path().join(format!("m{seed}"));
        let o = convkit(&[
            "train",
            "--epochs",
            "1",
            "--limit",
            "200",
            "--seed",
            seed,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        runs.push(out.to_str().unwrap().to_string());
    }
    for how in ["average", "vote"] {
        let out = dir.path().join(format!("ens-{how}"));
        let mut args = vec![
            "evaluate",
            "--limit",
            "200",
            "--ensemble",
            how,
            "--out",
            out.to_str().unwrap(),
        ];
        for r in &runs {
            args.extend(["--weights", r.as_str()]);
        }
        let o = convkit(&args);
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(
            t.contains("ensemble of 3 models")
                && t.contains("macro avg")
                && t.matches("test accuracy").count() >= 4,
            "{t}"
        );
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        assert!(
            metrics["test_accuracy"].as_f64().unwrap() > 0.3,
            "{how}: {metrics}"
        );
    }
    fails_with(
        &["evaluate", "--weights", &runs[0], "--ensemble", "median"],
        &["expected average or vote"],
    );
}

#[test]
fn augmented_training_writes_examples_and_rejects_bad_specs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("aug");
    let o = convkit(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "128",
        "--augment",
        "rotate=10,shift=0.1,zoom=0.1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let img = image::open(out.join("augmented.png")).unwrap();
    assert!(img.width() > 100 && img.height() > 100);
    fails_with(
        &[
            "train",
            "--augment",
            "rotate=10,blur",
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ],
        &["unknown `blur`"],
    );
}

#[test]
fn search_ranks_trials_and_saves_the_best_spec() {
    let dir = tempfile::tempdir().unwrap();
    let space = dir.path().join("space.toml");
    std::fs::write(&space, "model = \"tutorial-mnist\"\ndataset = \"mnist\"\nlimit = 256\nvalidation_split = 0.25\n[space]\noptimizer = [\"adam\", \"sgd\"]\nfilters = [8, 16]\ndropout = [0.0, 0.3]\n").unwrap();
    let out = dir.path().join("search");
    let o = convkit(&[
        "search",
        "--space",
        space.to_str().unwrap(),
        "--trials",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(out.join("search.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        lines[0]
            .starts_with("trial,optimizer,learning_rate,batch_size,filters,dropout,conv_blocks,kernel_size,dense_units,params,val_accuracy"),
        "{csv}"
    );
    let acc: Vec<f64> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(10).unwrap().parse().unwrap())
        .collect();
    assert!(acc.windows(2).all(|w| w[0] >= w[1]), "not sorted: {acc:?}");
    let best = convkit::Sequential::load_json(&out.join("best_model.json")).unwrap();
    assert!(best.layers.iter().any(
        |l| matches!(&l.kind, convkit::LayerKind::Conv2D(c) if c.filters == 8 || c.filters == 16)
    ));

    // Interrupted in the middle of writing trial 4's line, then resumed for five trials: the
    // three logged are not run again, and the table has all five.
    let log = out.join("trials.jsonl");
    let mut torn = std::fs::read_to_string(&log).unwrap();
    assert_eq!(torn.lines().count(), 3, "{torn}");
    torn.push_str("{\"index\":4,\"opt");
    std::fs::write(&log, torn).unwrap();
    let search = |trials: &str, space: &Path| {
        convkit(&[
            "search",
            "--space",
            space.to_str().unwrap(),
            "--trials",
            trials,
            "--out",
            out.to_str().unwrap(),
            "--resume",
        ])
    };
    let o = search("5", &space);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        text(&o).matches("logged before, not run again").count(),
        3,
        "{}",
        text(&o)
    );
    let csv = std::fs::read_to_string(out.join("search.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 5);
    // A changed space does not silently mix two searches.
    let changed = dir.path().join("changed.toml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&space)
            .unwrap()
            .replace("\"adam\", \"sgd\"", "\"rmsprop\""),
    )
    .unwrap();
    let o = search("5", &changed);
    assert!(
        !o.status.success() && text(&o).contains("trial 1 was"),
        "{}",
        text(&o)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[space]\noptimizer = [\"adagrad\"]\n").unwrap();
    fails_with(
        &["search", "--space", bad.to_str().unwrap()],
        &["expected sgd, adam or rmsprop"],
    );
}

#[test]
fn a_nan_loss_stops_with_an_error_and_keeps_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let o = convkit(&[
        "train",
        "--dataset",
        "mnist",
        "--limit",
        "128",
        "--epochs",
        "2",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "3e38",
        "--quiet",
        "--out",
        out_s,
    ]);
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("training loss became")
            && err.contains("at epoch 1, batch ")
            && err.contains("the weights from the start of epoch 1")
            && err.contains("saved the last finite weights to"),
        "{err}"
    );
    let o = convkit(&[
        "evaluate",
        "--weights",
        out_s,
        "--dataset",
        "mnist",
        "--limit",
        "64",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_huge_model_spec_is_refused_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("huge.json");
    std::fs::write(&spec, r#"{"name":"huge","input_shape":[100,100,1],"layers":[{"type":"Flatten"},{"type":"Dense","units":1000000}]}"#).unwrap();
    let spec = spec.to_str().unwrap();
    let o = convkit(&["summary", "--model", spec]);
    let err = text(&o);
    assert!(
        !o.status.success()
            && err.contains("10,001,000,000 parameters")
            && err.contains("--allow-large-model"),
        "{err}"
    );
    let o = convkit(&["summary", "--model", spec, "--allow-large-model"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Total params: 10,001,000,000"),
        "{}",
        text(&o)
    );
}

/// A run killed after an epoch and continued with `--resume` ends with the weights and history
/// of a run that was never interrupted: the optimizer's slots, the learning rate lowered by
/// ReduceLROnPlateau, EarlyStopping's best weights, the shuffle order and the History carry over.
#[test]
fn a_killed_run_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut interrupted = Vec::new();
    for name in listed_engines() {
        let run = |out: &Path| -> Vec<String> {
            [
                "train",
                "--backend",
                &name,
                "--epochs",
                "3",
                "--limit",
                "256",
                "--optimizer",
                "adam",
                "--reduce-lr",
                "monitor=val_loss,factor=0.5,patience=1,cooldown=1",
                "--early-stopping",
                "monitor=val_accuracy,patience=5,restore_best=true",
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec()
        };
        let whole = dir.path().join(format!("{name}-whole"));
        let o = convkit(&run(&whole).iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{name}: {}", text(&o));

        let cut = dir.path().join(format!("{name}-cut"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_convkit"))
            .args(run(&cut))
            .env("CONVKIT_DATA", common::data_dir())
            .env("CONVKIT_OFFLINE", "1")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Killed as soon as an epoch is backed up (later, if the run is quicker than this loop).
        let start = std::time::Instant::now();
        while !cut.join("last.safetensors").exists() {
            assert!(child.try_wait().unwrap().is_none() || cut.join("last.safetensors").exists());
            assert!(
                start.elapsed().as_secs() < 300,
                "{name}: no epoch finished in 5 min"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if !cut.join("model.safetensors").exists() {
            interrupted.push(name.clone());
        }
        let o = convkit(&["train", "--resume", cut.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", text(&o));

        let load = |run: &Path| convkit::Checkpoint::load(&run.join("model.safetensors")).unwrap();
        let diffs = load(&cut)
            .weights
            .max_abs_diff(&load(&whole).weights)
            .unwrap();
        let (tensor, worst) =
            diffs
                .into_iter()
                .fold((String::new(), 0f32), |a, b| if b.1 > a.1 { b } else { a });
        assert!(
            worst <= 1e-6,
            "{name}: resumed `{tensor}` differs by {worst:e}"
        );
        // The histories agree but for the epochs' durations.
        let history = |run: &Path| -> Vec<String> {
            let csv = std::fs::read_to_string(run.join("history.csv")).unwrap();
            let seconds = csv
                .lines()
                .next()
                .unwrap()
                .split(',')
                .position(|c| c == "seconds");
            csv.lines()
                .map(|l| {
                    let mut cells: Vec<&str> = l.split(',').collect();
                    cells.remove(seconds.expect("a seconds column"));
                    cells.join(",")
                })
                .collect()
        };
        assert_eq!(history(&cut), history(&whole), "{name}");
        assert!(cut.join("best.safetensors").exists());
    }
    assert!(
        !interrupted.is_empty(),
        "every run finished before it was killed"
    );
    // --resume takes the run's own arguments (but --epochs), and needs a run that finished
    // an epoch.
    let some_run = dir.path().join("candle-cpu-cut");
    fails_with(
        &[
            "train",
            "--resume",
            some_run.to_str().unwrap(),
            "--seed",
            "9",
        ],
        &["give no other argument but --epochs"],
    );
    fails_with(
        &[
            "train",
            "--resume",
            dir.path().join("nothing").to_str().unwrap(),
        ],
        &["command.json"],
    );
}

#[test]
fn a_run_folder_is_never_started_over_unasked_and_a_finished_run_trains_further() {
    let dir = tempfile::tempdir().unwrap();
    let train = |out: &Path, epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--dataset",
            "mnist",
            "--limit",
            "96",
            "--epochs",
            epochs,
            "--quiet",
            "--out",
        ];
        args.push(out.to_str().unwrap());
        args.extend(extra);
        convkit(&args)
    };
    let run = dir.path().join("run");
    let o = train(&run, "1", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let backup = std::fs::read(run.join("last.safetensors")).unwrap();
    // Into a folder that holds a run: refused, and nothing in it touched.
    let o = train(&run, "1", &["--seed", "7"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("--resume") && text(&o).contains("--overwrite"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), backup);
    // --resume RUN --epochs N trains the finished run further, as one N-epoch run would.
    let o = convkit(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let whole = dir.path().join("whole");
    let o = train(&whole, "2", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let load = |run: &Path| convkit::Checkpoint::load(&run.join("model.safetensors")).unwrap();
    let worst = (load(&run)
        .weights
        .max_abs_diff(&load(&whole).weights)
        .unwrap())
    .into_iter()
    .map(|(_, d)| d)
    .fold(0f32, f32::max);
    assert!(worst <= 1e-6, "the extended run differs by {worst:e}");
    let epochs = |run: &Path| {
        std::fs::read_to_string(run.join("history.csv"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(epochs(&run), 3, "a header and two epochs");
    // Resumed again later, it keeps its new length: nothing more to train.
    let o = convkit(&["train", "--resume", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(epochs(&run), 3);
    // --overwrite starts over in it.
    let o = train(&run, "1", &["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(epochs(&run), 2);
}

/// The tutorials' `Dense(num_classes)` and `image_size`: a preset takes the data's classes,
/// and named datasets are resized and converted to the model's input when asked.
#[test]
fn presets_fit_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, args: &[&str]| {
        let out = dir.path().join(name);
        let mut all = vec!["train", "--epochs", "1", "--batch-size", "8", "--out"];
        all.push(out.to_str().unwrap());
        all.extend(args);
        let o = convkit(&all);
        (o, out)
    };
    let last_units = |out: &Path| {
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap())
                .unwrap();
        spec["layers"].as_array().unwrap().last().unwrap()["units"].clone()
    };

    // A 2-class folder of RGB photos of any size, and the MNIST preset: no extra flag.
    let pool = dir.path().join("shapes");
    write_shapes(&pool, &["train", "test"]);
    let (o, out) = run(
        "shapes-run",
        &[
            "--dataset",
            pool.to_str().unwrap(),
            "--model",
            "tutorial-mnist",
        ],
    );
    let said = text(&o);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("tutorial-mnist: its classifier takes the data's 2 classes (was 10)"),
        "{said}"
    );
    assert_eq!(last_units(&out), 2);

    // A spec file keeps its own classifier: 2 classes against MNIST's 10 is an error.
    let spec = dir.path().join("two.json");
    std::fs::write(&spec, r#"{"name":"two","input_shape":[28,28,1],"layers":[{"type":"Flatten"},{"type":"Dense","units":2,"activation":"softmax"}]}"#).unwrap();
    let (o, _) = run(
        "two-run",
        &[
            "--dataset",
            "mnist",
            "--limit",
            "40",
            "--model",
            spec.to_str().unwrap(),
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("10 classes"),
        "{}",
        text(&o)
    );

    // CIFAR-10 (32×32) into the guide's 64×64 model: an error naming the flag, then resized.
    let cifar = [
        "--dataset",
        "cifar10",
        "--limit",
        "40",
        "--model",
        "tutorial-64x64",
    ];
    let (o, _) = run("cifar-refused", &cifar);
    let said = text(&o);
    assert!(
        !o.status.success() && said.contains("--image-size 64 64"),
        "{said}"
    );
    let (o, _) = run(
        "cifar-wrong-size",
        &[&cifar[..], &["--image-size", "32", "32"]].concat(),
    );
    let said = text(&o);
    assert!(
        !o.status.success() && said.contains("--image-size 64 64: the input size of model"),
        "{said}"
    );
    let (o, out) = run(
        "cifar-64",
        &[&cifar[..], &["--image-size", "64", "64"]].concat(),
    );
    let said = text(&o);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("resized from 32×32 to 64×64 (bilinear)"),
        "{said}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["scored_images"], 40);

    // Grey MNIST into the RGB CIFAR-10 CNN: resized and converted, saying both.
    let (o, _) = run(
        "mnist-rgb",
        &[
            "--dataset",
            "mnist",
            "--limit",
            "40",
            "--model",
            "tutorial-cifar10-cnn",
            "--image-size",
            "32",
            "32",
        ],
    );
    let said = text(&o);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("resized from 28×28 to 32×32 (bilinear) and converted from grey to RGB"),
        "{said}"
    );
}

/// Tutorial 1 as written: 100 noise images of 100×100×3, soft targets uniform in [0, 1],
/// Conv2D 32 → MaxPooling → Flatten → Dense 1 sigmoid, adam, binary cross-entropy, 10 epochs.
#[test]
fn the_first_tutorial_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("random");
    let args = [
        "train",
        "--dataset",
        "random",
        "--model",
        "tutorial-random",
        "--optimizer",
        "adam",
        "--epochs",
        "10",
        "--validation-split",
        "0",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = convkit(&args);
    let said = text(&o);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("train: 100 images of random 100×100×3 data"),
        "{said}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["loss"], "binary_crossentropy");
    assert_eq!(metrics["epochs_run"], 10);
    // Soft targets: the cross-entropy of uniform targets cannot fall below their mean
    // entropy (0.5 nats), and a model that learns nothing sits near ln 2.
    let test_loss = metrics["test_loss"].as_f64().unwrap();
    assert!(test_loss > 0.45, "{metrics}");
    // Sparse cross-entropy takes class indices: soft targets are refused, saying why.
    let o = convkit(
        &[
            &args[..args.len() - 2],
            &[
                "--new-head",
                "2",
                "--loss",
                "sparse_categorical_crossentropy",
                "--overwrite",
                "--out",
                out.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let said = text(&o);
    assert!(
        !o.status.success() && said.contains("this data has soft targets"),
        "{said}"
    );
}

/// The guide's search over "the number of layers, and filter sizes": conv blocks, kernel sizes
/// and dense units, each trial's parameter count in the table.
#[test]
fn search_varies_the_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let space = dir.path().join("space.toml");
    let head = "model = \"tutorial-mnist\"\ndataset = \"mnist\"\nlimit = 128\nvalidation_split = 0.25\n[space]\n";
    std::fs::write(
        &space,
        format!("{head}conv_blocks = [1, 2]\nkernel_size = [3, 5]\ndense_units = [16]\n"),
    )
    .unwrap();
    let out = dir.path().join("search");
    let o = convkit(&[
        "search",
        "--space",
        space.to_str().unwrap(),
        "--trials",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let table = csv_rows(&out.join("search.csv"));
    let mut rows: Vec<(u32, u32, u32, u64)> = table
        .iter()
        .map(|r| {
            (
                r["conv_blocks"].parse().unwrap(),
                r["kernel_size"].parse().unwrap(),
                r["dense_units"].parse().unwrap(),
                r["params"].parse().unwrap(),
            )
        })
        .collect();
    rows.sort();
    // Parameters as Keras counts them: conv 3×3×1×32 + 32, then (13·13·32)·16 + 16 and 16·10 + 10.
    assert_eq!(rows[0], (1, 3, 16, 320 + 5408 * 16 + 16 + 170));
    assert_eq!(
        rows.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        [(1, 3), (1, 5), (2, 3), (2, 5)]
    );
    let best = convkit::Sequential::load_json(&out.join("best_model.json")).unwrap();
    assert!(best
        .layers
        .iter()
        .any(|l| matches!(&l.kind, convkit::LayerKind::Dense(d) if d.units == 16)));

    // A space whose models do not fit the input stops before any trial trains.
    std::fs::write(&space, format!("{head}conv_blocks = [2, 4]\n")).unwrap();
    let o = convkit(&[
        "search",
        "--space",
        space.to_str().unwrap(),
        "--out",
        dir.path().join("never").to_str().unwrap(),
    ]);
    let said = text(&o);
    assert!(
        !o.status.success() && said.contains("trial 2: trial") && said.contains("does not fit"),
        "{said}"
    );
    assert!(!said.contains("val_accuracy"), "{said}");
}

/// The rows of a CSV file as column → text maps.
fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let names: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            names
                .iter()
                .cloned()
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

/// Keras' RandomCrop from the command line: random windows in training, the centre at
/// inference, kept in the checkpoint and its ONNX export.
#[test]
fn a_random_crop_trains_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("crop");
    let o = convkit(&[
        "train",
        "--limit",
        "64",
        "--epochs",
        "1",
        "--random-crop",
        "24",
        "24",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let checkpoint = convkit::Checkpoint::load(&out).unwrap();
    assert_eq!(checkpoint.spec.input_shape, [28, 28, 1]);
    assert!(matches!(
        checkpoint.spec.layers[0].kind,
        convkit::LayerKind::RandomCrop(convkit::RandomCrop {
            height: 24,
            width: 24
        })
    ));
    // 24 → 22 → 11 → 9 → 4: a Dense on 4·4·64 features.
    assert_eq!(
        checkpoint.weights.get("dense.weight").unwrap().shape,
        vec![128, 1024]
    );
    let onnx = dir.path().join("crop.onnx");
    let o = convkit(&[
        "export",
        "--weights",
        out.to_str().unwrap(),
        "--onnx",
        onnx.to_str().unwrap(),
    ]);
    assert!(o.status.success() && onnx.exists(), "{}", text(&o));
    // A window larger than the images is refused, saying what fits.
    let o = convkit(&[
        "train",
        "--limit",
        "64",
        "--epochs",
        "1",
        "--random-crop",
        "30",
        "24",
        "--out",
        dir.path().join("never").to_str().unwrap(),
    ]);
    let said = text(&o);
    assert!(
        !o.status.success() && said.contains("up to the input's 28×28, found 30×24"),
        "{said}"
    );
}

/// A run folder has one owner: a second run on the same --out stops at once, naming the first.
#[test]
fn a_second_run_in_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shared");
    let args = [
        "train", "--limit", "3000", "--epochs", "5", "--quiet", "--out",
    ];
    let mut first = Command::new(env!("CARGO_BIN_EXE_convkit"))
        .args(args)
        .arg(&out)
        .env("CONVKIT_DATA", common::data_dir())
        .env("CONVKIT_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".convkit-lock");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before it locked"
        );
        assert!(
            start.elapsed().as_secs() < 300,
            "the first run never locked its folder"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = convkit(&[&args[..], &[out.to_str().unwrap(), "--overwrite"]].concat());
    let said = text(&o);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        !o.status.success()
            && said.contains(&format!("process {} is running in this folder", first.id())),
        "{said}"
    );
    // Its lock goes with the process: the folder is free again.
    let o = convkit(&[
        "train",
        "--limit",
        "64",
        "--epochs",
        "1",
        "--quiet",
        "--overwrite",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A static file server on 127.0.0.1 for the files in `dir` (GET /NAME; anything else is a
/// 404), on its own threads; its base URL.
fn serve_files(dir: PathBuf) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap_or(0);
                let mut header = String::new();
                while reader.read_line(&mut header).unwrap_or(0) > 2 {
                    header.clear();
                }
                let name = request.split_whitespace().nth(1).unwrap_or("/");
                let _ = match std::fs::read(dir.join(name.trim_start_matches('/'))) {
                    Ok(body) => write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .and_then(|()| stream.write_all(&body)),
                    Err(_) => write!(
                        stream,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                };
            });
        }
    });
    url
}

/// What `cargo xtask test` runs on a machine without the shared datasets: `convkit download`
/// fetches MNIST through the checksummed downloader (here from a mirror on 127.0.0.1 serving
/// the real files) into convkit's cache, where the next run finds it offline.
#[test]
fn download_fetches_a_dataset_into_the_cache() {
    let mirror = serve_files(common::data_dir().join("mnist"));
    let (cache, nothing) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let download = |name: &str, offline: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_convkit"));
        c.args(["download", name])
            .env("XDG_CACHE_HOME", cache.path())
            .env("CONVKIT_DATA", nothing.path())
            .env("CONVKIT_MIRROR", &mirror);
        if offline {
            c.env("CONVKIT_OFFLINE", "1");
        } else {
            c.env_remove("CONVKIT_OFFLINE");
        }
        c.output().unwrap()
    };
    let o = download("mnist", false);
    let said = text(&o);
    let fetched = cache.path().join("convkit/mnist");
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains(&format!("mnist: {}", fetched.display())),
        "{said}"
    );
    for file in ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        assert!(fetched.join(file).is_file(), "{file}: {said}");
    }
    // Found there from now on, offline.
    let o = download("mnist", true);
    assert!(o.status.success(), "{}", text(&o));
    // Offline, a dataset that is nowhere is an error saying where it looked.
    let o = download("cifar10", true);
    let said = text(&o);
    assert!(
        !o.status.success() && said.contains("cifar10") && said.contains("CONVKIT_DATA"),
        "{said}"
    );
}
