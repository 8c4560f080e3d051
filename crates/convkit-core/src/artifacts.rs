//! The files a training or evaluation run leaves behind: `metrics.json`, `predictions.csv`,
//! `report.txt`, all written atomically.

use std::path::Path;

use serde_json::json;

use crate::metrics::{ClassificationReport, ConfusionMatrix};
use crate::train::{Evaluation, History};
use crate::{Error, Result};

/// An evaluation with its confusion matrix and report, computed once.
#[derive(Debug, Clone)]
pub struct Scored {
    pub evaluation: Evaluation,
    pub confusion: ConfusionMatrix,
    pub report: ClassificationReport,
}

impl Scored {
    pub fn new(evaluation: Evaluation) -> Result<Self> {
        let confusion = evaluation.confusion_matrix()?;
        let report = confusion.report();
        Ok(Scored {
            evaluation,
            confusion,
            report,
        })
    }

    /// Human-readable: loss, accuracy, confusion matrix, classification report.
    pub fn text(&self) -> String {
        format!(
            "test loss: {:.4}\ntest accuracy: {:.4}\n\nconfusion matrix (rows: true, columns: predicted):\n{}\nclassification report:\n{}",
            self.evaluation.loss, self.evaluation.accuracy, self.confusion, self.report
        )
    }

    /// `metrics.json`: test_loss, test_accuracy, classes, confusion_matrix, per-class scores,
    /// averages, epoch_seconds (when trained), plus `extra` fields.
    pub fn metrics_json(
        &self,
        history: Option<&History>,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let cm: Vec<Vec<u64>> = self
            .confusion
            .counts()
            .rows()
            .into_iter()
            .map(|r| r.to_vec())
            .collect();
        let mut v = json!({
            "test_loss": self.evaluation.loss,
            "test_accuracy": self.evaluation.accuracy,
            "classes": self.confusion.classes(),
            "confusion_matrix": cm,
            "per_class": self.report.per_class,
            "macro_avg": self.report.macro_avg,
            "weighted_avg": self.report.weighted_avg,
        });
        if let Some(b) = self.confusion.binary() {
            v["binary"] = json!(b);
        }
        if let Some(h) = history {
            v["epoch_seconds"] = json!(h.epochs.iter().map(|e| e.seconds).collect::<Vec<_>>());
            v["history"] = json!(h.epochs);
        }
        if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
        v
    }

    pub fn write_metrics_json(
        &self,
        path: &Path,
        history: Option<&History>,
        extra: serde_json::Value,
    ) -> Result<()> {
        let text =
            serde_json::to_string_pretty(&self.metrics_json(history, extra)).expect("serialisable");
        crate::io::write_bytes_atomic(path, text.as_bytes())
    }

    /// Columns index, label, predicted, then one probability column per class (`p_<class>`;
    /// a sigmoid head has one column, the probability of class 1).
    pub fn predictions_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let e = &self.evaluation;
        let mut columns = vec![
            Column::new(
                "index".into(),
                (0..e.labels.len() as u32).collect::<Vec<_>>(),
            ),
            Column::new("label".into(), e.labels.clone()),
            Column::new("predicted".into(), e.predicted.clone()),
        ];
        let classes = self.confusion.classes();
        for (k, col) in e.probabilities.columns().into_iter().enumerate() {
            let name = if e.probabilities.ncols() == 1 {
                classes.get(1).cloned().unwrap_or_else(|| "1".into())
            } else {
                classes[k].clone()
            };
            columns.push(Column::new(
                format!("p_{name}").as_str().into(),
                col.to_vec(),
            ));
        }
        DataFrame::new_infer_height(columns).map_err(|e| Error::Table(e.to_string()))
    }

    pub fn write_predictions_csv(&self, path: &Path) -> Result<()> {
        crate::table::write_csv(&mut self.predictions_dataframe()?, path)
    }
}

/// How an ensemble combines its members' predictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Mean of the members' probabilities.
    Average,
    /// Majority vote of the members' predicted classes; the "probabilities" are vote shares
    /// (a tie goes to the lowest class index).
    Vote,
}

