//! The Dense layer, `y = x · Wᵀ + b`, forward and backward. Each GEMM is shared out between
//! the threads by output rows (every sum runs whole on one thread), the bias is where the
//! output starts, and its gradient one pass over `dy` in row order, in f64.

use crate::gemm::{matmul_by_rows, Strides};
use crate::threads::Threads;
use crate::{check_len, Result};

/// The name errors give the op.
const OP: &str = "convkit dense";

/// How an engine stores a Dense kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelLayout {
    /// `[units, inputs]`: PyTorch's, candle's and convkit's canonical layout.
    UnitsByInputs,
    /// `[inputs, units]`: burn's.
    InputsByUnits,
}

/// One Dense product: input `[n, inputs]`, kernel in `layout`, bias `[units]`, output
/// `[n, units]`, all contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dense {
    pub n: usize,
    pub inputs: usize,
    pub units: usize,
    pub layout: KernelLayout,
}

impl Dense {
    pub fn new(n: usize, inputs: usize, units: usize, layout: KernelLayout) -> Self {
        Dense {
            n,
            inputs,
            units,
            layout,
        }
    }

    /// The kernel's `(row, column)` strides read as `Wᵀ`, `[inputs, units]`.
    fn kernel_t(&self) -> Strides {
        match self.layout {
            KernelLayout::UnitsByInputs => (1, self.inputs),
            KernelLayout::InputsByUnits => (self.units, 1),
        }
    }

    fn check(&self, what: &str, values: &[f32], len: usize) -> Result<()> {
        check_len(OP, what, values.len(), len)
    }

    /// `y [n, units] = x [n, inputs] · Wᵀ + bias [units]`.
    pub fn forward(
        &self,
        threads: &dyn Threads,
        x: &[f32],
        kernel: &[f32],
        bias: &[f32],
    ) -> Result<Vec<f32>> {
        let (n, inputs, units) = (self.n, self.inputs, self.units);
        self.check("input", x, n * inputs)?;
        self.check("kernel", kernel, units * inputs)?;
        self.check("bias", bias, units)?;
        let mut y = bias.repeat(n);
        matmul_by_rows(
            threads,
            &mut y,
            (units, inputs),
            true,
            x,
            (inputs, 1),
            kernel,
            self.kernel_t(),
        );
        Ok(y)
    }

    /// `dx [n, inputs] = dy [n, units] · W`.
    pub fn input_grad(
        &self,
        threads: &dyn Threads,
        dy: &[f32],
        kernel: &[f32],
    ) -> Result<Vec<f32>> {
        let (n, inputs, units) = (self.n, self.inputs, self.units);
        self.check("output gradient", dy, n * units)?;
        self.check("kernel", kernel, units * inputs)?;
        let (t_rs, t_cs) = self.kernel_t();
        let mut dx = vec![0f32; n * inputs];
        matmul_by_rows(
            threads,
            &mut dx,
            (inputs, units),
            false,
            dy,
            (units, 1),
            kernel,
            (t_cs, t_rs),
        );
        Ok(dx)
    }

    /// The kernel gradient in the kernel's layout: `dyᵀ · x` (`[units, inputs]`) or
    /// `xᵀ · dy` (`[inputs, units]`).
    pub fn kernel_grad(&self, threads: &dyn Threads, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let (n, inputs, units) = (self.n, self.inputs, self.units);
        self.check("input", x, n * inputs)?;
        self.check("output gradient", dy, n * units)?;
        let mut dk = vec![0f32; units * inputs];
        match self.layout {
            KernelLayout::UnitsByInputs => matmul_by_rows(
                threads,
                &mut dk,
                (inputs, n),
                false,
                dy,
                (1, units),
                x,
                (inputs, 1),
            ),
            KernelLayout::InputsByUnits => matmul_by_rows(
                threads,
                &mut dk,
                (units, n),
                false,
                x,
                (1, inputs),
                dy,
                (units, 1),
            ),
        }
        Ok(dk)
    }

    /// `db [units]`: each unit's sum of `dy [n, units]` over the rows.
    pub fn bias_grad(&self, dy: &[f32]) -> Result<Vec<f32>> {
        self.check("output gradient", dy, self.n * self.units)?;
        let mut sums = vec![0f64; self.units];
        for row in dy.chunks_exact(self.units.max(1)) {
            for (sum, &v) in sums.iter_mut().zip(row) {
                *sum += v as f64;
            }
        }
        Ok(sums.into_iter().map(|s| s as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_all_close, random, POOLS};

    #[test]
    fn forward_and_gradients_match_the_definition_in_both_layouts() {
        for (n, inputs, units) in [(1, 3, 2), (5, 7, 3), (32, 40, 9)] {
            let x = random(n * inputs, 1);
            let k = random(units * inputs, 2); // [units, inputs]
            let b = random(units, 3);
            let dy = random(n * units, 4);
            let w = |u: usize, i: usize| k[u * inputs + i] as f64;
            let y_ref: Vec<f32> = (0..n * units)
                .map(|j| {
                    let (r, u) = (j / units, j % units);
                    (b[u] as f64
                        + (0..inputs)
                            .map(|i| x[r * inputs + i] as f64 * w(u, i))
                            .sum::<f64>()) as f32
                })
                .collect();
            let dx_ref: Vec<f32> = (0..n * inputs)
                .map(|j| {
                    let (r, i) = (j / inputs, j % inputs);
                    (0..units)
                        .map(|u| dy[r * units + u] as f64 * w(u, i))
                        .sum::<f64>() as f32
                })
                .collect();
            let dk_ref: Vec<f32> = (0..units * inputs)
                .map(|j| {
                    let (u, i) = (j / inputs, j % inputs);
                    (0..n)
                        .map(|r| dy[r * units + u] as f64 * x[r * inputs + i] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            let db_ref: Vec<f32> = (0..units)
                .map(|u| (0..n).map(|r| dy[r * units + u] as f64).sum::<f64>() as f32)
                .collect();
            // the same kernel stored [inputs, units], and the reference kernel gradient so
            let transpose = |m: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                (0..rows * cols)
                    .map(|j| m[(j % rows) * cols + j / rows])
                    .collect()
            };
            let what = format!("{n}×{inputs}→{units}");
            for &threads in POOLS {
                for (layout, kernel, dk_expected) in [
                    (KernelLayout::UnitsByInputs, k.clone(), dk_ref.clone()),
                    (
                        KernelLayout::InputsByUnits,
                        transpose(&k, units, inputs),
                        transpose(&dk_ref, units, inputs),
                    ),
                ] {
                    let d = Dense::new(n, inputs, units, layout);
                    assert_all_close(
                        &what,
                        &[
                            (d.forward(threads, &x, &kernel, &b).unwrap(), &y_ref, 1e-5),
                            (d.input_grad(threads, &dy, &kernel).unwrap(), &dx_ref, 1e-5),
                            (d.kernel_grad(threads, &x, &dy).unwrap(), &dk_expected, 1e-5),
                            (d.bias_grad(&dy).unwrap(), &db_ref, 1e-6),
                        ],
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let d = Dense::new(4, 3, 2, KernelLayout::UnitsByInputs);
        let err = d
            .forward(&crate::Serial, &[0.0; 12], &[0.0; 5], &[0.0; 2])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "convkit dense: expected 6 values for the kernel, found 5"
        );
    }
}
