//! convkit's overhead over an engine used directly: one training step of `tutorial-mnist`
//! (batch 32, adam) through convkit's `Network::train_step`, beside the same step written as
//! a plain loop in the engine's own API (its layers and its Adam), both fed from host memory
//! as a data loader would. `cargo xtask bench`.
//!
//! The tch pair runs the same libtorch kernels, so their difference is convkit's own cost: the
//! executor, the NHWC → NCHW copy of the batch, the targets, reading the logits back to count
//! the correct answers, and the update rule in core. The candle pair also differs in kernels:
//! convkit's candle engine brings its own CPU convolution, pooling and ReLU, where a plain
//! candle-nn loop uses candle's.

use convkit::backend::Targets;
use convkit::ndarray::Array4;
use convkit::{init, Compile, Loss, Model, Optimizer, Sequential};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 32;

/// A batch of 28×28 grey images, NHWC (what convkit takes), and its labels.
fn batch() -> (Array4<f32>, Vec<u32>) {
    let x = Array4::from_shape_fn((BATCH, 28, 28, 1), |(n, h, w, _)| {
        ((n * 31 + h * 7 + w) % 255) as f32 / 255.0
    });
    (x, (0..BATCH as u32).map(|i| i % 10).collect())
}

/// convkit's training step on `engine`.
#[cfg(any(feature = "tch", feature = "candle"))]
fn convkit_step(c: &mut Criterion, engine: &str) {
    let spec = Sequential::preset("tutorial-mnist").unwrap();
    let weights = init::glorot_uniform(&spec, 0).unwrap();
    let Ok(backend) = convkit::backend(engine) else {
        return;
    };
    let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
    let mut model = Model::with_weights(spec, compile, backend.as_ref(), &weights).unwrap();
    let (x, labels) = batch();
    let y = Targets::Sparse(labels);
    let mut group = c.benchmark_group(format!("overhead/{engine}"));
    group.sample_size(30);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("convkit_train_step", |b| {
        b.iter(|| model.network_mut().train_step(x.view(), &y).unwrap())
    });
    group.finish();
}

#[cfg(feature = "tch")]
fn plain_tch(c: &mut Criterion) {
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Kind, Tensor};
    convkit::backend("tch-cpu").unwrap(); // the same thread count as convkit's engine
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let net = nn::seq()
        .add(nn::conv2d(&p / "conv1", 1, 32, 3, Default::default()))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        .add(nn::conv2d(&p / "conv2", 32, 64, 3, Default::default()))
        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(&p / "dense1", 1600, 128, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&p / "dense2", 128, 10, Default::default()));
    let mut adam = nn::Adam::default().build(&vs, 1e-3).unwrap();
    let (x, labels) = batch();
    // NCHW on the host, as a PyTorch-style loader would hand it over.
    let nchw: Vec<f32> = x.permuted_axes([0, 3, 1, 2]).iter().copied().collect();
    let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let mut group = c.benchmark_group("overhead/tch-cpu");
    group.sample_size(30);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("plain_tch_step", |b| {
        b.iter(|| {
            let x = Tensor::from_slice(&nchw).view([BATCH as i64, 1, 28, 28]);
            let y = Tensor::from_slice(&labels);
            let logits = net.forward(&x);
            let loss = logits.cross_entropy_for_logits(&y);
            adam.backward_step(&loss);
            // What a loop reports: the loss and the correct answers.
            let correct = logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64);
            (
                f64::try_from(&loss).unwrap(),
                i64::try_from(&correct).unwrap(),
            )
        })
    });
    group.finish();
}

#[cfg(feature = "candle")]
fn plain_candle(c: &mut Criterion) {
    use candle_core::{DType, Device, Module, Tensor, D};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
    let device = Device::Cpu;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    let conv1 = candle_nn::conv2d(1, 32, 3, Default::default(), vb.pp("conv1")).unwrap();
    let conv2 = candle_nn::conv2d(32, 64, 3, Default::default(), vb.pp("conv2")).unwrap();
    let dense1 = candle_nn::linear(1600, 128, vb.pp("dense1")).unwrap();
    let dense2 = candle_nn::linear(128, 10, vb.pp("dense2")).unwrap();
    // Adam: AdamW without weight decay.
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        eps: 1e-7,
        ..Default::default()
    };
    let mut adam = AdamW::new(vars.all_vars(), params).unwrap();
    let (x, labels) = batch();
    let nchw: Vec<f32> = x.permuted_axes([0, 3, 1, 2]).iter().copied().collect();
    let mut group = c.benchmark_group("overhead/candle-cpu");
    group.sample_size(20);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("plain_candle_nn_step", |b| {
        b.iter(|| {
            let x = Tensor::from_slice(&nchw, (BATCH, 1, 28, 28), &device).unwrap();
            let y = Tensor::from_slice(&labels, BATCH, &device).unwrap();
            let h = conv1.forward(&x).unwrap().relu().unwrap();
            let h = h.max_pool2d(2).unwrap();
            let h = conv2.forward(&h).unwrap().relu().unwrap();
            let h = h.max_pool2d(2).unwrap().flatten_from(1).unwrap();
            let h = dense1.forward(&h).unwrap().relu().unwrap();
            let logits = dense2.forward(&h).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            adam.backward_step(&loss).unwrap();
            let correct = logits
                .argmax(D::Minus1)
                .unwrap()
                .eq(&y)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            (
                loss.to_scalar::<f32>().unwrap(),
                correct.to_scalar::<f32>().unwrap(),
            )
        })
    });
    group.finish();
}

#[allow(unused_variables)] // with neither engine pair compiled in
fn overhead(c: &mut Criterion) {
    #[cfg(feature = "tch")]
    {
        convkit_step(c, "tch-cpu");
        plain_tch(c);
    }
    #[cfg(feature = "candle")]
    {
        convkit_step(c, "candle-cpu");
        plain_candle(c);
    }
}

criterion_group!(benches, overhead);
criterion_main!(benches);
