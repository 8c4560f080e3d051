//! Rich output in evcxr Jupyter notebooks (feature `evcxr`). evcxr calls `evcxr_display()` on
//! a cell's value and reads the content blocks it prints: plots show as PNG, tables as HTML,
//! and every value also gives a text/plain fallback. There is no dependency on evcxr itself.
//!
//! ```no_run
//! use convkit_core::display::Rich;
//! # fn show(history: &convkit_core::train::History) {
//! convkit_core::plot::TrainingCurves(history).evcxr_display(); // the last line of a cell does this itself
//! # }
//! ```

use base64::Engine as _;
use polars::prelude::{AnyValue, DataFrame};

use crate::artifacts::Scored;
use crate::metrics::{ClassificationReport, ConfusionMatrix};
use crate::plot::{ConfusionHeatmap, Figure, SampleGrid, TrainingCurves};
use crate::spec::Sequential;
use crate::train::History;

/// A value with rich notebook output.
pub trait Rich {
    /// `(MIME type, body)` blocks, the richest first, always with a `text/plain` one.
    fn rich(&self) -> Vec<(&'static str, String)>;

    /// Print the blocks in evcxr's protocol (what a notebook cell shows).
    fn evcxr_display(&self) {
        print!("{}", evcxr_blocks(&self.rich()));
    }
}

/// The blocks in evcxr's protocol: `EVCXR_BEGIN_CONTENT <mime>` … `EVCXR_END_CONTENT`.
pub fn evcxr_blocks(blocks: &[(&str, String)]) -> String {
    blocks
        .iter()
        .map(|(mime, body)| format!("EVCXR_BEGIN_CONTENT {mime}\n{body}\nEVCXR_END_CONTENT\n"))
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One table cell: floats as [`number_text`], a missing value as an empty cell, text unquoted.
fn cell_text(value: AnyValue<'_>) -> String {
    match value {
        AnyValue::Null => String::new(),
        AnyValue::Float64(v) => number_text(v),
        AnyValue::Float32(v) => number_text(v as f64),
        other => other.to_string().trim_matches('"').to_string(),
    }
}

/// A float with 4 decimals, or in scientific notation when that would hide it (a tolerance of
/// 1e-5 is not 0.0000): below 1e-3 or from 1e6 in magnitude.
fn number_text(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-3..1e6).contains(&v.abs()) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// An HTML table of a DataFrame: a header row of column names, then one row per record.
pub fn dataframe_html(df: &DataFrame) -> String {
    let columns = df.columns();
    let mut html = String::from("<table>\n<thead><tr>");
    for c in columns {
        html += &format!("<th>{}</th>", escape(c.name()));
    }
    html += "</tr></thead>\n<tbody>\n";
    for row in 0..df.height() {
        html += "<tr>";
        for c in columns {
            let cell = c.get(row).map(cell_text).unwrap_or_default();
            html += &format!("<td>{}</td>", escape(&cell));
        }
        html += "</tr>\n";
    }
    html + "</tbody>\n</table>"
}

/// A matrix (one-hot rows, probabilities) as an HTML table: whole numbers as they are,
/// others with 4 decimals; the text form is ndarray's.
impl Rich for ndarray::Array2<f32> {
    fn rich(&self) -> Vec<(&'static str, String)> {
        let mut html = String::from("<table>\n<thead><tr><th></th>");
        for c in 0..self.ncols() {
            html += &format!("<th>{c}</th>");
        }
        html += "</tr></thead>\n<tbody>\n";
        for (r, row) in self.rows().into_iter().enumerate() {
            html += &format!("<tr><th>{r}</th>");
            for v in row {
                if v.fract() == 0.0 {
                    html += &format!("<td>{v:.0}</td>");
                } else {
                    html += &format!("<td>{v:.4}</td>");
                }
            }
            html += "</tr>\n";
        }
        html += "</tbody>\n</table>";
        vec![("text/html", html), ("text/plain", format!("{self}"))]
    }
}

/// A plot: PNG, with its size as the text fallback.
fn figure_blocks<F: Figure>(figure: &F, what: &str) -> Vec<(&'static str, String)> {
    let (w, h) = figure.size();
    let text = format!("<{what}, {w}×{h} px>");
    match figure.to_png() {
        Ok(png) => vec![
            (
                "image/png",
                base64::engine::general_purpose::STANDARD.encode(png),
            ),
            ("text/plain", text),
        ],
        Err(e) => vec![("text/plain", format!("{text}: {e}"))],
    }
}

impl Rich for TrainingCurves<'_> {
    fn rich(&self) -> Vec<(&'static str, String)> {
        figure_blocks(self, "training curves")
    }
}

impl Rich for ConfusionHeatmap<'_> {
    fn rich(&self) -> Vec<(&'static str, String)> {
        figure_blocks(self, "confusion matrix")
    }
}

