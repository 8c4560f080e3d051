//! Per-step numbers for every compiled-in engine: one training step (batch 32) and one
//! inference batch (256) of `tutorial-mnist`. `cargo xtask bench`.

use convkit::backend::Targets;
use convkit::ndarray::Array4;
use convkit::{init, Compile, Loss, Model, Optimizer, Sequential};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn engines(c: &mut Criterion) {
    // As the `convkit` command does: this thread joins rayon's pool (burn-flex's operations),
    // and freed activations stay with the allocator (candle-cpu's step takes twice as long
    // without it here).
    convkit::threads::configure(None).unwrap();
    convkit::keep_freed_memory_for_reuse();
    let spec = Sequential::preset("tutorial-mnist").unwrap();
    let weights = init::glorot_uniform(&spec, 0).unwrap();
    let x32 = Array4::from_shape_fn((32, 28, 28, 1), |(n, h, w, _)| {
        ((n * 31 + h * 7 + w) % 255) as f32 / 255.0
    });
    let x256 = Array4::from_shape_fn((256, 28, 28, 1), |(n, h, w, _)| {
        ((n * 31 + h * 7 + w) % 255) as f32 / 255.0
    });
    let y = Targets::Sparse((0..32).map(|i| i % 10).collect());
    for name in convkit::backend_names() {
        let Ok(backend) = convkit::backend(name) else {
            continue;
        };
        let compile = Compile::new(Optimizer::adam(), Loss::SparseCategoricalCrossentropy);
        let mut model =
            Model::with_weights(spec.clone(), compile, backend.as_ref(), &weights).unwrap();
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        group.throughput(Throughput::Elements(32));
        group.bench_function("train_step_b32", |b| {
            b.iter(|| model.network_mut().train_step(x32.view(), &y).unwrap())
        });
        group.throughput(Throughput::Elements(256));
        group.bench_function("predict_b256", |b| {
            b.iter(|| model.network().predict(x256.view()).unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, engines);
criterion_main!(benches);
