//! [`SearchRequest`]: a hyper-parameter search's trials, their logs, the parts of a sharded or
//! MPI search, and the ranked table.

use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame, SortMultipleOptions};

use super::{DataRequest, Group};
use crate::backend::Backend;
use crate::compile::{Compile, Loss};
use crate::data::{Normalisation, Splits, Validation};
use crate::search::{merge_parts, SearchConfig, Shard, Trial, TrialResult};
use crate::spec::Sequential;
use crate::train::{Model, Verbosity};
use crate::{Error, Result};

/// `convkit search`: short fits over a space read from TOML, ranked by validation accuracy.
/// Writes, in [`out`](SearchRequest::out), each trial to a log as it finishes
/// (`trials.jsonl`, or the part's `trials-shard-K-of-N.jsonl`), then `search.csv`,
/// `best_model.json` and `best.json`.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The search's TOML: base model, dataset, epochs, limit, validation_split, strategy,
    /// seed, and its `[space]`.
    pub space: PathBuf,
    /// At most this many trials (the first of the grid, or this many random draws).
    pub trials: usize,
    pub out: PathBuf,
    /// Continue the search logged in `out`: trials already there are not run again.
    pub resume: bool,
    /// Run this part of the search only (a task of a job array); join the parts with `merge`.
    /// Under an MPI job the ranks split the search this way by themselves.
    pub shard: Option<Shard>,
    /// Run nothing: join the finished parts' logs found in these folders into one table.
    pub merge: Vec<PathBuf>,
}

/// The best trial of a search.
#[derive(Debug, Clone)]
pub struct BestTrial {
    pub result: TrialResult,
    pub spec: Sequential,
    pub compile: Compile,
}

/// What a [`SearchRequest`] gave.
#[derive(Debug)]
pub enum SearchOutcome {
    /// The whole search: its table, best first, and its best trial (also written to `out`).
    Table {
        table: DataFrame,
        best: Box<BestTrial>,
    },
    /// One part of a sharded search, logged; the table waits for every part (`merge`).
    Part {
        shard: Shard,
        trials: usize,
        log: PathBuf,
    },
    /// A rank of an MPI job other than 0: rank 0 gathered this rank's trials and wrote the table.
    OtherRank,
}

impl SearchRequest {
    /// What `convkit search` prints of `outcome`: the table and the best trial, or how to join
    /// a finished part with the others; nothing for another rank.
    pub fn report(&self, outcome: &SearchOutcome) -> Option<String> {
        match outcome {
            SearchOutcome::Table { table, best } => Some(format!(
                "{table}\nbest: {:?} (val_accuracy {:.4}); wrote {}",
                best.result.trial,
                best.result.val_accuracy.unwrap_or(f64::NAN),
                self.out.display()
            )),
            SearchOutcome::Part { shard, trials, log } => Some(format!(
                "shard {shard} done: {trials} trials logged to {}; when every shard is done, join them with\n  convkit search --space {} --trials {} --merge <each shard's --out> --out <folder>",
                log.display(),
                self.space.display(),
                self.trials
            )),
            SearchOutcome::OtherRank => None,
        }
    }

    /// Every trial (at most 10) of the search in `space`, written to `out`.
    pub fn new(space: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        SearchRequest {
            space: space.into(),
            trials: 10,
            out: out.into(),
            resume: false,
            shard: None,
            merge: Vec::new(),
        }
    }

