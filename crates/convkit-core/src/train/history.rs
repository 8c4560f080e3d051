//! What `fit` returns: Keras' per-epoch logs.

use std::path::Path;

use serde::Serialize;

use crate::{Error, Result};

/// Keras' per-epoch logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochLog {
    /// 1-based.
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// Wall-clock seconds of the epoch's training (validation excluded).
    pub seconds: f64,
    pub learning_rate: f64,
}

impl std::fmt::Display for EpochLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}s - loss: {:.4} - accuracy: {:.4}",
            self.seconds, self.loss, self.accuracy
        )?;
        if let (Some(l), Some(a)) = (self.val_loss, self.val_accuracy) {
            write!(f, " - val_loss: {l:.4} - val_accuracy: {a:.4}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for History {
    /// One line per epoch, as Keras prints them: `Epoch 1: 3.2s - loss: … - val_accuracy: …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, log) in self.epochs.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "Epoch {}: {log}", log.epoch)?;
        }
        Ok(())
    }
}

/// What `fit` returns: one [`EpochLog`] per epoch run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct History {
    pub epochs: Vec<EpochLog>,
}

impl History {
    /// A made-up history of `epochs` epochs with falling losses, for tests of what reads one.
    #[cfg(test)]
    pub(crate) fn for_tests(epochs: usize) -> Self {
        History {
            epochs: (1..=epochs)
                .map(|epoch| EpochLog {
                    epoch,
                    loss: 1.0 / epoch as f64,
                    accuracy: 0.5 + 0.1 * epoch as f64,
                    val_loss: Some(1.1 / epoch as f64),
                    val_accuracy: Some(0.5),
                    seconds: 1.0,
                    learning_rate: 1e-3,
                })
                .collect(),
        }
    }

    /// Columns epoch, loss, accuracy, val_loss, val_accuracy, seconds, learning_rate.
    pub fn to_dataframe(&self) -> Result<polars::prelude::DataFrame> {
        use polars::prelude::*;
        let e = &self.epochs;
        let col = |name: &str, v: Vec<f64>| Column::new(name.into(), v);
        let opt = |name: &str, v: Vec<Option<f64>>| Column::new(name.into(), v);
        DataFrame::new_infer_height(vec![
            Column::new(
                "epoch".into(),
                e.iter().map(|l| l.epoch as u32).collect::<Vec<_>>(),
            ),
            col("loss", e.iter().map(|l| l.loss).collect()),
            col("accuracy", e.iter().map(|l| l.accuracy).collect()),
            opt("val_loss", e.iter().map(|l| l.val_loss).collect()),
            opt("val_accuracy", e.iter().map(|l| l.val_accuracy).collect()),
            col("seconds", e.iter().map(|l| l.seconds).collect()),
            col("learning_rate", e.iter().map(|l| l.learning_rate).collect()),
        ])
        .map_err(|e| Error::Table(e.to_string()))
    }

    /// Write the history as CSV, atomically.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        crate::table::write_csv(&mut self.to_dataframe()?, path)
    }
}
