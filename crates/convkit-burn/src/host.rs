//! burn-flex on convkit-cpu's kernels: convolution with its bias, max pooling, ReLU and Dense,
//! forward and backward, plugged into burn through its backend extension
//! (`#[backend_extension]`, burn 0.22.1).
//!
//! burn's own Flex convolution copies to NCHW and computes the kernel gradient as a
//! convolution with an image-sized kernel, and its pooling is a scalar loop per output: the
//! two took half of a burn-flex training step. The same im2col + GEMM and one-pass kernels
//! that candle runs run here on rayon's pool, the one Flex runs its own operations on.
//!
//! The trait routes to `Flex` for plain tensors (inference) and to `Autodiff<Flex>` for
//! tracked ones (training), where each op registers a backward written here. Only burn-flex
//! calls it (`BurnOps` checks the engine); burn's other backends keep burn's operations. Every
//! tensor is 4-D, as elsewhere in the engine: a Dense input is `[n, inputs, 1, 1]`, its kernel
//! burn's `[inputs, units, 1, 1]` and a bias `[units, 1, 1, 1]`.

use burn_core as burn;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::{backend_extension, tensor::FloatTensor, Backend};
use burn_tensor::TensorData;
use convkit_cpu::conv::{Conv2d, Conv2dShape};
use convkit_cpu::conv_relu_pool::ConvReluMaxPoolShape;
use convkit_cpu::dense::{Dense, KernelLayout};
use convkit_cpu::pool::{MaxPool2d, MaxPool2dShape};
use convkit_cpu::Rayon;

/// convkit-cpu's kernels as burn operations. Shapes are checked by the caller
/// ([`crate::BurnOps`]) before an op is dispatched, so the kernels' shape errors cannot reach
/// here; should one, it is a bug and panics with the kernel's message.
#[backend_extension(Flex, Autodiff)]
pub(crate) trait HostKernels: Backend {
    /// `y [n, o, oh, ow]` from `x [n, c, h, w]`, `kernel [o, c, kh, kw]`, `bias [o, 1, 1, 1]`.
    fn host_conv2d(
        x: FloatTensor<Self>,
        kernel: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        conv: Conv2d,
    ) -> FloatTensor<Self>;
    /// `max_pool(relu(conv(x)))`, `[n, o, ph, pw]`, from `host_conv2d`'s operands.
    fn host_conv2d_relu_max_pool(
        x: FloatTensor<Self>,
        kernel: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        conv: Conv2d,
        pool: MaxPool2d,
    ) -> FloatTensor<Self>;
    /// `y [n, c, oh, ow]`, each window's first maximum of `x [n, c, h, w]`.
    fn host_max_pool2d(x: FloatTensor<Self>, pool: MaxPool2d) -> FloatTensor<Self>;
    /// `max(x, 0)`, any shape; a gradient of 0 where the output is not positive.
    fn host_relu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `y [n, units, 1, 1]` from `x [n, inputs, 1, 1]`, `kernel [inputs, units, 1, 1]` and
    /// `bias [units, 1, 1, 1]`.
    fn host_dense(
        x: FloatTensor<Self>,
        kernel: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `t` with its values contiguous, copied only where they are not.
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 values of a contiguous tensor.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().unwrap_or_else(|| {
        panic!("convkit's host kernels take contiguous f32 tensors, found {t:?}")
    })
}

/// The dims of a tensor.
fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().as_slice().to_vec()
}

/// A kernel's output as a tensor of `dims`.
fn tensor(values: convkit_cpu::Result<Vec<f32>>, dims: &[usize]) -> FlexTensor {
    let values = values.unwrap_or_else(|e| panic!("{e}"));
    FlexTensor::from_data(TensorData::new(values, dims.to_vec()))
}

