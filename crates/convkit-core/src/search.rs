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
    /// Fraction of the training data held out to rank the trials on; by default the
    /// dataset's own validation folder, else 0.2. Never the test split.
    #[serde(default)]
    pub validation_split: Option<f32>,
    /// `[height, width]`: resize the dataset's images to the model's input on load.
    #[serde(default)]
    pub image_size: Option<[usize; 2]>,
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
    /// How many convolution blocks (a Conv2D and the layers after it, up to the next Conv2D or
    /// the Flatten): fewer keeps the first ones, more repeats the last.
    #[serde(default)]
    pub conv_blocks: Vec<usize>,
    /// The kernel size of every Conv2D (square).
    #[serde(default)]
    pub kernel_size: Vec<usize>,
    /// The units of every Dense layer but the last (the classifier).
    #[serde(default)]
    pub dense_units: Vec<usize>,
}

/// One point of the space; `None` keeps the base model's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub optimizer: String,
    pub learning_rate: Option<f64>,
    pub batch_size: usize,
    pub filters: Option<usize>,
    pub dropout: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_blocks: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_units: Option<usize>,
}

impl SearchConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<Self> {
        let text = crate::io::read_to_string_capped(path, 1 << 20)?;
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
            || config.space.conv_blocks.contains(&0)
            || config.space.kernel_size.contains(&0)
            || config.space.dense_units.contains(&0)
            || config
                .space
                .learning_rate
                .iter()
                .any(|l| !(l.is_finite() && *l > 0.0))
        {
            return Err(Error::config(
                "search space",
                "batch sizes, filters, conv blocks, kernel sizes, dense units and learning rates must be positive (and finite)",
            ));
        }
        Ok(config)
    }

    /// The trials: the grid's first `max` points, in order, or `max` seeded random draws.
    /// They are made one at a time as the search asks for them, so a huge grid or `max`
    /// costs nothing up front.
    pub fn trials(&self, max: usize) -> Trials {
        let s = &self.space;
        // An empty list tries only the base model's or Keras' default.
        fn or<T>(values: Vec<T>, default: T) -> Vec<T> {
            if values.is_empty() {
                vec![default]
            } else {
                values
            }
        }
        let axes = Axes {
            optimizer: or(s.optimizer.clone(), "adam".to_string()),
            learning_rate: or(s.learning_rate.iter().copied().map(Some).collect(), None),
            batch_size: or(s.batch_size.clone(), 32),
            filters: or(s.filters.iter().copied().map(Some).collect(), None),
            dropout: or(s.dropout.clone(), 0.0),
            conv_blocks: or(s.conv_blocks.iter().copied().map(Some).collect(), None),
            kernel_size: or(s.kernel_size.iter().copied().map(Some).collect(), None),
            dense_units: or(s.dense_units.iter().copied().map(Some).collect(), None),
        };
        let len = match self.strategy {
            Strategy::Grid => max.min(axes.grid_size()),
            Strategy::Random => max,
        };
        Trials {
            axes,
            strategy: self.strategy,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(self.seed),
            next: 0,
            len,
        }
    }
}

/// The values of each hyper-parameter a search tries, none of them empty.
#[derive(Debug, Clone)]
struct Axes {
    optimizer: Vec<String>,
    learning_rate: Vec<Option<f64>>,
    batch_size: Vec<usize>,
    filters: Vec<Option<usize>>,
    dropout: Vec<f32>,
    conv_blocks: Vec<Option<usize>>,
    kernel_size: Vec<Option<usize>>,
    dense_units: Vec<Option<usize>>,
}

impl Axes {
    /// How many points the grid has (`usize::MAX` when more).
    fn grid_size(&self) -> usize {
        [
            self.optimizer.len(),
            self.learning_rate.len(),
            self.batch_size.len(),
            self.filters.len(),
            self.dropout.len(),
            self.conv_blocks.len(),
            self.kernel_size.len(),
            self.dense_units.len(),
        ]
        .into_iter()
        .try_fold(1usize, usize::checked_mul)
        .unwrap_or(usize::MAX)
    }

