//! Keras' `model.summary()`.

use std::fmt::Write as _;

use super::{thousands, Sequential};
use crate::Result;

impl Sequential {
    /// A Keras-style summary: layers, output shapes, parameter counts, trainable and
    /// non-trainable totals.
    pub fn summary(&self) -> Result<String> {
        let shapes = self.output_shapes()?;
        let params = self.param_counts()?;
        let names = self.layer_names();
        let fixed = self.non_trainable_counts()?;
        let rows: Vec<[String; 3]> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                [
                    format!("{} ({})", names[i], layer.kind.type_name()),
                    shapes[i].to_string(),
                    thousands(params[i]),
                ]
            })
            .collect();
        // Columns as wide as Keras' (34, 26) or their longest entry plus two spaces.
        let header = ["Layer (type)", "Output Shape", "Param #"];
        let width = |col: usize, least: usize| {
            rows.iter()
                .map(|r| r[col].chars().count() + 2)
                .chain([least])
                .max()
                .unwrap_or(least)
        };
        let (w0, w1) = (width(0, 34), width(1, 26));
        let total = (1 + w0 + w1 + width(2, 10)).max(71);
        let line = |cells: [&str; 3]| format!(" {:<w0$}{:<w1$}{}", cells[0], cells[1], cells[2]);
        let mut s = String::new();
        let rule = "_".repeat(total);
        let _ = writeln!(s, "Model: \"{}\"", self.name);
        let _ = writeln!(s, "{rule}");
        let _ = writeln!(s, "{}", line(header));
        let _ = writeln!(s, "{}", "=".repeat(total));
        let (mut trainable, mut frozen) = (0, 0);
        for (i, row) in rows.iter().enumerate() {
            let _ = writeln!(s, "{}", line([&row[0], &row[1], &row[2]]));
            trainable += params[i] - fixed[i];
            frozen += fixed[i];
        }
        let _ = writeln!(s, "{}", "=".repeat(total));
        let _ = writeln!(s, "Total params: {}", thousands(trainable + frozen));
        let _ = writeln!(s, "Trainable params: {}", thousands(trainable));
        let _ = writeln!(s, "Non-trainable params: {}", thousands(frozen));
        let _ = write!(s, "{rule}");
        Ok(s)
    }
}