fn conv_shape(conv: Conv2d, x: &FlexTensor, kernel: &FlexTensor) -> Conv2dShape {
    conv.shape(&dims(x), &dims(kernel))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn block_shape(
    conv: Conv2d,
    pool: MaxPool2d,
    x: &FlexTensor,
    kernel: &FlexTensor,
) -> ConvReluMaxPoolShape {
    ConvReluMaxPoolShape::new(conv_shape(conv, x, kernel), pool).unwrap_or_else(|e| panic!("{e}"))
}

fn pool_shape(pool: MaxPool2d, x: &FlexTensor) -> MaxPool2dShape {
    pool.shape(&dims(x)).unwrap_or_else(|e| panic!("{e}"))
}

/// The Dense product of `x [n, inputs, 1, 1]` by burn's kernel `[inputs, units, 1, 1]`.
fn dense_shape(x: &FlexTensor, kernel: &FlexTensor) -> Dense {
    let (x, kernel) = (dims(x), dims(kernel));
    Dense::new(x[0], kernel[0], kernel[1], KernelLayout::InputsByUnits)
}

impl HostKernels for Flex {
    fn host_conv2d(
        x: FlexTensor,
        kernel: FlexTensor,
        bias: FlexTensor,
        conv: Conv2d,
    ) -> FlexTensor {
        let (x, kernel, bias) = (contiguous(x), contiguous(kernel), contiguous(bias));
        let s = conv_shape(conv, &x, &kernel);
        tensor(
            s.forward(&Rayon, f32s(&x), f32s(&kernel), f32s(&bias)),
            &s.output(),
        )
    }

    fn host_conv2d_relu_max_pool(
        x: FlexTensor,
        kernel: FlexTensor,
        bias: FlexTensor,
        conv: Conv2d,
        pool: MaxPool2d,
    ) -> FlexTensor {
        let (x, kernel, bias) = (contiguous(x), contiguous(kernel), contiguous(bias));
        let s = block_shape(conv, pool, &x, &kernel);
        tensor(
            s.forward(&Rayon, f32s(&x), f32s(&kernel), f32s(&bias)),
            &s.output(),
        )
    }

    fn host_max_pool2d(x: FlexTensor, pool: MaxPool2d) -> FlexTensor {
        let x = contiguous(x);
        let s = pool_shape(pool, &x);
        tensor(s.forward(&Rayon, f32s(&x)), &s.output())
    }

    fn host_relu(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        tensor(Ok(convkit_cpu::relu::forward(&Rayon, f32s(&x))), &dims(&x))
    }

    fn host_dense(x: FlexTensor, kernel: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (x, kernel, bias) = (contiguous(x), contiguous(kernel), contiguous(bias));
        let d = dense_shape(&x, &kernel);
        tensor(
            d.forward(&Rayon, f32s(&x), f32s(&kernel), f32s(&bias)),
            &[d.n, d.units, 1, 1],
        )
    }
}

/// Registers `grad()` for the parent `node` where autodiff tracks it.
fn register(grads: &mut Gradients, node: Option<NodeId>, grad: impl FnOnce() -> FlexTensor) {
    if let Some(node) = node {
        grads.register::<Flex>(node, grad());
    }
}

/// The convolution's backward: the input gradient where the input is tracked (not for a
/// first layer's images), the kernel's and the bias's.
#[derive(Debug)]
struct Conv2dBackward;

impl Backward<Flex, 3> for Conv2dBackward {
    /// The forward's contiguous input and kernel, its sizes, and the bias's dims.
    type State = (FlexTensor, FlexTensor, Conv2dShape, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let nodes = ops.parents.map(|p| p.map(|node| node.id));
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, kernel, s, bias_dims) = ops.state;
        register_conv_grads(grads, nodes, (&x, &kernel, &s, &bias_dims), f32s(&dy));
    }
}

/// Registers the gradients of a convolution's tracked operands from `dy`, the gradient at its
/// output: `nodes` are the input's, the kernel's and the bias's.
fn register_conv_grads(
    grads: &mut Gradients,
    [x_node, kernel_node, bias_node]: [Option<NodeId>; 3],
    (x, kernel, s, bias_dims): (&FlexTensor, &FlexTensor, &Conv2dShape, &[usize]),
    dy: &[f32],
) {
    register(grads, x_node, || {
        tensor(s.input_grad(&Rayon, dy, f32s(kernel)), &s.input())
    });
    register(grads, kernel_node, || {
        tensor(s.kernel_grad(&Rayon, f32s(x), dy), &s.kernel())
    });
    register(grads, bias_node, || {
        tensor(s.bias_grad(&Rayon, dy), bias_dims)
    });
}

