//! Shared test helpers: a naive f64 reference forward pass (the semantics every engine must
//! match), tolerances, and small models and batches.
#![allow(dead_code)]

pub mod mpirun;

use convkit::ndarray::{Array2, Array4};
use convkit::spec::{Activation, ActivationLayer, LayerKind, Sequential, Shape};
use convkit::Weights;
use rand::{Rng, SeedableRng};

/// Tolerances, shared with `compare`.
#[allow(unused_imports)] // not every test binary checks against them
pub use convkit::tolerance as tol;

/// Seeded uniform batch `[n, h, w, c]` in [0, 1).
pub fn batch(n: usize, shape: [usize; 3], seed: u64) -> Array4<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Array4::from_shape_fn((n, shape[0], shape[1], shape[2]), |_| rng.random::<f32>())
}

/// `batch` with a blank (exactly 0) border of `width` pixels and a saturated (1.0) block inside,
/// as real images have: at
/// initialisation (zero biases) a conv over a blank patch gives exactly 0 before its ReLU, and
/// max-pool windows tie. Engines must treat both as Keras does.
pub fn blank_border(mut x: Array4<f32>, width: usize) -> Array4<f32> {
    let (_, h, w, _) = x.dim();
    x.indexed_iter_mut().for_each(|((_, i, j, _), v)| {
        if i < width || j < width || i >= h - width || j >= w - width {
            *v = 0.0;
        } else if i < width + 6 && j < width + 6 {
            // a saturated block: equal activations, so max-pool windows tie above zero too
            *v = 1.0;
        }
    });
    x
}

fn act(x: f64, a: Activation) -> f64 {
    match a {
        Activation::Linear | Activation::Softmax => x,
        Activation::Relu => x.max(0.0),
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
    }
}

/// `row` replaced by its softmax, in place.
fn softmax(row: &mut [f64]) {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
    row.iter_mut().for_each(|v| *v = (*v - m).exp() / z);
}

/// Keras semantics, in plain loops: NHWC activations, canonical weights, (H, W, C) flatten.
/// Returns the probabilities `[n, outputs]` in inference mode.
pub fn reference_forward(spec: &Sequential, w: &Weights, x: &Array4<f32>) -> Array2<f64> {
    reference_pass(spec, w, x, false).0
}

