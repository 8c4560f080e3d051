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

/// Loss and accuracy per epoch, train and validation, side by side.
pub struct TrainingCurves<'a>(pub &'a History);

impl Figure for TrainingCurves<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 400)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let (left, right) = root.split_horizontally(500);
        let epochs = &self.0.epochs;
        type Get = fn(&crate::train::EpochLog) -> Option<f64>;
        let panels: [(&DrawingArea<DB, Shift>, &str, Get, Get); 2] = [
            (&left, "loss", |l| Some(l.loss), |l| l.val_loss),
            (&right, "accuracy", |l| Some(l.accuracy), |l| l.val_accuracy),
        ];
        for (area, name, train, val) in panels {
            let values: Vec<f64> = epochs
                .iter()
                .flat_map(|l| [train(l), val(l)])
                .flatten()
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
            let mut chart = ChartBuilder::on(area)
                .caption(format!("model {name}"), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(
                    0.5f64..(epochs.len().max(1) as f64 + 0.5),
                    (lo - pad)..(hi + pad),
                )
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
                .draw()
                .map_err(e)?;
            for (label, get, color) in [("train", train, BLUE), ("validation", val, RED)] {
                let points: Vec<(f64, f64)> = epochs
                    .iter()
                    .filter_map(|l| get(l).map(|v| (l.epoch as f64, v)))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(e)?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, color.filled())),
                    )
                    .map_err(e)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Heat map of a confusion matrix; each row shaded by its share (recall), counts printed.
pub struct ConfusionHeatmap<'a>(pub &'a ConfusionMatrix);

impl Figure for ConfusionHeatmap<'_> {
    fn size(&self) -> (u32, u32) {
        let k = self.0.classes().len() as u32;
        let side = 56 * k.max(2);
        (side + 160, side + 100)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let cm = self.0;
        let k = cm.classes().len() as i32;
        let (left, top, cell) = (130i32, 50i32, 56i32);
        let font = |size: f64| ("sans-serif", size).into_font();
        root.draw(&Text::new(
            "Confusion matrix (rows: true, columns: predicted)",
            (10, 12),
            font(16.0),
        ))
        .map_err(e)?;
        for r in 0..k {
            let row_total = cm.counts().row(r as usize).sum().max(1) as f64;
            for c in 0..k {
                let n = cm.counts()[[r as usize, c as usize]];
                let share = n as f64 / row_total;
                let shade = (255.0 * (1.0 - 0.85 * share)) as u8;
                let fill = RGBColor(shade, shade, 255);
                let (x, y) = (left + c * cell, top + r * cell);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))
                .map_err(e)?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    BLACK.mix(0.2),
                ))
                .map_err(e)?;
                let color = if share > 0.6 { WHITE } else { BLACK };
                let text = n.to_string();
                let dx = (text.len() as i32 * 7) / 2;
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
            columns: 8,
        }
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
            root.draw(&Text::new(format!("true: {truth}"), (x0, ty), font.clone()))
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
        assert_eq!((img.width(), img.height()), (1000, 400));
        assert!(std::fs::read_to_string(dir.path().join("h.svg"))
            .unwrap()
            .contains("model loss"));
        let cm =
            ConfusionMatrix::new(&[0, 1, 1], &[0, 1, 0], vec!["a".into(), "b".into()]).unwrap();
        ConfusionHeatmap(&cm)
            .save(&dir.path().join("cm.png"))
            .unwrap();
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
