//! Plots with plotters: training curves, confusion-matrix heat map, and a grid of sample
//! images with true (and predicted) labels. PNG or SVG, chosen by the file extension, written
//! atomically. Text uses the embedded DejaVu Sans, so no system fonts are needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::data::Dataset;
use crate::metrics::ConfusionMatrix;
use crate::train::History;
use crate::{Error, Result};

type DrawResult = std::result::Result<(), String>;

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration only fails on an unparsable font; the embedded one parses.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Something that can be drawn on any plotters backend.
pub trait Figure {
    /// Pixel size `(width, height)`.
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult;

    /// Render as PNG bytes.
    fn to_png(&self) -> Result<Vec<u8>> {
        fonts();
        let (w, h) = self.size();
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            self.draw(&root)
                .and_then(|_| root.present().map_err(|e| e.to_string()))
                .map_err(plot_err)?;
        }
        let img = image::RgbImage::from_raw(w, h, rgb).expect("buffer sized for the image");
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| plot_err(e.to_string()))?;
        Ok(png)
    }

    /// Render as an SVG document.
    fn to_svg(&self) -> Result<String> {
        fonts();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size()).into_drawing_area();
            self.draw(&root)
                .and_then(|_| root.present().map_err(|e| e.to_string()))
                .map_err(plot_err)?;
        }
        Ok(svg)
    }

    /// Save as `.png` or `.svg` (by extension), atomically.
    fn save(&self, path: &Path) -> Result<()> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let bytes = match ext.as_deref() {
            Some("png") => self.to_png(),
            Some("svg") => self.to_svg().map(String::into_bytes),
            other => {
                return Err(Error::Plot {
                    path: path.into(),
                    message: format!(
                        "expected a .png or .svg file name, found extension {other:?}"
                    ),
                })
            }
        }
        .map_err(|e| match e {
            Error::Plot { message, .. } => Error::Plot {
                path: path.into(),
                message,
            },
            other => other,
        })?;
        crate::io::write_bytes_atomic(path, &bytes)
    }
}

fn plot_err(message: String) -> Error {
    Error::Plot {
        path: "<memory>".into(),
        message,
    }
}

fn e<T: std::fmt::Display>(err: T) -> String {
    err.to_string()
}

/// Height in pixels of the legend row under a chart.
const LEGEND_ROW: u32 = 28;

/// Split `area` into the chart and, below it, a row for [`draw_legend`]: legends never cover
/// the data, whatever its shape.
pub(crate) fn with_legend_row<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
) -> (DrawingArea<DB, Shift>, DrawingArea<DB, Shift>) {
    let height = area.dim_in_pixel().1;
    area.split_vertically(height.saturating_sub(LEGEND_ROW))
}

/// A line and a label per entry, side by side, centred in `row`.
pub(crate) fn draw_legend<DB: DrawingBackend>(
    row: &DrawingArea<DB, Shift>,
    entries: &[(String, RGBColor)],
) -> DrawResult {
    let font = ("sans-serif", 14.0).into_font();
    let widths: Vec<i32> = entries
        .iter()
        .map(|(label, _)| 34 + 8 * label.chars().count() as i32 + 18)
        .collect();
    let width = row.dim_in_pixel().0 as i32;
    let mut x = (width - widths.iter().sum::<i32>()).max(0) / 2;
    for ((label, color), w) in entries.iter().zip(widths) {
        row.draw(&PathElement::new(
            vec![(x, 12), (x + 26, 12)],
            color.stroke_width(3),
        ))
        .map_err(e)?;
        row.draw(&Text::new(label.clone(), (x + 32, 4), font.clone()))
            .map_err(e)?;
        x += w;
    }
    Ok(())
}

/// Train and validation colours (matplotlib's first two).
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VALIDATION: RGBColor = RGBColor(255, 127, 14);

/// Accuracy and loss per epoch, train and validation: accuracy on the left (its axis within
/// [0, 1]), loss on the right, the legend under each panel.
pub struct TrainingCurves<'a>(pub &'a History);