/// [`reference_forward`] in inference mode, or as a training pass without dropout: trainable
/// batch normalisations use the batch's statistics (biased variance). Also returns the moving
/// statistics each trainable batch normalisation holds after a training pass, by tensor name.
pub fn reference_pass(
    spec: &Sequential,
    w: &Weights,
    x: &Array4<f32>,
    training: bool,
) -> (Array2<f64>, Vec<(String, Vec<f64>)>) {
    let names = spec.layer_names();
    let shapes = spec.output_shapes().unwrap();
    let n = x.dim().0;
    let mut moving = Vec::new();
    // one activation per sample, stored HWC (flat vectors as h = w = 1)
    let [h0, w0, c0] = spec.input_shape;
    let mut batch: Vec<Vec<f64>> = (0..n)
        .map(|s| {
            x.slice(convkit::ndarray::s![s, .., .., ..])
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    let (mut h, mut wd, mut c) = (h0, w0, c0);
    for (i, layer) in spec.layers.iter().enumerate() {
        let (oh, ow, oc) = match shapes[i] {
            Shape::Image { h, w, c } => (h, w, c),
            Shape::Flat(k) => (1, 1, k),
        };
        let param = |part: &str| &w.get(&format!("{}.{part}", names[i])).unwrap().data;
        if let LayerKind::BatchNormalization(bn) = &layer.kind {
            // per channel (the last axis), over samples and positions
            let count = (n * batch[0].len() / c) as f64;
            let channel_mean = |f: &dyn Fn(f64) -> f64| -> Vec<f64> {
                let mut acc = vec![0f64; c];
                for cur in &batch {
                    for (j, v) in cur.iter().enumerate() {
                        acc[j % c] += f(*v);
                    }
                }
                acc.iter().map(|a| a / count).collect()
            };
            let (mean, var) = if training && layer.trainable {
                let mean = channel_mean(&|v| v);
                let sq = channel_mean(&|v| v * v);
                let var: Vec<f64> = sq.iter().zip(&mean).map(|(s, m)| s - m * m).collect();
                let m = bn.momentum as f64;
                for (part, stat) in [("moving_mean", &mean), ("moving_variance", &var)] {
                    let updated = param(part)
                        .iter()
                        .zip(stat.iter())
                        .map(|(&old, b)| old as f64 * m + b * (1.0 - m))
                        .collect();
                    moving.push((format!("{}.{part}", names[i]), updated));
                }
                (mean, var)
            } else {
                let f = |part| param(part).iter().map(|&v| v as f64).collect::<Vec<_>>();
                (f("moving_mean"), f("moving_variance"))
            };
            let (gamma, beta) = (param("gamma"), param("beta"));
            for cur in &mut batch {
                for (j, v) in cur.iter_mut().enumerate() {
                    let k = j % c;
                    *v = (*v - mean[k]) / (var[k] + bn.epsilon as f64).sqrt() * gamma[k] as f64
                        + beta[k] as f64;
                }
            }
            continue;
        }
        for cur in &mut batch {
            let mut next = vec![0f64; oh * ow * oc];
            match &layer.kind {
                LayerKind::Conv2D(conv) => {
                    let (k, b) = (param("weight"), param("bias"));
                    let [kh, kw] = conv.kernel_size;
                    let [sh, sw] = conv.strides;
                    let [pt, _, pl, _] = conv.pad_amounts(h, wd);
                    for y in 0..oh {
                        for xx in 0..ow {
                            for o in 0..oc {
                                let mut acc = b[o] as f64;
                                for ky in 0..kh {
                                    for kx in 0..kw {
                                        let iy = (y * sh + ky) as isize - pt as isize;
                                        let ix = (xx * sw + kx) as isize - pl as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize
                                        {
                                            continue;
                                        }
                                        for ci in 0..c {
                                            let v = cur[(iy as usize * wd + ix as usize) * c + ci];
                                            acc += v * k[((o * c + ci) * kh + ky) * kw + kx] as f64;
                                        }
                                    }
                                }
                                next[(y * ow + xx) * oc + o] = act(acc, conv.activation);
                            }
                        }
                    }
                }
                LayerKind::MaxPooling2D(p) | LayerKind::AveragePooling2D(p) => {
                    let max = matches!(layer.kind, LayerKind::MaxPooling2D(_));
                    let [kh, kw] = p.pool_size;
                    let [sh, sw] = p.strides();
                    for y in 0..oh {
                        for xx in 0..ow {
                            for ci in 0..oc {
                                let vals = (0..kh)
                                    .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
                                    .map(|(ky, kx)| {
                                        cur[((y * sh + ky) * wd + xx * sw + kx) * c + ci]
                                    });
                                next[(y * ow + xx) * oc + ci] = if max {
                                    vals.fold(f64::NEG_INFINITY, f64::max)
                                } else {
                                    vals.sum::<f64>() / (kh * kw) as f64
                                };
                            }
                        }
                    }
                }
                LayerKind::GlobalMaxPooling2D | LayerKind::GlobalAveragePooling2D => {
                    let max = matches!(layer.kind, LayerKind::GlobalMaxPooling2D);
                    for ci in 0..c {
                        let vals = (0..h * wd).map(|p| cur[p * c + ci]);
                        next[ci] = if max {
                            vals.fold(f64::NEG_INFINITY, f64::max)
                        } else {
                            vals.sum::<f64>() / (h * wd) as f64
                        };
                    }
                }
                LayerKind::Flatten | LayerKind::Dropout(_) => next = cur.clone(),
                // Softmax over the last axis: each position's channels, or the features.
                LayerKind::Activation(ActivationLayer {
                    activation: Activation::Softmax,
                })
                | LayerKind::Softmax(_) => {
                    next = cur.clone();
                    next.chunks_mut(oc).for_each(softmax);
                }
                LayerKind::Activation(a) => {
                    next = cur.iter().map(|&v| act(v, a.activation)).collect()
                }
                LayerKind::ReLU(_) => {
                    next = cur.iter().map(|&v| act(v, Activation::Relu)).collect()
                }
                // The centre window (what inference takes; a training pass here has no
                // random stream to draw windows from).
                LayerKind::RandomCrop(crop) => {
                    let (top, left) = ((h - crop.height) / 2, (wd - crop.width) / 2);
                    for y in 0..oh {
                        for xx in 0..ow {
                            for ci in 0..oc {
                                next[(y * ow + xx) * oc + ci] =
                                    cur[((top + y) * wd + left + xx) * c + ci];
                            }
                        }
                    }
                }
                LayerKind::Dense(d) => {
                    let (k, b) = (param("weight"), param("bias"));
                    let inputs = cur.len();
                    for o in 0..d.units {
                        let acc: f64 = b[o] as f64
                            + (0..inputs)
                                .map(|j| cur[j] * k[o * inputs + j] as f64)
                                .sum::<f64>();
                        next[o] = act(acc, d.activation);
                    }
                    if d.activation == Activation::Softmax {
                        softmax(&mut next);
                    }
                }
                LayerKind::BatchNormalization(_) => unreachable!("handled over the batch"),
            }
            *cur = next;
        }
        (h, wd, c) = (oh, ow, oc);
    }
    // A model that ends in logits gets the head's softmax (or sigmoid), as predict applies.
    let last = &spec.layers[spec.layers.len() - 1].kind;
    if last.classifier_activation() == Some(Activation::Linear) {
        for row in &mut batch {
            if let [z] = row.as_mut_slice() {
                *z = 1.0 / (1.0 + (-*z).exp());
            } else {
                softmax(row);
            }
        }
    }
    let k = batch[0].len();
    let probs = Array2::from_shape_vec((n, k), batch.into_iter().flatten().collect()).unwrap();
    (probs, moving)
}

/// Small models that exercise every layer and padding case.
pub fn small_specs() -> Vec<Sequential> {
    use convkit::{
        BatchNormalization, Conv2D, Dense, Dropout, Padding, Pool2D, RandomCrop, ReLU, Softmax,
    };
    vec![
        // asymmetric `same` padding with stride 2, tanh, a linear-logits head
        Sequential::new(7, 6, 2)
            .add(
                Conv2D::new(3, 3)
                    .padding(Padding::Same)
                    .strides(2, 2)
                    .activation(Activation::Relu),
            )
            .add(Conv2D::new(2, 2).activation(Activation::Tanh))
            .flatten()
            .add(Dense::new(4).activation(Activation::Sigmoid))
            .add(Dense::new(3).activation(Activation::Softmax))
            .named("small-same"),
        // max then average pooling with overlapping stride, dropout
        Sequential::new(8, 8, 1)
            .add(Conv2D::new(3, 3).activation(Activation::Relu))
            .max_pool(2)
            .add(LayerKind::AveragePooling2D(Pool2D {
                pool_size: [2, 2],
                strides: Some([1, 1]),
            }))
            .flatten()
            .add(Dropout::new(0.3))
            .add(Dense::new(2).activation(Activation::Softmax))
            .named("small-pools"),
        // binary head
        Sequential::new(5, 5, 3)
            .add(
                Conv2D::new(2, 3)
                    .padding(Padding::Same)
                    .activation(Activation::Relu),
            )
            .flatten()
            .add(Dense::new(1).activation(Activation::Sigmoid))
            .named("small-binary"),
        // batch normalisation of an image (per channel) and of a flat vector (per feature)
        Sequential::new(6, 6, 2)
            .add(Conv2D::new(3, 3).activation(Activation::Relu))
            .add(BatchNormalization::new())
            .max_pool(2)
            .flatten()
            .add(Dense::new(4).activation(Activation::Tanh))
            .add(BatchNormalization::new().momentum(0.9).epsilon(1e-2))
            .add(Dense::new(3).activation(Activation::Softmax))
            .named("small-batchnorm"),
        // Keras' Conv2D → BatchNormalization → Activation, and a softmax over channels
        Sequential::new(6, 5, 2)
            .add(Conv2D::new(3, 3).padding(Padding::Same))
            .add(BatchNormalization::new())
            .add(ActivationLayer::new(Activation::Relu))
            .add(Conv2D::new(3, 2))
            .add(ActivationLayer::new(Activation::Softmax))
            .flatten()
            .add(Dense::new(4))
            .add(ActivationLayer::new(Activation::Tanh))
            .add(Dense::new(3).activation(Activation::Softmax))
            .named("small-activation-layers"),
        // global pooling: the mean of each channel, and its maximum
        Sequential::new(6, 5, 2)
            .add(Conv2D::new(4, 3).activation(Activation::Relu))
            .add(LayerKind::GlobalAveragePooling2D)
            // logits, the head's softmax in the loss (Keras' from_logits=True)
            .add(Dense::new(3))
            .named("small-global-average"),
        // Keras' ReLU and Softmax layers, and cifar10_cnn.py's classifier that ends in an
        // activation layer: Dense(num_classes) → Activation('softmax')
        Sequential::new(6, 5, 2)
            .add(Conv2D::new(3, 3).padding(Padding::Same))
            .add(ReLU::new())
            .add(Conv2D::new(4, 2))
            .add(Softmax::new())
            .flatten()
            .add(Dense::new(3))
            .add(ActivationLayer::new(Activation::Softmax))
            .named("small-keras-activations"),
        Sequential::new(7, 7, 1)
            .add(
                Conv2D::new(3, 2)
                    .padding(Padding::Same)
                    .activation(Activation::Tanh),
            )
            .max_pool(2)
            .add(LayerKind::GlobalMaxPooling2D)
            .add(Dense::new(1).activation(Activation::Sigmoid))
            .named("small-global-max"),
        // a ReLU convolution into overlapping max pooling (3×3 windows at stride 2), which the
        // CPU engines run as one fused operation
        Sequential::new(9, 8, 2)
            .add(
                Conv2D::new(3, 3)
                    .padding(Padding::Same)
                    .activation(Activation::Relu),
            )
            .add(LayerKind::MaxPooling2D(Pool2D {
                pool_size: [3, 3],
                strides: Some([2, 2]),
            }))
            .flatten()
            .add(Dense::new(3).activation(Activation::Softmax))
            .named("small-overlapping-max-pool"),
        // a random crop: the centre window at inference
        Sequential::new(9, 8, 2)
            .add(RandomCrop::new(6, 5))
            .add(Conv2D::new(3, 3).activation(Activation::Relu))
            .max_pool(2)
            .flatten()
            .add(Dense::new(3).activation(Activation::Softmax))
            .named("small-crop"),
    ]
}

/// `CONVKIT_DATA`, or the shared folder beside the checkout.
pub fn data_dir() -> std::path::PathBuf {
    std::env::var_os("CONVKIT_DATA")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets")
        })
}

