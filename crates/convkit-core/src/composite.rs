//! The operations core writes once over an engine's primitives ([`Ops::reshape`],
//! [`Ops::unary`], [`Ops::binary`], [`Ops::reduce`], ...): flattening, activations, batch
//! statistics and normalisation, and the two cross-entropies. Every engine gets them through
//! the blanket [`Composite`] impl and none writes its own, so they agree by construction.
//!
//! Before they moved here each engine wrote them itself, as these same compositions (candle's
//! and burn's softmax and log-softmax are compositions of these primitives too); tch alone
//! had fused kernels, for softmax and the two cross-entropies on `[n, classes]` logits, too
//! small to matter to a step's time. Batch normalisation now takes three passes over `x` instead of
//! the four each engine took. Where an engine's own fused version is measured faster, it
//! belongs in [`Ops`] as a primitive, with the measurement beside it.

use crate::op::Activation;
use crate::optim::TensorMath;
use crate::primitives::{Binary, Ops, Reduction, Unary};
use crate::Result;

/// Operations written over [`Ops`], for every engine.
pub trait Composite: Ops {
    /// NCHW `[n, c, h, w]` → `[n, h·w·c]` in (H, W, C) order, as Keras flattens.
    fn flatten(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let dims = self.dims(x);
        let n = dims[0];
        let features: usize = dims[1..].iter().product();
        self.reshape(&self.permute(x, &[0, 2, 3, 1])?, &[n, features])
    }

    /// An element-wise activation; softmax is over axis 1 (channels, or features).
    fn activation(&self, x: &Self::Tensor, activation: Activation) -> Result<Self::Tensor> {
        match activation {
            Activation::Linear => Ok(x.clone()),
            Activation::Relu => self.unary(Unary::Relu, x),
            Activation::Sigmoid => self.unary(Unary::Sigmoid, x),
            Activation::Tanh => self.unary(Unary::Tanh, x),
            Activation::Softmax => {
                let (_, e, total) = self.softmax_parts(x)?;
                self.binary(Binary::Div, &e, &total)
            }
        }
    }

    /// Per-channel mean and biased variance over every axis but axis 1: `[c]` each, tracked.
    fn moments(&self, x: &Self::Tensor) -> Result<(Self::Tensor, Self::Tensor)> {
        let dims = self.dims(x);
        let axes: Vec<usize> = (0..dims.len()).filter(|&d| d != 1).collect();
        let count: usize = axes.iter().map(|&d| dims[d]).product();
        let mean_over = |t: &Self::Tensor| -> Result<Self::Tensor> {
            self.reduce(Reduction::Sum, t, &axes)?
                .affine(1.0 / count as f64, 0.0)
        };
        let mean = mean_over(x)?;
        let variance = mean_over(&self.binary(Binary::Sub, x, &mean)?.sqr()?)?;
        Ok((
            self.reshape(&mean, &[dims[1]])?,
            self.reshape(&variance, &[dims[1]])?,
        ))
    }

    /// `(x − mean) / √(variance + epsilon) · gamma + beta`, the `[c]` vectors broadcast over
    /// axis 1 of `x`.
    fn batch_norm(
        &self,
        x: &Self::Tensor,
        mean: &Self::Tensor,
        variance: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        epsilon: f64,
    ) -> Result<Self::Tensor> {
        let mut channel = vec![1; self.dims(x).len()];
        channel[1] = self.dims(gamma).iter().product();
        let along_axis_1 = |v: &Self::Tensor| self.reshape(v, &channel);
        // gamma / √(variance + ε) on the `[c]` vectors, then two passes over `x`.
        let scale = gamma.div(&variance.affine(1.0, epsilon)?.sqrt()?)?;
        let centred = self.binary(Binary::Sub, x, &along_axis_1(mean)?)?;
        let scaled = self.binary(Binary::Mul, &centred, &along_axis_1(&scale)?)?;
        self.binary(Binary::Add, &scaled, &along_axis_1(beta)?)
    }

    /// Mean over the batch of `−Σ targets · log_softmax(logits)`, both `[n, classes]`; a
    /// one-element tensor.
    fn softmax_cross_entropy(
        &self,
        logits: &Self::Tensor,
        targets: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (shifted, _, total) = self.softmax_parts(logits)?;
        let log_softmax = self.binary(Binary::Sub, &shifted, &self.unary(Unary::Log, &total)?)?;
        let n = self.dims(logits)[0];
        self.scaled_sum(&log_softmax.mul(targets)?, -1.0 / n as f64)
    }

    /// Mean of `max(z, 0) − z·t + log(1 + e^−|z|)` (binary cross-entropy of sigmoid(z), stable
    /// for any logit), `logits` and `targets` `[n, 1]`; a one-element tensor. `|z|` is taken
    /// as `relu(z) + relu(−z)` and `max(z, 0)` as `(z + |z|) / 2`, so the gradient is
    /// `sigmoid(z) − t` at `z = 0` too (an engine's own `abs` may give 0 or 1 there).
    fn sigmoid_cross_entropy(
        &self,
        logits: &Self::Tensor,
        targets: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let z = logits;
        let negative_part = self.unary(Unary::Relu, &z.affine(-1.0, 0.0)?)?;
        let magnitude = self.unary(Unary::Relu, z)?.add(&negative_part)?;
        let positive_part = z.add(&magnitude)?.affine(0.5, 0.0)?;
        let e = self.unary(Unary::Exp, &magnitude.affine(-1.0, 0.0)?)?;
        let soft = self.unary(Unary::Log, &e.affine(1.0, 1.0)?)?;
        let terms = positive_part.sub(&z.mul(targets)?)?.add(&soft)?;
        let count: usize = self.dims(z).iter().product();
        self.scaled_sum(&terms, 1.0 / count as f64)
    }

    /// What softmax over axis 1 is made of, without overflow: `x` minus its maximum over
    /// axis 1 (that maximum taken as a constant), the exponential of that, and its sum over
    /// axis 1 (kept).
    fn softmax_parts(
        &self,
        x: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let max = self.detach(&self.reduce(Reduction::Max, x, &[1])?);
        let shifted = self.binary(Binary::Sub, x, &max)?;
        let e = self.unary(Unary::Exp, &shifted)?;
        let total = self.reduce(Reduction::Sum, &e, &[1])?;
        Ok((shifted, e, total))
    }

    /// The sum of every element of `x` times `scale`, as a one-element tensor.
    fn scaled_sum(&self, x: &Self::Tensor, scale: f64) -> Result<Self::Tensor> {
        let axes: Vec<usize> = (0..self.dims(x).len()).collect();
        let sum = self.reduce(Reduction::Sum, x, &axes)?;
        self.reshape(&sum.affine(scale, 0.0)?, &[1])
    }
}

impl<O: Ops + ?Sized> Composite for O {}