impl Figure for TrainingCurves<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 420)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let (left, right) = root.split_horizontally(500);
        let epochs = &self.0.epochs;
        type Get = fn(&crate::train::EpochLog) -> Option<f64>;
        let panels: [(&DrawingArea<DB, Shift>, &str, Get, Get); 2] = [
            (&left, "accuracy", |l| Some(l.accuracy), |l| l.val_accuracy),
            (&right, "loss", |l| Some(l.loss), |l| l.val_loss),
        ];
        for (area, name, train, val) in panels {
            let values: Vec<f64> = epochs
                .iter()
                .flat_map(|l| [train(l), val(l)])
                .flatten()
                .filter(|v| v.is_finite())
                .collect();
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let (lo, hi) = if values.is_empty() {
                (0.0, 1.0)
            } else {
                (lo, hi)
            };
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let (lo, hi) = if name == "accuracy" {
                ((lo - pad).max(0.0), (hi + pad).min(1.0))
            } else {
                ((lo - pad).max(0.0), hi + pad)
            };
            let (chart_area, legend_row) = with_legend_row(area);
            let mut chart = ChartBuilder::on(&chart_area)
                .caption(format!("model {name}"), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(0.5f64..(epochs.len().max(1) as f64 + 0.5), lo..hi)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(name)
                .x_labels(epochs.len().clamp(1, 10) + 1)
                .x_label_formatter(&|x| {
                    if x.fract() == 0.0 {
                        format!("{x:.0}")
                    } else {
                        String::new()
                    }
                })
                .y_label_formatter(&|y| format!("{y:.3}"))
                .draw()
                .map_err(e)?;
            let mut legend = Vec::new();
            for (label, get, color) in [("train", train, TRAIN), ("validation", val, VALIDATION)] {
                let points: Vec<(f64, f64)> = epochs
                    .iter()
                    .filter_map(|l| get(l).map(|v| (l.epoch as f64, v)))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(e)?;
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, color.filled())),
                    )
                    .map_err(e)?;
                legend.push((label.to_string(), color));
            }
            draw_legend(&legend_row, &legend)?;
        }
        Ok(())
    }
}

/// Heat map of a confusion matrix. Each cell is shaded by its share of its row (the recall of
/// the true class), with a colour bar; it shows the count, or with
/// [`ConfusionHeatmap::normalized`] the share itself, so rows sum to 1 as with scikit-learn's
/// `normalize="true"`.
pub struct ConfusionHeatmap<'a> {
    pub matrix: &'a ConfusionMatrix,
    /// Print each row's shares instead of counts.
    pub normalized: bool,
}

impl<'a> ConfusionHeatmap<'a> {
    /// Counts, shaded by row share.
    pub fn new(matrix: &'a ConfusionMatrix) -> Self {
        ConfusionHeatmap {
            matrix,
            normalized: false,
        }
    }
    /// Shares of each true class (rows sum to 1) instead of counts.
    pub fn normalized(mut self, yes: bool) -> Self {
        self.normalized = yes;
        self
    }
}

/// matplotlib's "Blues", from its lightest to its darkest end, at `t` in [0, 1].
fn blues(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    RGBColor(mix(247, 8), mix(251, 48), mix(255, 107))
}

const CELL: i32 = 56;
const HEATMAP_LEFT: i32 = 130;
const HEATMAP_TOP: i32 = 50;