    /// Every trial in this process; one part with [`shard`](SearchRequest::shard); the ranks'
    /// parts of an MPI `group`, gathered on rank 0; or, with [`merge`](SearchRequest::merge),
    /// the parts' logs joined.
    pub fn run(&self, backend: &dyn Backend, group: &Group) -> Result<SearchOutcome> {
        let config = SearchConfig::from_toml(&self.space)?;
        let speak = group.is_root() && self.merge.is_empty();
        let (splits, base) = super::root_first(group, || self.data(&config, speak))?;
        let total = config.trials(self.trials).len();
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        if !self.merge.is_empty() {
            if self.shard.is_some() || group.size() > 1 {
                return Err(Error::config("search", "--merge joins the logs of finished parts in one process: give it without --shard and without an MPI launcher"));
            }
            let results = self.merged_logs(&config, &base)?;
            return self.write_table(&results, &base, backend.name());
        }
        let shard = match (self.shard, group.size()) {
            (Some(_), n) if n > 1 => return Err(Error::config("search", format!(
                "--shard picks one part of the search, and {n} MPI ranks already split it: give one or the other"
            ))),
            (Some(shard), _) => shard,
            (None, n) => Shard::new(group.rank() + 1, n)?,
        };
        let mine = self.run_trials(&config, &base, &splits, shard, backend)?;
        if group.size() > 1 {
            return match gather(mine, group, total, &self.out)? {
                Some(results) => self.write_table(&results, &base, backend.name()),
                None => Ok(SearchOutcome::OtherRank),
            };
        }
        if shard.parts > 1 {
            return Ok(SearchOutcome::Part {
                shard,
                trials: mine.len(),
                log: self.out.join(shard.log_name()),
            });
        }
        self.write_table(&mine, &base, backend.name())
    }

    /// The search's data and its base model, a preset's classifier sized to the data's classes
    /// (the model's trials and its table's parameter counts depend on it, so a merge reads
    /// the data too). `speak`: this process says where the data came from.
    fn data(&self, config: &SearchConfig, speak: bool) -> Result<(Splits, Sequential)> {
        let base = Sequential::from_preset_or_file(&config.model)?;
        let data = DataRequest {
            dataset: config.dataset.clone().into(),
            limit: config.limit,
            // Trials are ranked on validation data, never on the test split.
            validation: match config.validation_split {
                Some(f) => Validation::Holdout(f),
                None => Validation::Auto(0.2),
            },
            seed: config.seed,
            batch_size: 32,
            image_size: config.image_size,
        };
        let splits = data.open(&base, &Normalisation::Rescale)?;
        let (base, resized_head) =
            super::preset_sized_for(&config.model, base, splits.train.classes.len())?;
        if speak {
            for line in splits.sources.iter().chain(&resized_head) {
                eprintln!("{line}");
            }
        }
        Ok((splits, base))
    }

    /// Run `shard`'s trials (every trial for [`Shard::WHOLE`]), each logged as it finishes;
    /// with `resume`, the trials already logged are not run again.
    fn run_trials(
        &self,
        config: &SearchConfig,
        base: &Sequential,
        splits: &Splits,
        shard: Shard,
        backend: &dyn Backend,
    ) -> Result<Vec<TrialResult>> {
        let validation = splits.validation.as_ref().ok_or_else(|| {
            Error::config(
                "search",
                "the search ranks trials on validation data: give a validation_split above 0",
            )
        })?;
        // Every trial's model is checked before any trains: a space that gives a model that
        // does not fit (say, more pooling blocks than the input has room for) stops here.
        for (i, trial) in config.trials(self.trials).enumerate() {
            trial_model(base, &trial).map_err(|e| match e {
                Error::Config { what, message } => Error::Config {
                    what,
                    message: format!("trial {}: {message}", i + 1),
                },
                other => other,
            })?;
        }
        let trials = config.trials(self.trials);
        let total = trials.len();
        // Parts of one search may share --out (a job array's tasks), each with its own log;
        // two processes on one log would interleave it.
        let _lock = crate::io::FolderLock::acquire_for(&self.out, &shard.log_name())?;
        let log = self.out.join(shard.log_name());
        let logged = self.logged_before(&log, shard)?;
        let mut results = Vec::new();
        let mine = (trials.enumerate())
            .map(|(i, trial)| (i + 1, trial))
            .filter(|(index, _)| shard.owns(*index));
        for (k, (index, trial)) in mine.enumerate() {
            let label = match shard == Shard::WHOLE {
                true => format!("trial {index}/{total}"),
                false => format!("trial {index}/{total} (shard {shard})"),
            };
            if let Some(done) = logged.get(k) {
                if done.trial != trial {
                    return Err(Error::data(&log, format!(
                        "trial {index} was {:?}, but the space now gives {trial:?}; the search changed, so start it afresh (without --resume) or in another --out",
                        done.trial
                    )));
                }
                eprintln!("{label}: {trial:?} → logged before, not run again");
                results.push(done.clone());
                continue;
            }
            let (spec, compile) = trial_model(base, &trial)?;
            let mut model = Model::new(spec, compile, backend, config.seed)?;
            let start = std::time::Instant::now();
            let fit = model
                .fit(&splits.train)
                .epochs(config.epochs)
                .batch_size(trial.batch_size)
                .seed(config.seed)
                .validation_data(validation)
                .verbosity(Verbosity::Silent)
                .run();
            // A trial that diverges is a result (it ranks last), not the end of the search.
            let (val_accuracy, val_loss) = match fit {
                Ok(history) => {
                    let last = history.epochs.last().expect("at least one epoch");
                    (last.val_accuracy, last.val_loss)
                }
                Err(err @ Error::NonFinite { .. }) => {
                    eprintln!("{label}: {trial:?} diverged: {err}");
                    (None, None)
                }
                Err(other) => return Err(other),
            };
            let result = TrialResult {
                index,
                trial,
                val_accuracy,
                val_loss,
                seconds: start.elapsed().as_secs_f64(),
            };
            result.append(&log)?;
            eprintln!(
                "{label}: {:?} → val_accuracy {:.4}, val_loss {:.4}",
                result.trial,
                val_accuracy.unwrap_or(f64::NAN),
                val_loss.unwrap_or(f64::NAN)
            );
            results.push(result);
        }
        Ok(results)
    }

