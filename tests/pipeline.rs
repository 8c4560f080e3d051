//! End to end through the library: data → model → fit (callbacks, History) → evaluate →
//! reports, on every compiled-in engine.

mod common;

use convkit::prelude::*;
use convkit::{Checkpoint, CheckpointMeta};

fn engines() -> Vec<Box<dyn Backend>> {
    common::end_to_end_engines()
}

fn mnist(split: Split, n: usize) -> Dataset {
    let dir = common::data_dir().join("mnist");
    let loc = Locator {
        data_dir: None,
        cache_dir: None,
        system_dirs: vec![],
        mirrors: None,
        download: false,
    };
    loc.load(DatasetName::Mnist, split, Some(&dir))
        .unwrap_or_else(|e| panic!("MNIST is needed for this test (set CONVKIT_DATA): {e}"))
        .limit(n)
        .normalise(Normalisation::Rescale)
}

#[test]
fn tutorial_mnist_learns_from_2000_images_in_one_epoch() {
    let train = mnist(Split::Train, 2000);
    let test = mnist(Split::Test, 1000);
    for engine in engines() {
        let spec = Sequential::preset("tutorial-mnist").unwrap();
        let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
        let mut model = Model::new(spec, compile, engine.as_ref(), 42).unwrap();
        let history = model
            .fit(&train)
            .epochs(1)
            .batch_size(32)
            .seed(1)
            .validation_data(&test)
            .verbosity(Verbosity::Silent)
            .run()
            .unwrap();
        let scored = Scored::new(model.evaluate(&test, 256).unwrap()).unwrap();
        // chance is 0.10
        assert!(
            scored.evaluation.accuracy > 0.7,
            "{}: test accuracy {}",
            engine.name(),
            scored.evaluation.accuracy
        );
        assert_eq!(history.epochs.len(), 1);
        assert!(
            (history.epochs[0].val_accuracy.unwrap() - scored.evaluation.accuracy).abs() < 1e-9
        );
        assert_eq!(scored.confusion.total(), 1000);
        assert_eq!(scored.report.per_class.len(), 10);
        let df = history.to_dataframe().unwrap();
        assert_eq!(
            df.get_column_names(),
            [
                "epoch",
                "loss",
                "accuracy",
                "val_loss",
                "val_accuracy",
                "seconds",
                "learning_rate"
            ]
        );
    }
}

#[test]
fn same_seed_same_batches_same_result() {
    let train = synthetic(96, ImageShape::new(8, 8, 1), 3, 0)
        .unwrap()
        .normalise(Normalisation::Rescale);
    let spec = Sequential::new(8, 8, 1)
        .add(Conv2D::new(4, 3).activation(Activation::Relu))
        .flatten()
        .add(Dense::new(3).activation(Activation::Softmax));
    for engine in engines() {
        let run = |seed| {
            let mut m = Model::new(
                spec.clone(),
                Compile::new(Optimizer::sgd(), Loss::CategoricalCrossentropy),
                engine.as_ref(),
                3,
            )
            .unwrap();
            m.fit(&train)
                .epochs(2)
                .batch_size(16)
                .seed(seed)
                .verbosity(Verbosity::Silent)
                .run()
                .unwrap();
            m.weights().unwrap()
        };
        assert_eq!(run(5), run(5), "{}: not deterministic", engine.name());
        assert_ne!(run(5), run(6));
    }
}

