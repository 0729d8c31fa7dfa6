//! PNG plots with `plotters` (pure-Rust text through an embedded DejaVu Sans
//! font): a run's loss and dev-metric curves, a sweep's dev metric per
//! epoch, and the bias-term ranking as heat-maps and bar charts.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::method::rank::Ranking;

static FONT: Once = Once::new();

fn init_font() {
    FONT.call_once(|| {
        // The bytes are a valid TrueType font shipped by the `dejavu` crate.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, format!("cannot draw the plot: {e}"))
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A line chart of named series of (x, y) points.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    init_font();
    let pts: Vec<&(f64, f64)> = series
        .iter()
        .flat_map(|(_, v)| v.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        return Err(Error::file(path, "nothing to plot"));
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| perr(path, e))?;
    // Whole-number x (epochs): one tick per value, no fractions.
    let whole = series
        .iter()
        .flat_map(|(_, v)| v.iter())
        .all(|(x, _)| !x.is_finite() || x.fract() == 0.0)
        && x1 - x0 <= 20.0;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14));
    if whole {
        mesh.x_labels((x1 - x0) as usize + 1)
            .x_label_formatter(&|x: &f64| format!("{:.0}", x));
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    for (i, (name, v)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), c.stroke_width(2)))
            .map_err(|e| perr(path, e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if v.len() <= 30 {
            chart
                .draw_series(v.iter().map(|p| Circle::new(*p, 3, c.filled())))
                .map_err(|e| perr(path, e))?;
        }
    }
    if series.len() > 1 || !series[0].0.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))
}

/// A bar chart.
pub fn bar_chart(path: &Path, title: &str, labels: &[String], values: &[f64]) -> Result<()> {
    init_font();
    let ymax = values.iter().cloned().fold(0.0f64, f64::max).max(1e-12) * 1.1;
    let ymin = values.iter().cloned().fold(0.0f64, f64::min) * 1.1;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let n = labels.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, ymin..ymax)
        .map_err(|e| perr(path, e))?;
    let labels_owned: Vec<String> = labels.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(1))
        .x_label_formatter(&move |x: &f64| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                labels_owned.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| perr(path, e))?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *v)],
                COLORS[i % COLORS.len()].filled(),
            )
        }))
        .map_err(|e| perr(path, e))?;
    root.present().map_err(|e| perr(path, e))
}

/// A horizontal bar chart of percentages (one bar per label, coloured by
/// `group[i]`, with a reference line at 100 %): `beft bench`'s achieved
/// share of each op's ceiling.
pub fn percent_bars(
    path: &Path,
    title: &str,
    labels: &[String],
    values: &[f64],
    group: &[usize],
    legend: &[&str],
) -> Result<()> {
    init_font();
    let n = labels.len().max(1);
    let xmax = values.iter().cloned().fold(100.0f64, f64::max) * 1.08;
    let height = (60 + 20 * n + 60) as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(430)
        .build_cartesian_2d(0f64..xmax, 0f64..n as f64)
        .map_err(|e| perr(path, e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("% of the measured ceiling")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| perr(path, e))?;
    for (gi, name) in legend.iter().enumerate() {
        let color = COLORS[gi % COLORS.len()];
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| group[*i] == gi)
                    .map(|(i, v)| {
                        let y = (n - 1 - i) as f64;
                        Rectangle::new([(0.0, y + 0.15), (*v, y + 0.85)], color.filled())
                    }),
            )
            .map_err(|e| perr(path, e))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(100.0, 0.0), (100.0, n as f64)],
            BLACK.stroke_width(1),
        )))
        .map_err(|e| perr(path, e))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| perr(path, e))?;
    // Row labels, right-aligned against the axis (row i from the top).
    let style =
        TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for (i, label) in labels.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, (n - 1 - i) as f64 + 0.5));
        root.draw(&Text::new(label.clone(), (x - 6, y), style.clone()))
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))
}