    /// With `resume`, the trials `log` holds; otherwise none, and an earlier log removed.
    fn logged_before(&self, log: &Path, shard: Shard) -> Result<Vec<TrialResult>> {
        if self.resume {
            return TrialResult::resume_log(log, shard);
        }
        if log.exists() {
            std::fs::remove_file(log).map_err(|e| Error::io(log, e))?;
        }
        Ok(Vec::new())
    }

    /// The finished parts' logs found in the `merge` folders (each part's
    /// `trials-shard-K-of-N.jsonl`), joined and checked against the search the space gives.
    fn merged_logs(&self, config: &SearchConfig, base: &Sequential) -> Result<Vec<TrialResult>> {
        let mut parts = Vec::new();
        for folder in &self.merge {
            let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
            let mut found = false;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(folder, e))?;
                let name = entry.file_name();
                let Some(shard) = name.to_str().and_then(Shard::from_log_name) else {
                    continue;
                };
                found = true;
                parts.push((shard, TrialResult::resume_log(&entry.path(), shard)?));
            }
            if !found {
                return Err(Error::data(
                    folder,
                    "no shard log (trials-shard-K-of-N.jsonl) to merge",
                ));
            }
        }
        let trials: Vec<_> = config.trials(self.trials).collect();
        let merged = merge_parts(parts, trials.len(), &self.merge[0])?;
        for (result, trial) in merged.iter().zip(&trials) {
            if result.trial != *trial {
                return Err(Error::data(&self.merge[0], format!(
                    "trial {} was logged as {:?}, but the space gives {trial:?}: the shards ran another search",
                    result.index, result.trial
                )));
            }
            trial_model(base, trial)?;
        }
        Ok(merged)
    }

    /// The search's table (`search.csv`, ranked by validation accuracy) and its best trial
    /// (`best_model.json`, `best.json`), written to `out`.
    fn write_table(
        &self,
        results: &[TrialResult],
        base: &Sequential,
        backend: &str,
    ) -> Result<SearchOutcome> {
        let mut table = ranked_table(results, base)?;
        crate::table::write_csv(&mut table, &self.out.join("search.csv"))?;
        let best = results
            .iter()
            .filter_map(|r| r.val_accuracy.map(|a| (a, r)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, r)| r)
            .ok_or_else(|| {
                Error::config(
                    "search",
                    "no trial finished: the space is empty, --trials is 0, or every trial diverged",
                )
            })?;
        let (spec, compile) = trial_model(base, &best.trial)?;
        spec.save_json(&self.out.join("best_model.json"))?;
        let summary = serde_json::json!({"trial": best.trial, "compile": compile, "val_accuracy": best.val_accuracy, "val_loss": best.val_loss, "backend": backend});
        let json = serde_json::to_string_pretty(&summary).expect("a summary serialises");
        crate::io::write_bytes_atomic(&self.out.join("best.json"), json.as_bytes())?;
        Ok(SearchOutcome::Table {
            table,
            best: Box::new(BestTrial {
                result: best.clone(),
                spec,
                compile,
            }),
        })
    }
}

