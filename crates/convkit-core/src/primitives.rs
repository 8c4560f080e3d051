//! The operations an engine supplies: device tensors in, device tensors out, on the engine's
//! own autodiff. Layer-sized operations (convolution, pooling, the Dense product), where an
//! engine's kernels decide the speed, and a few primitives (reshape, permute, element-wise,
//! reductions) that core writes everything else over once ([`crate::composite`]).
//!
//! Layout on the device: images are NCHW (`[n, channels, height, width]`), flat activations
//! `[n, features]`.

pub use convkit_cpu::Threads;
use ndarray::ArrayView4;

use crate::op::PoolKind;
use crate::optim::TensorMath;
use crate::plan::{PlannedOp, WeightSpec};
use crate::{Error, Result};

/// An element-wise function of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    /// `max(x, 0)`; its gradient at exactly 0 is 0, as in Keras and PyTorch.
    Relu,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    Tanh,
    Exp,
    /// The natural logarithm.
    Log,
}

/// An element-wise function of two tensors, see [`Ops::binary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

/// A reduction over axes, see [`Ops::reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    /// The maximum; where it is used, its gradient does not matter (core takes it as a
    /// constant for numerical stability).
    Max,
}

/// An optimizer's step on one weight, element by element: `(threads, values, gradient,
/// slots)`, each slot (a moment, a velocity) as long as the values ([`Ops::update_in_place`]);
/// `threads` is the pool the engine's own kernels run on, which the update shares its
/// elements out on.
pub type ElementUpdate<'f> = dyn FnMut(&dyn Threads, &mut [f32], &[f32], &mut [&mut [f32]]) + 'f;

/// A convolution whose output goes through ReLU and then max pooling, as one operation
/// ([`Ops::conv2d_relu_max_pool`]): the common block of an image classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvReluMaxPool {
    /// The convolution's zero padding, `[top, bottom, left, right]`.
    pub pad: [usize; 4],
    /// The convolution's strides, `[h, w]`.
    pub strides: [usize; 2],
    /// The pooling windows, `[h, w]`.
    pub pool_size: [usize; 2],
    /// The pooling strides, `[h, w]`.
    pub pool_strides: [usize; 2],
}

/// [`Ops::conv2d_relu_max_pool`] as its three operations, one after the other: the default,
/// and what an engine falls back to where its fused kernel does not apply.
pub fn conv2d_relu_max_pool_unfused<O: Ops + ?Sized>(
    ops: &O,
    x: &O::Tensor,
    kernel: &O::Tensor,
    bias: &O::Tensor,
    block: ConvReluMaxPool,
) -> Result<O::Tensor> {
    let y = ops.conv2d(x, kernel, bias, block.pad, block.strides)?;
    let y = ops.unary(Unary::Relu, &y)?;
    ops.pool2d(&y, PoolKind::Max, block.pool_size, block.pool_strides)
}

/// The operations an engine supplies. Every method works on device tensors in the layouts
/// above; errors are [`Error::Engine`] naming the engine (see [`Ops::engine`]).
pub trait Ops {
    /// A device tensor; cloning shares its storage.
    type Tensor: Clone + TensorMath;

    /// The engine's CLI name, e.g. `burn-flex`, for error messages.
    fn engine(&self) -> &str;

    /// Whether the engine can run `op` (layer `layer` of the plan); the reason when it cannot.
    /// Asked once per layer when a network is built.
    fn supports(&self, _op: &PlannedOp) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Keeps the engine's idle compute threads ready for its next operation until the value
    /// returned is dropped. The executor holds it over a step's or a prediction's operations,
    /// not over a wait for other ranks. For an engine on rayon's pool, whose idle threads
    /// otherwise fall asleep between two operations and each operation wakes them again with
    /// a system call. Default: `None`, for engines with a pool of their own or a device.
    fn keep_threads_awake(&self) -> Option<convkit_cpu::RayonAwake> {
        None
    }

