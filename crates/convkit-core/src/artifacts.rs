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