/// The fused convolution, ReLU and max pooling's backward: the gradients of the tracked
/// operands from the pooled output's gradient and each window's winner
/// ([`ConvReluMaxPoolShape::kernel_grad`] and its siblings).
#[derive(Debug)]
struct ConvReluMaxPoolBackward;

impl Backward<Flex, 3> for ConvReluMaxPoolBackward {
    /// The forward's contiguous input and kernel, its sizes, the bias's dims and the winners.
    type State = (
        FlexTensor,
        FlexTensor,
        ConvReluMaxPoolShape,
        Vec<usize>,
        Vec<u32>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, kernel_node, bias_node] = ops.parents.map(|p| p.map(|node| node.id));
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, kernel, s, bias_dims, winners) = ops.state;
        let dy = f32s(&dy);
        register(grads, x_node, || {
            let dx = s.input_grad(&Rayon, dy, &winners, f32s(&kernel));
            tensor(dx, &s.conv.input())
        });
        register(grads, kernel_node, || {
            tensor(
                s.kernel_grad(&Rayon, f32s(&x), dy, &winners),
                &s.conv.kernel(),
            )
        });
        register(grads, bias_node, || {
            tensor(s.bias_grad(&Rayon, dy, &winners), &bias_dims)
        });
    }
}

/// Max pooling's backward: each output's gradient to its window's first maximum.
#[derive(Debug)]
struct MaxPool2dBackward;

impl Backward<Flex, 1> for MaxPool2dBackward {
    type State = (FlexTensor, MaxPool2dShape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node] = ops.parents.map(|p| p.map(|node| node.id));
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, s) = ops.state;
        register(grads, x_node, || {
            tensor(s.backward(&Rayon, f32s(&x), f32s(&dy)), &dims(&x))
        });
    }
}

/// ReLU's backward, from its output.
#[derive(Debug)]
struct ReluBackward;

impl Backward<Flex, 1> for ReluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node] = ops.parents.map(|p| p.map(|node| node.id));
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let y = ops.state;
        register(grads, x_node, || {
            tensor(
                convkit_cpu::relu::backward(&Rayon, f32s(&dy), f32s(&y)),
                &dims(&y),
            )
        });
    }
}

/// Dense's backward: the input gradient where the input is tracked, the kernel's and the bias's.
#[derive(Debug)]
struct DenseBackward;

impl Backward<Flex, 3> for DenseBackward {
    /// The forward's contiguous input and kernel, and the bias's dims.
    type State = (FlexTensor, FlexTensor, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, kernel_node, bias_node] = ops.parents.map(|p| p.map(|node| node.id));
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let (x, kernel, bias_dims) = ops.state;
        let (d, dy) = (dense_shape(&x, &kernel), f32s(&dy));
        register(grads, x_node, || {
            tensor(d.input_grad(&Rayon, dy, f32s(&kernel)), &dims(&x))
        });
        register(grads, kernel_node, || {
            tensor(d.kernel_grad(&Rayon, f32s(&x), dy), &dims(&kernel))
        });
        register(grads, bias_node, || tensor(d.bias_grad(dy), &bias_dims));
    }
}

/// The autodiff nodes of an op's operands, and their Flex values.
fn split<C: CheckpointStrategy, const N: usize>(
    operands: [FloatTensor<Autodiff<Flex, C>>; N],
) -> ([NodeGuard; N], [FlexTensor; N]) {
    let nodes = operands.each_ref().map(|t| t.node());
    (nodes, operands.map(|t| t.into_primitive()))
}

