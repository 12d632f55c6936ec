//! The latency plot (latency.svg): p99 and max per 100 ms row of one run,
//! log scale, a marker at each event, and its legend.

use std::fmt::Write as _;

use crate::client::Row;
use crate::kinds::EventKind;
use crate::scenarios::Event;

/// The colour of an event's marker.
fn event_color(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Reload => "#2a9d3a",
        EventKind::Restart => "#8e44ad",
        EventKind::Kill => "#e67e22",
        EventKind::Upgrade => "#1f77b4",
    }
}

/// How a legend entry is drawn.
#[derive(Debug, Clone, Copy)]
enum Mark {
    /// A short line of this colour (a series), then the label.
    Line(&'static str),
    /// The label in this colour after `┆` (an event marker).
    Event(EventKind),
    /// A small box of this colour (a shaded area), then the label.
    Box(&'static str),
}

/// One legend entry, `dx` from the legend's left edge.
#[derive(Debug, Clone, Copy)]
struct Item {
    dx: f64,
    mark: Mark,
    label: &'static str,
}

/// The plot's legend: one row of entries above the plot area.
#[derive(Debug)]
struct Legend(&'static [Item]);

const LEGEND: Legend = Legend(&[
    Item { dx: 0.0, mark: Mark::Line("#d62728"), label: "max" },
    Item { dx: 60.0, mark: Mark::Line("#1f77b4"), label: "p99" },
    Item { dx: 120.0, mark: Mark::Event(EventKind::Reload), label: "reload" },
    Item { dx: 185.0, mark: Mark::Event(EventKind::Restart), label: "systemctl restart" },
    Item { dx: 310.0, mark: Mark::Event(EventKind::Kill), label: "kill -9 main, auto-restart" },
    Item { dx: 480.0, mark: Mark::Box("#f4c7c3"), label: "no echo in 100 ms" },
]);

impl Legend {
    /// Writes the legend as one `<g>` line, its left edge at `lx`, below
    /// the plot's `top`.
    fn render(&self, s: &mut String, lx: f64, top: f64) {
        let (ly, ty) = (top + 10.0, top + 14.0);
        let _ = write!(s, "<g font-size=\"11\">");
        for it in self.0 {
            let x = lx + it.dx;
            let _ = match it.mark {
                Mark::Line(color) => write!(
                    s,
                    "<line x1=\"{x}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\
                     <text x=\"{}\" y=\"{ty}\">{}</text>",
                    x + 20.0,
                    x + 24.0,
                    it.label
                ),
                Mark::Event(kind) => {
                    write!(s, "<text x=\"{x}\" y=\"{ty}\" fill=\"{}\">┆ {}</text>", event_color(kind), it.label)
                }
                Mark::Box(color) => write!(
                    s,
                    "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{ty}\">{}</text>",
                    top + 5.0,
                    x + 14.0,
                    it.label
                ),
            };
        }
        let _ = writeln!(s, "</g>");
    }
}

/// latency.svg: p99 and max per 100 ms row over one run, log scale, with a
/// vertical marker at each event.
pub fn svg(title: &str, timelines: &[Vec<Row>], events: &[Event]) -> String {
    let rows: Vec<&Row> = timelines.first().map(|t| t.iter().collect()).unwrap_or_default();
    let (w, h) = (960.0_f64, 420.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>",
        w / 2.0,
        escape(title)
    );
    let live: Vec<&&Row> = rows.iter().filter(|r| r.echoes > 0).collect();
    if live.is_empty() {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">no data</text>\n</svg>", w / 2.0, h / 2.0);
        return s;
    }
    let t0 = rows.first().map_or(0.0, |r| r.t_ms);
    let t1 = rows.last().map_or(1.0, |r| r.t_ms + 100.0);
    let span = (t1 - t0).max(1.0);
    let min_p99 = live.iter().map(|r| r.p99_us.max(1) as f64 / 1e3).fold(f64::INFINITY, f64::min);
    let lo_ms = 10f64.powf(min_p99.log10().floor()).max(0.001);
    let hi_ms = live.iter().map(|r| r.max_us as f64 / 1e3).fold(1.0, f64::max) * 1.5;
    let (lo, hi) = (lo_ms.log10(), hi_ms.log10().ceil().max(lo_ms.log10() + 1.0));
    let x = |t: f64| left + (t - t0) / span * pw;
    let y = |v_ms: f64| top + ph - (v_ms.max(lo_ms).log10() - lo) / (hi - lo) * ph;
    // Axes and grid.
    let _ =
        writeln!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>");
    let mut d = lo.floor() as i32;
    while d as f64 <= hi {
        let v = 10f64.powi(d);
        let yy = y(v);
        let label = if v >= 1.0 { format!("{v:.0} ms") } else { format!("{} ms", v) };
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            left + pw,
            left - 6.0,
            yy + 4.0
        );
        d += 1;
    }
    let step = nice_step(span / 1e3 / 10.0);
    let mut tt = 0.0;
    while tt <= span / 1e3 {
        let xx = x(t0 + tt * 1e3);
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{}\" x2=\"{xx:.1}\" y2=\"{}\" stroke=\"#444\"/>\
             <text x=\"{xx:.1}\" y=\"{}\" text-anchor=\"middle\">{tt:.d$}</text>",
            top + ph,
            top + ph + 5.0,
            top + ph + 18.0,
            d = if step < 1.0 { 1 } else { 0 }
        );
        tt += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since the client started (s); one point per 100 ms row</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">echo latency (log scale)</text>",
        left + pw / 2.0,
        h - 18.0,
        top + ph / 2.0,
        top + ph / 2.0
    );
    // 100 ms rows without a single echo (between the first and the last
    // echo): every connection was waiting.
    let (first, last) = (live.first().map_or(0.0, |r| r.t_ms), live.last().map_or(0.0, |r| r.t_ms));
    for r in rows.iter().filter(|r| r.echoes == 0 && r.t_ms > first && r.t_ms < last) {
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#f4c7c3\" opacity=\"0.6\"/>",
            x(r.t_ms),
            (x(r.t_ms + 100.0) - x(r.t_ms)).max(0.5)
        );
    }
    // Event markers.
    for e in events {
        let color = event_color(e.kind);
        let xx = x(e.at_ms);
        if !(left..=left + pw).contains(&xx) {
            continue;
        }
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"{}\" fill=\"{color}\" font-size=\"10\" transform=\"rotate(90 {:.1} {})\">{}</text>",
            top + ph,
            xx + 3.0,
            top + 24.0,
            xx + 3.0,
            top + 24.0,
            e.kind
        );
    }
    // Series: one polyline per run of consecutive rows with echoes.
    for (name, color, get) in
        [("max", "#d62728", (|r: &Row| r.max_us) as fn(&Row) -> u64), ("p99", "#1f77b4", |r: &Row| r.p99_us)]
    {
        let mut segment: Vec<String> = Vec::new();
        let mut segments = Vec::new();
        for r in &rows {
            if r.echoes == 0 {
                if !segment.is_empty() {
                    segments.push(std::mem::take(&mut segment));
                }
                continue;
            }
            segment.push(format!("{:.1},{:.1}", x(r.t_ms + 50.0), y(get(r) as f64 / 1e3)));
        }
        segments.push(segment);
        for seg in segments.iter().filter(|g| !g.is_empty()) {
            if seg.len() == 1 {
                let (cx, cy) = seg[0].split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"2\" fill=\"{color}\"><title>{name}</title></circle>"
                );
            } else {
                let _ = writeln!(
                    s,
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"><title>{name}</title></polyline>",
                    seg.join(" ")
                );
            }
        }
    }
    LEGEND.render(&mut s, left + 10.0, top);
    let _ = writeln!(s, "</svg>");
    s
}

fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(0.1);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// What latency.svg shows, and its caption: the systemd run at 1 000
/// connections if there is one, else the 1 000 (or smallest) handoff run.
pub fn choose(systemd: &crate::report::SystemdSection, handoff: &[crate::handoff::HandoffResult]) -> (String, String) {
    use crate::kinds::Placement;
    if let Some(sd) = systemd.runs.iter().find(|s| s.connections == 1_000) {
        (
            format!(
                "One run under systemd with {} connections (interval {} ms): `systemctl reload`, `systemctl restart` \
                 and kill -9 of the main process with automatic restart, marked by dashed lines.",
                sd.connections, sd.interval_ms
            ),
            svg(
                &format!("echo latency per 100 ms, {} connections, takeoverd under systemd", sd.connections),
                &sd.timelines,
                &sd.events,
            ),
        )
    } else if let Some(h) =
        handoff.iter().find(|h| h.connections == 1_000 && h.placement == Placement::Pinned).or(handoff.first())
    {
        (
            format!(
                "The handoff run with {} connections (interval {} ms) and its {} reloads, marked by dashed lines \
                 (no systemd run to show).",
                h.connections, h.interval_ms, h.reloads
            ),
            svg(&format!("echo latency per 100 ms, {} connections, reloads", h.connections), &h.timelines, &h.events),
        )
    } else {
        ("No run to plot.".to_owned(), svg("no data", &[], &[]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_enough() {
        let rows: Vec<Row> = (0..50)
            .map(|i| Row {
                t_ms: i as f64 * 100.0,
                echoes: 10,
                p50_us: 100,
                p99_us: 200 + i * 10,
                max_us: 300 + i * 100,
                errors: 0,
            })
            .collect();
        let ev = Event {
            kind: EventKind::Reload,
            at_ms: 1000.0,
            done_ms: 1010.0,
            ok: true,
            detail: String::new(),
            window: Default::default(),
            handoff_ms: None,
            old_exit_ms: None,
        };
        let s = svg("a <b>", &[rows], &[ev]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("polyline") && s.contains("a &lt;b&gt;") && s.contains("reload"));
        assert_eq!(s.matches("<polyline").count(), 2);
        let mut gap: Vec<Row> = (0..10)
            .map(|i| Row { t_ms: i as f64 * 100.0, echoes: 1, p50_us: 1, p99_us: 2, max_us: 3, errors: 0 })
            .collect();
        gap[5].echoes = 0;
        let s = svg("gap", &[gap], &[]);
        assert_eq!(s.matches("<polyline").count(), 4, "a gap splits each series");
        assert!(s.contains("#f4c7c3"));
    }

    #[test]
    fn legend_is_drawn_as_before() {
        let mut s = String::new();
        LEGEND.render(&mut s, 80.0, 40.0);
        assert_eq!(
            s,
            "<g font-size=\"11\"><line x1=\"80\" y1=\"50\" x2=\"100\" y2=\"50\" stroke=\"#d62728\" stroke-width=\"2\"/>\
             <text x=\"104\" y=\"54\">max</text><line x1=\"140\" y1=\"50\" x2=\"160\" y2=\"50\" stroke=\"#1f77b4\" \
             stroke-width=\"2\"/><text x=\"164\" y=\"54\">p99</text><text x=\"200\" y=\"54\" fill=\"#2a9d3a\">┆ \
             reload</text><text x=\"265\" y=\"54\" fill=\"#8e44ad\">┆ systemctl restart</text><text x=\"390\" \
             y=\"54\" fill=\"#e67e22\">┆ kill -9 main, auto-restart</text><rect x=\"560\" y=\"45\" width=\"10\" \
             height=\"10\" fill=\"#f4c7c3\"/><text x=\"574\" y=\"54\">no echo in 100 ms</text></g>\n"
        );
    }

    #[test]
    fn steps() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.5), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(7.0), 10.0);
    }
}