#[test]
fn binary_classification_with_validation_split_and_callbacks() {
    let data = synthetic(400, ImageShape::new(10, 10, 3), 2, 7)
        .unwrap()
        .normalise(Normalisation::Rescale);
    let spec = Sequential::new(10, 10, 3)
        .add(Conv2D::new(4, 3).activation(Activation::Relu))
        .max_pool(2)
        .flatten()
        .add(Dense::new(1).activation(Activation::Sigmoid));
    let dir = tempfile::tempdir().unwrap();
    for engine in engines() {
        let mut model = Model::new(
            spec.clone(),
            Compile::new(
                Optimizer::rmsprop().with_learning_rate(0.01),
                Loss::BinaryCrossentropy,
            ),
            engine.as_ref(),
            0,
        )
        .unwrap();
        let csv = dir.path().join(format!("{}-log.csv", engine.name()));
        let best = dir
            .path()
            .join(format!("{}-best.safetensors", engine.name()));
        let history = model
            .fit(&data)
            .epochs(4)
            .batch_size(20)
            .validation_split(0.25)
            .verbosity(Verbosity::Lines)
            .callback(CsvLogger::new(&csv))
            .callback(
                ModelCheckpoint::new(&best, CheckpointMeta::default())
                    .save_best_only(Monitor::ValAccuracy),
            )
            .run()
            .unwrap();
        assert_eq!(history.epochs.len(), 4);
        assert!(history.epochs.iter().all(|e| e.val_loss.is_some()));
        assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 5);
        let ckpt = Checkpoint::load(&best).unwrap();
        assert_eq!(ckpt.spec, spec);
        let scored = Scored::new(model.evaluate(&data, 64).unwrap()).unwrap();
        assert!(
            scored.evaluation.accuracy > 0.8,
            "{}: {}",
            engine.name(),
            scored.evaluation.accuracy
        );
        let b = scored.confusion.binary().unwrap();
        assert_eq!(
            b.true_positives + b.false_positives + b.false_negatives + b.true_negatives,
            400
        );
        assert!(scored
            .text()
            .contains("TP (true class_1, predicted class_1)"));
    }
}

#[test]
fn early_stopping_stops_and_restores_the_best_weights() {
    let data = synthetic(64, ImageShape::new(6, 6, 1), 2, 1)
        .unwrap()
        .normalise(Normalisation::Rescale);
    let spec = Sequential::new(6, 6, 1)
        .flatten()
        .add(Dense::new(2).activation(Activation::Softmax));
    for engine in engines() {
        // A huge learning rate makes validation loss blow up after the first epoch.
        let compile = Compile::new(
            Optimizer::sgd().with_learning_rate(50.0),
            Loss::SparseCategoricalCrossentropy,
        );
        let mut model = Model::new(spec.clone(), compile, engine.as_ref(), 0).unwrap();
        let history = model
            .fit(&data)
            .epochs(30)
            .validation_split(0.5)
            .verbosity(Verbosity::Silent)
            .callback(EarlyStopping::new(Monitor::ValLoss, 1).restore_best_weights(true))
            .run();
        match history {
            Ok(h) => {
                assert!(h.epochs.len() < 30, "{}: never stopped", engine.name());
                let (best_epoch, best) = h
                    .epochs
                    .iter()
                    .map(|e| (e.epoch, e.val_loss.unwrap()))
                    .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
                // As Keras: patience 1 stops after the first epoch that does not improve.
                assert_eq!(
                    h.epochs.len(),
                    best_epoch + 1,
                    "{}: stopped after epoch {}, best was {best_epoch}",
                    engine.name(),
                    h.epochs.len()
                );
                let (_, val) = data.clone().split(0.5).unwrap();
                let now = model.evaluate(&val, 32).unwrap().loss;
                assert!(
                    (now - best).abs() < 1e-4,
                    "{}: restored loss {now} vs best {best}",
                    engine.name()
                );
            }
            Err(e) => assert!(e.to_string().contains("loss became"), "{e}"),
        }
    }
}

#[test]
fn wrong_data_for_the_model_is_a_clear_error() {
    let engine = &engines()[0];
    let spec = Sequential::preset("tutorial-mnist").unwrap();
    let mut model = Model::new(
        spec,
        Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy),
        engine.as_ref(),
        0,
    )
    .unwrap();
    let cifar_like = synthetic(4, ImageShape::new(32, 32, 3), 10, 0).unwrap();
    let err = model.fit(&cifar_like).run().unwrap_err().to_string();
    assert!(
        err.contains("expected images of 28×28×1") && err.contains("found 32×32×3"),
        "{err}"
    );
    let three = synthetic(4, ImageShape::new(28, 28, 1), 3, 0).unwrap();
    let err = model.evaluate(&three, 4).unwrap_err().to_string();
    assert!(
        err.contains("10 classes") && err.contains("found 3 classes"),
        "{err}"
    );
    let ok = synthetic(4, ImageShape::new(28, 28, 1), 10, 0).unwrap();
    assert!(model
        .fit(&ok)
        .batch_size(0)
        .run()
        .unwrap_err()
        .to_string()
        .contains("batch size"));
    assert!(model.fit(&ok).epochs(0).run().is_err());
    assert!(model.fit(&ok).validation_split(1.5).run().is_err());
}