/// On rank 0, every rank's part of the search, once every rank has run its trials however
/// long that takes; `None` on the other ranks.
fn gather(
    mine: Vec<TrialResult>,
    group: &Group,
    total: usize,
    out: &Path,
) -> Result<Option<Vec<TrialResult>>> {
    group.barrier()?;
    let json = serde_json::to_vec(&mine).expect("trial results serialise");
    let mut parts = Vec::new();
    for (rank, bytes) in group.all_gather(json)?.into_iter().enumerate() {
        let part: Vec<TrialResult> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::config("search", format!("rank {rank}'s results do not parse: {e}"))
        })?;
        parts.push((Shard::new(rank + 1, group.size())?, part));
    }
    if !group.is_root() {
        return Ok(None);
    }
    merge_parts(parts, total, out).map(Some)
}

/// The model and compile settings of `trial` of a search from `base`.
fn trial_model(base: &Sequential, trial: &Trial) -> Result<(Sequential, Compile)> {
    let spec = trial.spec(base)?;
    let compile = Compile::new(trial.optimizer()?, Loss::default_for(&spec)?);
    Ok((spec, compile))
}

/// One row per trial, best validation accuracy first, trials that diverged last.
fn ranked_table(results: &[TrialResult], base: &Sequential) -> Result<DataFrame> {
    let models = (results.iter())
        .map(|r| trial_model(base, &r.trial))
        .collect::<Result<Vec<_>>>()?;
    let learning_rates = (models.iter())
        .map(|(_, compile)| Some(compile.optimizer.learning_rate()))
        .collect();
    let params = (models.iter())
        .map(|(spec, _)| Ok(spec.param_counts()?.iter().sum::<usize>() as u64))
        .collect::<Result<Vec<_>>>()?;
    let architecture = |f: fn(&Trial) -> Option<usize>| {
        (results.iter().map(|r| f(&r.trial).map(|v| v as u32))).collect::<Vec<_>>()
    };
    let column = |name: &str, values: Vec<Option<f64>>| Column::new(name.into(), values);
    let each = |f: fn(&TrialResult) -> Option<f64>| results.iter().map(f).collect::<Vec<_>>();
    let table = DataFrame::new_infer_height(vec![
        Column::new(
            "trial".into(),
            (results.iter().map(|r| r.index as u32)).collect::<Vec<_>>(),
        ),
        Column::new(
            "optimizer".into(),
            (results.iter().map(|r| r.trial.optimizer.clone())).collect::<Vec<_>>(),
        ),
        column("learning_rate", learning_rates),
        Column::new(
            "batch_size".into(),
            (results.iter().map(|r| r.trial.batch_size as u32)).collect::<Vec<_>>(),
        ),
        Column::new(
            "filters".into(),
            (results.iter().map(|r| r.trial.filters.map(|f| f as u32))).collect::<Vec<_>>(),
        ),
        Column::new(
            "dropout".into(),
            (results.iter().map(|r| r.trial.dropout)).collect::<Vec<_>>(),
        ),
        Column::new("conv_blocks".into(), architecture(|t| t.conv_blocks)),
        Column::new("kernel_size".into(), architecture(|t| t.kernel_size)),
        Column::new("dense_units".into(), architecture(|t| t.dense_units)),
        Column::new("params".into(), params),
        column("val_accuracy", each(|r| r.val_accuracy)),
        column("val_loss", each(|r| r.val_loss)),
        column("seconds", each(|r| Some(r.seconds))),
    ])
    .and_then(|df| {
        df.sort(
            ["val_accuracy"],
            SortMultipleOptions::default()
                .with_order_descending(true)
                .with_nulls_last(true),
        )
    });
    table.map_err(|e| Error::Table(e.to_string()))
}
