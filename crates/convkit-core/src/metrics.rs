//! Confusion matrix and scikit-learn's classification report.
//!
//! The counts are kept here as a full `K×K` matrix (rows: true class, columns: predicted,
//! scikit-learn's orientation, every class present even with no support). linfa's
//! `ConfusionMatrix` is available through [`ConfusionMatrix::to_linfa`] for its scores (MCC,
//! ...); it cannot be the store itself: its matrix is private, it drops classes that never
//! occur, and its rows are predictions.

use std::fmt::Write as _;

use ndarray::{Array1, Array2};
use serde::Serialize;

use crate::{Error, Result};

/// Counts of (true, predicted) class pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    classes: Vec<String>,
    /// `[true, predicted]`.
    counts: Array2<u64>,
    truth: Vec<u32>,
    predicted: Vec<u32>,
}

/// TP/FP/FN/TN of a two-class problem, class 1 positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BinaryCounts {
    pub true_positives: u64,
    pub false_positives: u64,
    pub false_negatives: u64,
    pub true_negatives: u64,
}

impl ConfusionMatrix {
    pub fn new(truth: &[u32], predicted: &[u32], classes: Vec<String>) -> Result<Self> {
        let k = classes.len();
        if truth.len() != predicted.len() {
            return Err(Error::Shape {
                expected: format!("{} predictions", truth.len()),
                found: predicted.len().to_string(),
            });
        }
        let mut counts = Array2::zeros((k, k));
        for (i, (&t, &p)) in truth.iter().zip(predicted).enumerate() {
            if t as usize >= k || p as usize >= k {
                return Err(Error::config(
                    "confusion matrix",
                    format!("sample {i}: class {t} / {p} out of range for {k} classes"),
                ));
            }
            counts[[t as usize, p as usize]] += 1;
        }
        Ok(ConfusionMatrix {
            classes,
            counts,
            truth: truth.to_vec(),
            predicted: predicted.to_vec(),
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// `[true, predicted]` counts.
    pub fn counts(&self) -> &Array2<u64> {
        &self.counts
    }

    pub fn total(&self) -> u64 {
        self.counts.sum()
    }

    pub fn accuracy(&self) -> f64 {
        let diag: u64 = (0..self.classes.len()).map(|i| self.counts[[i, i]]).sum();
        diag as f64 / self.total().max(1) as f64
    }

    /// linfa's confusion matrix of the same predictions.
    pub fn to_linfa(&self) -> Result<linfa::metrics::ConfusionMatrix<usize>> {
        use linfa::metrics::ToConfusionMatrix;
        let pred = Array1::from_iter(self.predicted.iter().map(|&p| p as usize));
        let truth = Array1::from_iter(self.truth.iter().map(|&t| t as usize));
        pred.confusion_matrix(&truth)
            .map_err(|e| Error::config("confusion matrix", e.to_string()))
    }

    /// TP/FP/FN/TN with class 1 positive; `None` unless there are exactly two classes.
    pub fn binary(&self) -> Option<BinaryCounts> {
        (self.classes.len() == 2).then(|| BinaryCounts {
            true_positives: self.counts[[1, 1]],
            false_positives: self.counts[[0, 1]],
            false_negatives: self.counts[[1, 0]],
            true_negatives: self.counts[[0, 0]],
        })
    }

    /// The per-class and averaged scores.
    pub fn report(&self) -> ClassificationReport {
        let k = self.classes.len();
        let per_class: Vec<ClassScores> = (0..k)
            .map(|c| {
                let tp = self.counts[[c, c]] as f64;
                let predicted = self.counts.column(c).sum() as f64;
                let support = self.counts.row(c).sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, support as f64);
                ClassScores {
                    class: self.classes[c].clone(),
                    precision,
                    recall,
                    f1_score: ratio(2.0 * precision * recall, precision + recall),
                    support,
                }
            })
            .collect();
        let total = self.total();
        let avg = |name: &str, weight: &dyn Fn(&ClassScores) -> f64, norm: f64| ClassScores {
            class: name.into(),
            precision: per_class
                .iter()
                .map(|s| s.precision * weight(s))
                .sum::<f64>()
                / norm,
            recall: per_class.iter().map(|s| s.recall * weight(s)).sum::<f64>() / norm,
            f1_score: per_class
                .iter()
                .map(|s| s.f1_score * weight(s))
                .sum::<f64>()
                / norm,
            support: total,
        };
        let macro_avg = avg("macro avg", &|_| 1.0, k.max(1) as f64);
        let weighted_avg = avg("weighted avg", &|s| s.support as f64, total.max(1) as f64);
        ClassificationReport {
            per_class,
            accuracy: self.accuracy(),
            total,
            macro_avg,
            weighted_avg,
        }
    }

    /// The counts as a DataFrame: a `true` column of class names, one column per predicted class.
    pub fn to_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let mut columns = vec![Column::new("true".into(), self.classes.clone())];
        for (c, name) in self.classes.iter().enumerate() {
            columns.push(Column::new(
                name.as_str().into(),
                self.counts.column(c).to_vec(),
            ));
        }
        DataFrame::new_infer_height(columns).map_err(|e| Error::Table(e.to_string()))
    }
}

/// Zero when the denominator is zero (scikit-learn's `zero_division=0`).
fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

impl std::fmt::Display for ConfusionMatrix {
    /// Rows are true classes, columns predicted classes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .chain(self.counts.iter().map(|n| n.to_string().len()))
            .max()
            .unwrap_or(1)
            .max(4);
        let label = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(4)
            .max(9);
        write!(f, "{:>label$}", "true\\pred")?;
        for c in &self.classes {
            write!(f, " {c:>width$}")?;
        }
        writeln!(f)?;
        for (r, c) in self.classes.iter().enumerate() {
            write!(f, "{c:>label$}")?;
            for n in self.counts.row(r) {
                write!(f, " {n:>width$}")?;
            }
            writeln!(f)?;
        }
        if let Some(b) = self.binary() {
            writeln!(
                f,
                "TP (true {p}, predicted {p}) = {}, FP = {}, FN = {}, TN = {}",
                b.true_positives,
                b.false_positives,
                b.false_negatives,
                b.true_negatives,
                p = self.classes[1]
            )?;
        }
        Ok(())
    }
}