#[test]
fn fashion_mnist_from_the_system_location() {
    // Debian's dataset-fashion-mnist, installed by `cargo xtask setup`.
    let loc = Locator {
        data_dir: None,
        cache_dir: None,
        system_dirs: vec!["/usr/share/datasets".into()],
        mirrors: None,
        download: false,
    };
    let test = loc
        .load(DatasetName::FashionMnist, Split::Test, None)
        .expect("run `cargo xtask setup` (installs dataset-fashion-mnist)");
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.classes[9], "Ankle boot");
}

#[test]
fn learning_rate_schedules_and_plateaus() {
    let data = synthetic(64, ImageShape::new(6, 6, 1), 2, 3)
        .unwrap()
        .normalise(Normalisation::Rescale);
    let spec = Sequential::new(6, 6, 1)
        .flatten()
        .add(Dense::new(2).activation(Activation::Softmax));
    for engine in engines() {
        let compile = Compile::new(
            Optimizer::sgd().with_learning_rate(0.1),
            Loss::SparseCategoricalCrossentropy,
        );
        let mut model = Model::new(spec.clone(), compile, engine.as_ref(), 0).unwrap();
        let h = model
            .fit(&data)
            .epochs(3)
            .verbosity(Verbosity::Silent)
            .callback(LearningRateScheduler(Schedule::Step {
                initial: 0.1,
                factor: 0.5,
                every: 1,
            }))
            .run()
            .unwrap();
        let rates: Vec<f64> = h.epochs.iter().map(|e| e.learning_rate).collect();
        assert_eq!(rates, vec![0.1, 0.05, 0.025], "{}", engine.name());

        // A rate so small the loss cannot improve: the plateau rule halves it after one epoch.
        let compile = Compile::new(
            Optimizer::sgd().with_learning_rate(1e-12),
            Loss::SparseCategoricalCrossentropy,
        );
        let mut model = Model::new(spec.clone(), compile, engine.as_ref(), 0).unwrap();
        let h = model
            .fit(&data)
            .epochs(3)
            .verbosity(Verbosity::Silent)
            .callback(ReduceLrOnPlateau::new(Monitor::Loss, 1).factor(0.5))
            .run()
            .unwrap();
        let rates: Vec<f64> = h.epochs.iter().map(|e| e.learning_rate).collect();
        assert_eq!(rates, vec![1e-12, 1e-12, 5e-13], "{}", engine.name());
        // Keras' cooldown: after a cut, `cooldown` epochs' plateaus are not counted (the
        // counter runs down at the start of each epoch's check, so cooldown=2 skips one).
        let rule: PlateauRule = "monitor=loss,patience=1,factor=0.5,cooldown=2"
            .parse()
            .unwrap();
        let h = model
            .fit(&data)
            .epochs(5)
            .verbosity(Verbosity::Silent)
            .callback(rule.callback())
            .run()
            .unwrap();
        let rates: Vec<f64> = h.epochs.iter().map(|e| e.learning_rate).collect();
        assert_eq!(
            rates,
            // From 2.5e-13, where the last fit's third epoch left the rate.
            vec![2.5e-13, 2.5e-13, 1.25e-13, 1.25e-13, 6.25e-14],
            "{}",
            engine.name()
        );
        assert!(model
            .fit(&data)
            .callback(ReduceLrOnPlateau::new(Monitor::Loss, 1).factor(2.0))
            .run()
            .is_err());
    }
}

#[test]
fn a_nan_loss_stops_training_and_keeps_the_last_finite_weights() {
    // Raw 0..255 inputs and a learning rate of 3e38: the first step overflows the weights.
    let data = synthetic(64, ImageShape::new(8, 8, 1), 3, 0).unwrap();
    let spec = Sequential::new(8, 8, 1)
        .flatten()
        .add(Dense::new(3).activation(Activation::Softmax));
    for engine in engines() {
        let compile = Compile::new(
            Optimizer::sgd().with_learning_rate(3e38),
            Loss::SparseCategoricalCrossentropy,
        );
        let mut model = Model::new(spec.clone(), compile, engine.as_ref(), 3).unwrap();
        let start = model.weights().unwrap();
        let err = model
            .fit(&data)
            .epochs(3)
            .batch_size(8)
            .verbosity(Verbosity::Silent)
            .run()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, convkit::Error::NonFinite { .. })
                && text.contains("training loss became")
                && text.contains("epoch 1, batch ")
                && text.contains("of 8")
                && text.contains("the weights from the start of epoch 1"),
            "{}: {text}",
            engine.name()
        );
        // The model holds the last finite weights, and they save and load.
        let kept = model.weights().unwrap();
        assert_eq!(kept, start, "{}", engine.name());
        let ckpt = model.checkpoint(CheckpointMeta::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        ckpt.save(&dir.path().join("m.safetensors")).unwrap();
        Checkpoint::load(&dir.path().join("m.safetensors")).unwrap();
    }
}

