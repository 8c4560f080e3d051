//! The conformance suite: every compiled-in engine, the same specs, weights and batches.
//! Each engine is checked against the naive reference in `common` (Keras semantics) and,
//! where several engines are compiled in, against each other.

mod common;

use common::{batch, reference_forward, reference_pass, small_specs, tol};
use convkit::backend::Targets;
use convkit::optim::Slots;
use convkit::{init, Compile, Loss, Model, Optimizer, Sequential, Weights};

fn engines() -> Vec<Box<dyn convkit::Backend>> {
    common::available_engines()
}

fn loss_for(spec: &Sequential) -> Loss {
    Loss::default_for(spec).unwrap()
}

/// Hard targets for `loss`: class indices, one-hot rows or 0/1.
fn targets(loss: Loss, n: usize, classes: usize) -> Targets {
    let labels: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7 + 3) % classes.max(2) as u32)
        .collect();
    match loss {
        Loss::SparseCategoricalCrossentropy => Targets::Sparse(labels),
        Loss::CategoricalCrossentropy => {
            Targets::Dense(convkit::data::one_hot(&labels, classes).unwrap())
        }
        Loss::BinaryCrossentropy => Targets::Binary(labels.iter().map(|&l| l as f32).collect()),
    }
}

/// Soft targets (Keras' float `y`): values in [0, 1] for binary cross-entropy, rows that
/// share their weight over the classes for categorical cross-entropy.
fn soft_targets(loss: Loss, n: usize, classes: usize) -> Targets {
    let value = |i: usize, k: usize| ((i * 37 + k * 11 + 5) % 97) as f32 / 96.0;
    match loss {
        Loss::BinaryCrossentropy => Targets::Binary((0..n).map(|i| value(i, 0)).collect()),
        _ => {
            let mut rows =
                convkit::ndarray::Array2::from_shape_fn((n, classes), |(i, k)| value(i, k));
            for mut row in rows.rows_mut() {
                let sum = row.sum();
                row.mapv_inplace(|v| v / sum);
            }
            Targets::Dense(rows)
        }
    }
}

/// Cross-entropy of reference probabilities, f64.
fn reference_loss(p: &convkit::ndarray::Array2<f64>, y: &Targets) -> f64 {
    let n = p.nrows() as f64;
    match y {
        Targets::Sparse(l) => {
            l.iter()
                .enumerate()
                .map(|(i, &c)| -p[[i, c as usize]].ln())
                .sum::<f64>()
                / n
        }
        Targets::Dense(t) => {
            t.rows()
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    r.iter()
                        .enumerate()
                        .map(|(c, &v)| -(v as f64) * p[[i, c]].ln())
                        .sum::<f64>()
                })
                .sum::<f64>()
                / n
        }
        Targets::Binary(t) => {
            t.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let v = v as f64;
                    -(v * p[[i, 0]].ln() + (1.0 - v) * (1.0 - p[[i, 0]]).ln())
                })
                .sum::<f64>()
                / n
        }
    }
}

/// Largest `|ours − reference|` over paired values.
fn max_gap<'a>(
    ours: impl IntoIterator<Item = &'a f32>,
    reference: impl IntoIterator<Item = &'a f64>,
) -> f64 {
    ours.into_iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

fn worst(diffs: &[(String, f32)]) -> (String, f32) {
    diffs
        .iter()
        .cloned()
        .fold((String::new(), 0.0), |a, b| if b.1 > a.1 { b } else { a })
}

/// Adding a layer type adds it to a small spec, so every engine's conformance covers it.
#[test]
fn the_small_specs_hold_every_layer_type() {
    let specs = small_specs();
    let used: std::collections::BTreeSet<&str> = (specs.iter())
        .flat_map(|spec| spec.layers.iter().map(|l| l.kind.type_name()))
        .collect();
    for kind in convkit::LayerKind::one_of_each() {
        assert!(
            used.contains(kind.type_name()),
            "no small spec in tests/common has a {} layer",
            kind.type_name()
        );
    }
}

#[test]
fn forward_matches_the_reference_for_every_preset_and_small_model() {
    let mut specs: Vec<Sequential> = convkit::spec::PRESETS
        .iter()
        .map(|p| Sequential::preset(p).unwrap())
        .collect();
    specs.extend(small_specs());
    for engine in engines() {
        for spec in &specs {
            let weights = init::glorot_uniform(spec, 11).unwrap();
            let compile = Compile::new(Optimizer::adam(), loss_for(spec));
            let model =
                Model::with_weights(spec.clone(), compile, engine.as_ref(), &weights).unwrap();
            let x = batch(3, spec.input_shape, 5);
            let ours = model.network().predict(x.view()).unwrap();
            let reference = reference_forward(spec, &weights, &x);
            let diff = ours
                .iter()
                .zip(reference.iter())
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                diff <= tol::FORWARD,
                "{}: model `{}` forward differs from the reference by {diff:e}",
                engine.name(),
                spec.name
            );
        }
    }
}