impl Figure for ConfusionHeatmap<'_> {
    fn size(&self) -> (u32, u32) {
        let side = CELL as u32 * (self.matrix.classes().len() as u32).max(2);
        (
            HEATMAP_LEFT as u32 + side + 130,
            HEATMAP_TOP as u32 + side + 60,
        )
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let cm = self.matrix;
        let k = cm.classes().len() as i32;
        let (left, top, cell) = (HEATMAP_LEFT, HEATMAP_TOP, CELL);
        let font = |size: f64| ("sans-serif", size).into_font();
        let title = if self.normalized {
            "Confusion matrix, normalised over each true class (rows sum to 1)"
        } else {
            "Confusion matrix (rows: true class, columns: predicted)"
        };
        root.draw(&Text::new(title, (10, 12), font(16.0)))
            .map_err(e)?;
        for r in 0..k {
            let row_total = cm.counts().row(r as usize).sum();
            for c in 0..k {
                let n = cm.counts()[[r as usize, c as usize]];
                let share = n as f64 / row_total.max(1) as f64;
                let (x, y) = (left + c * cell, top + r * cell);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    blues(share).filled(),
                ))
                .map_err(e)?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    BLACK.mix(0.2),
                ))
                .map_err(e)?;
                let color = if share > 0.5 { WHITE } else { BLACK };
                let text = match (self.normalized, row_total) {
                    (true, 0) => "–".to_string(),
                    (true, _) => format!("{share:.2}"),
                    (false, _) => n.to_string(),
                };
                let dx = (text.chars().count() as i32 * 7) / 2;
                root.draw(&Text::new(
                    text,
                    (x + cell / 2 - dx, y + cell / 2 - 7),
                    font(13.0).color(&color),
                ))
                .map_err(e)?;
            }
            let name: String = cm.classes()[r as usize].chars().take(16).collect();
            root.draw(&Text::new(
                name,
                (8, top + r * cell + cell / 2 - 7),
                font(12.0),
            ))
            .map_err(e)?;
        }
        for c in 0..k {
            let name: String = cm.classes()[c as usize].chars().take(8).collect();
            let dx = (name.chars().count() as i32 * 6) / 2;
            root.draw(&Text::new(
                name,
                (left + c * cell + cell / 2 - dx, top + k * cell + 6),
                font(11.0),
            ))
            .map_err(e)?;
        }
        root.draw(&Text::new(
            "predicted",
            (left + k * cell / 2 - 30, top + k * cell + 26),
            font(14.0),
        ))
        .map_err(e)?;
        root.draw(&Text::new("true", (8, top - 20), font(14.0)))
            .map_err(e)?;
        // The colour bar: share of the true class, 0 at the bottom, 1 at the top.
        let (bar_x, bar_w, bar_h) = (left + k * cell + 24, 18, k * cell);
        for y in 0..bar_h {
            let t = 1.0 - y as f64 / (bar_h - 1).max(1) as f64;
            root.draw(&Rectangle::new(
                [(bar_x, top + y), (bar_x + bar_w, top + y + 1)],
                blues(t).filled(),
            ))
            .map_err(e)?;
        }
        root.draw(&Rectangle::new(
            [(bar_x, top), (bar_x + bar_w, top + bar_h)],
            BLACK.mix(0.5),
        ))
        .map_err(e)?;
        for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = top + ((1.0 - tick) * (bar_h - 1) as f64).round() as i32;
            root.draw(&PathElement::new(
                vec![(bar_x + bar_w, y), (bar_x + bar_w + 4, y)],
                BLACK,
            ))
            .map_err(e)?;
            root.draw(&Text::new(
                format!("{tick:.2}"),
                (bar_x + bar_w + 7, y - 6),
                font(11.0),
            ))
            .map_err(e)?;
        }
        root.draw(&Text::new(
            "share of the true class",
            (bar_x - 40, top + bar_h + 26),
            font(11.0),
        ))
        .map_err(e)?;
        Ok(())
    }
}

/// A grid of images with their true class and, when given, the predicted one (red if wrong).
pub struct SampleGrid<'a> {
    pub data: &'a Dataset,
    pub indices: Vec<usize>,
    pub predicted: Option<&'a [u32]>,
    /// Images per row.
    pub columns: usize,
    /// A caption per shown image, in place of `true: <class>`.
    pub captions: Option<Vec<String>>,
}

impl<'a> SampleGrid<'a> {
    /// `n` images spread evenly over `data` (so a class-sorted folder shows every class);
    /// `predicted[i]` is the prediction for image `i`. Set `indices` to choose others.
    pub fn new(data: &'a Dataset, n: usize, predicted: Option<&'a [u32]>) -> Self {
        let n = n.min(data.len());
        SampleGrid {
            data,
            indices: (0..n).map(|k| k * data.len() / n).collect(),
            predicted,
            columns: near_square_columns(n),
            captions: None,
        }
    }
    /// A caption under each shown image, in order, instead of its true class.
    pub fn captions(mut self, captions: Vec<String>) -> Self {
        self.captions = Some(captions);
        self
    }
    /// Images per row (by default the most square layout, [`near_square_columns`]).
    pub fn columns(mut self, columns: usize) -> Self {
        self.columns = columns.max(1);
        self
    }
    fn scale(&self) -> u32 {
        (96 / self.data.shape.width.max(1) as u32).max(1)
    }
    fn tile(&self) -> (u32, u32) {
        let s = self.scale();
        (
            (self.data.shape.width as u32 * s).max(110) + 10,
            self.data.shape.height as u32 * s + 44,
        )
    }
}