impl<C: CheckpointStrategy> HostKernels for Autodiff<Flex, C> {
    fn host_conv2d(
        x: FloatTensor<Self>,
        kernel: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        conv: Conv2d,
    ) -> FloatTensor<Self> {
        let (nodes, [x, kernel, bias]) = split::<C, 3>([x, kernel, bias]);
        match Conv2dBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, kernel) = (contiguous(x), contiguous(kernel));
                let (s, bias_dims) = (conv_shape(conv, &x, &kernel), dims(&bias));
                let y = Flex::host_conv2d(x.clone(), kernel.clone(), bias, conv);
                prep.finish((x, kernel, s, bias_dims), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::host_conv2d(x, kernel, bias, conv)),
        }
    }

    fn host_conv2d_relu_max_pool(
        x: FloatTensor<Self>,
        kernel: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        conv: Conv2d,
        pool: MaxPool2d,
    ) -> FloatTensor<Self> {
        let (nodes, [x, kernel, bias]) = split::<C, 3>([x, kernel, bias]);
        match ConvReluMaxPoolBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, kernel, bias) = (contiguous(x), contiguous(kernel), contiguous(bias));
                let s = block_shape(conv, pool, &x, &kernel);
                let (y, winners) = s
                    .forward_with_winners(&Rayon, f32s(&x), f32s(&kernel), f32s(&bias))
                    .unwrap_or_else(|e| panic!("{e}"));
                let y = tensor(Ok(y), &s.output());
                prep.finish((x, kernel, s, dims(&bias), winners), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::host_conv2d_relu_max_pool(x, kernel, bias, conv, pool))
            }
        }
    }

    fn host_max_pool2d(x: FloatTensor<Self>, pool: MaxPool2d) -> FloatTensor<Self> {
        let (nodes, [x]) = split::<C, 1>([x]);
        match MaxPool2dBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = contiguous(x);
                let s = pool_shape(pool, &x);
                let y = Flex::host_max_pool2d(x.clone(), pool);
                prep.finish((x, s), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::host_max_pool2d(x, pool)),
        }
    }

    fn host_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (nodes, [x]) = split::<C, 1>([x]);
        match ReluBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = Flex::host_relu(x);
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::host_relu(x)),
        }
    }

    fn host_dense(
        x: FloatTensor<Self>,
        kernel: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (nodes, [x, kernel, bias]) = split::<C, 3>([x, kernel, bias]);
        match DenseBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, kernel) = (contiguous(x), contiguous(kernel));
                let bias_dims = dims(&bias);
                let y = Flex::host_dense(x.clone(), kernel.clone(), bias);
                prep.finish((x, kernel, bias_dims), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::host_dense(x, kernel, bias)),
        }
    }
}

/// The extension's operations on the engine's 4-D tensors, through burn's dispatch.
pub(crate) mod ops {
    use super::*;
    use burn::backend::Dispatch;
    use burn_tensor::Tensor;

    /// [`HostKernels::host_conv2d`].
    pub(crate) fn conv2d(
        x: &Tensor<4>,
        kernel: &Tensor<4>,
        bias: &Tensor<4>,
        conv: Conv2d,
    ) -> Tensor<4> {
        Tensor::from_dispatch(<Dispatch as HostKernels>::host_conv2d(
            x.clone().into_dispatch(),
            kernel.clone().into_dispatch(),
            bias.clone().into_dispatch(),
            conv,
        ))
    }

    /// [`HostKernels::host_conv2d_relu_max_pool`].
    pub(crate) fn conv2d_relu_max_pool(
        x: &Tensor<4>,
        kernel: &Tensor<4>,
        bias: &Tensor<4>,
        conv: Conv2d,
        pool: MaxPool2d,
    ) -> Tensor<4> {
        Tensor::from_dispatch(<Dispatch as HostKernels>::host_conv2d_relu_max_pool(
            x.clone().into_dispatch(),
            kernel.clone().into_dispatch(),
            bias.clone().into_dispatch(),
            conv,
            pool,
        ))
    }

    /// [`HostKernels::host_max_pool2d`].
    pub(crate) fn max_pool2d(x: &Tensor<4>, pool: MaxPool2d) -> Tensor<4> {
        Tensor::from_dispatch(<Dispatch as HostKernels>::host_max_pool2d(
            x.clone().into_dispatch(),
            pool,
        ))
    }