#[test]
fn loss_and_gradients_match_the_reference() {
    for engine in engines() {
        for spec in small_specs() {
            // (loss, soft targets?)
            let losses = if loss_for(&spec) == Loss::BinaryCrossentropy {
                vec![
                    (Loss::BinaryCrossentropy, false),
                    (Loss::BinaryCrossentropy, true),
                ]
            } else {
                vec![
                    (Loss::SparseCategoricalCrossentropy, false),
                    (Loss::CategoricalCrossentropy, false),
                    (Loss::CategoricalCrossentropy, true),
                ]
            };
            let classes = spec.output_shape().unwrap().numel();
            // no dropout for gradient checks
            let mut spec = spec.clone();
            spec.layers
                .retain(|l| !matches!(l.kind, convkit::LayerKind::Dropout(_)));
            // A training step crops at random: the reference takes the cropped batch instead.
            if let convkit::LayerKind::RandomCrop(crop) = spec.layers[0].kind {
                spec.layers.remove(0);
                spec.input_shape = [crop.height, crop.width, spec.input_shape[2]];
            }
            for (loss, soft) in losses {
                let what = match soft {
                    true => format!("{} with soft targets", loss.name()),
                    false => loss.name().to_string(),
                };
                let weights = init::glorot_uniform(&spec, 3).unwrap();
                let x = batch(4, spec.input_shape, 9);
                let y = match soft {
                    true => soft_targets(loss, 4, classes),
                    false => targets(loss, 4, classes),
                };
                // SGD with lr 1: w' = w − g, so g = w − w'.
                let compile = Compile::new(Optimizer::sgd().with_learning_rate(1.0), loss);
                let mut model =
                    Model::with_weights(spec.clone(), compile, engine.as_ref(), &weights).unwrap();
                let stats = model.network_mut().train_step(x.view(), &y).unwrap();
                let (probs, moving) = reference_pass(&spec, &weights, &x, true);
                let reference = reference_loss(&probs, &y);
                assert!(
                    (stats.loss as f64 - reference).abs() < tol::BATCH_LOSS * 10.0,
                    "{}: {} loss {} vs reference {reference}",
                    engine.name(),
                    what,
                    stats.loss
                );
                let after = model.weights().unwrap();
                // moving statistics follow the batch's, never the gradient
                for (name, expected) in &moving {
                    let d = max_gap(&after.get(name).unwrap().data, expected);
                    assert!(
                        d <= tol::ONE_STEP,
                        "{}: model `{}`: {name} is {d:e} from the Keras moving average",
                        engine.name(),
                        spec.name
                    );
                }
                // central differences on a few entries of every trained tensor
                for (name, t) in &weights.tensors {
                    if moving.iter().any(|(m, _)| m == name) {
                        continue;
                    }
                    for k in [0, t.data.len() / 2, t.data.len() - 1] {
                        let grad = (t.data[k] - after.get(name).unwrap().data[k]) as f64;
                        let eps = 1e-3;
                        let at = |d: f64| {
                            let mut w = weights.clone();
                            w.tensors.get_mut(name).unwrap().data[k] += d as f32;
                            reference_loss(&reference_pass(&spec, &w, &x, true).0, &y)
                        };
                        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                        assert!(
                            (grad - numeric).abs() < 2e-3 + 2e-2 * numeric.abs(),
                            "{}: model `{}`, {}: gradient of {name}[{k}] is {grad}, finite differences give {numeric}",
                            engine.name(), spec.name, what
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn one_step_of_each_optimizer_follows_the_keras_rule() {
    let spec = small_specs().remove(0);
    let weights = init::glorot_uniform(&spec, 21).unwrap();
    let x = batch(4, spec.input_shape, 2);
    let y = targets(Loss::SparseCategoricalCrossentropy, 4, 3);
    for engine in engines() {
        // the engine's gradient
        let mut probe = Model::with_weights(
            spec.clone(),
            Compile::new(
                Optimizer::sgd().with_learning_rate(1.0),
                Loss::SparseCategoricalCrossentropy,
            ),
            engine.as_ref(),
            &weights,
        )
        .unwrap();
        probe.network_mut().train_step(x.view(), &y).unwrap();
        let stepped = probe.weights().unwrap();
        let optimizers = [
            Optimizer::sgd(),
            Optimizer::sgd().with_momentum(0.9).unwrap(),
            Optimizer::Sgd {
                learning_rate: 0.05,
                momentum: 0.8,
                nesterov: true,
            },
            Optimizer::adam(),
            Optimizer::rmsprop(),
            Optimizer::Rmsprop {
                learning_rate: 0.01,
                rho: 0.8,
                momentum: 0.5,
                epsilon: 1e-7,
                centered: true,
            },
        ];
        for opt in optimizers {
            let mut model = Model::with_weights(
                spec.clone(),
                Compile::new(opt.clone(), Loss::SparseCategoricalCrossentropy),
                engine.as_ref(),
                &weights,
            )
            .unwrap();
            model.network_mut().train_step(x.view(), &y).unwrap();
            let got = model.weights().unwrap();
            let mut expected = Weights::default();
            for (name, w) in &weights.tensors {
                let g: Vec<f32> = w
                    .data
                    .iter()
                    .zip(&stepped.get(name).unwrap().data)
                    .map(|(a, b)| a - b)
                    .collect();
                let wa = convkit::ndarray::ArrayD::from_shape_vec(w.shape.clone(), w.data.clone())
                    .unwrap();
                let ga = convkit::ndarray::ArrayD::from_shape_vec(w.shape.clone(), g).unwrap();
                let new = opt
                    .update(opt.learning_rate(), 1, &wa, &ga, &mut Slots::default())
                    .unwrap();
                expected.insert(
                    name.clone(),
                    convkit::Tensor::new(w.shape.clone(), new.into_raw_vec_and_offset().0).unwrap(),
                );
            }
            let (name, d) = worst(&got.max_abs_diff(&expected).unwrap());
            assert!(
                d as f64 <= tol::ONE_STEP,
                "{}: {opt:?}: tensor `{name}` differs from the Keras rule by {d:e}",
                engine.name()
            );
        }
    }
}

/// L1/L2 kernel regularisers as Keras applies them: one plain SGD step on the regularised
/// model moves each kernel by an extra `−lr·(l1·sign(w) + 2·l2·w)`, leaves biases as the
/// unregularised step does, and the reported loss gains `l1·Σ|w| + l2·Σw²`.
#[test]
fn kernel_regularisers_add_their_penalty_and_gradient() {
    use convkit::{LayerKind, Regularizer};
    let plain = small_specs().remove(0);
    let mut regularised = plain.clone();
    let factors = [
        Regularizer::l1_l2(0.01, 0.02),
        Regularizer::l2(0.05),
        Regularizer::l1(0.03),
    ];
    let mut kernels = Vec::new();
    let mut next = factors.iter();
    let names = regularised.layer_names();
    for (i, layer) in regularised.layers.iter_mut().enumerate() {
        let slot = match &mut layer.kind {
            LayerKind::Conv2D(c) => &mut c.kernel_regularizer,
            LayerKind::Dense(d) => &mut d.kernel_regularizer,
            _ => continue,
        };
        if let Some(&r) = next.next() {
            *slot = Some(r);
            kernels.push((format!("{}.weight", names[i]), r));
        }
    }
    let weights = init::glorot_uniform(&plain, 5).unwrap();
    let penalty: f64 = kernels
        .iter()
        .map(|(name, r)| r.penalty(&weights.get(name).unwrap().data))
        .sum();
    assert!((weights.kernel_penalty(&regularised).unwrap() - penalty).abs() < 1e-12);
    let x = batch(4, plain.input_shape, 3);
    let y = targets(Loss::SparseCategoricalCrossentropy, 4, 3);
    let lr = 0.1f32;
    let compile = Compile::new(
        Optimizer::sgd().with_learning_rate(lr as f64),
        Loss::SparseCategoricalCrossentropy,
    );
    for engine in engines() {
        let step = |spec: &Sequential| {
            let mut model =
                Model::with_weights(spec.clone(), compile.clone(), engine.as_ref(), &weights)
                    .unwrap();
            let stats = model.network_mut().train_step(x.view(), &y).unwrap();
            (stats.loss as f64, model.weights().unwrap())
        };
        let (loss_plain, after_plain) = step(&plain);
        let (loss_reg, after_reg) = step(&regularised);
        let extra = loss_reg - loss_plain;
        assert!(
            (extra - penalty).abs() <= 1e-4 * penalty.max(1.0),
            "{}: the loss gained {extra}, the penalty is {penalty}",
            engine.name()
        );
        for (name, w0) in &weights.tensors {
            let r = kernels.iter().find(|(k, _)| k == name).map(|(_, r)| *r);
            let (a, b) = (after_plain.get(name).unwrap(), after_reg.get(name).unwrap());
            let d = w0
                .data
                .iter()
                .zip(a.data.iter().zip(&b.data))
                .map(|(&w, (&p, &q))| {
                    let expected = r.map_or(0.0, |r| {
                        let sign = if w == 0.0 { 0.0 } else { w.signum() };
                        -lr * (r.l1 * sign + 2.0 * r.l2 * w)
                    });
                    ((q - p) - expected).abs()
                })
                .fold(0.0f32, f32::max);
            assert!(
                d as f64 <= tol::ONE_STEP,
                "{}: tensor `{name}` ({r:?}) is {d:e} from the regularised step",
                engine.name()
            );
        }
    }
}

/// BatchNormalization as Keras runs it: moving statistics at inference, the batch's in
/// training (and the moving ones updated), and inference mode while the layer is frozen.
#[test]
fn batch_normalization_follows_keras() {
    use rand::{Rng, SeedableRng};
    let spec = small_specs()
        .into_iter()
        .find(|s| s.name == "small-batchnorm")
        .unwrap();
    // Non-trivial statistics and scales, so that inference and training modes differ.
    let mut weights = init::glorot_uniform(&spec, 8).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    for (name, t) in weights.tensors.iter_mut() {
        let range = match name.rsplit_once('.').unwrap().1 {
            "gamma" | "moving_variance" => 0.5..2.0,
            "beta" | "moving_mean" => -0.5..0.5,
            _ => continue,
        };
        t.data
            .iter_mut()
            .for_each(|v| *v = rng.random_range(range.clone()));
    }
    let x = batch(6, spec.input_shape, 12);
    let y = targets(Loss::SparseCategoricalCrossentropy, 6, 3);
    let compile = Compile::new(
        Optimizer::sgd().with_learning_rate(0.1),
        Loss::SparseCategoricalCrossentropy,
    );
    let max_diff = |a: &convkit::ndarray::Array2<f32>, b: &convkit::ndarray::Array2<f64>| {
        max_gap(a.iter(), b.iter())
    };
    let inference = reference_forward(&spec, &weights, &x);
    let (training, moving) = reference_pass(&spec, &weights, &x, true);
    assert!(
        max_diff(&inference.mapv(|v| v as f32), &training) > 1e-3,
        "the test needs modes that differ"
    );
    for engine in engines() {
        let mut model =
            Model::with_weights(spec.clone(), compile.clone(), engine.as_ref(), &weights).unwrap();
        let d = max_diff(&model.network().predict(x.view()).unwrap(), &inference);
        assert!(
            d as f64 <= tol::FORWARD,
            "{}: inference differs from the moving-statistics reference by {d:e}",
            engine.name()
        );
        let stats = model.network_mut().train_step(x.view(), &y).unwrap();
        let expected = reference_loss(&training, &y);
        assert!(
            (stats.loss as f64 - expected).abs() < tol::BATCH_LOSS * 10.0,
            "{}: training loss {} vs the batch-statistics reference {expected}",
            engine.name(),
            stats.loss
        );
        let after = model.weights().unwrap();
        for (name, expected) in &moving {
            let d = max_gap(&after.get(name).unwrap().data, expected);
            assert!(
                d <= tol::ONE_STEP,
                "{}: {name} is {d:e} from the moving average",
                engine.name()
            );
        }
        // inference after the step uses the updated moving statistics
        let d = max_diff(
            &model.network().predict(x.view()).unwrap(),
            &reference_forward(&spec, &after, &x),
        );
        assert!(
            d as f64 <= tol::FORWARD,
            "{}: inference after a step differs by {d:e}",
            engine.name()
        );

        // Frozen: inference mode in training too; nothing of the layer changes.
        let mut frozen_spec = spec.clone();
        frozen_spec.layers[1].trainable = false;
        let mut frozen =
            Model::with_weights(spec.clone(), compile.clone(), engine.as_ref(), &weights).unwrap();
        frozen.set_trainable(1, false).unwrap();
        let stats = frozen.network_mut().train_step(x.view(), &y).unwrap();
        let (probs, moving) = reference_pass(&frozen_spec, &weights, &x, true);
        assert!(moving
            .iter()
            .all(|(n, _)| !n.starts_with("batch_normalization.")));
        let expected = reference_loss(&probs, &y);
        assert!(
            (stats.loss as f64 - expected).abs() < tol::BATCH_LOSS * 10.0,
            "{}: loss with a frozen batch normalisation {} vs {expected}",
            engine.name(),
            stats.loss
        );
        let after = frozen.weights().unwrap();
        for part in ["gamma", "beta", "moving_mean", "moving_variance"] {
            let name = format!("batch_normalization.{part}");
            assert_eq!(
                after.get(&name).unwrap(),
                weights.get(&name).unwrap(),
                "{}: frozen {name} changed",
                engine.name()
            );
        }
        assert_ne!(
            after.get("batch_normalization_1.moving_mean").unwrap(),
            weights.get("batch_normalization_1.moving_mean").unwrap(),
            "{}: the trainable batch normalisation kept its statistics",
            engine.name()
        );
    }
}

#[test]
fn frozen_layers_stay_bit_identical() {
    let spec = Sequential::preset("tutorial-mnist").unwrap();
    let weights = init::glorot_uniform(&spec, 1).unwrap();
    let x = batch(8, spec.input_shape, 1);
    let y = targets(Loss::SparseCategoricalCrossentropy, 8, 10);
    for engine in engines() {
        let mut model = Model::with_weights(
            spec.clone(),
            Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy),
            engine.as_ref(),
            &weights,
        )
        .unwrap();
        model.set_trainable(0, false).unwrap();
        model.set_trainable(2, false).unwrap();
        for _ in 0..2 {
            model.network_mut().train_step(x.view(), &y).unwrap();
        }
        let after = model.weights().unwrap();
        for name in [
            "conv2d.weight",
            "conv2d.bias",
            "conv2d_1.weight",
            "conv2d_1.bias",
        ] {
            assert_eq!(
                after.get(name).unwrap(),
                weights.get(name).unwrap(),
                "{}: frozen {name} changed",
                engine.name()
            );
        }
        assert_ne!(
            after.get("dense.weight").unwrap(),
            weights.get("dense.weight").unwrap(),
            "{}: trainable dense did not change",
            engine.name()
        );
        assert!(model
            .summary()
            .unwrap()
            .contains("Non-trainable params: 18,816"));
        assert!(model.set_trainable(99, false).is_err());
    }
}

#[test]
fn saved_weights_load_on_every_engine_and_predict_the_same() {
    let spec = small_specs().remove(1);
    let x = batch(5, spec.input_shape, 8);
    let dir = tempfile::tempdir().unwrap();
    for source in engines() {
        let compile = Compile::new(Optimizer::rmsprop(), Loss::SparseCategoricalCrossentropy);
        let mut model = Model::new(spec.clone(), compile, source.as_ref(), 4).unwrap();
        model
            .network_mut()
            .train_step(
                x.view(),
                &targets(Loss::SparseCategoricalCrossentropy, 5, 2),
            )
            .unwrap();
        let path = dir.path().join(format!("{}.safetensors", source.name()));
        model
            .checkpoint(Default::default())
            .unwrap()
            .save(&path)
            .unwrap();
        let expected = model.network().predict(x.view()).unwrap();
        for target in engines() {
            let ckpt = convkit::Checkpoint::load(&path).unwrap();
            let loaded = Model::from_checkpoint(&ckpt, target.as_ref()).unwrap();
            let got = loaded.network().predict(x.view()).unwrap();
            let d = got
                .iter()
                .zip(expected.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                d as f64 <= tol::FORWARD,
                "{} -> {}: predictions differ by {d:e}",
                source.name(),
                target.name()
            );
        }
    }
}

#[test]
fn dropout_is_active_only_in_training() {
    let spec = Sequential::new(4, 4, 1)
        .flatten()
        .add(convkit::Dropout::new(0.5))
        .add(convkit::Dense::new(3).activation(convkit::Activation::Softmax));
    let weights = init::glorot_uniform(&spec, 2).unwrap();
    let x = batch(64, spec.input_shape, 3);
    let y = targets(Loss::SparseCategoricalCrossentropy, 64, 3);
    for engine in engines() {
        let mut model = Model::with_weights(
            spec.clone(),
            Compile::new(Optimizer::sgd(), Loss::SparseCategoricalCrossentropy),
            engine.as_ref(),
            &weights,
        )
        .unwrap();
        let a = model.network().predict(x.view()).unwrap();
        let reference = reference_forward(&spec, &weights, &x);
        let d = a
            .iter()
            .zip(reference.iter())
            .map(|(p, r)| (*p as f64 - r).abs())
            .fold(0.0, f64::max);
        assert!(
            d < tol::FORWARD,
            "{}: inference with dropout differs from no dropout by {d}",
            engine.name()
        );
        // training loss with dropout differs from the inference loss
        let train_loss = model.network_mut().train_step(x.view(), &y).unwrap().loss as f64;
        let infer_loss = reference_loss(&reference, &y);
        assert!(
            (train_loss - infer_loss).abs() > 1e-4,
            "{}: dropout had no effect in training",
            engine.name()
        );
    }
}

#[test]
fn unsupported_requests_are_errors_that_say_so() {
    // Per-axis strides: some engines cannot; those must say so, the others must be right.
    let spec = Sequential::new(6, 6, 1)
        .add(convkit::Conv2D::new(2, 2).strides(1, 2))
        .flatten()
        .add(convkit::Dense::new(2).activation(convkit::Activation::Softmax));
    let weights = init::glorot_uniform(&spec, 0).unwrap();
    let x = batch(2, spec.input_shape, 0);
    for engine in engines() {
        match Model::with_weights(
            spec.clone(),
            Compile::new(Optimizer::sgd(), Loss::SparseCategoricalCrossentropy),
            engine.as_ref(),
            &weights,
        ) {
            Ok(model) => {
                let p = model.network().predict(x.view()).unwrap();
                let r = reference_forward(&spec, &weights, &x);
                let d = p
                    .iter()
                    .zip(r.iter())
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(d < tol::FORWARD, "{}", engine.name());
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(engine.name())
                        && msg.contains("not supported")
                        && msg.contains("conv2d"),
                    "{msg}"
                );
            }
        }
        // a wrong-shaped batch is an error, not a panic
        let model = Model::with_weights(
            Sequential::preset("tutorial-mnist").unwrap(),
            Compile::new(Optimizer::sgd(), Loss::SparseCategoricalCrossentropy),
            engine.as_ref(),
            &init::glorot_uniform(&Sequential::preset("tutorial-mnist").unwrap(), 0).unwrap(),
        )
        .unwrap();
        assert!(model
            .network()
            .predict(batch(1, [32, 32, 3], 0).view())
            .is_err());
    }
}

/// The reference engine for cross-engine checks: tch-cpu when compiled in, else the first.
fn reference_engine(engines: &[Box<dyn convkit::Backend>]) -> usize {
    engines
        .iter()
        .position(|e| e.name() == "tch-cpu")
        .unwrap_or(0)
}

#[test]
fn engines_agree_with_the_reference_engine() {
    let engines = engines();
    let r = reference_engine(&engines);
    let spec = Sequential::preset("tutorial-mnist").unwrap();
    let weights = init::glorot_uniform(&spec, 99).unwrap();
    let x = common::blank_border(batch(6, spec.input_shape, 4), 7);
    let optimizers = [
        Optimizer::sgd().with_momentum(0.9).unwrap(),
        Optimizer::adam(),
        Optimizer::rmsprop(),
    ];
    for loss in [
        Loss::SparseCategoricalCrossentropy,
        Loss::CategoricalCrossentropy,
    ] {
        let y = targets(loss, 6, 10);
        for opt in &optimizers {
            let run = |e: &dyn convkit::Backend| {
                let mut m =
                    Model::with_weights(spec.clone(), Compile::new(opt.clone(), loss), e, &weights)
                        .unwrap();
                let before = m.network().predict(x.view()).unwrap();
                let stats = m.network_mut().train_step(x.view(), &y).unwrap();
                (before, stats, m.weights().unwrap())
            };
            let (p_ref, s_ref, w_ref) = run(engines[r].as_ref());
            for (i, e) in engines.iter().enumerate() {
                if i == r {
                    continue;
                }
                let (p, s, w) = run(e.as_ref());
                let d = p
                    .iter()
                    .zip(p_ref.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    d as f64 <= tol::FORWARD,
                    "{} vs {}: forward differs by {d:e}",
                    e.name(),
                    engines[r].name()
                );
                assert!(
                    ((s.loss - s_ref.loss) as f64).abs() <= tol::BATCH_LOSS * 10.0,
                    "{} vs {}: {} loss {} vs {}",
                    e.name(),
                    engines[r].name(),
                    loss.name(),
                    s.loss,
                    s_ref.loss
                );
                assert_eq!(s.correct, s_ref.correct);
                let (name, d) = worst(&w.max_abs_diff(&w_ref).unwrap());
                assert!(
                    d as f64 <= tol::ONE_STEP,
                    "{} vs {}: after one {} step tensor `{name}` differs by {d:e}",
                    e.name(),
                    engines[r].name(),
                    opt.name()
                );
            }
        }
    }
}

#[test]
fn a_changed_learning_rate_reaches_the_engine() {
    let spec = small_specs().remove(0);
    let weights = init::glorot_uniform(&spec, 5).unwrap();
    let x = batch(4, spec.input_shape, 6);
    let y = targets(Loss::SparseCategoricalCrossentropy, 4, 3);
    for engine in engines() {
        let step = |initial: f64, set: Option<f64>| {
            let compile = Compile::new(
                Optimizer::sgd().with_learning_rate(initial),
                Loss::SparseCategoricalCrossentropy,
            );
            let mut m =
                Model::with_weights(spec.clone(), compile, engine.as_ref(), &weights).unwrap();
            if let Some(lr) = set {
                m.set_learning_rate(lr);
            }
            m.network_mut().train_step(x.view(), &y).unwrap();
            m.weights().unwrap()
        };
        let (name, d) = worst(
            &step(0.1, Some(0.05))
                .max_abs_diff(&step(0.05, None))
                .unwrap(),
        );
        assert!(
            d <= 1e-7,
            "{}: set_learning_rate(0.05) differs from building with 0.05 at `{name}` by {d:e}",
            engine.name()
        );
    }
}

/// A resumed run continues with the optimizer's slots and step count: state taken after two
/// steps on the reference engine and loaded into any engine gives, after a third step, what the
/// reference engine's own third step gives. Moving statistics are not optimizer variables.
#[test]
fn optimizer_state_moves_between_engines() {
    let engines = engines();
    let r = reference_engine(&engines);
    let spec = small_specs()
        .into_iter()
        .find(|s| s.name == "small-batchnorm")
        .unwrap();
    let weights = init::glorot_uniform(&spec, 5).unwrap();
    let x = batch(4, spec.input_shape, 6);
    let y = targets(Loss::SparseCategoricalCrossentropy, 4, 3);
    let optimizers = [
        Optimizer::sgd().with_momentum(0.9).unwrap(),
        Optimizer::adam(),
        Optimizer::Rmsprop {
            learning_rate: 0.01,
            rho: 0.8,
            momentum: 0.5,
            epsilon: 1e-7,
            centered: true,
        },
    ];
    for opt in optimizers {
        let compile = Compile::new(opt.clone(), Loss::SparseCategoricalCrossentropy);
        let mut source =
            Model::with_weights(spec.clone(), compile.clone(), engines[r].as_ref(), &weights)
                .unwrap();
        for _ in 0..2 {
            source.network_mut().train_step(x.view(), &y).unwrap();
        }
        let state = source.network_mut().optimizer_state().unwrap();
        let midway = source.weights().unwrap();
        assert_eq!(state.step, 2);
        assert!(
            !state.slots.keys().any(|k| k.contains("moving")),
            "{:?}",
            state.slots.keys()
        );
        source.network_mut().train_step(x.view(), &y).unwrap();
        let want = source.weights().unwrap();
        for e in &engines {
            let mut resumed =
                Model::with_weights(spec.clone(), compile.clone(), e.as_ref(), &midway).unwrap();
            resumed.network_mut().set_optimizer_state(&state).unwrap();
            assert_eq!(
                resumed.network_mut().optimizer_state().unwrap(),
                state,
                "{}: {opt:?}: the state reads back as it was loaded",
                e.name()
            );
            resumed.network_mut().train_step(x.view(), &y).unwrap();
            let (name, d) = worst(&resumed.weights().unwrap().max_abs_diff(&want).unwrap());
            assert!(
                d as f64 <= tol::ONE_STEP,
                "{} resumed from {}'s state: {opt:?}: tensor `{name}` differs by {d:e}",
                e.name(),
                engines[r].name()
            );
            // A slot that does not fit is named.
            let mut bad = state.clone();
            let (key, t) = bad.slots.iter_mut().next().unwrap();
            let key = key.clone();
            t.shape = vec![t.data.len() + 1];
            t.data.push(0.0);
            let err = resumed
                .network_mut()
                .set_optimizer_state(&bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("optimizer/{key}")), "{err}");
            let mut unknown = state.clone();
            unknown.slots.insert(
                "conv2d.weight/z".into(),
                state.slots.values().next().unwrap().clone(),
            );
            let err = resumed
                .network_mut()
                .set_optimizer_state(&unknown)
                .unwrap_err()
                .to_string();
            assert!(err.contains("optimizer/conv2d.weight/z"), "{err}");
        }
    }
}

/// Dropout masks come from core's seeded stream: a training step with Dropout after a
/// convolution (a channels-last image mask) and after Flatten gives the same weights on every
/// engine, the same again for the same seed, and other weights for another seed.
#[test]
fn dropout_drops_the_same_units_on_every_engine() {
    use convkit::{Activation, Conv2D, Dense, Dropout};
    let engines = engines();
    let r = reference_engine(&engines);
    let spec = Sequential::new(6, 6, 2)
        .add(Conv2D::new(3, 3).activation(Activation::Relu))
        .add(Dropout::new(0.4))
        .flatten()
        .add(Dropout::new(0.25))
        .add(Dense::new(3).activation(Activation::Softmax));
    let weights = init::glorot_uniform(&spec, 8).unwrap();
    let x = batch(8, spec.input_shape, 9);
    let y = targets(Loss::SparseCategoricalCrossentropy, 8, 3);
    let step = |e: &dyn convkit::Backend, seed: u64| {
        let compile = Compile::new(Optimizer::sgd(), Loss::SparseCategoricalCrossentropy);
        let mut m = Model::with_weights(spec.clone(), compile, e, &weights).unwrap();
        m.network_mut().set_dropout_stream(seed, 0);
        let stats = m.network_mut().train_step(x.view(), &y).unwrap();
        (stats.loss, m.weights().unwrap())
    };
    let (loss_ref, w_ref) = step(engines[r].as_ref(), 7);
    for e in &engines {
        let (loss, w) = step(e.as_ref(), 7);
        assert!(
            ((loss - loss_ref) as f64).abs() <= tol::BATCH_LOSS * 10.0,
            "{} vs {}: loss {loss} vs {loss_ref}",
            e.name(),
            engines[r].name()
        );
        let (name, d) = worst(&w.max_abs_diff(&w_ref).unwrap());
        assert!(
            d as f64 <= tol::ONE_STEP,
            "{} vs {}: with dropout, tensor `{name}` differs by {d:e}",
            e.name(),
            engines[r].name()
        );
        let (_, again) = step(e.as_ref(), 7);
        assert_eq!(again, w, "{}: the same seed drops the same units", e.name());
        let (_, other) = step(e.as_ref(), 8);
        assert!(
            worst(&other.max_abs_diff(&w).unwrap()).1 > 1e-6,
            "{}: another seed drops other units",
            e.name()
        );
    }
}

#[test]
fn random_crop_takes_the_same_windows_on_every_engine() {
    use convkit::{Activation, Conv2D, Dense, RandomCrop};
    let engines = engines();
    let r = reference_engine(&engines);
    let cropped = Sequential::new(6, 5, 2)
        .add(Conv2D::new(3, 3).activation(Activation::Relu))
        .flatten()
        .add(Dense::new(3).activation(Activation::Softmax));
    let mut spec = cropped.clone();
    spec.input_shape = [9, 8, 2];
    spec.layers.insert(0, RandomCrop::new(6, 5).into());
    let weights = init::glorot_uniform(&spec, 8).unwrap();
    let x = batch(8, spec.input_shape, 9);
    let y = targets(Loss::SparseCategoricalCrossentropy, 8, 3);
    let compile = Compile::new(Optimizer::sgd(), Loss::SparseCategoricalCrossentropy);
    // The windows a seeded stream gives: core draws them, the same for every engine.
    let mut training = convkit::optim::Training::new(
        &convkit::Compiled::new(spec.clone(), compile.clone()).unwrap(),
    )
    .unwrap();
    training.set_dropout_stream(7, 0);
    let corners = training.crop_offsets(8).unwrap();
    assert!(
        corners.iter().any(|&c| c != [1, 1]),
        "not only the centre: {corners:?}"
    );
    let x_cropped = convkit::augment::crop(x.view(), &corners, [6, 5]);
    let step =
        |e: &dyn convkit::Backend, spec: &Sequential, x: convkit::ndarray::ArrayView4<f32>| {
            let mut m = Model::with_weights(spec.clone(), compile.clone(), e, &weights).unwrap();
            m.network_mut().set_dropout_stream(7, 0);
            m.network_mut().train_step(x, &y).unwrap();
            m.weights().unwrap()
        };
    let w_ref = step(engines[r].as_ref(), &spec, x.view());
    for e in &engines {
        // The crop model's step on the full images is the plain model's on the windows.
        let w = step(e.as_ref(), &spec, x.view());
        let plain = step(e.as_ref(), &cropped, x_cropped.view());
        let (name, d) = worst(&w.max_abs_diff(&plain).unwrap());
        assert!(
            d as f64 <= tol::ONE_STEP,
            "{}: `{name}` differs by {d:e} from the step on the drawn windows",
            e.name()
        );
        let (name, d) = worst(&w.max_abs_diff(&w_ref).unwrap());
        assert!(
            d as f64 <= tol::ONE_STEP,
            "{} vs {}: `{name}` differs by {d:e}",
            e.name(),
            engines[r].name()
        );
        // Inference takes the centre window.
        let model =
            Model::with_weights(spec.clone(), compile.clone(), e.as_ref(), &weights).unwrap();
        let plain =
            Model::with_weights(cropped.clone(), compile.clone(), e.as_ref(), &weights).unwrap();
        let centre = convkit::augment::crop(x.view(), &[[1, 1]; 8], [6, 5]);
        let gap = max_gap(
            model.predict_batch(x.view()).unwrap().iter(),
            plain
                .predict_batch(centre.view())
                .unwrap()
                .mapv(f64::from)
                .iter(),
        );
        assert!(
            gap <= tol::FORWARD,
            "{}: inference is {gap:e} from the centre window's",
            e.name()
        );
    }
    // Only as the first layer, and never larger than the image.
    let mut late = cropped.clone();
    late.layers.insert(1, RandomCrop::new(2, 2).into());
    let err = late.output_shapes().unwrap_err().to_string();
    assert!(err.contains("must be the model's first layer"), "{err}");
    let mut big = cropped.clone();
    big.layers.insert(0, RandomCrop::new(7, 5).into());
    let err = big.output_shapes().unwrap_err().to_string();
    assert!(err.contains("up to the input's 6×5, found 7×5"), "{err}");
}

/// At a logit of exactly 0 (all-zero weights, or a blank image at initialisation) the
/// gradient of binary cross-entropy is still `sigmoid(0) − t`, on every engine: whatever
/// their own `abs` and `relu` give at 0.
#[test]
fn binary_cross_entropy_at_a_zero_logit_has_the_sigmoid_gradient() {
    let spec = small_specs()
        .into_iter()
        .find(|s| s.name == "small-binary")
        .unwrap();
    let mut weights = init::glorot_uniform(&spec, 3).unwrap();
    for t in weights.tensors.values_mut() {
        t.data.iter_mut().for_each(|v| *v = 0.0);
    }
    let x = batch(4, spec.input_shape, 9);
    let y = Targets::Binary(vec![1.0, 1.0, 1.0, 0.0]);
    for engine in engines() {
        let compile = Compile::new(
            Optimizer::sgd().with_learning_rate(1.0),
            Loss::BinaryCrossentropy,
        );
        let mut model =
            Model::with_weights(spec.clone(), compile, engine.as_ref(), &weights).unwrap();
        let stats = model.network_mut().train_step(x.view(), &y).unwrap();
        assert!(
            (stats.loss as f64 - 2f64.ln()).abs() < 1e-6,
            "{}: loss {} at a zero logit, expected ln 2",
            engine.name(),
            stats.loss
        );
        // w' = w − g: the head's bias gets −mean(0.5 − t) = 0.25; every other gradient is 0
        // (the inputs of the head are relu(0) = 0).
        for (name, t) in &model.weights().unwrap().tensors {
            let expected = if t.data.len() == 1 { 0.25 } else { 0.0 };
            let gap = max_gap(&t.data, &vec![expected; t.data.len()]);
            assert!(
                gap <= 1e-6,
                "{}: {name} is {:?} after one step, expected {expected}",
                engine.name(),
                t.data
            );
        }
    }
}

/// Logits of ±1000 (a diverging model) give the exact cross-entropies and finite gradients on
/// every engine: core's softmax and sigmoid cross-entropies never exponentiate a large
/// positive number.
#[test]
fn cross_entropies_of_huge_logits_are_exact_and_finite() {
    use convkit::{Dense, Tensor};
    // Zero kernels: the logits are the head's biases, whatever the images.
    let cases = [
        // (units, biases, targets, the loss of each image)
        (
            3,
            vec![1000.0, -1000.0, 0.0],
            Targets::Sparse(vec![1, 0]),
            [2000.0, 0.0],
        ),
        (
            1,
            vec![-1000.0],
            Targets::Binary(vec![1.0, 0.0]),
            [1000.0, 0.0],
        ),
        (
            1,
            vec![1000.0],
            Targets::Binary(vec![0.0, 1.0]),
            [1000.0, 0.0],
        ),
    ];
    for engine in engines() {
        for (units, biases, y, losses) in &cases {
            let spec = Sequential::new(2, 2, 1).flatten().add(Dense::new(*units));
            let loss = if *units == 1 {
                Loss::BinaryCrossentropy
            } else {
                Loss::SparseCategoricalCrossentropy
            };
            let mut weights = Weights::default();
            weights.insert(
                "dense.weight",
                Tensor::new(vec![*units, 4], vec![0.0; units * 4]).unwrap(),
            );
            weights.insert(
                "dense.bias",
                Tensor::new(vec![*units], biases.clone()).unwrap(),
            );
            let compile = Compile::new(Optimizer::sgd().with_learning_rate(1.0), loss);
            let mut model = Model::with_weights(spec, compile, engine.as_ref(), &weights).unwrap();
            let stats = model
                .network_mut()
                .train_step(batch(2, [2, 2, 1], 5).view(), y)
                .unwrap();
            let expected = (losses[0] + losses[1]) / 2.0;
            assert!(
                (stats.loss as f64 - expected).abs() < 1e-3,
                "{}: {units} unit(s), biases {biases:?}: loss {}, expected {expected}",
                engine.name(),
                stats.loss
            );
            let after = model.weights().unwrap();
            let bias = &after.get("dense.bias").unwrap().data;
            assert!(
                bias.iter().all(|b| b.is_finite()),
                "{}: biases {bias:?} after the step",
                engine.name()
            );
        }
    }
}
