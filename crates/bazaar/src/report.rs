//! `bazaar load --report FILE.html`: one self-contained page (inline SVG
//! and CSS, no script, nothing fetched) with the run's throughput and
//! latency over time, the latency histogram and the outcomes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::load::Report;

const W: f64 = 720.0;
const H: f64 = 240.0;
const PAD: f64 = 48.0;

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round upper bound for an axis.
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let step = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * step)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * step)
}

/// One line of a chart: its name, colour and points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart of `series`.
fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let x_max = nice(
        series
            .iter()
            .flat_map(|s| &s.2)
            .map(|p| p.0)
            .fold(0.0, f64::max),
    );
    let y_max = nice(
        series
            .iter()
            .flat_map(|s| &s.2)
            .map(|p| p.1)
            .fold(0.0, f64::max),
    );
    let x = |v: f64| PAD + v / x_max * (W - 2.0 * PAD);
    let y = |v: f64| H - PAD + -v / y_max * (H - 2.0 * PAD);
    let mut svg = axes(title, x_label, y_label, x_max, y_max);
    for (i, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/><text x="{:.0}" y="{:.0}" fill="{colour}" font-size="12">{}</text>"#,
            path.join(" "),
            W - PAD - 150.0,
            PAD + 14.0 * i as f64,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A bar chart of `bars` (label, value).
fn bars(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let y_max = nice(bars.iter().map(|b| b.1).fold(0.0, f64::max));
    let mut svg = axes(title, "", y_label, 0.0, y_max);
    let slot = (W - 2.0 * PAD) / bars.len().max(1) as f64;
    for (i, (label, value)) in bars.iter().enumerate() {
        let h = value / y_max * (H - 2.0 * PAD);
        let left = PAD + slot * i as f64;
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#4477aa"><title>{}: {value}</title></rect><text x="{:.1}" y="{:.0}" font-size="10" text-anchor="middle">{}</text>"##,
            left + slot * 0.1,
            H - PAD - h,
            slot * 0.8,
            esc(label),
            left + slot / 2.0,
            H - PAD + 14.0,
            esc(label)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// An SVG's frame: title, axes, and the y (and x) maxima.
fn axes(title: &str, x_label: &str, y_label: &str, x_max: f64, y_max: f64) -> String {
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img"><title>{t}</title><rect width="{W}" height="{H}" fill="#fafafa"/><text x="{PAD}" y="16" font-size="14" font-weight="bold">{t}</text>"##,
        t = esc(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="#888"/><text x="4" y="{PAD}" font-size="11">{y_max}</text><text x="4" y="{b}" font-size="11">0</text><text x="4" y="{m}" font-size="11">{}</text>"##,
        esc(y_label),
        b = H - PAD,
        r = W - PAD,
        m = H / 2.0,
    );
    if x_max > 0.0 {
        let _ = write!(
            svg,
            r#"<text x="{r}" y="{y}" font-size="11" text-anchor="end">{x_max} {}</text>"#,
            esc(x_label),
            r = W - PAD,
            y = H - PAD + 16.0,
        );
    }
    svg
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return 0.0;
    }
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// The report page.
pub fn html(report: &Report) -> String {
    // Per second of the run: orders placed, orders that reached their
    // outcome, and the checkout latency's p50 and p99.
    let mut placed: BTreeMap<u64, f64> = BTreeMap::new();
    let mut finished: BTreeMap<u64, f64> = BTreeMap::new();
    let mut latency: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut to_outcome: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for s in &report.samples {
        let sec = s.at_s.max(0.0) as u64;
        *placed.entry(sec).or_default() += 1.0;
        latency.entry(sec).or_default().push(s.checkout_ms);
        if let Some(ms) = s.outcome_ms {
            *finished
                .entry((s.at_s + ms / 1000.0).max(0.0) as u64)
                .or_default() += 1.0;
            to_outcome.entry(sec).or_default().push(ms);
        }
    }
    let per_sec = |m: &BTreeMap<u64, f64>| m.iter().map(|(k, v)| (*k as f64, *v)).collect();
    let q = |m: &mut BTreeMap<u64, Vec<f64>>, p: f64| -> Vec<(f64, f64)> {
        m.iter_mut()
            .map(|(k, v)| (*k as f64, quantile(v, p)))
            .collect()
    };
    let throughput = lines(
        "Throughput",
        "s",
        "orders/s",
        &[
            ("placed", "#4477aa", per_sec(&placed)),
            ("reached an outcome", "#228833", per_sec(&finished)),
        ],
    );
    let over_time = lines(
        "Latency over time",
        "s",
        "ms",
        &[
            ("checkout p50", "#4477aa", q(&mut latency, 0.5)),
            ("checkout p99", "#66ccee", q(&mut latency, 0.99)),
            ("to outcome p50", "#228833", q(&mut to_outcome, 0.5)),
            ("to outcome p99", "#ccbb44", q(&mut to_outcome, 0.99)),
        ],
    );
    // Time to the outcome, in power-of-two millisecond buckets.
    let mut buckets: BTreeMap<u32, f64> = BTreeMap::new();
    for ms in report.samples.iter().filter_map(|s| s.outcome_ms) {
        let b = (ms.max(1.0).log2().ceil() as u32).min(20);
        *buckets.entry(b).or_default() += 1.0;
    }
    let histogram = bars(
        "Time to the outcome (orders per bucket)",
        "orders",
        &buckets
            .iter()
            .map(|(b, n)| (format!("≤{} ms", 1u64 << b), *n))
            .collect::<Vec<_>>(),
    );
    let mut outcomes: BTreeMap<&str, f64> = BTreeMap::new();
    for s in &report.samples {
        *outcomes.entry(s.outcome.as_str()).or_default() += 1.0;
    }
    let outcomes = bars(
        "Outcomes",
        "orders",
        &outcomes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<Vec<_>>(),
    );
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bazaar load report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}svg{{display:block;margin:1.5em 0;background:#fafafa}}code{{background:#eee;padding:2px 4px}}</style>
</head><body>
<h1>bazaar load</h1>
<p><code>{summary}</code></p>
{throughput}
{over_time}
{histogram}
{outcomes}
</body></html>
"#,
        summary = esc(&report.summary()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Sample;

    #[test]
    fn the_report_is_one_page_with_four_charts_and_nothing_fetched() {
        let mut report = Report::default();
        for i in 0..500 {
            report.samples.push(Sample {
                at_s: f64::from(i) / 100.0,
                checkout_ms: 5.0 + f64::from(i % 7),
                outcome: if i % 10 == 0 {
                    "CANCELLED: <payment_declined>".into()
                } else {
                    "CONFIRMED".into()
                },
                outcome_ms: Some(20.0 + f64::from(i % 50)),
            });
        }
        report.placed = 500;
        let page = html(&report);
        assert!(page.starts_with("<!doctype html>"));
        assert_eq!(page.matches("<svg ").count(), 4, "{page}");
        assert!(page.contains("<polyline"));
        assert!(page.contains("<rect"));
        // Self-contained: no script, no link, no source fetched.
        for fetch in ["<script", "<link", " src=", " href="] {
            assert!(!page.contains(fetch), "{fetch}");
        }
        // Labels are escaped.
        assert!(page.contains("CANCELLED: &lt;payment_declined&gt;"));
        assert!(!page.contains("<payment_declined>"));
    }
}