impl std::str::FromStr for Combine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "average" | "mean" => Ok(Combine::Average),
            "vote" => Ok(Combine::Vote),
            o => Err(Error::config(
                "ensemble",
                format!("expected average or vote, found `{o}`"),
            )),
        }
    }
}

/// Combine the evaluations of several models on the same data into the ensemble's.
pub fn ensemble(
    members: &[Evaluation],
    combine: Combine,
    loss: crate::Loss,
    head: crate::Head,
) -> Result<Evaluation> {
    let first = members
        .first()
        .ok_or_else(|| Error::config("ensemble", "needs at least one model"))?;
    for (i, m) in members.iter().enumerate() {
        if m.labels != first.labels
            || m.classes != first.classes
            || m.probabilities.dim() != first.probabilities.dim()
        {
            return Err(Error::config(
                "ensemble",
                format!("model {i} was evaluated on other data or classes ({:?} probabilities, {} classes) than model 0 ({:?}, {})", m.probabilities.dim(), m.classes.len(), first.probabilities.dim(), first.classes.len()),
            ));
        }
    }
    let n = members.len() as f32;
    let probabilities = match combine {
        Combine::Average => {
            members.iter().fold(
                ndarray::Array2::zeros(first.probabilities.dim()),
                |acc, m| acc + &m.probabilities,
            ) / n
        }
        Combine::Vote => {
            let (rows, cols) = first.probabilities.dim();
            let mut shares = ndarray::Array2::<f32>::zeros((rows, cols));
            for m in members {
                for (r, &class) in m.predicted.iter().enumerate() {
                    match head {
                        crate::Head::Sigmoid => shares[[r, 0]] += class as f32 / n,
                        crate::Head::Softmax => shares[[r, class as usize]] += 1.0 / n,
                    }
                }
            }
            shares
        }
    };
    match &first.soft_targets {
        Some(targets) => Evaluation::soft(
            loss,
            head,
            probabilities,
            targets.clone(),
            first.classes.clone(),
        ),
        None => Evaluation::new(
            loss,
            head,
            probabilities,
            first.labels.clone(),
            first.classes.clone(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    fn eval(p: ndarray::Array2<f32>) -> Evaluation {
        Evaluation::new(
            crate::Loss::SparseCategoricalCrossentropy,
            crate::Head::Softmax,
            p,
            vec![0, 1, 2],
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap()
    }

    #[test]
    fn average_and_vote() {
        let a = eval(arr2(&[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]));
        let b = eval(arr2(&[[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]]));
        let c = eval(arr2(&[[0.5, 0.4, 0.1], [0.1, 0.6, 0.3], [0.6, 0.2, 0.2]]));
        let members = [a, b, c];
        let avg = ensemble(
            &members,
            Combine::Average,
            crate::Loss::SparseCategoricalCrossentropy,
            crate::Head::Softmax,
        )
        .unwrap();
        assert!((avg.probabilities[[0, 0]] - 1.3 / 3.0).abs() < 1e-6);
        // sample 0 averages to (0.433, 0.467, 0.1): class 1, though two of three models vote 0
        assert_eq!(avg.predicted, vec![1, 1, 2]);
        let vote = ensemble(
            &members,
            Combine::Vote,
            crate::Loss::SparseCategoricalCrossentropy,
            crate::Head::Softmax,
        )
        .unwrap();
        // sample 0: votes a→0, b→1, c→0 → 0; sample 2: 2, 2, 0 → 2
        assert_eq!(vote.predicted, vec![0, 1, 2]);
        assert!((vote.probabilities[[0, 0]] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(vote.accuracy, 1.0);
        let other = Evaluation::new(
            crate::Loss::SparseCategoricalCrossentropy,
            crate::Head::Softmax,
            arr2(&[[1.0, 0.0, 0.0]]),
            vec![0],
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        assert!(ensemble(
            &[members[0].clone(), other],
            Combine::Average,
            crate::Loss::SparseCategoricalCrossentropy,
            crate::Head::Softmax
        )
        .is_err());
    }
}
