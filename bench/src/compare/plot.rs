//! SVG plots of a figure against the number of Services, one line per arm, the median with
//! its min-max range as an error bar. plotters' SVG backend with its built-in font metrics
//! (no `ttf` feature), so no system font is needed: the text is SVG text.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One point: N, median, min, max.
pub type Point = (u32, f64, f64, f64);

pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn nice_bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (if log { 0.1 } else { 0.0 }, 1.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        (0.0, hi * 1.15)
    }
}

/// Draws `series` against N (log scale) into `path`; `log_y` for figures spanning decades.
pub fn draw(path: &Path, title: &str, y_label: &str, series: &[Series], log_y: bool) -> Result<()> {
    let e = |err: Box<dyn std::error::Error>| anyhow!("plotting {}: {err}", path.display());
    let max_n = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .max()
        .unwrap_or(10);
    let x_range = 0.5f64..(f64::from(max_n) * 2.0);
    let (y_lo, y_hi) = nice_bounds(
        series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|p| [p.1, p.2, p.3])),
        log_y,
    );
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(Box::new(x)))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(72);
    let x_fmt = |v: &f64| {
        let n = v.round();
        if n >= 1000.0 {
            format!("{}k", n / 1000.0)
        } else {
            format!("{n}")
        }
    };

    // 20000 rather than 20000.0; 0.125 rather than 0.12500000001.
    let y_fmt = |v: &f64| {
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            let s = format!("{v:.4}");
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        }
    };

    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("Services (N)")
                .y_desc(y_label)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .draw()
                .map_err(|x| e(Box::new(x)))?;
            for (i, s) in series.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                let points: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .filter(|p| p.1.is_finite())
                    .map(|p| (f64::from(p.0), p.1))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                    .map_err(|x| e(Box::new(x)))?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                    .map_err(|x| e(Box::new(x)))?;
                chart
                    .draw_series(
                        s.points.iter().filter(|p| p.2.is_finite()).map(|p| {
                            ErrorBar::new_vertical(f64::from(p.0), p.2, p.1, p.3, colour, 8)
                        }),
                    )
                    .map_err(|x| e(Box::new(x)))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|x| e(Box::new(x)))?;
        }};
    }

    if log_y {
        body!(
            builder
                .build_cartesian_2d(x_range.log_scale(), (y_lo..y_hi).log_scale())
                .map_err(|x| e(Box::new(x)))?
        );
    } else {
        body!(
            builder
                .build_cartesian_2d(x_range.log_scale(), y_lo..y_hi)
                .map_err(|x| e(Box::new(x)))?
        );
    }
    root.present().map_err(|x| e(Box::new(x)))?;
    Ok(())
}