    /// Grid point `i`: the architecture (conv blocks, kernel sizes, dense units) varies
    /// slowest, then optimizers, learning rates, batch sizes, filters, and dropout rates fastest.
    fn point(&self, mut i: usize) -> Trial {
        let mut pick = |n: usize| {
            let k = i % n;
            i /= n;
            k
        };
        let dropout = self.dropout[pick(self.dropout.len())];
        let filters = self.filters[pick(self.filters.len())];
        let batch_size = self.batch_size[pick(self.batch_size.len())];
        let learning_rate = self.learning_rate[pick(self.learning_rate.len())];
        let optimizer = self.optimizer[pick(self.optimizer.len())].clone();
        let dense_units = self.dense_units[pick(self.dense_units.len())];
        let kernel_size = self.kernel_size[pick(self.kernel_size.len())];
        let conv_blocks = self.conv_blocks[pick(self.conv_blocks.len())];
        Trial {
            optimizer,
            learning_rate,
            batch_size,
            filters,
            dropout,
            conv_blocks,
            kernel_size,
            dense_units,
        }
    }

    /// One seeded draw of every hyper-parameter. The architecture's axes draw only when they
    /// have a choice, so a space without them draws the same trials as before they existed.
    fn draw(&self, rng: &mut rand_chacha::ChaCha8Rng) -> Trial {
        let mut trial = Trial {
            optimizer: self.optimizer.choose(rng).expect("non-empty").clone(),
            learning_rate: *self.learning_rate.choose(rng).expect("non-empty"),
            batch_size: *self.batch_size.choose(rng).expect("non-empty"),
            filters: *self.filters.choose(rng).expect("non-empty"),
            dropout: *self.dropout.choose(rng).expect("non-empty"),
            conv_blocks: self.conv_blocks[0],
            kernel_size: self.kernel_size[0],
            dense_units: self.dense_units[0],
        };
        let mut draw = |axis: &[Option<usize>], value: &mut Option<usize>| {
            if axis.len() > 1 {
                *value = *axis.choose(rng).expect("non-empty");
            }
        };
        draw(&self.conv_blocks, &mut trial.conv_blocks);
        draw(&self.kernel_size, &mut trial.kernel_size);
        draw(&self.dense_units, &mut trial.dense_units);
        trial
    }
}

/// A search's trials, made one at a time ([`SearchConfig::trials`]).
#[derive(Debug, Clone)]
pub struct Trials {
    axes: Axes,
    strategy: Strategy,
    rng: rand_chacha::ChaCha8Rng,
    next: usize,
    len: usize,
}

impl Iterator for Trials {
    type Item = Trial;

    fn next(&mut self) -> Option<Trial> {
        if self.next == self.len {
            return None;
        }
        let trial = match self.strategy {
            Strategy::Grid => self.axes.point(self.next),
            Strategy::Random => self.axes.draw(&mut self.rng),
        };
        self.next += 1;
        Some(trial)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.len - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Trials {}

/// A finished trial, one JSON line of a search's `trials.jsonl`, written as it finishes so
/// that an interrupted search can resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    /// Position in the search, from 1.
    pub index: usize,
    #[serde(flatten)]
    pub trial: Trial,
    /// `None` when the trial diverged (a NaN or infinite loss).
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
    pub seconds: f64,
}

impl TrialResult {
    /// Append this result to the log at `path` as one line, synced to disk.
    pub fn append(&self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        let mut line = serde_json::to_string(self).expect("a trial result serialises");
        line.push('\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.write_all(line.as_bytes())
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io(path, e))
    }

