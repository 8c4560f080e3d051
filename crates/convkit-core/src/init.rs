//! Initial weights, made once in core so every engine starts from the same numbers:
//! Keras' defaults, glorot-uniform kernels and zero biases, from a seeded ChaCha8 stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::plan::Role;
use crate::spec::Sequential;
use crate::weights::{Tensor, Weights};
use crate::Result;

/// Glorot-uniform kernels (limit √(6 / (fan_in + fan_out)), with fan_in = kh·kw·in and
/// fan_out = kh·kw·out for convolutions) and zero biases, in layer order from `seed`; batch
/// normalisations start as Keras' do, with γ and the moving variance 1, β and the moving
/// mean 0 (they draw nothing from the stream).
pub fn glorot_uniform(spec: &Sequential, seed: u64) -> Result<Weights> {
    glorot_uniform_for(&spec.plan()?, seed)
}

/// [`glorot_uniform`] for a plan made already.
pub fn glorot_uniform_for(plan: &crate::plan::Plan, seed: u64) -> Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut weights = Weights::default();
    for weight in &plan.weights {
        let (n, shape) = (weight.numel(), weight.shape.clone());
        let tensor = match weight.role {
            Role::Bias | Role::Beta | Role::MovingMean => Tensor::zeros(shape),
            Role::Gamma | Role::MovingVariance => Tensor::new(shape, vec![1.0; n])?,
            Role::Kernel => {
                let receptive: usize = shape[2..].iter().product();
                let fan_in = shape[1] * receptive;
                let fan_out = shape[0] * receptive;
                let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                let data = (0..n).map(|_| rng.random_range(-limit..limit)).collect();
                Tensor::new(shape, data)?
            }
        };
        weights.insert(weight.name.clone(), tensor);
    }
    Ok(weights)
}

/// Weights for `spec` taken from `trained` wherever a tensor of the same name and shape exists
/// (fine-tuning), and freshly initialised from `seed` elsewhere (a new head).
pub fn transfer(spec: &Sequential, trained: &Weights, seed: u64) -> Result<Weights> {
    let mut weights = glorot_uniform(spec, seed)?;
    for (name, tensor) in weights.tensors.iter_mut() {
        if let Some(t) = trained
            .tensors
            .get(name)
            .filter(|t| t.shape == tensor.shape)
        {
            *tensor = t.clone();
        }
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glorot_limits_and_determinism() {
        let spec = Sequential::preset("tutorial-mnist").unwrap();
        let a = glorot_uniform(&spec, 7).unwrap();
        let b = glorot_uniform(&spec, 7).unwrap();
        let c = glorot_uniform(&spec, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        a.check(&spec).unwrap();
        let k = a.get("conv2d.weight").unwrap();
        assert_eq!(k.shape, vec![32, 1, 3, 3]);
        let limit = (6.0f32 / (9.0 + 288.0)).sqrt();
        assert!(k.data.iter().all(|v| v.abs() <= limit));
        assert!(k.data.iter().any(|v| v.abs() > limit * 0.9));
        assert!(a.get("dense.bias").unwrap().data.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn batch_normalization_starts_as_keras_and_draws_nothing() {
        let plain = Sequential::preset("tutorial-mnist").unwrap();
        let spec = plain.with_batch_normalization();
        let w = glorot_uniform(&spec, 7).unwrap();
        w.check(&spec).unwrap();
        let all = |name: &str, v: f32| w.get(name).unwrap().data.iter().all(|x| *x == v);
        assert!(all("batch_normalization.gamma", 1.0));
        assert!(all("batch_normalization.beta", 0.0));
        assert!(all("batch_normalization_1.moving_mean", 0.0));
        assert!(all("batch_normalization_2.moving_variance", 1.0));
        // the kernels are the ones the model without normalisation gets
        let p = glorot_uniform(&plain, 7).unwrap();
        assert_eq!(
            w.get("dense_1.weight").unwrap(),
            p.get("dense_1.weight").unwrap()
        );
        // a negative variance from a file is refused, naming the tensor and index
        let mut bad = w.clone();
        bad.tensors
            .get_mut("batch_normalization.moving_variance")
            .unwrap()
            .data[3] = -1.0;
        let err = bad.check(&spec).unwrap_err().to_string();
        assert!(err.contains("batch_normalization.moving_variance"), "{err}");
        assert!(err.contains("found -1 at index 3"), "{err}");
    }
}
