//! ReLU as one pass forward and one backward: `max(x, 0)` with a gradient of 0 wherever the
//! output is not positive (at exactly 0 too, as Keras and PyTorch). NaN stays NaN.

use crate::threads::{collect_chunks, Threads};
use crate::{check_len, Result};

/// Elements per parallel task: large enough to amortise the hand-off.
const CHUNK: usize = 16 * 1024;

/// `max(v, 0)` of one value: 0 for −0 too, NaN stays NaN.
pub(crate) fn rectify(v: f32) -> f32 {
    if v <= 0.0 {
        0.0
    } else {
        v
    }
}

/// `y = max(x, 0)`, any shape.
pub fn forward(threads: &dyn Threads, x: &[f32]) -> Vec<f32> {
    collect_chunks(threads, x.len(), CHUNK, |i| {
        (x[i * CHUNK..].iter()).map(|&x| rectify(x))
    })
}

/// `dx = dy` where the forward's output `y` is positive, 0 elsewhere.
pub fn backward(threads: &dyn Threads, dy: &[f32], y: &[f32]) -> Result<Vec<f32>> {
    check_len("convkit relu", "output", y.len(), dy.len())?;
    Ok(collect_chunks(threads, dy.len(), CHUNK, |i| {
        let (dy, y) = (&dy[i * CHUNK..], &y[i * CHUNK..]);
        dy.iter()
            .zip(y)
            .map(|(&dy, &y)| if y > 0.0 { dy } else { 0.0 })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::POOLS;

    #[test]
    fn zero_gradient_at_zero_and_nan_kept_across_chunks() {
        let x: Vec<f32> = (0..CHUNK * 2 + 5)
            .map(|i| match i % 4 {
                0 => -1.0,
                1 => 0.0,
                2 => i as f32,
                _ => f32::NAN,
            })
            .collect();
        let dy: Vec<f32> = (0..x.len()).map(|i| i as f32 + 1.0).collect();
        for &threads in POOLS {
            let y = forward(threads, &x);
            let dx = backward(threads, &dy, &y).unwrap();
            for (i, ((&x, &y), &dx)) in x.iter().zip(&y).zip(&dx).enumerate() {
                if x.is_nan() {
                    assert!(y.is_nan() && dx == 0.0, "{i}");
                } else {
                    assert_eq!(y, x.max(0.0), "{i}");
                    assert_eq!(dx, if x > 0.0 { dy[i] } else { 0.0 }, "{i}");
                }
            }
        }
    }
}