/// `Fit::backup` (Keras' BackupAndRestore): a fit that ran one epoch and a fresh model that
/// continues from its backup end where three uninterrupted epochs end, with augmentation,
/// Dropout, RMSprop's slots and a plateau-lowered learning rate in play; other settings are
/// refused.
#[test]
fn a_fit_continues_from_its_backup() {
    let train = mnist(Split::Train, 300);
    let mut spec = Sequential::preset("tutorial-mnist").unwrap();
    let head = spec.layers.len() - 1;
    spec.layers.insert(head, convkit::Dropout::new(0.3).into());
    let compile = Compile::new(Optimizer::rmsprop(), Loss::SparseCategoricalCrossentropy);
    let augment = Augment::parse("flip,shift=0.1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for engine in engines() {
        let fit = |epochs: usize, backup: &std::path::Path, batch_size: usize| {
            let mut model = Model::new(spec.clone(), compile.clone(), engine.as_ref(), 3).unwrap();
            let history = model
                .fit(&train)
                .epochs(epochs)
                .batch_size(batch_size)
                .seed(9)
                .validation_split(0.2)
                .augment(augment)
                .verbosity(Verbosity::Silent)
                .callback(ReduceLrOnPlateau::new(Monitor::Loss, 1).min_lr(1e-4))
                .backup(backup)
                .run()?;
            Ok::<_, convkit::Error>((history, model.weights().unwrap()))
        };
        let whole = dir
            .path()
            .join(format!("{}-whole.safetensors", engine.name()));
        let (history, weights) = fit(3, &whole, 32).unwrap();
        let cut = dir
            .path()
            .join(format!("{}-cut.safetensors", engine.name()));
        fit(1, &cut, 32).unwrap();
        let (resumed_history, resumed) = fit(3, &cut, 32).unwrap();
        let (tensor, worst) = resumed
            .max_abs_diff(&weights)
            .unwrap()
            .into_iter()
            .fold((String::new(), 0f32), |a, b| if b.1 > a.1 { b } else { a });
        assert!(
            worst <= 1e-6,
            "{}: resumed `{tensor}` differs by {worst:e}",
            engine.name()
        );
        let losses = |h: &convkit::train::History| {
            h.epochs
                .iter()
                .map(|e| (e.loss, e.val_loss, e.learning_rate))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            losses(&resumed_history),
            losses(&history),
            "{}",
            engine.name()
        );
        // The backup is a checkpoint too.
        assert_eq!(Checkpoint::load(&cut).unwrap().weights, resumed);
        // Another batch size gives other batches: refused, naming what differs.
        let err = fit(4, &cut, 16).unwrap_err().to_string();
        assert!(
            err.contains("another run") && err.contains("batch_size: 32"),
            "{err}"
        );
        // Renamed class folders: the labels would mean something else. Refused, naming them.
        let mut renamed = train.clone();
        renamed.classes.swap(0, 1);
        let mut model = Model::new(spec.clone(), compile.clone(), engine.as_ref(), 3).unwrap();
        let err = (model.fit(&renamed).epochs(4).batch_size(32).seed(9))
            .verbosity(Verbosity::Silent)
            .backup(&cut)
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the class names differ") && err.contains(r#"["1", "0", "2""#),
            "{err}"
        );
        // Another model: the first layer that differs is named.
        let mut wider = spec.clone();
        wider.layers[0] = convkit::Conv2D::new(16, 3)
            .activation(convkit::Activation::Relu)
            .into();
        let mut model = Model::new(wider, compile.clone(), engine.as_ref(), 3).unwrap();
        let err = (model.fit(&train).epochs(4).verbosity(Verbosity::Silent))
            .backup(&cut)
            .run()
            .unwrap_err()
            .to_string();
        assert!(err.contains("the model differs: layer 0 (conv2d)"), "{err}");
    }
}