    /// [`HostKernels::host_relu`].
    pub(crate) fn relu(x: &Tensor<4>) -> Tensor<4> {
        Tensor::from_dispatch(<Dispatch as HostKernels>::host_relu(
            x.clone().into_dispatch(),
        ))
    }

    /// [`HostKernels::host_dense`].
    pub(crate) fn dense(x: &Tensor<4>, kernel: &Tensor<4>, bias: &Tensor<4>) -> Tensor<4> {
        Tensor::from_dispatch(<Dispatch as HostKernels>::host_dense(
            x.clone().into_dispatch(),
            kernel.clone().into_dispatch(),
            bias.clone().into_dispatch(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::ops;
    use burn_tensor::activation::relu;
    use burn_tensor::module::{conv2d, max_pool2d};
    use burn_tensor::ops::{ConvOptions, MaxPoolOptions};
    use burn_tensor::{Device, Distribution, Tensor};

    /// The largest absolute difference between two tensors of one shape.
    fn gap(a: &Tensor<4>, b: &Tensor<4>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        a.clone().sub(b.clone()).abs().max().into_scalar::<f32>()
    }

    /// Checks `ours` against `burns` (burn's built-in ops) on `Device::flex().autodiff()`:
    /// forward within `forward`, and every operand's gradient within `backward` under a loss
    /// that weighs each output differently; then forward again on plain Flex (inference).
    fn assert_matches_burn(
        dims: &[[usize; 4]],
        ours: impl Fn(&[Tensor<4>]) -> Tensor<4>,
        burns: impl Fn(&[Tensor<4>]) -> Tensor<4>,
        [forward, backward]: [f32; 2],
        case: &str,
    ) {
        let device = Device::flex().autodiff();
        let operands: Vec<Tensor<4>> = dims
            .iter()
            .map(|d| {
                Tensor::<4>::random(*d, Distribution::Normal(0.0, 1.0), &device).require_grad()
            })
            .collect();
        let (y_ours, y_burn) = (ours(&operands), burns(&operands));
        assert!(gap(&y_ours, &y_burn) < forward, "forward, {case}");
        let weights = Tensor::<4>::random(y_ours.dims(), Distribution::Normal(0.0, 1.0), &device);
        let g_ours = y_ours.mul(weights.clone()).sum().backward();
        let g_burn = y_burn.mul(weights).sum().backward();
        for (i, t) in operands.iter().enumerate() {
            let (a, b) = (t.grad(&g_ours).unwrap(), t.grad(&g_burn).unwrap());
            assert_eq!(a.dims(), t.dims(), "gradient {i} shape, {case}");
            assert!(
                gap(&a, &b) < backward,
                "gradient {i}, {case}: {}",
                gap(&a, &b)
            );
        }
        let plain: Vec<Tensor<4>> = operands.iter().map(|t| t.clone().inner()).collect();
        assert!(
            gap(&ours(&plain), &burns(&plain)) < forward,
            "inference, {case}"
        );
    }

    #[test]
    fn convolution_matches_burns_forward_and_backward() {
        for (pad, strides, [h, w]) in [
            ([0; 4], [1, 1], [9, 8]),
            ([1; 4], [1, 1], [7, 7]),
            ([0, 1, 0, 1], [2, 2], [8, 9]),
            ([2, 1, 1, 2], [3, 2], [10, 9]),
        ] {
            let conv = convkit_cpu::conv::Conv2d::new(pad, strides);
            let [top, bottom, left, right] = pad;
            assert_matches_burn(
                &[[3, 2, h, w], [4, 2, 3, 3], [4, 1, 1, 1]],
                |t| ops::conv2d(&t[0], &t[1], &t[2], conv),
                |t| {
                    let options = ConvOptions::new_with_padding(
                        strides,
                        [(top, bottom), (left, right)],
                        [1, 1],
                        1,
                    );
                    conv2d(
                        t[0].clone(),
                        t[1].clone(),
                        Some(t[2].clone().reshape([4])),
                        options,
                    )
                },
                [1e-4, 1e-3],
                &format!("pad {pad:?} strides {strides:?}"),
            );
        }
    }

    #[test]
    fn max_pooling_relu_and_dense_match_burns_forward_and_backward() {
        for (size, strides) in [([2, 2], [2, 2]), ([3, 2], [1, 2])] {
            let pool = convkit_cpu::pool::MaxPool2d::new(size, strides);
            assert_matches_burn(
                &[[2, 3, 9, 8]],
                |t| ops::max_pool2d(&t[0], pool),
                |t| max_pool2d(t[0].clone(), MaxPoolOptions::new(size).with_stride(strides)),
                [1e-6, 1e-6],
                &format!("pool {size:?} {strides:?}"),
            );
        }
        assert_matches_burn(
            &[[2, 3, 5, 4]],
            |t| ops::relu(&t[0]),
            |t| relu(t[0].clone()),
            [1e-7, 1e-7],
            "relu",
        );
        for (n, inputs, units) in [(1, 3, 2), (5, 7, 3), (32, 40, 9)] {
            assert_matches_burn(
                &[[n, inputs, 1, 1], [inputs, units, 1, 1], [units, 1, 1, 1]],
                |t| ops::dense(&t[0], &t[1], &t[2]),
                |t| {
                    let x = t[0].clone().reshape([n, inputs]);
                    let k = t[1].clone().reshape([inputs, units]);
                    let b = t[2].clone().reshape([1, units]);
                    x.matmul(k).add(b).reshape([n, units, 1, 1])
                },
                [1e-4, 1e-4],
                &format!("dense {n}×{inputs}→{units}"),
            );
        }
    }

    /// The fused block against burn's own convolution, ReLU and max pooling, forward,
    /// backward and in inference (the kernel crate checks it bit for bit against its three
    /// kernels, with ties and NaNs): two input channels take the dense gradients of the
    /// scattered output gradient, sixteen the sums over the winners.
    #[test]
    fn the_fused_block_matches_burns_three_ops() {
        for (pad, strides, size, pool_strides, c) in [
            ([0; 4], [1, 1], [2, 2], [2, 2], 2),
            ([1; 4], [2, 1], [3, 2], [1, 2], 2),
            ([0; 4], [1, 1], [2, 2], [2, 2], 16),
        ] {
            let conv = convkit_cpu::conv::Conv2d::new(pad, strides);
            let pool = convkit_cpu::pool::MaxPool2d::new(size, pool_strides);
            let [top, bottom, left, right] = pad;
            assert_matches_burn(
                &[[3, c, 10, 9], [4, c, 3, 3], [4, 1, 1, 1]],
                |t| ops::conv2d_relu_max_pool(&t[0], &t[1], &t[2], conv, pool),
                |t| {
                    let options = ConvOptions::new_with_padding(
                        strides,
                        [(top, bottom), (left, right)],
                        [1, 1],
                        1,
                    );
                    let bias = Some(t[2].clone().reshape([4]));
                    let y = relu(conv2d(t[0].clone(), t[1].clone(), bias, options));
                    max_pool2d(y, MaxPoolOptions::new(size).with_stride(pool_strides))
                },
                [1e-4, 1e-3],
                &format!(
                    "pad {pad:?} strides {strides:?} pool {size:?} {pool_strides:?}, {c} channels"
                ),
            );
        }
    }

    /// A first layer's images are constants: no input gradient is computed or registered.
    #[test]
    fn a_constant_input_gets_no_gradient() {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random([2, 1, 6, 6], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([3, 1, 3, 3], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let b = Tensor::<4>::zeros([3, 1, 1, 1], &device).require_grad();
        let conv = convkit_cpu::conv::Conv2d::new([0, 1, 0, 1], [1, 2]);
        let y = ops::conv2d(&x, &k, &b, conv);
        assert_eq!(y.dims(), [2, 3, 5, 3]);
        let grads = y.sum().backward();
        assert!(x.grad(&grads).is_none());
        assert!(k.grad(&grads).is_some() && b.grad(&grads).is_some());
    }
}
