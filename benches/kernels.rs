//! convkit-cpu's kernels alone, on `tutorial-mnist`'s shapes at batch 32 (the step's two
//! convolutions, their ReLUs and poolings, and the three fused), forward and every gradient,
//! on rayon's pool as burn-flex runs them. `cargo xtask bench -- kernels`. Throughput is in
//! FLOPs for the convolutions' GEMMs (2·n·o·oh·ow·c·kh·kw each) and in elements for the rest.

use convkit_cpu::conv::Conv2d;
use convkit_cpu::conv_relu_pool::ConvReluMaxPoolShape;
use convkit_cpu::pool::MaxPool2d;
use convkit_cpu::{relu, Rayon};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// `len` values in [-0.5, 0.5) that repeat every 13.
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + seed) % 13) as f32 / 13.0 - 0.5)
        .collect()
}

fn kernels(c: &mut Criterion) {
    // As the `convkit` command does: this thread joins rayon's pool, as under burn-flex.
    convkit::threads::configure(None).unwrap();
    let (threads, n) = (&Rayon, 32);
    // (name, input channels, input side, filters): the two 3×3 convolutions of tutorial-mnist.
    for (name, channels, side, filters) in [("conv1", 1, 28, 32), ("conv2", 32, 13, 64)] {
        let conv = Conv2d::new([0; 4], [1, 1])
            .shape(&[n, channels, side, side], &[filters, channels, 3, 3])
            .unwrap();
        let [_, _, oh, ow] = conv.output();
        let x = values(n * channels * side * side, 1);
        let kernel = values(filters * channels * 9, 2);
        let bias = values(filters, 3);
        let dy = values(n * filters * oh * ow, 4);
        let mut group = c.benchmark_group(format!("kernels/{name}"));
        group.sample_size(30);
        group.throughput(Throughput::Elements(
            (2 * n * filters * oh * ow * channels * 9) as u64,
        ));
        group.bench_function("forward", |b| {
            b.iter(|| conv.forward(threads, &x, &kernel, &bias).unwrap())
        });
        group.bench_function("input_grad", |b| {
            b.iter(|| conv.input_grad(threads, &dy, &kernel).unwrap())
        });
        group.bench_function("kernel_grad", |b| {
            b.iter(|| conv.kernel_grad(threads, &x, &dy).unwrap())
        });
        group.throughput(Throughput::Elements(dy.len() as u64));
        group.bench_function("bias_grad", |b| {
            b.iter(|| conv.bias_grad(threads, &dy).unwrap())
        });
        let y = relu::forward(threads, &dy);
        group.bench_function("relu_forward", |b| b.iter(|| relu::forward(threads, &dy)));
        group.bench_function("relu_backward", |b| {
            b.iter(|| relu::backward(threads, &dy, &y).unwrap())
        });
        let pool = MaxPool2d::new([2, 2], [2, 2])
            .shape(&conv.output())
            .unwrap();
        let pooled = pool.forward(threads, &y).unwrap();
        group.bench_function("max_pool_forward", |b| {
            b.iter(|| pool.forward(threads, &y).unwrap())
        });
        group.bench_function("max_pool_backward", |b| {
            b.iter(|| pool.backward(threads, &y, &pooled).unwrap())
        });
        // The three as one: against forward + relu_forward + max_pool_forward, and the
        // scatter against max_pool_backward + relu_backward (the FLOPs are the forward's).
        let block = ConvReluMaxPoolShape::new(conv, MaxPool2d::new([2, 2], [2, 2])).unwrap();
        let (_, winners) = (block.forward_with_winners(threads, &x, &kernel, &bias)).unwrap();
        group.throughput(Throughput::Elements(
            (2 * n * filters * oh * ow * channels * 9) as u64,
        ));
        group.bench_function("conv_relu_max_pool_forward", |b| {
            b.iter(|| {
                block
                    .forward_with_winners(threads, &x, &kernel, &bias)
                    .unwrap()
            })
        });
        group.bench_function("conv_relu_max_pool_inference", |b| {
            b.iter(|| block.forward(threads, &x, &kernel, &bias).unwrap())
        });
        group.throughput(Throughput::Elements(dy.len() as u64));
        group.bench_function("conv_relu_max_pool_output_grad", |b| {
            b.iter(|| block.conv_output_grad(threads, &pooled, &winners).unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