#[test]
fn each_cli_command_is_one_request_a_program_makes_too() {
    use convkit::run::{self, DataRequest, ModelSource, SearchOutcome};
    let dir = tempfile::tempdir().unwrap();
    let backend = convkit::backend(convkit::backend_names()[0]).unwrap();
    let data = DataRequest {
        limit: Some(48),
        ..DataRequest::new("synthetic")
    };
    let folder = dir.path().join("run");
    let mut train = run::TrainRequest {
        epochs: 1,
        quiet: true,
        command: Some(run::CommandRecord {
            cwd: dir.path().to_path_buf(),
            args: vec!["convkit".into(), "train".into()],
        }),
        ..run::TrainRequest::new(
            ModelSource::Spec("tutorial-mnist".into()),
            data.clone(),
            &folder,
        )
    };
    let trained = train.run(backend.as_ref(), &run::alone()).unwrap();
    // What the CLI prints is the request's report of its outcome.
    let report = train.report(&trained).unwrap();
    assert!(
        report.starts_with("scored on the test data:\ntest loss: "),
        "{report}"
    );
    assert!(
        report.ends_with(&format!("wrote {}", folder.display())),
        "{report}"
    );
    let (scored, part) = trained.scored.expect("a process alone scores its model");
    assert_eq!((part, trained.history.epochs.len()), ("test", 1));
    for file in [
        "model.safetensors",
        "last.safetensors",
        "best.safetensors",
        "command.json",
        "metrics.json",
        "history.png",
        "confusion_matrix.png",
    ] {
        assert!(folder.join(file).is_file(), "{file}");
    }
    assert_eq!(
        run::CommandRecord::load(&folder).unwrap(),
        train.command.clone().unwrap()
    );
    // The same folder resumed for a second epoch continues the first.
    train.epochs = 2;
    train.resume = true;
    let resumed = train.run(backend.as_ref(), &run::alone()).unwrap();
    assert_eq!(resumed.history.epochs.len(), 2);
    assert_eq!(
        resumed.history.epochs[0].loss,
        trained.history.epochs[0].loss
    );

    let model = folder.join("model.safetensors");
    let evaluated = run::EvaluateRequest::new(data.clone(), &model)
        .run(backend.as_ref())
        .unwrap();
    assert_eq!(evaluated.part, "test");
    assert_eq!(
        evaluated.scored.evaluation.accuracy,
        resumed.scored.as_ref().unwrap().0.evaluation.accuracy
    );
    assert_ne!(
        scored.evaluation.probabilities,
        evaluated.scored.evaluation.probabilities
    );
    let ensemble = run::EvaluateRequest {
        weights: vec![model.clone(), model.clone()],
        ..run::EvaluateRequest::new(data, &model)
    }
    .run(backend.as_ref())
    .unwrap();
    assert_eq!(ensemble.members.len(), 2);
    let report = ensemble.to_string();
    assert!(
        report.contains("ensemble of 2 models (Average):\nscored on the test data:"),
        "{report}"
    );
    assert!(
        report.starts_with(&format!("{}: test loss ", model.display())),
        "{report}"
    );
    assert_eq!(
        ensemble.scored.evaluation.probabilities,
        evaluated.scored.evaluation.probabilities
    );

    let image = dir.path().join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 3) % 256) as u8]))
        .save(&image)
        .unwrap();
    let predictions = run::PredictRequest::new(&model, vec![image.clone()])
        .run(backend.as_ref())
        .unwrap();
    assert_eq!(predictions.len(), 1);
    assert_eq!(predictions[0].scores.len(), 10);
    let total: f32 = predictions[0].scores.iter().map(|s| s.1).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    let (top, p) = predictions[0].top();
    assert!(predictions[0].scores.iter().all(|s| s.1 <= p));
    assert!(predictions[0].scores.iter().any(|s| s.0 == top));
    let report = predictions[0].to_string();
    assert_eq!(report.lines().count(), 11, "{report}");
    assert!(
        report.starts_with(&format!("{}: {top} ({p:.4})", image.display())),
        "{report}"
    );

    let onnx = dir.path().join("model.onnx");
    let exported = run::ExportRequest::new(&model, &onnx).run().unwrap();
    assert!(onnx.is_file() && exported.outputs == 10, "{exported:?}");
    assert!(exported
        .to_string()
        .starts_with(&format!("wrote {} (ONNX opset ", onnx.display())));

    let space = dir.path().join("space.toml");
    std::fs::write(&space, "model = \"tutorial-mnist\"\ndataset = \"synthetic\"\nlimit = 48\nvalidation_split = 0.25\n[space]\noptimizer = [\"adam\", \"sgd\"]\n").unwrap();
    let search = run::SearchRequest::new(&space, dir.path().join("search"));
    let searched = search.run(backend.as_ref(), &run::alone()).unwrap();
    let report = search.report(&searched).unwrap();
    assert!(report.contains("\nbest: Trial {"), "{report}");
    let SearchOutcome::Table { table, best } = searched else {
        panic!("a whole search ends in its table, found {searched:?}");
    };
    assert_eq!(table.height(), 2);
    assert!(["adam", "sgd"].contains(&best.result.trial.optimizer.as_str()));
    assert!(dir.path().join("search/search.csv").is_file());

    // compare: each engine in its own `convkit compare-worker` process, then the report.
    let compare = convkit::compare::CompareRequest {
        settings: convkit::compare::RunSettings {
            dataset: "synthetic".into(),
            model: "tutorial-mnist".into(),
            epochs: 1,
            limit: Some(64),
            batch_size: 32,
            optimizer: "adam".into(),
            repeat: 1,
            seed: 42,
        },
        backends: vec![backend.name().to_string()],
        out: dir.path().join("compare"),
        worker: env!("CARGO_BIN_EXE_convkit").into(),
    };
    let comparison = compare.run(&convkit::engines()).unwrap();
    assert!(comparison.markdown().contains(backend.name()));
    assert!(dir.path().join("compare/compare.md").is_file());
    // summary and backends
    let summary =
        convkit::Sequential::from_preset_or_file_within("tutorial-mnist", &Default::default())
            .and_then(|spec| spec.summary())
            .unwrap();
    assert!(summary.contains("Total params"), "{summary}");
    assert!(!convkit::describe_backends().is_empty());
}