impl Rich for SampleGrid<'_> {
    fn rich(&self) -> Vec<(&'static str, String)> {
        figure_blocks(self, "sample grid")
    }
}

/// A table: HTML from its DataFrame (when it converts), with `text` as the fallback.
fn table_blocks(
    df: crate::Result<DataFrame>,
    caption: &str,
    text: String,
) -> Vec<(&'static str, String)> {
    let mut blocks = Vec::new();
    if let Ok(df) = df {
        blocks.push((
            "text/html",
            format!("<p><b>{}</b></p>\n{}", escape(caption), dataframe_html(&df)),
        ));
    }
    blocks.push(("text/plain", text));
    blocks
}

impl Rich for ConfusionMatrix {
    fn rich(&self) -> Vec<(&'static str, String)> {
        table_blocks(
            self.to_dataframe(),
            "Confusion matrix (rows: true class, columns: predicted)",
            self.to_string(),
        )
    }
}

impl Rich for ClassificationReport {
    fn rich(&self) -> Vec<(&'static str, String)> {
        table_blocks(
            self.to_dataframe(),
            "Classification report",
            self.to_string(),
        )
    }
}

impl Rich for History {
    fn rich(&self) -> Vec<(&'static str, String)> {
        table_blocks(self.to_dataframe(), "Training history", self.to_string())
    }
}

impl Rich for Scored {
    fn rich(&self) -> Vec<(&'static str, String)> {
        let mut html = format!(
            "<p>loss {:.4}, accuracy {:.4}</p>\n",
            self.evaluation.loss, self.evaluation.accuracy
        );
        for (caption, df) in [
            ("Classification report", self.report.to_dataframe()),
            ("Confusion matrix", self.confusion.to_dataframe()),
        ] {
            if let Ok(df) = df {
                html += &format!("<p><b>{caption}</b></p>\n{}\n", dataframe_html(&df));
            }
        }
        vec![("text/html", html), ("text/plain", self.text())]
    }
}

impl Rich for Sequential {
    fn rich(&self) -> Vec<(&'static str, String)> {
        let text = self.summary().unwrap_or_else(|e| e.to_string());
        vec![
            ("text/html", format!("<pre>{}</pre>", escape(&text))),
            ("text/plain", text),
        ]
    }
}

impl Rich for crate::compare::Comparison {
    /// The speed table, the agreement checks and the loss and throughput charts.
    fn rich(&self) -> Vec<(&'static str, String)> {
        let mut html = format!(
            "<p><b>{}</b> (reference: {})</p>\n",
            if self.passed() {
                "Every engine agrees"
            } else {
                "The engines disagree, or one failed"
            },
            escape(self.reference.as_deref().unwrap_or("none"))
        );
        for (caption, df) in [
            ("Speed", self.to_dataframe()),
            ("Agreement with the reference", self.checks_dataframe()),
        ] {
            if let Ok(df) = df {
                html += &format!("<p><b>{caption}</b></p>\n{}\n", dataframe_html(&df));
            }
        }
        if !self.left_out.is_empty() {
            html += "<p><b>Not run</b></p>\n<ul>\n";
            for l in &self.left_out {
                html += &format!("<li>{}: {}</li>\n", escape(&l.engine), escape(&l.reason));
            }
            html += "</ul>\n";
        }
        for png in [self.loss_chart().to_png(), self.throughput_chart().to_png()]
            .into_iter()
            .flatten()
        {
            html += &format!(
                "<img src=\"data:image/png;base64,{}\"/>\n",
                base64::engine::general_purpose::STANDARD.encode(png)
            );
        }
        vec![("text/html", html), ("text/plain", self.markdown())]
    }
}