    /// The results logged at `path` by `shard` of a search, in order (none when there is no
    /// log), to resume it. A last line cut short by an interruption is cut off the file, so
    /// new results append cleanly; any other line that does not parse, or that records a
    /// trial out of the shard's order, is an error.
    pub fn resume_log(path: &std::path::Path, shard: Shard) -> Result<Vec<TrialResult>> {
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = crate::io::read_to_string_capped(path, 64 << 20)?;
        let keep = text.rfind('\n').map_or(0, |end| end + 1);
        let complete = &text[..keep];
        if keep < text.len() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(keep as u64).and_then(|_| f.sync_data()))
                .map_err(|e| Error::io(path, e))?;
        }
        let mut results: Vec<TrialResult> = Vec::new();
        for (n, line) in complete.lines().enumerate() {
            let result: TrialResult = serde_json::from_str(line).map_err(|e| Error::Json {
                path: path.into(),
                message: format!("line {}: {e}", n + 1),
            })?;
            let expected = shard.part + n * shard.parts;
            if result.index != expected {
                return Err(Error::data(
                    path,
                    format!(
                        "line {} records trial {}, expected trial {expected}{}",
                        n + 1,
                        result.index,
                        if shard == Shard::WHOLE {
                            String::new()
                        } else {
                            format!(" (shard {shard})")
                        }
                    ),
                ));
            }
            results.push(result);
        }
        Ok(results)
    }
}

/// One part of a search: trials `part`, `part + parts`, `part + 2·parts`, … (counted from 1),
/// for a Slurm job array (`--shard K/N`) or one MPI rank. Each part logs to a file of its own
/// ([`Shard::log_name`]); [`merge_logs`] joins the parts' logs into the whole search's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `1..=parts`.
    pub part: usize,
    pub parts: usize,
}

impl Shard {
    /// The whole search, in one part.
    pub const WHOLE: Shard = Shard { part: 1, parts: 1 };

    /// Part `part` (from 1) of `parts`, checked.
    pub fn new(part: usize, parts: usize) -> Result<Self> {
        if parts == 0 || part == 0 || part > parts {
            return Err(Error::config(
                "shard",
                format!("expected K/N with 1 ≤ K ≤ N, found {part}/{parts}"),
            ));
        }
        Ok(Shard { part, parts })
    }

    /// Whether trial `index` (from 1) is this part's.
    pub fn owns(&self, index: usize) -> bool {
        index >= 1 && (index - 1) % self.parts == self.part - 1
    }

    /// How many of `total` trials are this part's.
    pub fn len_of(&self, total: usize) -> usize {
        (total + self.parts - self.part) / self.parts
    }

    /// The log's file name: `trials.jsonl` for the whole search, `trials-shard-K-of-N.jsonl`
    /// for a part.
    pub fn log_name(&self) -> String {
        if *self == Shard::WHOLE {
            "trials.jsonl".into()
        } else {
            format!("trials-shard-{}-of-{}.jsonl", self.part, self.parts)
        }
    }

    /// The part whose log is named `name`, if it is a part's log.
    pub fn from_log_name(name: &str) -> Option<Shard> {
        let (part, parts) = name
            .strip_prefix("trials-shard-")?
            .strip_suffix(".jsonl")?
            .split_once("-of-")?;
        Shard::new(part.parse().ok()?, parts.parse().ok()?).ok()
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.part, self.parts)
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;

    /// `K/N`, as `--shard` takes it.
    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "shard",
                format!("expected K/N (such as 2/8), found `{text}`"),
            )
        };
        let (part, parts) = text.split_once('/').ok_or_else(bad)?;
        Shard::new(
            part.trim().parse().map_err(|_| bad())?,
            parts.trim().parse().map_err(|_| bad())?,
        )
    }
}