#[test]
fn compare_runs_what_it_is_asked_and_all_adds_back_what_the_default_leaves_out() {
    use convkit::compare::chosen_engines;
    let engines = convkit::engines();
    let named = vec!["candle-cpu".to_string(), "no-such-engine".to_string()];
    assert_eq!(
        chosen_engines(&named, &engines),
        (named.clone(), Vec::new())
    );

    let (default, left_out) = chosen_engines(&[], &engines);
    let (all, missing) = chosen_engines(&["all".to_string()], &engines);
    // `all` adds back exactly the engines left out for being slow here; engines whose device
    // is missing stay out either way.
    for l in &left_out {
        assert!(!default.contains(&l.engine), "{l:?}");
        let device_missing = missing.iter().any(|m| m.engine == l.engine);
        assert_eq!(all.contains(&l.engine), !device_missing, "{l:?}");
    }
    assert!(default.iter().all(|n| all.contains(n)));
    assert_eq!(
        all.len() + missing.len(),
        convkit::backend_names().len(),
        "{all:?} {missing:?}"
    );
    if convkit::backend_names().contains(&"burn-ndarray") {
        assert!(left_out.iter().any(|l| l.engine == "burn-ndarray"));
        assert!(all.iter().any(|n| n == "burn-ndarray"));
    }
}

#[test]
fn a_model_is_checked_and_planned_once_whatever_builds_it() {
    let backend = convkit::backend(convkit::backend_names()[0]).unwrap();
    for preset in ["tutorial-mnist", "tutorial-cifar10-cnn"] {
        let spec = Sequential::preset(preset).unwrap();
        let compile = Compile::new(Optimizer::adam(), Loss::default_for(&spec).unwrap());
        let before = convkit::spec::output_shapes_calls();
        let model = Model::new(spec.clone(), compile.clone(), backend.as_ref(), 1).unwrap();
        assert_eq!(convkit::spec::output_shapes_calls() - before, 1, "{preset}");
        let weights = model.weights().unwrap();
        let before = convkit::spec::output_shapes_calls();
        Model::with_weights(spec, compile, backend.as_ref(), &weights).unwrap();
        assert_eq!(convkit::spec::output_shapes_calls() - before, 1, "{preset}");
    }
}
