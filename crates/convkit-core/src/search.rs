//! Hyper-parameter search: a space of optimizers, learning rates, batch sizes, filter counts
//! and dropout rates, read from TOML, expanded into trials by grid or seeded random sampling.
//! Each trial is a short fit on a validation split (run by the caller, on any engine); the
//! results form a table sorted by validation accuracy.

use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::spec::{Dropout, LayerKind, Sequential};
use crate::{Error, Result};

/// The search, as `convkit search --space space.toml` reads it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Base model: a preset or a spec .json.
    #[serde(default = "default_model")]
    pub model: String,
    #[serde(default = "default_dataset")]
    pub dataset: String,
    #[serde(default = "one")]
    pub epochs: usize,
    /// Use at most this many training images.
    pub limit: Option<usize>,
    #[serde(default = "default_split")]
    pub validation_split: f32,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub seed: u64,
    pub space: Space,
}

fn default_model() -> String {
    "tutorial-mnist".into()
}
fn default_dataset() -> String {
    "mnist".into()
}
fn one() -> usize {
    1
}
fn default_split() -> f32 {
    0.2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every combination, in order.
    #[default]
    Grid,
    /// Seeded uniform draws from the lists.
    Random,
}

/// The values to try; an empty list keeps the base model's / Keras' default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Space {
    #[serde(default)]
    pub optimizer: Vec<String>,
    #[serde(default)]
    pub learning_rate: Vec<f64>,
    #[serde(default)]
    pub batch_size: Vec<usize>,
    /// Filters of the first Conv2D; later ones keep their ratio to it.
    #[serde(default)]
    pub filters: Vec<usize>,
    /// Dropout before the last Dense layer (0: none).
    #[serde(default)]
    pub dropout: Vec<f32>,
}

/// One point of the space.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trial {
    pub optimizer: String,
    pub learning_rate: Option<f64>,
    pub batch_size: usize,
    pub filters: Option<usize>,
    pub dropout: f32,
}

impl SearchConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: SearchConfig = toml::from_str(&text).map_err(|e| Error::Json {
            path: path.into(),
            message: format!("TOML: {e}"),
        })?;
        for o in &config.space.optimizer {
            crate::compile::Optimizer::by_name(o)?;
        }
        if let Some(d) = config
            .space
            .dropout
            .iter()
            .find(|d| !(0.0..1.0).contains(*d))
        {
            return Err(Error::config(
                "search space",
                format!("dropout must be in [0, 1), found {d}"),
            ));
        }
        if config.space.batch_size.contains(&0)
            || config.space.filters.contains(&0)
            || config.space.learning_rate.iter().any(|l| *l <= 0.0)
        {
            return Err(Error::config(
                "search space",
                "batch sizes, filters and learning rates must be positive",
            ));
        }
        Ok(config)
    }

    /// The trials: the whole grid (first `max` of it), or `max` seeded random draws.
    pub fn trials(&self, max: usize) -> Vec<Trial> {
        let s = &self.space;
        let or = |v: &Vec<String>| {
            if v.is_empty() {
                vec!["adam".to_string()]
            } else {
                v.clone()
            }
        };
        let opt = or(&s.optimizer);
        let lr: Vec<Option<f64>> = if s.learning_rate.is_empty() {
            vec![None]
        } else {
            s.learning_rate.iter().map(|v| Some(*v)).collect()
        };
        let bs = if s.batch_size.is_empty() {
            vec![32]
        } else {
            s.batch_size.clone()
        };
        let fl: Vec<Option<usize>> = if s.filters.is_empty() {
            vec![None]
        } else {
            s.filters.iter().map(|v| Some(*v)).collect()
        };
        let dr = if s.dropout.is_empty() {
            vec![0.0]
        } else {
            s.dropout.clone()
        };
        match self.strategy {
            Strategy::Grid => {
                let mut all = Vec::new();
                for o in &opt {
                    for l in &lr {
                        for b in &bs {
                            for f in &fl {
                                for d in &dr {
                                    all.push(Trial {
                                        optimizer: o.clone(),
                                        learning_rate: *l,
                                        batch_size: *b,
                                        filters: *f,
                                        dropout: *d,
                                    });
                                }
                            }
                        }
                    }
                }
                all.truncate(max);
                all
            }
            Strategy::Random => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
                (0..max)
                    .map(|_| Trial {
                        optimizer: opt.choose(&mut rng).expect("non-empty").clone(),
                        learning_rate: *lr.choose(&mut rng).expect("non-empty"),
                        batch_size: *bs.choose(&mut rng).expect("non-empty"),
                        filters: *fl.choose(&mut rng).expect("non-empty"),
                        dropout: *dr.choose(&mut rng).expect("non-empty"),
                    })
                    .collect()
            }
        }
    }
}