/// The whole search's results, in trial order, from every part's results (`parts[k]` is
/// part `k + 1`'s, as its log or an MPI rank gives them) of a search of `total` trials. A
/// part missing, unfinished, or given twice is an error naming it; `source` names where the
/// parts came from.
pub fn merge_parts(
    parts: Vec<(Shard, Vec<TrialResult>)>,
    total: usize,
    source: &std::path::Path,
) -> Result<Vec<TrialResult>> {
    let count = parts.first().map_or(1, |(s, _)| s.parts);
    let mut seen: Vec<Option<Vec<TrialResult>>> = vec![None; count];
    for (shard, results) in parts {
        if shard.parts != count {
            return Err(Error::data(
                source,
                format!(
                    "shard {shard} is from a search in {} parts, the others from one in {count}",
                    shard.parts
                ),
            ));
        }
        let slot = &mut seen[shard.part - 1];
        if slot.is_some() {
            return Err(Error::data(source, format!("shard {shard} is given twice")));
        }
        let expected = shard.len_of(total);
        if results.len() != expected {
            return Err(Error::data(
                source,
                format!(
                    "shard {shard} has {} of its {expected} trials: it has not finished (run it again with --resume)",
                    results.len()
                ),
            ));
        }
        *slot = Some(results);
    }
    let missing: Vec<String> = (seen.iter().enumerate())
        .filter(|(_, s)| s.is_none())
        .map(|(k, _)| format!("{}/{count}", k + 1))
        .collect();
    if !missing.is_empty() {
        return Err(Error::data(
            source,
            format!("no log of shard {}", missing.join(", ")),
        ));
    }
    let mut all: Vec<TrialResult> = seen.into_iter().flatten().flatten().collect();
    all.sort_by_key(|r| r.index);
    Ok(all)
}