    /// Row-major host values of `shape` as a device tensor that no gradient flows into.
    fn upload(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    /// A device tensor's values, row-major.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Row-major NHWC host values (`[n, h, w, c]`, a batch or a dropout mask) as the NCHW
    /// device tensor the layers take. Its memory layout is the engine's choice: by default
    /// the values are transposed on the host; an engine whose kernels are faster on
    /// channels-last memory can keep it.
    fn images(&self, [n, h, w, c]: [usize; 4], data: &[f32]) -> Result<Self::Tensor> {
        let nhwc = ArrayView4::from_shape((n, h, w, c), data)
            .map_err(|e| Error::engine(self.engine(), e))?;
        let nchw: Vec<f32> = nhwc.permuted_axes([0, 3, 1, 2]).iter().copied().collect();
        self.upload(&[n, c, h, w], &nchw)
    }
    /// `weight`'s canonical values as the engine keeps that weight (and its gradient and
    /// optimizer slots); an engine may choose another layout than the canonical one.
    fn upload_weight(&self, weight: &WeightSpec, data: &[f32]) -> Result<Self::Tensor> {
        self.upload(&weight.shape, data)
    }
    /// The inverse of [`Ops::upload_weight`]: canonical row-major values.
    fn download_weight(&self, _weight: &WeightSpec, t: &Self::Tensor) -> Result<Vec<f32>> {
        self.download(t)
    }

    /// A trained variable, held between steps, starting at `value`.
    fn variable(&self, value: Self::Tensor) -> Result<Self::Tensor>;
    /// Give `variable` the values of `value` (same shape): in place where the engine can,
    /// which spares an allocation of every weight at every step.
    fn assign(&self, variable: &mut Self::Tensor, value: Self::Tensor) -> Result<()> {
        *variable = self.variable(value)?;
        Ok(())
    }
    /// One optimizer update of `variable` in a single pass over host memory: calls `update`
    /// once with the variable's values, its gradient's and its optimizer `slots`' (each in
    /// the same element order, the values and slots to change in place). A CPU engine thus
    /// visits each parameter once per step instead of once per tensor operation of the rule.
    /// Returns `false`, having called nothing, where the engine keeps to the composite form
    /// ([`TensorMath`]): the default, and what GPU engines do.
    fn update_in_place(
        &self,
        _variable: &mut Self::Tensor,
        _grad: &Self::Tensor,
        _slots: &mut [&mut Self::Tensor],
        _update: &mut ElementUpdate<'_>,
    ) -> Result<bool> {
        Ok(false)
    }
    /// What a forward pass reads from `variable`: tracked when `grad` (its gradient is asked
    /// for with [`Ops::gradients`] afterwards), a constant otherwise.
    fn read(&self, variable: &Self::Tensor, grad: bool) -> Self::Tensor;
    /// Gradients of the scalar `loss` with respect to `wrt` (values from `read(_, true)`), in
    /// order; `None` for one the loss does not depend on.
    fn gradients(
        &self,
        loss: &Self::Tensor,
        wrt: &[&Self::Tensor],
    ) -> Result<Vec<Option<Self::Tensor>>>;
    /// The same values, cut from the autodiff graph.
    fn detach(&self, t: &Self::Tensor) -> Self::Tensor;

    /// Convolution of NCHW `x` with `kernel` (`[out, in, kh, kw]` as uploaded) plus `bias`
    /// `[out]`, after zero `pad` (`[top, bottom, left, right]`), at `strides` `[h, w]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        kernel: &Self::Tensor,
        bias: &Self::Tensor,
        pad: [usize; 4],
        strides: [usize; 2],
    ) -> Result<Self::Tensor>;
    /// `max_pool(relu(conv2d(x, kernel, bias)))`: [`Ops::conv2d`] with `block`'s padding and
    /// strides, ReLU, and [`Ops::pool2d`]'s max pooling over `block`'s windows, as one
    /// operation, the same values and gradients. An engine whose kernel pools each image's
    /// convolution output while it is in cache, never writing it whole, supplies it; the
    /// default runs the three ([`conv2d_relu_max_pool_unfused`]).
    fn conv2d_relu_max_pool(
        &self,
        x: &Self::Tensor,
        kernel: &Self::Tensor,
        bias: &Self::Tensor,
        block: ConvReluMaxPool,
    ) -> Result<Self::Tensor> {
        conv2d_relu_max_pool_unfused(self, x, kernel, bias, block)
    }
    /// Pooling of NCHW `x` over `size` windows at `strides`, no padding; rows and columns
    /// that do not fill a window are dropped. Max pooling's gradient goes to the first
    /// maximum of each window (row-major within the window).
    fn pool2d(
        &self,
        x: &Self::Tensor,
        kind: PoolKind,
        size: [usize; 2],
        strides: [usize; 2],
    ) -> Result<Self::Tensor>;
    /// `x · kernelᵀ + bias`: `x` `[n, in]`, `kernel` `[out, in]` as uploaded, `bias` `[out]`.
    fn dense(
        &self,
        x: &Self::Tensor,
        kernel: &Self::Tensor,
        bias: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// The tensor's shape as the engine keeps it. An engine may keep lower ranks padded with
    /// trailing axes of 1 (burn keeps every tensor 4-D), so what is written over these
    /// operations reshapes only to shapes of the rank this gives, and reduces keeping axes.
    fn dims(&self, x: &Self::Tensor) -> Vec<usize>;
    /// The same row-major values in `shape` (same element count); the engine may pad `shape`
    /// as [`Ops::dims`] says.
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// Axis `i` of the result is axis `axes[i]` of `x`.
    fn permute(&self, x: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;
    /// An element-wise function; see [`Unary`] for the gradients.
    fn unary(&self, op: Unary, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// An element-wise `a op b` of two tensors of one rank, an axis of size 1 in either
    /// broadcast over the other's.
    fn binary(&self, op: Binary, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `op` over `axes` of `x`, each kept with size 1.
    fn reduce(&self, op: Reduction, x: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;
}
