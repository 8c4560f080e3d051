//! [`EvaluateRequest`]: saved weights, one model or an ensemble, scored on a dataset.

use std::path::PathBuf;

use super::DataRequest;
use crate::artifacts::{Combine, Scored};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::data::Dataset;
use crate::spec::SizeLimits;
use crate::train::{Evaluation, Model};
use crate::{Error, Result};

/// `convkit evaluate`: checkpoints scored on `data`'s test split (or the validation data it
/// names); several checkpoints are an ensemble.
#[derive(Debug, Clone)]
pub struct EvaluateRequest {
    /// Its test split is the data scored.
    pub data: DataRequest,
    pub size_limits: SizeLimits,
    /// Checkpoint files or run folders holding `model.safetensors`; several: an ensemble.
    pub weights: Vec<PathBuf>,
    /// How an ensemble combines its models.
    pub combine: Combine,
    /// Where to write `metrics.json` and `predictions.csv`, if anywhere.
    pub out: Option<PathBuf>,
}

/// What an [`EvaluateRequest`] gave.
#[derive(Debug)]
pub struct EvaluateOutcome {
    /// The model (or the ensemble) scored.
    pub scored: Scored,
    /// What it was scored on: `test` or `validation`.
    pub part: &'static str,
    /// Each checkpoint's own evaluation, in the order given.
    pub members: Vec<(PathBuf, Evaluation)>,
    /// How an ensemble combined them.
    pub combine: Combine,
}

/// `convkit evaluate`'s report: each member's loss and accuracy (an ensemble's), then the
/// scores and the classification report.
impl std::fmt::Display for EvaluateOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let part = self.part;
        if self.members.len() > 1 {
            for (path, member) in &self.members {
                let (loss, accuracy) = (member.loss, member.accuracy);
                writeln!(
                    f,
                    "{}: {part} loss {loss:.4}, {part} accuracy {accuracy:.4}",
                    path.display()
                )?;
            }
            writeln!(
                f,
                "ensemble of {} models ({:?}):",
                self.members.len(),
                self.combine
            )?;
        }
        write!(f, "scored on the {part} data:\n{}", self.scored.text())
    }
}

impl EvaluateRequest {
    /// Score `weights` on `data`'s test split, one model, nothing written.
    pub fn new(data: DataRequest, weights: impl Into<PathBuf>) -> Self {
        EvaluateRequest {
            data,
            size_limits: SizeLimits::default(),
            weights: vec![weights.into()],
            combine: Combine::Average,
            out: None,
        }
    }

    pub fn run(&self, backend: &dyn Backend) -> Result<EvaluateOutcome> {
        let mut members = Vec::new();
        let mut first: Option<(Checkpoint, Dataset, &'static str)> = None;
        for path in &self.weights {
            let checkpoint = Checkpoint::load_within(path, &self.size_limits)?;
            let (data, part) = match &first {
                Some((f, data, part))
                    if f.spec.input_shape == checkpoint.spec.input_shape
                        && f.meta.normalisation == checkpoint.meta.normalisation =>
                {
                    (data.clone(), *part)
                }
                _ => self.scored_data(&checkpoint)?,
            };
            if !checkpoint.meta.classes.is_empty() && checkpoint.meta.classes != data.classes {
                return Err(Error::data(
                    path,
                    format!(
                        "the weights were trained on classes {:?}, but `{}` has {:?}",
                        checkpoint.meta.classes,
                        self.data.dataset_shown(),
                        data.classes
                    ),
                ));
            }
            let model = Model::from_checkpoint(&checkpoint, backend)?;
            let evaluation = model.evaluate(&data, self.data.batch_size.max(1))?;
            members.push((path.clone(), evaluation));
            if first.is_none() {
                first = Some((checkpoint, data, part));
            }
        }
        let (checkpoint, _, part) = first.ok_or_else(|| {
            Error::config("evaluate", "needs at least one checkpoint to evaluate")
        })?;
        let evaluation = if members.len() == 1 {
            members[0].1.clone()
        } else {
            let head = checkpoint.compile.check(&checkpoint.spec)?;
            let evaluations: Vec<Evaluation> = members.iter().map(|m| m.1.clone()).collect();
            crate::artifacts::ensemble(&evaluations, self.combine, checkpoint.compile.loss, head)?
        };
        let scored = Scored::new(evaluation)?;
        if let Some(out) = &self.out {
            let extra = serde_json::json!({"backend": backend.name(), "model": checkpoint.spec.name, "dataset": self.data.dataset_shown(), "weights": self.weights, "ensemble": format!("{:?}", self.combine)});
            scored.write_metrics_json(&out.join("metrics.json"), None, extra)?;
            scored.write_predictions_csv(&out.join("predictions.csv"))?;
        }
        Ok(EvaluateOutcome {
            scored,
            part,
            members,
            combine: self.combine,
        })
    }

    /// The data `checkpoint` is scored on, in its input shape and normalisation.
    fn scored_data(&self, checkpoint: &Checkpoint) -> Result<(Dataset, &'static str)> {
        let splits = self
            .data
            .open(&checkpoint.spec, &checkpoint.meta.normalisation)?;
        let (data, part) = splits.evaluation().ok_or_else(|| {
            Error::config(
                "data",
                format!(
                    "`{}` has no test split; name validation data with --validation-split",
                    self.data.dataset_shown()
                ),
            )
        })?;
        Ok((data.clone(), part))
    }
}
