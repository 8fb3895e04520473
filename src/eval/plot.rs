//! Accuracy against mean completion tokens, one point per setting (with its
//! 95% interval), the Pareto front drawn through the settings that no other
//! beats on both counts. Written as PNG and SVG.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::report::SettingSummary;

/// Indices of the settings on the Pareto front, by increasing tokens: those for
/// which no other setting is at least as accurate with at most as many tokens
/// and strictly better on one of the two.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let dominated = |i: usize| {
        let (ti, ai) = points[i];
        points
            .iter()
            .any(|&(t, a)| t <= ti && a >= ai && (t < ti || a > ai))
    };
    let mut front: Vec<usize> = (0..points.len()).filter(|&i| !dominated(i)).collect();
    front.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(points[a].1.total_cmp(&points[b].1)));
    front
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 600;

/// Text is drawn with DejaVu Sans embedded in the binary, so the plot needs no
/// system fonts and looks the same everywhere.
fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded face is a valid font; a failure here would show as missing text.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draw the plot into `png` and `svg`.
pub fn write_plots(summaries: &[SettingSummary], title: &str, png: &Path, svg: &Path) -> Result<()> {
    register_fonts();
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, summaries, title)?;
        root.present().map_err(|e| anyhow!("drawing the SVG plot: {e:?}"))?;
    }
    std::fs::write(svg, svg_text).with_context(|| format!("writing {}", svg.display()))?;

    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, summaries, title)?;
        root.present().map_err(|e| anyhow!("drawing the PNG plot: {e:?}"))?;
    }
    std::fs::write(png, encode_png(&pixels)?).with_context(|| format!("writing {}", png.display()))
}

fn encode_png(rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("encoding the PNG")?;
    writer.write_image_data(rgb).context("encoding the PNG")?;
    writer.finish().context("encoding the PNG")?;
    Ok(out)
}

/// The y range in percent: whole tens around the intervals.
fn accuracy_range(summaries: &[SettingSummary]) -> (f64, f64) {
    let lo = summaries.iter().map(|s| s.accuracy_low).fold(1.0, f64::min);
    let hi = summaries.iter().map(|s| s.accuracy_high).fold(0.0, f64::max);
    let lo = ((lo * 10.0).floor() * 10.0).clamp(0.0, 90.0);
    let hi = ((hi * 10.0).ceil() * 10.0).clamp(lo + 10.0, 100.0);
    (lo, hi)
}

/// One label per distinct point: settings that land on the same spot share it.
fn labels(summaries: &[SettingSummary]) -> Vec<((f64, f64), String)> {
    let mut out: Vec<((f64, f64), String)> = Vec::new();
    for s in summaries {
        let at = (s.mean_tokens, 100.0 * s.accuracy);
        match out.iter_mut().find(|(p, _)| *p == at) {
            Some((_, text)) => {
                text.push_str(", ");
                text.push_str(&s.setting);
            }
            None => out.push((at, s.setting.clone())),
        }
    }
    out
}

/// Approximate width of a 14 px label in pixels (DejaVu Sans averages ~0.55 em).
fn label_width(text: &str) -> i32 {
    (text.chars().count() as f64 * 7.7).ceil() as i32 + 8
}

/// Stack labels that would overlap: each label (anchored at its point's x
/// pixel, extending right) goes to the lowest row where it clears the labels
/// already placed, by increasing x.
fn label_rows(x_pixels: &[i32], texts: &[&str]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x_pixels.len()).collect();
    order.sort_by_key(|&i| x_pixels[i]);
    let mut row_ends: Vec<i32> = Vec::new();
    let mut rows = vec![0; x_pixels.len()];
    for i in order {
        let left = x_pixels[i];
        let row = row_ends.iter().position(|&end| end <= left).unwrap_or(row_ends.len());
        if row == row_ends.len() {
            row_ends.push(0);
        }
        row_ends[row] = left + label_width(texts[i]);
        rows[i] = row;
    }
    rows
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, summaries: &[SettingSummary], title: &str) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let max_tokens = summaries.iter().map(|s| s.mean_tokens).fold(1.0, f64::max);
    let (y_lo, y_hi) = accuracy_range(summaries);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_tokens * 1.2, y_lo..y_hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("mean completion tokens")
        .y_desc("accuracy (%)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;

    let point = |s: &SettingSummary| (s.mean_tokens, 100.0 * s.accuracy);
    let grey = BLACK.mix(0.35);
    for s in summaries {
        let x = s.mean_tokens;
        chart
            .draw_series(LineSeries::new([(x, 100.0 * s.accuracy_low), (x, 100.0 * s.accuracy_high)], grey))
            .map_err(err)?;
    }
    let points: Vec<(f64, f64)> = summaries.iter().map(point).collect();
    let front = pareto_front(&points);
    chart
        .draw_series(LineSeries::new(front.iter().map(|&i| points[i]), RED.stroke_width(2)))
        .map_err(err)?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 5, BLUE.filled())))
        .map_err(err)?
        .label("setting (bar: 95% interval)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
    let labels = labels(summaries);
    let pixels: Vec<i32> = labels.iter().map(|(at, _)| chart.backend_coord(at).0).collect();
    let rows = label_rows(&pixels, &labels.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>());
    chart
        .draw_series(labels.into_iter().zip(rows).map(|((at, text), row)| {
            let lift = -16 - 16 * row as i32;
            EmptyElement::at(at) + Text::new(text, (8, lift), ("sans-serif", 14).into_font())
        }))
        .map_err(err)?;
    chart
        .configure_series_labels()
        // Upper left: where a point would beat every other, so usually empty.
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_the_undominated() {
        // (tokens, accuracy)
        let points = [(300.0, 0.60), (150.0, 0.58), (200.0, 0.50), (100.0, 0.40), (400.0, 0.60), (150.0, 0.58)];
        // 2 is beaten by 1; 4 ties 0 on accuracy with more tokens; 5 equals 1 (both kept).
        assert_eq!(pareto_front(&points), vec![3, 1, 5, 0]);
        assert_eq!(pareto_front(&[]), Vec::<usize>::new());
        assert_eq!(pareto_front(&[(10.0, 0.0)]), vec![0]);
    }

    #[test]
    fn close_labels_stack() {
        // Far apart: one row. Close: the second goes up a row, the third (clear
        // of the first) comes back down.
        assert_eq!(label_rows(&[0, 500], &["a", "b"]), vec![0, 0]);
        assert_eq!(label_rows(&[100, 110, 300], &["baseline", "ts=4", "budget"]), vec![0, 1, 0]);
        assert_eq!(label_rows(&[110, 100], &["x", "y"]), vec![1, 0]);
    }
}