/// Every compiled-in engine whose device is here. Only GPU engines may be missing (no GPU on
/// this machine); a CPU engine that fails to start is a test failure, never a silent skip.
pub fn available_engines() -> Vec<Box<dyn convkit::Backend>> {
    let names = convkit::backend_names();
    assert!(!names.is_empty(), "no engine compiled in");
    names
        .into_iter()
        .filter_map(|n| match convkit::backend(n) {
            Ok(b) => Some(b),
            Err(e) if n.ends_with("-cuda") => {
                eprintln!("skipping {n}: {e}");
                None
            }
            Err(e) => panic!("{n} is compiled in but cannot start: {e}"),
        })
        .collect()
}

/// Engines whose end-to-end runs (training whole epochs, the CLI, memory) cost minutes here
/// without testing anything the conformance suite does not: burn-wgpu on a machine without a
/// GPU runs on Mesa's software Vulkan driver, where one 60k epoch takes about 15 minutes. The
/// conformance suite checks it (every layer, loss, optimizer step and weight round trip)
/// against the reference.
pub const CONFORMANCE_ONLY: [&str; 1] = ["burn-wgpu"];

/// [`available_engines`] less [`CONFORMANCE_ONLY`]: the engines the end-to-end tests loop over.
pub fn end_to_end_engines() -> Vec<Box<dyn convkit::Backend>> {
    available_engines()
        .into_iter()
        .filter(|e| !CONFORMANCE_ONLY.contains(&e.name()))
        .collect()
}