/// A polars DataFrame shown as an HTML table: `Table(history.to_dataframe()?)`.
#[derive(Debug, Clone)]
pub struct Table(pub DataFrame);

impl Rich for Table {
    fn rich(&self) -> Vec<(&'static str, String)> {
        vec![
            ("text/html", dataframe_html(&self.0)),
            ("text/plain", self.0.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_png_blocks_with_a_text_fallback() {
        let h = History::for_tests(2);
        let blocks = TrainingCurves(&h).rich();
        assert_eq!(blocks[0].0, "image/png");
        let png = base64::engine::general_purpose::STANDARD
            .decode(&blocks[0].1)
            .unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(blocks.last().unwrap().0, "text/plain");
        let out = evcxr_blocks(&blocks);
        assert!(out.starts_with("EVCXR_BEGIN_CONTENT image/png\n"));
        assert_eq!(out.matches("EVCXR_END_CONTENT\n").count(), 2);
    }

    #[test]
    fn small_and_large_numbers_keep_their_digits() {
        let cells: Vec<String> = [1e-5, 2.98e-8, 0.0, 0.05, 0.9343, 161.9, 2.5e7, -3e-4]
            .map(number_text)
            .to_vec();
        assert_eq!(
            cells,
            [
                "1.000e-5",
                "2.980e-8",
                "0.0000",
                "0.0500",
                "0.9343",
                "161.9000",
                "2.500e7",
                "-3.000e-4"
            ]
        );
    }

    #[test]
    fn tables_are_html_with_every_row_and_escaped_names() {
        let h = History::for_tests(2);
        let html = &h.rich()[0].1;
        assert!(html.contains("<th>val_accuracy</th>"), "{html}");
        assert_eq!(
            html.matches("<tr>").count(),
            3,
            "header and two epochs: {html}"
        );
        let cm =
            ConfusionMatrix::new(&[0, 1, 1], &[0, 1, 0], vec!["<a>".into(), "b".into()]).unwrap();
        let blocks = cm.rich();
        assert_eq!(blocks[0].0, "text/html");
        assert!(blocks[0].1.contains("&lt;a&gt;") && !blocks[0].1.contains("<a>"));
        assert_eq!(blocks[1], ("text/plain", cm.to_string()));
        let spec = Sequential::preset("tutorial-mnist").unwrap();
        assert!(spec.rich()[1].1.contains("Total params:"));
        // Four decimals, no `null`, the accuracy row, epoch numbers in the text.
        let mut h = History::for_tests(1);
        h.epochs[0].val_loss = None;
        let blocks = h.rich();
        assert!(!blocks[0].1.contains("null"), "{}", blocks[0].1);
        assert!(blocks[1].1.starts_with("Epoch 1: "), "{}", blocks[1].1);
        let report = cm.report();
        let html = &report.rich()[0].1;
        assert!(
            html.contains("<td>accuracy</td><td></td><td></td><td>0.6667</td><td>3</td>"),
            "{html}"
        );
        let one_hot = crate::data::one_hot(&[1, 0], 3).unwrap().rich();
        assert!(
            one_hot[0]
                .1
                .contains("<tr><th>0</th><td>0</td><td>1</td><td>0</td></tr>"),
            "{}",
            one_hot[0].1
        );
    }
}
