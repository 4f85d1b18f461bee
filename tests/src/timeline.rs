//! The demo's timeline as an SVG a browser opens: three panels over a shared time axis (read
//! weights, node health, data-path latency on a log scale) with the events as labelled vertical
//! lines. Pure: points in, text out.

use std::fmt::Write;

use crate::scenario::Point;

const W: f64 = 1100.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const PANEL_H: f64 = 170.0;
const GAP: f64 = 40.0;
const TOP: f64 = 60.0;
const COLORS: [&str; 2] = ["#1f77b4", "#d62728"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

struct Panel {
    y0: f64,
    title: &'static str,
    /// Maps a value to 0..=1 of the panel height.
    scale: fn(f64) -> f64,
    ticks: Vec<(f64, String)>,
}

fn lin100(v: f64) -> f64 {
    (v / 100.0).clamp(0.0, 1.0)
}

/// 10 us .. 1 s on a log scale.
fn log_us(v: f64) -> f64 {
    ((v.max(10.0).log10() - 1.0) / 5.0).clamp(0.0, 1.0)
}

/// Renders the timeline; `title` goes on top.
pub fn svg(title: &str, points: &[Point], events: &[(f64, String)]) -> String {
    let t_max = points.iter().map(|p| p.t).chain(events.iter().map(|e| e.0)).fold(1.0, f64::max);
    let x = |t: f64| LEFT + (t / t_max) * (W - LEFT - RIGHT);
    let panels = [
        Panel {
            y0: TOP,
            title: "read weight % (source blue, target red)",
            scale: lin100,
            ticks: (0..=4).map(|i| (f64::from(i) * 25.0, format!("{}", i * 25))).collect(),
        },
        Panel {
            y0: TOP + PANEL_H + GAP,
            title: "node health 0-100 (gaps: node unreachable)",
            scale: lin100,
            ticks: (0..=4).map(|i| (f64::from(i) * 25.0, format!("{}", i * 25))).collect(),
        },
        Panel {
            y0: TOP + 2.0 * (PANEL_H + GAP),
            title: "data-path latency per replica (EWMA, log scale)",
            scale: log_us,
            ticks: vec![
                (10.0, "10us".into()),
                (100.0, "100us".into()),
                (1e3, "1ms".into()),
                (1e4, "10ms".into()),
                (1e5, "100ms".into()),
                (1e6, "1s".into()),
            ],
        },
    ];
    let h = TOP + 3.0 * (PANEL_H + GAP) + 20.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>"#, esc(title));
    for p in &panels {
        let y = |v: f64| p.y0 + PANEL_H - (p.scale)(v) * PANEL_H;
        let _ = writeln!(
            o,
            r##"<rect x="{LEFT}" y="{}" width="{}" height="{PANEL_H}" fill="none" stroke="#999"/>"##,
            p.y0,
            W - LEFT - RIGHT
        );
        let _ =
            writeln!(o, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, p.y0 - 6.0, esc(p.title));
        for (v, label) in &p.ticks {
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 4.0,
                y(*v) + 4.0,
                esc(label),
                yy = y(*v)
            );
        }
    }
    // Time axis.
    let bottom = TOP + 3.0 * PANEL_H + 2.0 * GAP;
    let step = if t_max > 120.0 {
        20.0
    } else if t_max > 40.0 {
        10.0
    } else {
        5.0
    };
    let mut t = 0.0;
    while t <= t_max {
        let _ =
            writeln!(o, r#"<text x="{}" y="{}" text-anchor="middle">{t:.0}s</text>"#, x(t), bottom + 14.0);
        t += step;
    }
    // Events.
    for (i, (t, what)) in events.iter().enumerate() {
        let _ = writeln!(
            o,
            r##"<line x1="{xx}" x2="{xx}" y1="{}" y2="{bottom}" stroke="#2ca02c" stroke-dasharray="4,3"/><text x="{}" y="{}" fill="#2ca02c">{}</text>"##,
            TOP - 2.0,
            x(*t) + 3.0,
            TOP + 12.0 + (i % 4) as f64 * 12.0,
            esc(what),
            xx = x(*t)
        );
    }
    // Series: polylines, broken where a value is missing.
    let mut series = |panel: &Panel, color: &str, value: &dyn Fn(&Point) -> Option<f64>| {
        let y = |v: f64| panel.y0 + PANEL_H - (panel.scale)(v) * PANEL_H;
        let mut seg: Vec<String> = Vec::new();
        let flush = |seg: &mut Vec<String>, o: &mut String| {
            if seg.len() > 1 {
                let _ = writeln!(
                    o,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
                    seg.join(" ")
                );
            }
            seg.clear();
        };
        for p in points {
            match value(p) {
                Some(v) => seg.push(format!("{:.1},{:.1}", x(p.t), y(v))),
                None => flush(&mut seg, &mut o),
            }
        }
        flush(&mut seg, &mut o);
    };
    series(&panels[0], COLORS[0], &|p| Some(100.0 - f64::from(p.target_weight)));
    series(&panels[0], COLORS[1], &|p| Some(f64::from(p.target_weight)));
    for (i, c) in COLORS.iter().enumerate() {
        series(&panels[1], c, &|p| p.health[i]);
        series(&panels[2], c, &|p| (p.latency_us[i] > 0.0).then_some(p.latency_us[i]));
    }
    let _ = writeln!(o, "</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_events_and_escapes() {
        let pts: Vec<Point> = (0..10)
            .map(|i| Point {
                t: f64::from(i),
                target_weight: if i < 5 { 0 } else { 100 },
                mode: "Normal".into(),
                health: [if i == 6 { None } else { Some(90.0) }, Some(100.0)],
                latency_us: [100.0 * f64::from(i + 1), 50.0],
                reads: [0, 0],
                in_sync: [true, true],
                low_signals: Default::default(),
            })
            .collect();
        let s = svg("demo <1>", &pts, &[(5.0, "kill source & wait".into())]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("demo &lt;1&gt;") && s.contains("kill source &amp; wait"));
        // Source health is missing at t=6: two segments for it.
        assert!(s.matches("<polyline").count() >= 7, "{s}");
    }
}