impl Trial {
    /// The base model with this trial's filters and dropout.
    pub fn spec(&self, base: &Sequential) -> Result<Sequential> {
        let mut spec = base.clone();
        if let Some(first) = self.filters {
            let base_first = spec.layers.iter().find_map(|l| match &l.kind {
                LayerKind::Conv2D(c) => Some(c.filters),
                _ => None,
            });
            let Some(base_first) = base_first else {
                return Err(Error::config(
                    "search space",
                    format!(
                        "`filters` needs a Conv2D layer; model `{}` has none",
                        base.name
                    ),
                ));
            };
            for l in &mut spec.layers {
                if let LayerKind::Conv2D(c) = &mut l.kind {
                    c.filters = (c.filters * first).div_ceil(base_first).max(1);
                }
            }
        }
        if self.dropout > 0.0 {
            let last = spec.layers.len() - 1;
            spec.layers.insert(last, Dropout::new(self.dropout).into());
        }
        spec.output_shapes()?;
        Ok(spec)
    }

    /// The optimizer with this trial's learning rate.
    pub fn optimizer(&self) -> Result<crate::compile::Optimizer> {
        let o = crate::compile::Optimizer::by_name(&self.optimizer)?;
        Ok(match self.learning_rate {
            Some(lr) => o.with_learning_rate(lr),
            None => o,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: &str) -> SearchConfig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("space.toml");
        std::fs::write(&p, format!("strategy = \"{strategy}\"\nepochs = 1\n[space]\noptimizer = [\"adam\", \"sgd\"]\nlearning_rate = [0.001, 0.01]\nfilters = [8]\ndropout = [0.0, 0.5]\n")).unwrap();
        SearchConfig::from_toml(&p).unwrap()
    }

    #[test]
    fn grid_random_and_specs() {
        let grid = config("grid").trials(100);
        assert_eq!(grid.len(), 8);
        assert_eq!(config("grid").trials(3).len(), 3);
        let a = config("random").trials(5);
        assert_eq!(a, config("random").trials(5));
        let base = Sequential::preset("tutorial-mnist").unwrap();
        let t = Trial {
            optimizer: "sgd".into(),
            learning_rate: Some(0.05),
            batch_size: 16,
            filters: Some(8),
            dropout: 0.5,
        };
        let spec = t.spec(&base).unwrap();
        let filters: Vec<usize> = spec
            .layers
            .iter()
            .filter_map(|l| {
                if let LayerKind::Conv2D(c) = &l.kind {
                    Some(c.filters)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(filters, vec![8, 16]);
        assert!(matches!(
            spec.layers[spec.layers.len() - 2].kind,
            LayerKind::Dropout(_)
        ));
        assert_eq!(t.optimizer().unwrap().learning_rate(), 0.05);
    }

    #[test]
    fn bad_spaces_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "[space]\noptimizer = [\"adagrad\"]\n").unwrap();
        assert!(SearchConfig::from_toml(&p)
            .unwrap_err()
            .to_string()
            .contains("expected sgd, adam or rmsprop"));
        std::fs::write(&p, "[space]\nlearning_rates = [1]\n").unwrap();
        assert!(SearchConfig::from_toml(&p)
            .unwrap_err()
            .to_string()
            .contains("learning_rates"));
        std::fs::write(&p, "[space]\ndropout = [1.5]\n").unwrap();
        assert!(SearchConfig::from_toml(&p)
            .unwrap_err()
            .to_string()
            .contains("dropout must be in [0, 1)"));
    }
}