/// Columns for `n` tiles: from ⌈√n⌉ up to two more, the fewest empty slots on the last row
/// (25 → 5×5, 32 → 8×4, 16 → 4×4, 10 → 5×2).
pub fn near_square_columns(n: usize) -> usize {
    let root = (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1);
    (root..=root + 2)
        .min_by_key(|c| n.div_ceil(*c) * c - n)
        .unwrap_or(root)
}

impl Figure for SampleGrid<'_> {
    fn size(&self) -> (u32, u32) {
        let (tw, th) = self.tile();
        let cols = self.columns.min(self.indices.len()).max(1) as u32;
        let rows = self.indices.len().div_ceil(self.columns.max(1)).max(1) as u32;
        (cols * tw, rows * th)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let (tw, th) = self.tile();
        let s = self.scale() as i32;
        let shape = self.data.shape;
        for (k, &i) in self.indices.iter().enumerate() {
            let x0 = (k % self.columns) as i32 * tw as i32 + 5;
            let y0 = (k / self.columns) as i32 * th as i32 + 4;
            let pixels = self.data.image(i);
            for y in 0..shape.height {
                for x in 0..shape.width {
                    let p = &pixels[(y * shape.width + x) * shape.channels..];
                    let color = if shape.channels >= 3 {
                        RGBColor(p[0], p[1], p[2])
                    } else {
                        RGBColor(p[0], p[0], p[0])
                    };
                    let (px, py) = (x0 + x as i32 * s, y0 + y as i32 * s);
                    root.draw(&Rectangle::new(
                        [(px, py), (px + s, py + s)],
                        color.filled(),
                    ))
                    .map_err(e)?;
                }
            }
            let truth = &self.data.classes[self.data.labels[i] as usize];
            let ty = y0 + shape.height as i32 * s + 2;
            let font = ("sans-serif", 12.0).into_font();
            let caption = match self.captions.as_ref().and_then(|c| c.get(k)) {
                Some(caption) => caption.clone(),
                None => format!("true: {truth}"),
            };
            root.draw(&Text::new(caption, (x0, ty), font.clone()))
                .map_err(e)?;
            if let Some(pred) = self.predicted {
                let p = pred[i];
                let color = if p == self.data.labels[i] {
                    RGBColor(0, 120, 0)
                } else {
                    RED
                };
                let name = self
                    .data
                    .classes
                    .get(p as usize)
                    .map(String::as_str)
                    .unwrap_or("?");
                root.draw(&Text::new(
                    format!("pred: {name}"),
                    (x0, ty + 15),
                    font.color(&color),
                ))
                .map_err(e)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_png_and_svg() {
        let history = History::for_tests(3);
        let dir = tempfile::tempdir().unwrap();
        TrainingCurves(&history)
            .save(&dir.path().join("h.png"))
            .unwrap();
        TrainingCurves(&history)
            .save(&dir.path().join("h.svg"))
            .unwrap();
        let png = std::fs::read(dir.path().join("h.png")).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (1000, 420));
        assert!(std::fs::read_to_string(dir.path().join("h.svg"))
            .unwrap()
            .contains("model loss"));
        let cm =
            ConfusionMatrix::new(&[0, 1, 1], &[0, 1, 0], vec!["a".into(), "b".into()]).unwrap();
        ConfusionHeatmap::new(&cm)
            .save(&dir.path().join("cm.png"))
            .unwrap();
        ConfusionHeatmap::new(&cm)
            .normalized(true)
            .save(&dir.path().join("cm-normalized.png"))
            .unwrap();
        for (n, columns) in [(25, 5), (32, 8), (16, 4), (10, 5), (1, 1), (7, 4)] {
            assert_eq!(near_square_columns(n), columns, "{n} tiles");
        }
        let ds = crate::data::synthetic(5, crate::data::ImageShape::new(8, 8, 3), 2, 0).unwrap();
        SampleGrid::new(&ds, 5, Some(&[0, 1, 0, 1, 0]))
            .save(&dir.path().join("s.svg"))
            .unwrap();
        let err = TrainingCurves(&history)
            .save(&dir.path().join("h.gif"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a .png or .svg"), "{err}");
    }
}