/// Precision, recall, F1 and support of one class (or an average).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScores {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1_score: f64,
    pub support: u64,
}

/// scikit-learn's `classification_report`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub per_class: Vec<ClassScores>,
    pub accuracy: f64,
    pub total: u64,
    pub macro_avg: ClassScores,
    pub weighted_avg: ClassScores,
}

impl ClassificationReport {
    /// One row per class, then accuracy, macro avg and weighted avg.
    pub fn to_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        // scikit-learn's layout: the accuracy row has only an f1-score (the accuracy) and the
        // support; its precision and recall are empty.
        type Row = (String, Option<f64>, Option<f64>, f64, u64);
        let row = |c: &ClassScores| -> Row {
            let (p, r) = (Some(c.precision), Some(c.recall));
            (c.class.clone(), p, r, c.f1_score, c.support)
        };
        let mut rows: Vec<Row> = self.per_class.iter().map(row).collect();
        rows.push(("accuracy".into(), None, None, self.accuracy, self.total));
        rows.extend([&self.macro_avg, &self.weighted_avg].map(row));
        DataFrame::new_infer_height(vec![
            Column::new(
                "class".into(),
                rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "precision".into(),
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            ),
            Column::new(
                "recall".into(),
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            ),
            Column::new(
                "f1-score".into(),
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            ),
            Column::new(
                "support".into(),
                rows.iter().map(|r| r.4).collect::<Vec<_>>(),
            ),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }
}

impl std::fmt::Display for ClassificationReport {
    /// scikit-learn's layout, two decimals.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self
            .per_class
            .iter()
            .map(|c| c.class.chars().count())
            .max()
            .unwrap_or(0)
            .max("weighted avg".len());
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>width$} {:>9} {:>9} {:>9} {:>9}\n",
            "", "precision", "recall", "f1-score", "support"
        );
        let row = |s: &mut String, c: &ClassScores| {
            let _ = writeln!(
                s,
                "{:>width$} {:>9.2} {:>9.2} {:>9.2} {:>9}",
                c.class, c.precision, c.recall, c.f1_score, c.support
            );
        };
        for c in &self.per_class {
            row(&mut s, c);
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:>width$} {:>9} {:>9} {:>9.2} {:>9}",
            "accuracy", "", "", self.accuracy, self.total
        );
        row(&mut s, &self.macro_avg);
        row(&mut s, &self.weighted_avg);
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|c| format!("c{c}")).collect()
    }

    #[test]
    fn hand_computed_report() {
        // truth:     0 0 0 1 1 2
        // predicted: 0 0 1 1 2 2
        let cm = ConfusionMatrix::new(&[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 2, 2], names(3)).unwrap();
        assert_eq!(
            cm.counts(),
            &ndarray::arr2(&[[2, 1, 0], [0, 1, 1], [0, 0, 1]])
        );
        let r = cm.report();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        close(r.accuracy, 4.0 / 6.0);
        close(r.per_class[0].precision, 1.0);
        close(r.per_class[0].recall, 2.0 / 3.0);
        close(r.per_class[0].f1_score, 0.8);
        close(r.per_class[1].precision, 0.5);
        close(r.per_class[1].recall, 0.5);
        close(r.per_class[2].precision, 0.5);
        close(r.per_class[2].recall, 1.0);
        close(r.per_class[2].f1_score, 2.0 / 3.0);
        close(r.macro_avg.precision, 2.0 / 3.0);
        close(
            r.weighted_avg.recall,
            (3.0 * (2.0 / 3.0) + 2.0 * 0.5 + 1.0) / 6.0,
        );
        assert_eq!(r.per_class[1].support, 2);
        // linfa agrees on the macro averages
        let linfa = cm.to_linfa().unwrap();
        eprintln!(
            "linfa precision {} recall {} accuracy {}",
            linfa.precision(),
            linfa.recall(),
            linfa.accuracy()
        );
        assert!((linfa.accuracy() as f64 - r.accuracy).abs() < 1e-6);
        let text = r.to_string();
        assert!(
            text.contains("precision    recall  f1-score   support"),
            "{text}"
        );
        assert!(
            text.contains("          c0      1.00      0.67      0.80         3"),
            "{text}"
        );
        assert!(
            text.contains("    accuracy                          0.67         6"),
            "{text}"
        );
        assert!(text.contains("weighted avg"), "{text}");
        assert_eq!(r.to_dataframe().unwrap().height(), 6);
        assert_eq!(cm.to_dataframe().unwrap().width(), 4);
    }

    #[test]
    fn absent_classes_and_zero_division() {
        let cm = ConfusionMatrix::new(&[0, 0], &[0, 0], names(3)).unwrap();
        let r = cm.report();
        assert_eq!(r.per_class[2].support, 0);
        assert_eq!(r.per_class[2].precision, 0.0);
        assert!(ConfusionMatrix::new(&[3], &[0], names(3)).is_err());
    }

    #[test]
    fn binary_counts_are_named() {
        let cm = ConfusionMatrix::new(
            &[1, 1, 0, 0, 1],
            &[1, 0, 0, 1, 1],
            vec!["neg".into(), "pos".into()],
        )
        .unwrap();
        let b = cm.binary().unwrap();
        assert_eq!(
            (
                b.true_positives,
                b.false_positives,
                b.false_negatives,
                b.true_negatives
            ),
            (2, 1, 1, 1)
        );
        assert!(cm
            .to_string()
            .contains("TP (true pos, predicted pos) = 2, FP = 1, FN = 1, TN = 1"));
    }
}
