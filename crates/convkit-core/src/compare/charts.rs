//! The comparison's PNG charts: throughput and accuracy bars, and the loss curves.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Comparison, EngineRun};
use crate::plot::Figure;

impl Comparison {
    /// Training images per second, a bar per engine.
    pub fn throughput_chart(&self) -> impl Figure + '_ {
        Bars {
            title: "training throughput (images/s)",
            decimals: 0,
            top: None,
            bars: self
                .succeeded()
                .iter()
                .map(|r| (r.backend.clone(), r.train_images_per_second()))
                .collect(),
        }
    }

    /// Final test accuracy, a bar per engine.
    pub fn accuracy_chart(&self) -> impl Figure + '_ {
        Bars {
            title: "final test accuracy",
            decimals: 2,
            top: Some(1.0),
            bars: self
                .succeeded()
                .iter()
                .map(|r| (r.backend.clone(), r.test_accuracy))
                .collect(),
        }
    }

    /// Every engine's smoothed training loss on one plot.
    pub fn loss_chart(&self) -> impl Figure + '_ {
        LossCurves(self.succeeded())
    }
}

type DrawResult = std::result::Result<(), String>;

fn e<T: std::fmt::Display>(err: T) -> String {
    err.to_string()
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A bar per engine.
struct Bars {
    title: &'static str,
    bars: Vec<(String, f64)>,
    /// Decimals of the value axis' labels (0 for images/s, 2 for an accuracy).
    decimals: usize,
    /// A fixed top of the value axis (1 for an accuracy); otherwise 15% above the tallest bar.
    top: Option<f64>,
}

impl Figure for Bars {
    fn size(&self) -> (u32, u32) {
        (200 + 120 * self.bars.len().max(1) as u32, 400)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let tallest = self.bars.iter().map(|b| b.1).fold(0.0, f64::max);
        let top = self.top.unwrap_or((tallest * 1.15).max(1e-9));
        // One slot per bar: centred on 0, 1, … n−1, half a slot of room on either side.
        let n = self.bars.len().max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(e)?;
        let decimals = self.decimals;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| format!("{v:.decimals$}"))
            .draw()
            .map_err(e)?;
        let font = ("sans-serif", 14.0).into_font();
        for (i, (name, value)) in self.bars.iter().enumerate() {
            let x = i as f64;
            chart
                .draw_series([Rectangle::new(
                    [(x - 0.35, 0.0), (x + 0.35, *value)],
                    PALETTE[i % PALETTE.len()].filled(),
                )])
                .map_err(e)?;
            // The engine's name under its bar, the value above it.
            let (px, py) = chart.backend_coord(&(x, 0.0));
            let width = 7 * name.chars().count() as i32;
            root.draw(&Text::new(
                name.clone(),
                (px - width / 2, py + 8),
                font.clone(),
            ))
            .map_err(e)?;
            // Values two decimals finer than the axis where they are fractions (accuracy).
            let label = match decimals {
                0 => format!("{value:.0}"),
                d => format!("{value:.prec$}", prec = d + 2),
            };
            let (vx, vy) = chart.backend_coord(&(x, *value));
            let width = 7 * label.chars().count() as i32;
            root.draw(&Text::new(label, (vx - width / 2, vy - 18), font.clone()))
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Every engine's smoothed training loss on one plot.
struct LossCurves<'a>(Vec<&'a EngineRun>);

impl Figure for LossCurves<'_> {
    fn size(&self) -> (u32, u32) {
        (900, 450)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let len = self
            .0
            .iter()
            .map(|r| r.loss_trace.len())
            .max()
            .unwrap_or(1)
            .max(2);
        let max = self
            .0
            .iter()
            .flat_map(|r| r.loss_trace.iter().cloned())
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.05;
        let every = self
            .0
            .first()
            .map(|r| r.loss_trace_every)
            .unwrap_or(1)
            .max(1);
        let (chart_area, legend_row) = crate::plot::with_legend_row(root);
        let mut chart = ChartBuilder::on(&chart_area)
            .caption(
                format!("training loss (mean of every {every} batches)"),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..(len * every) as f64, 0f64..max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("batch")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()
            .map_err(e)?;
        let mut legend = Vec::new();
        for (i, r) in self.0.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    r.loss_trace
                        .iter()
                        .enumerate()
                        .map(|(k, v)| (((k + 1) * every) as f64, *v)),
                    color.stroke_width(2),
                ))
                .map_err(e)?;
            // A short run has too few points for a line to show: mark each one.
            if r.loss_trace.len() <= 30 {
                chart
                    .draw_series(r.loss_trace.iter().enumerate().map(|(k, v)| {
                        Circle::new((((k + 1) * every) as f64, *v), 4, color.filled())
                    }))
                    .map_err(e)?;
            }
            legend.push((r.backend.clone(), color));
        }
        crate::plot::draw_legend(&legend_row, &legend)?;
        Ok(())
    }
}