/// A heat-map of `values[row][col]` (rows labelled, columns = layers).
pub fn heatmap(path: &Path, title: &str, rows: &[String], values: &[Vec<f64>]) -> Result<()> {
    init_font();
    let cols = values.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let (lo, hi) = values
        .iter()
        .flatten()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let root = BitMapBackend::new(path, (900, 120 + 48 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let nrows = rows.len();
    let rows_owned: Vec<String> = rows.to_vec();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}  (min {lo:.3e}, max {hi:.3e})"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(80)
        // Cells centred on whole numbers, so that the ticks (whole
        // numbers) name them.
        .build_cartesian_2d(-0.5f64..cols as f64 - 0.5, -0.5f64..nrows as f64 - 0.5)
        .map_err(|e| perr(path, e))?;
    let whole = |v: f64| (v - v.round()).abs() < 1e-6 && v >= -1e-6;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("layer")
        .x_labels(cols)
        .x_label_formatter(&move |x: &f64| {
            if whole(*x) {
                format!("{}", x.round() as usize)
            } else {
                String::new()
            }
        })
        .y_labels(nrows)
        .y_label_formatter(&move |y: &f64| {
            if !whole(*y) {
                return String::new();
            }
            let i = y.round() as usize;
            rows_owned
                .get(nrows.saturating_sub(i + 1))
                .cloned()
                .unwrap_or_default()
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| perr(path, e))?;
    chart
        .draw_series(values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, v)| {
                let t = ((v - lo) / span).clamp(0.0, 1.0);
                // White → dark blue.
                let col = RGBColor(
                    (255.0 * (1.0 - 0.85 * t)) as u8,
                    (255.0 * (1.0 - 0.7 * t)) as u8,
                    (255.0 * (1.0 - 0.3 * t)) as u8,
                );
                let (x, y) = (c as f64, (nrows - 1 - r) as f64);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], col.filled())
            })
        }))
        .map_err(|e| perr(path, e))?;
    root.present().map_err(|e| perr(path, e))
}

/// Heat-maps (terms × layers) of each score and a bar chart of the
/// layer-averaged scores, into `out`.
pub fn ranking_plots(r: &Ranking, out: &Path) -> Result<Vec<PathBuf>> {
    let names: Vec<String> = r.terms.keys().cloned().collect();
    let mut written = Vec::new();
    for (score, get, mean) in [
        (
            "beft_score",
            (|t: &crate::method::rank::TermScores| t.beft_score.clone())
                as fn(&crate::method::rank::TermScores) -> Vec<f64>,
            (|t: &crate::method::rank::TermScores| t.beft_score_mean)
                as fn(&crate::method::rank::TermScores) -> f64,
        ),
        ("magnitude", |t| t.magnitude.clone(), |t| t.magnitude_mean),
        ("fisher", |t| t.fisher.clone(), |t| t.fisher_mean),
    ] {
        let rows: Vec<Vec<f64>> = r.terms.values().map(get).collect();
        let p = out.join(format!("heatmap_{score}.png"));
        heatmap(
            &p,
            &format!("{score}: {} on {} (terms × layers)", r.model, r.task),
            &names,
            &rows,
        )?;
        written.push(p);
        let vals: Vec<f64> = r.terms.values().map(mean).collect();
        let p = out.join(format!("bars_{score}.png"));
        bar_chart(&p, &format!("{score}, mean over layers"), &names, &vals)?;
        written.push(p);
    }
    Ok(written)
}

/// `beft plot RUN_DIR`: loss per step and the dev metric per epoch, as
/// `loss.png` and `dev_metric.png` in the run directory; for a `beft rank`
/// directory (with `ranking.json`), its heat-maps and bar charts again.
pub fn plot_run(run: &Path) -> Result<Vec<PathBuf>> {
    let ranking = run.join("ranking.json");
    if ranking.is_file() {
        let s = std::fs::read_to_string(&ranking).map_err(|e| Error::io(&ranking, e))?;
        let r: crate::method::rank::Ranking =
            serde_json::from_str(&s).map_err(|e| Error::file(&ranking, e))?;
        return ranking_plots(&r, run);
    }
    let steps_path = run.join("steps.jsonl");
    let steps = read_jsonl(&steps_path)?;
    let loss: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|v| Some((v["step"].as_f64()?, v["loss"].as_f64()?)))
        .collect();
    // A running mean over 20 steps beside the raw loss.
    let w = 20usize;
    let smooth: Vec<(f64, f64)> = (0..loss.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let s: f64 = loss[lo..=i].iter().map(|p| p.1).sum();
            (loss[i].0, s / (i - lo + 1) as f64)
        })
        .collect();
    let mut out = Vec::new();
    let p = run.join("loss.png");
    line_chart(
        &p,
        "training loss",
        "step",
        "loss",
        &[("loss".into(), loss), (format!("mean of last {w}"), smooth)],
    )?;
    out.push(p);
    let metrics = read_jsonl(&run.join("metrics.jsonl"))?;
    let name = metrics
        .first()
        .and_then(|v| v["metric_name"].as_str())
        .unwrap_or("metric")
        .to_string();
    let dev: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|v| Some((v["epoch"].as_f64()?, v["metric"].as_f64()?)))
        .collect();
    let p = run.join("dev_metric.png");
    line_chart(
        &p,
        &format!("dev {name}"),
        "epoch",
        &name,
        &[(format!("dev {name}"), dev)],
    )?;
    out.push(p);
    Ok(out)
}

/// Read a JSON-lines file.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let s = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    s.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::line(path, i + 1, e)))
        .collect()
}