impl Trial {
    /// The base model with this trial's conv blocks, kernel sizes, filters, dense units and
    /// dropout, checked (shapes).
    pub fn spec(&self, base: &Sequential) -> Result<Sequential> {
        let mut spec = match self.conv_blocks {
            Some(blocks) => with_conv_blocks(base, blocks)?,
            None => base.clone(),
        };
        if let Some(k) = self.kernel_size {
            let mut any = false;
            for layer in &mut spec.layers {
                if let LayerKind::Conv2D(c) = &mut layer.kind {
                    c.kernel_size = [k, k];
                    any = true;
                }
            }
            if !any {
                return Err(Error::config(
                    "search space",
                    format!(
                        "`kernel_size` needs a Conv2D layer; model `{}` has none",
                        base.name
                    ),
                ));
            }
        }
        if let Some(units) = self.dense_units {
            let classifier = spec
                .layers
                .iter()
                .rposition(|l| matches!(l.kind, LayerKind::Dense(_)));
            let mut any = false;
            for (i, layer) in spec.layers.iter_mut().enumerate() {
                if let (LayerKind::Dense(d), false) = (&mut layer.kind, Some(i) == classifier) {
                    d.units = units;
                    any = true;
                }
            }
            if !any {
                return Err(Error::config(
                    "search space",
                    format!("`dense_units` needs a Dense layer before the classifier; model `{}` has none", base.name),
                ));
            }
        }
        if let Some(first) = self.filters {
            let base_first = spec.layers.iter().find_map(|l| {
                if let LayerKind::Conv2D(c) = &l.kind {
                    Some(c.filters)
                } else {
                    None
                }
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
            for (index, l) in spec.layers.iter_mut().enumerate() {
                if let LayerKind::Conv2D(c) = &mut l.kind {
                    let scaled = c.filters.checked_mul(first).ok_or_else(|| {
                        Error::config(
                            "search space",
                            format!(
                                "`filters = {first}` scales layer {index}'s {} filters past what this machine can count",
                                c.filters
                            ),
                        )
                    })?;
                    c.filters = scaled.div_ceil(base_first).max(1);
                }
            }
        }
        if self.dropout > 0.0 {
            let last = spec.layers.len() - 1;
            spec.layers.insert(last, Dropout::new(self.dropout).into());
        }
        spec.output_shapes().map_err(|e| {
            Error::config(
                "search space",
                format!("trial {self:?} gives a model that does not fit: {e}"),
            )
        })?;
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

/// `base` with `blocks` convolution blocks: each block is a Conv2D and the layers after it up
/// to the next Conv2D or the end of the convolutional part (the first Flatten or global
/// pooling). Fewer keeps the first blocks; more repeats the last block (its layers unnamed, so
/// they take Keras' automatic names).
fn with_conv_blocks(base: &Sequential, blocks: usize) -> Result<Sequential> {
    let body_end = (base.layers.iter())
        .position(|l| l.kind.flattens())
        .unwrap_or(base.layers.len());
    let starts: Vec<usize> = (0..body_end)
        .filter(|&i| matches!(base.layers[i].kind, LayerKind::Conv2D(_)))
        .collect();
    let (Some(&first), Some(&last)) = (starts.first(), starts.last()) else {
        return Err(Error::config(
            "search space",
            format!(
                "`conv_blocks` needs a Conv2D layer; model `{}` has none",
                base.name
            ),
        ));
    };
    let mut spec = base.clone();
    let body: Vec<_> = if blocks <= starts.len() {
        let end = starts.get(blocks).copied().unwrap_or(body_end);
        base.layers[first..end].to_vec()
    } else {
        let repeated = base.layers[last..body_end].iter().map(|l| {
            let mut l = l.clone();
            l.name = None;
            l
        });
        let extra: Vec<_> = std::iter::repeat_n(repeated, blocks - starts.len())
            .flatten()
            .collect();
        base.layers[first..body_end]
            .iter()
            .cloned()
            .chain(extra)
            .collect()
    };
    spec.layers.splice(first..body_end, body);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trials_vary_the_architecture() {
        let base = Sequential::preset("tutorial-mnist").unwrap();
        let trial = |conv_blocks, kernel_size, dense_units| Trial {
            optimizer: "adam".into(),
            learning_rate: None,
            batch_size: 32,
            filters: None,
            dropout: 0.0,
            conv_blocks,
            kernel_size,
            dense_units,
        };
        let kinds = |spec: &Sequential| -> Vec<&'static str> {
            spec.layers.iter().map(|l| l.kind.type_name()).collect()
        };
        let one = trial(Some(1), None, None).spec(&base).unwrap();
        assert_eq!(
            kinds(&one),
            ["Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
        );
        let three = trial(Some(3), Some(3), Some(32)).spec(&base).unwrap();
        assert_eq!(
            kinds(&three),
            [
                "Conv2D",
                "MaxPooling2D",
                "Conv2D",
                "MaxPooling2D",
                "Conv2D",
                "MaxPooling2D",
                "Flatten",
                "Dense",
                "Dense"
            ]
        );
        assert_eq!(
            three.output_shapes().unwrap()[5].numel(),
            64,
            "28 → 13 → 5 → 1, 64 channels"
        );
        let LayerKind::Dense(hidden) = &three.layers[7].kind else {
            panic!()
        };
        assert_eq!(hidden.units, 32);
        assert_eq!(
            three.class_count().unwrap(),
            10,
            "the classifier keeps its units"
        );
        let five = trial(None, Some(5), None).spec(&base).unwrap();
        let LayerKind::Conv2D(conv) = &five.layers[2].kind else {
            panic!()
        };
        assert_eq!(conv.kernel_size, [5, 5]);
        // A fourth block has no room on 28×28: a clear error, before anything trains.
        let err = trial(Some(4), None, None)
            .spec(&base)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not fit") && err.contains("conv_blocks: Some(4)"),
            "{err}"
        );
        let dense_only = Sequential::new(4, 4, 1)
            .flatten()
            .add(crate::spec::Dense::new(2));
        let err = trial(Some(2), None, None)
            .spec(&dense_only)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`conv_blocks` needs a Conv2D"), "{err}");
        let err = trial(None, None, Some(8))
            .spec(&dense_only)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`dense_units` needs a Dense layer before the classifier"),
            "{err}"
        );
    }

    #[test]
    fn the_architecture_axes_leave_other_spaces_draws_alone() {
        let space = |extra: &str| {
            let text = format!("strategy = \"random\"\nseed = 3\n[space]\nlearning_rate = [0.1, 0.01, 0.001]\nbatch_size = [16, 32]\n{extra}");
            let config: SearchConfig = toml::from_str(&text).unwrap();
            config.trials(6).collect::<Vec<_>>()
        };
        let before = space("");
        let with_one = space("kernel_size = [5]");
        for (a, b) in before.iter().zip(&with_one) {
            assert_eq!(
                (a.learning_rate, a.batch_size),
                (b.learning_rate, b.batch_size)
            );
            assert_eq!(b.kernel_size, Some(5));
        }
        // A grid of 2 × 2 architectures × 3 rates: the architecture varies slowest.
        let config: SearchConfig = toml::from_str(
            "[space]\nconv_blocks = [1, 2]\ndense_units = [16, 64]\nlearning_rate = [0.1, 0.01, 0.001]",
        )
        .unwrap();
        let grid: Vec<_> = config.trials(100).collect();
        assert_eq!(grid.len(), 12);
        assert_eq!(
            (grid[0].conv_blocks, grid[0].dense_units),
            (Some(1), Some(16))
        );
        assert_eq!(
            (grid[3].conv_blocks, grid[3].dense_units),
            (Some(1), Some(64))
        );
        assert_eq!(grid[6].conv_blocks, Some(2));
    }

    #[test]
    fn the_trial_log_survives_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("trials.jsonl");
        assert!(TrialResult::resume_log(&log, Shard::WHOLE)
            .unwrap()
            .is_empty());
        let trial = Trial {
            optimizer: "adam".into(),
            learning_rate: Some(0.01),
            batch_size: 32,
            filters: None,
            dropout: 0.25,
            conv_blocks: None,
            kernel_size: None,
            dense_units: None,
        };
        let first = TrialResult {
            index: 1,
            trial: trial.clone(),
            val_accuracy: Some(0.5),
            val_loss: None,
            seconds: 1.5,
        };
        first.append(&log).unwrap();
        TrialResult {
            index: 2,
            ..first.clone()
        }
        .append(&log)
        .unwrap();
        // An interruption in the middle of the third line.
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut file, b"{\"index\":3,\"optim").unwrap();
        let read = TrialResult::resume_log(&log, Shard::WHOLE).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0], first);
        // The torn line is gone, so the next result starts a line of its own.
        TrialResult {
            index: 3,
            ..first.clone()
        }
        .append(&log)
        .unwrap();
        assert_eq!(
            TrialResult::resume_log(&log, Shard::WHOLE).unwrap().len(),
            3
        );
        std::fs::write(&log, "{\"index\":2}\n").unwrap();
        let err = TrialResult::resume_log(&log, Shard::WHOLE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn shards_split_the_trials_and_merge_back() {
        let shard: Shard = "2/3".parse().unwrap();
        let owned: Vec<usize> = (1..=8).filter(|&i| shard.owns(i)).collect();
        assert_eq!(owned, [2, 5, 8]);
        assert_eq!(shard.len_of(8), 3);
        assert_eq!(Shard::new(3, 3).unwrap().len_of(8), 2);
        assert_eq!(Shard::from_log_name(&shard.log_name()), Some(shard));
        assert_eq!(Shard::WHOLE.log_name(), "trials.jsonl");
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let result = |index| TrialResult {
            index,
            trial: Trial {
                optimizer: "adam".into(),
                learning_rate: None,
                batch_size: 32,
                filters: None,
                dropout: 0.0,
                conv_blocks: None,
                kernel_size: None,
                dense_units: None,
            },
            val_accuracy: Some(index as f64),
            val_loss: None,
            seconds: 0.0,
        };
        let part = |k: usize| {
            let s = Shard::new(k, 2).unwrap();
            (s, (1..=5).filter(|&i| s.owns(i)).map(result).collect())
        };
        let here = std::path::Path::new("runs");
        let merged = merge_parts(vec![part(2), part(1)], 5, here).unwrap();
        assert_eq!(
            merged.iter().map(|r| r.index).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let missing = merge_parts(vec![part(1)], 5, here).unwrap_err().to_string();
        assert!(missing.contains("no log of shard 2/2"), "{missing}");
        let twice = merge_parts(vec![part(1), part(1)], 5, here)
            .unwrap_err()
            .to_string();
        assert!(twice.contains("given twice"), "{twice}");
        let (s, mut short) = part(2);
        short.pop();
        let unfinished = merge_parts(vec![part(1), (s, short)], 5, here)
            .unwrap_err()
            .to_string();
        assert!(unfinished.contains("1 of its 2 trials"), "{unfinished}");
    }

    fn config(strategy: &str) -> SearchConfig {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("space.toml");
        std::fs::write(&p, format!("strategy = \"{strategy}\"\nepochs = 1\n[space]\noptimizer = [\"adam\", \"sgd\"]\nlearning_rate = [0.001, 0.01]\nfilters = [8]\ndropout = [0.0, 0.5]\n")).unwrap();
        SearchConfig::from_toml(&p).unwrap()
    }

    #[test]
    fn grid_random_and_specs() {
        let grid: Vec<Trial> = config("grid").trials(100).collect();
        assert_eq!(grid.len(), 8);
        // The order of nested loops over optimizer, learning rate, batch size, filters and
        // dropout (innermost).
        let point = |o: &str, l, d| Trial {
            optimizer: o.into(),
            learning_rate: Some(l),
            batch_size: 32,
            filters: Some(8),
            dropout: d,
            conv_blocks: None,
            kernel_size: None,
            dense_units: None,
        };
        assert_eq!(grid[0], point("adam", 0.001, 0.0));
        assert_eq!(grid[1], point("adam", 0.001, 0.5));
        assert_eq!(grid[2], point("adam", 0.01, 0.0));
        assert_eq!(grid[7], point("sgd", 0.01, 0.5));
        assert_eq!(config("grid").trials(3).len(), 3);
        let a: Vec<Trial> = config("random").trials(5).collect();
        assert_eq!(a, config("random").trials(5).collect::<Vec<_>>());
        let base = Sequential::preset("tutorial-mnist").unwrap();
        let t = Trial {
            optimizer: "sgd".into(),
            learning_rate: Some(0.05),
            batch_size: 16,
            filters: Some(8),
            dropout: 0.5,
            conv_blocks: None,
            kernel_size: None,
            dense_units: None,
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
        std::fs::write(&p, "[space]\nlearning_rate = [nan]\n").unwrap();
        assert!(SearchConfig::from_toml(&p)
            .unwrap_err()
            .to_string()
            .contains("must be positive (and finite)"));
    }

    /// Once an overflow panic, and a grid built whole (here 2^36 points) before `--trials`
    /// cut it.
    #[test]
    fn huge_spaces_cost_nothing_up_front_and_huge_filter_counts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge.toml");
        let values: Vec<String> = (1..=4096).map(|v| v.to_string()).collect();
        let list = format!("[{}]", values.join(", "));
        std::fs::write(
            &p,
            format!(
                "[space]\nbatch_size = {list}\nfilters = {list}\nlearning_rate = [{}]\n",
                values
                    .iter()
                    .map(|v| format!("{v}.0"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .unwrap();
        let config = SearchConfig::from_toml(&p).unwrap();
        let mut trials = config.trials(usize::MAX);
        assert_eq!(trials.len(), 4096 * 4096 * 4096);
        assert_eq!(trials.next().unwrap().filters, Some(1));
        assert_eq!(config.trials(2).count(), 2);
        let mut random = config.clone();
        random.strategy = Strategy::Random;
        assert_eq!(random.trials(usize::MAX).len(), usize::MAX);

        let base = Sequential::preset("tutorial-mnist").unwrap();
        let t = Trial {
            optimizer: "adam".into(),
            learning_rate: None,
            batch_size: 32,
            filters: Some(usize::MAX),
            dropout: 0.0,
            conv_blocks: None,
            kernel_size: None,
            dense_units: None,
        };
        let message = t.spec(&base).unwrap_err().to_string();
        assert!(
            message.contains("past what this machine can count"),
            "{message}"
        );
    }
}
