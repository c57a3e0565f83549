//! Reports for people: a text page for terminals and a self-contained HTML page (no network,
//! inline SVG chart of the memory timeline with the event marked, then the tables).

use std::fmt::Write;

use super::report::{Frame, Report};

const GIB: f64 = (1u64 << 30) as f64;

pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

pub fn frame(f: &Frame) -> String {
    let mut s = f
        .function
        .clone()
        .unwrap_or_else(|| format!("{:#x}", f.address));
    match (&f.file, f.line) {
        (Some(file), Some(line)) => {
            let _ = write!(s, " ({file}:{line})");
        }
        _ => {
            if let (Some(module), Some(off)) = (&f.module, f.offset) {
                let _ = write!(s, " ({module}+{off:#x})");
            }
        }
    }
    s
}

/// Text as a terminal may show it: control characters (C0, DEL, C1) and the bidirectional
/// controls written as escapes (`\n`, `\x1b`, `\u{202e}`), so a name that a process chose
/// cannot move the cursor, recolour the terminal or reorder what is shown. `None` when the
/// text needs none.
pub fn visible(s: &str) -> Option<String> {
    if !s.chars().any(needs_escape) {
        return None;
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        let _ = match c {
            '\n' => write!(out, "\\n"),
            '\r' => write!(out, "\\r"),
            '\t' => write!(out, "\\t"),
            c if needs_escape(c) && c.is_ascii() => write!(out, "\\x{:02x}", u32::from(c)),
            c if needs_escape(c) => write!(out, "\\u{{{:x}}}", u32::from(c)),
            c => write!(out, "{c}"),
        };
    }
    Some(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// The report with every text field [`visible`].
fn printable(r: &Report) -> Report {
    let mut r = r.clone();
    r.strings_mut(&mut |s| {
        if let Some(v) = visible(s) {
            *s = v;
        }
    });
    r
}

/// Pretty JSON that a terminal shows as it is: serde escapes C0 controls; DEL, C1 and the
/// bidirectional controls (only ever inside strings) become `\u` escapes too.
pub fn json<T: serde::Serialize>(v: &T) -> serde_json::Result<String> {
    let s = serde_json::to_string_pretty(v)?;
    if !s.chars().any(|c| needs_escape(c) && u32::from(c) >= 0x7f) {
        return Ok(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if needs_escape(c) && u32::from(c) >= 0x7f {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// One line per report for `forensics list`.
pub fn list_line(r: &Report) -> String {
    let r = &printable(r);
    let gpu = r.gpu.as_ref().map_or("-".into(), |g| g.index.to_string());
    format!(
        "{}  {}  {:<17} pid {:<7} {:<15} gpu {:<3} {}{}",
        r.id,
        r.time,
        r.kind.as_str(),
        r.process.pid,
        r.process.comm,
        gpu,
        pod_of(&r.process).map_or(String::new(), |p| format!("{p}  ")),
        r.summary
    )
}

/// `namespace/pod container c` of a process in a pod.
fn pod_of(p: &crate::track::draft::ProcessInfo) -> Option<String> {
    (!p.pod.is_empty()).then(|| format!("{}/{} container {}", p.namespace, p.pod, p.container))
}

/// Requests in flight (and their body bytes) at the event, and the peak count over the
/// timeline.
fn now_and_peak(srv: &super::report::RequestSeries) -> ((u32, u64), u32) {
    let now = srv
        .points
        .iter()
        .rev()
        .find(|(t, _, _)| *t <= 0.5)
        .map_or((0, 0), |(_, n, b)| (*n, *b));
    let peak = srv.points.iter().map(|(_, n, _)| *n).max().unwrap_or(0);
    (now, peak)
}

pub fn text(r: &Report) -> String {
    let r = &printable(r);
    let mut s = String::new();
    let _ = writeln!(s, "{}\n", r.summary);
    let _ = writeln!(
        s,
        "report   {} ({}, schema {})",
        r.id,
        r.kind.as_str(),
        r.schema_version
    );
    let _ = writeln!(s, "time     {}", r.time);
    let p = &r.process;
    let _ = writeln!(s, "process  pid {} ({}) {}", p.pid, p.comm, p.cmdline);
    if let Some(pod) = pod_of(p) {
        let _ = writeln!(s, "pod      {pod}");
    }
    if !p.cgroup.is_empty() {
        let _ = writeln!(s, "cgroup   {}", p.cgroup);
    }
    if let Some(g) = &r.gpu {
        let _ = writeln!(
            s,
            "gpu      {} {} {}: {} of {} used, utilization {}, {} C, throttle {}",
            g.index,
            g.name.as_deref().unwrap_or("?"),
            g.uuid.as_deref().unwrap_or(""),
            g.memory_used_bytes.map_or("?".into(), bytes),
            g.memory_total_bytes.map_or("?".into(), bytes),
            g.utilization.map_or("?".into(), |u| format!("{u}%")),
            g.temperature_c.map_or("?".into(), |t| t.to_string()),
            if g.throttle_reasons.is_empty() {
                "none".into()
            } else {
                g.throttle_reasons.join(",")
            },
        );
    }
    if let Some(c) = &r.cuda {
        let _ = writeln!(
            s,
            "\nfailed call: {} of {} -> {} ({}), thread {}",
            c.api,
            bytes(c.requested_bytes),
            c.error,
            c.code,
            c.thread
        );
        for f in &c.stack {
            let _ = writeln!(s, "    {}", frame(f));
        }
    }
    if let Some(p) = &r.python {
        python_text(&mut s, p);
    }
    if let Some(e) = &r.exit {
        let _ = writeln!(
            s,
            "\nexit: status {} signal {}",
            e.exit_code.map_or("-".into(), |c| c.to_string()),
            e.signal_name.clone().unwrap_or_else(|| "-".into())
        );
    }
    if let Some(h) = &r.host_oom {
        let _ = writeln!(
            s,
            "\nhost OOM kill: rss anon {} file {} shmem {}, vm {}, oom_score_adj {}",
            bytes(h.anon_rss_bytes),
            bytes(h.file_rss_bytes),
            bytes(h.shmem_rss_bytes),
            bytes(h.total_vm_bytes),
            h.oom_score_adj
        );
        let _ = writeln!(
            s,
            "cgroup limit {} usage {}; node {} available of {}",
            h.cgroup_limit_bytes.map_or("?".into(), bytes),
            h.cgroup_usage_bytes.map_or("?".into(), bytes),
            h.node_memory_available_bytes.map_or("?".into(), bytes),
            h.node_memory_total_bytes.map_or("?".into(), bytes),
        );
        for row in &h.largest_processes {
            let _ = writeln!(
                s,
                "    {:>8} {:<16} {}",
                row.pid,
                row.comm,
                bytes(row.rss_bytes)
            );
        }
    }
    if let Some(a) = &r.allocations {
        let _ = writeln!(
            s,
            "\nlive allocations: {} in {} ({} in {} older than 10 min); {:.1} allocs/s, {:.1} frees/s over the last minute",
            bytes(a.bytes), a.count, bytes(a.old_bytes), a.old_count, a.alloc_rate_per_s, a.free_rate_per_s
        );
        for c in &a.by_size_class {
            let _ = writeln!(
                s,
                "    {:<14} {:>7} {:>12}",
                c.class,
                c.count,
                bytes(c.bytes)
            );
        }
        let _ = writeln!(s, "largest:");
        for row in &a.largest {
            let at = row
                .stack
                .first()
                .map(frame)
                .unwrap_or_else(|| format!("({})", row.stack_status.missing_text()));
            let _ = writeln!(
                s,
                "    {:>12} {:<22} gpu {} age {:>7.1} s  {}",
                bytes(row.bytes),
                row.api,
                row.gpu,
                row.age_seconds,
                at
            );
        }
    }
    if !r.gpu_processes.is_empty() {
        let _ = writeln!(s, "\nprocesses on this GPU:");
        for row in &r.gpu_processes {
            let _ = writeln!(
                s,
                "    {:>8} {:<16} ledger {:>12}  nvml {:>12}",
                row.pid,
                row.comm,
                bytes(row.ledger_bytes),
                row.nvml_bytes.map_or("-".into(), bytes)
            );
        }
    }
    if !r.timeline.requests.is_empty() {
        let _ = writeln!(
            s,
            "\nrequests in flight (from the wire), now / peak over the timeline:"
        );
        for srv in &r.timeline.requests {
            let ((now, bytes_now), peak) = now_and_peak(srv);
            let _ = writeln!(
                s,
                "    {:>8} {:<16} {now} / {peak}  ({} of request bodies at the event)",
                srv.pid,
                srv.comm,
                bytes(bytes_now)
            );
        }
    }
    if let Some(q) = &r.requests {
        requests_text(&mut s, q);
    }
    let t = &r.timeline;
    let _ = writeln!(
        s,
        "\ntimeline: {} GPU samples and {} failures in the last {} s",
        t.gpu.len(),
        t.failures.len(),
        t.window_seconds
    );
    if r.suppressed_before > 0 {
        let _ = writeln!(
            s,
            "({} more events of this kind were only counted)",
            r.suppressed_before
        );
    }
    s
}

fn python_frame(f: &crate::forensics::report::PythonFrame) -> String {
    format!("{} ({}:{})", f.function, f.file, f.line)
}

fn thread_title(t: &crate::forensics::report::PythonThread) -> String {
    format!(
        "thread {}{}{}{}",
        t.os_thread_id.unwrap_or(t.thread_id),
        t.name.as_ref().map(|n| format!(" {n}")).unwrap_or_default(),
        if t.failing {
            " (the failing call's)"
        } else {
            ""
        },
        if t.owns_gil { ", holds the GIL" } else { "" }
    )
}

/// When the stacks were read, in words.
fn python_when(p: &crate::forensics::report::PythonStacks) -> String {
    if p.frozen {
        format!(
            "read at the failing call (the process was stopped there for {:.1} ms)",
            p.read_ms_after_failure
        )
    } else {
        format!(
            "read {:.1} ms after the failure (threads may have moved on)",
            p.read_ms_after_failure
        )
    }
}

fn python_text(s: &mut String, p: &crate::forensics::report::PythonStacks) {
    let _ = writeln!(s, "\npython stacks, {}:", python_when(p));
    if let Some(e) = &p.error {
        let _ = writeln!(s, "    not read: {e}");
    }
    for t in &p.threads {
        let _ = writeln!(s, "  {}:", thread_title(t));
        for f in &t.frames {
            let _ = writeln!(s, "    {}", python_frame(f));
        }
    }
}

/// One request as a line: what it was, where it stood, how it ended.
fn request_line(row: &crate::forensics::report::RequestRow) -> String {
    let mut l = format!(
        "pid {} {} arrived {:.3} s before, {} ({} tokens), prompt {}",
        row.server_pid,
        row.model,
        row.arrived_seconds_before,
        row.state,
        row.tokens_so_far,
        bytes(row.prompt_bytes)
    );
    if let Some(t) = row.prompt_tokens {
        l.push_str(&format!(" / {t} tokens"));
    }
    if let Some(m) = row.max_tokens {
        l.push_str(&format!(", max_tokens {m}"));
    }
    if let Some(c) = &row.client {
        l.push_str(&format!(", client {c}"));
        if let Some(p) = &row.client_process {
            l.push_str(&format!(" ({})", p.describe()));
        }
    }
    if let Some(o) = &row.outcome {
        match row.ended_seconds_after {
            Some(after) => l.push_str(&format!("; ended {after:.3} s after: {o}")),
            None => l.push_str(&format!("; {o}")),
        }
    }
    l
}

fn requests_text(s: &mut String, q: &crate::forensics::report::Requests) {
    let _ = writeln!(
        s,
        "\nrequests in flight at the failure on the server ({} pids {:?}):",
        q.in_flight.len(),
        q.servers
    );
    for row in &q.in_flight {
        let mark = if row.likely_trigger { "TRIGGER?" } else { "" };
        let _ = writeln!(s, "  {mark:>8} {}", request_line(row));
        if let Some(why) = &row.trigger_reason {
            let _ = writeln!(s, "           likely trigger: {why}");
        }
    }
    if let Some(why) = &q.no_trigger {
        let _ = writeln!(s, "  no likely trigger: {why}");
    }
    if q.after_complete {
        let _ = writeln!(
            s,
            "requests that failed in the {} s after the failure: {}",
            q.after_window_secs,
            q.failed_after.len()
        );
        for row in &q.failed_after {
            let _ = writeln!(s, "           {}", request_line(row));
        }
    } else {
        let _ = writeln!(
            s,
            "(the requests that fail in the {} s after the failure are added when that window ends)",
            q.after_window_secs
        );
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLORS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// The memory timeline: GPU memory used (NVML) and each process's ledger bytes, with the
/// event at t = 0 marked.
pub fn svg(r: &Report) -> String {
    let (w, h, pad) = (900.0, 320.0, 50.0);
    let t = &r.timeline;
    // From the oldest point (at least 10 s back, at most the window) to the event.
    let oldest = t
        .gpu
        .iter()
        .map(|p| p.t)
        .chain(
            t.processes
                .iter()
                .flat_map(|s| s.points.iter().map(|(tt, _)| *tt)),
        )
        .chain(t.failures.iter().map(|f| f.t))
        .fold(-10.0_f64, f64::min);
    let t_min = oldest.max(-(t.window_seconds as f64).max(10.0));
    let mut y_max: f64 = 1.0;
    for p in &t.gpu {
        y_max = y_max.max(p.memory_total_bytes.or(p.memory_used_bytes).unwrap_or(0) as f64);
    }
    for s in &t.processes {
        for (_, b) in &s.points {
            y_max = y_max.max(*b as f64);
        }
    }
    let x = |tt: f64| pad + (tt - t_min) / (0.0 - t_min).max(1e-9) * (w - 2.0 * pad);
    let y = |b: f64| h - pad - b / y_max * (h - 2.0 * pad);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="memory timeline">"#
    );
    let _ = write!(
        s,
        r##"<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>"##
    );
    let _ = write!(
        s,
        r##"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
        h - pad,
        w - pad,
        h - pad
    );
    let _ = write!(
        s,
        r##"<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{}" stroke="#999"/>"##,
        h - pad
    );
    let _ = write!(
        s,
        r##"<text x="{pad}" y="{}" font-size="11">{:.0} s</text>"##,
        h - pad + 15.0,
        t_min
    );
    let _ = write!(
        s,
        r##"<text x="4" y="{}" font-size="11">{}</text>"##,
        pad - 5.0,
        esc(&bytes(y_max as u64))
    );
    let mut legend = 0.0;
    let mut series = |s: &mut String, name: &str, color: &str, pts: Vec<(f64, f64)>| {
        if pts.is_empty() {
            return;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|(tt, b)| format!("{:.1},{:.1}", x(*tt), y(*b)))
            .collect();
        // A series of one point (a process seen for under a second) is a dot.
        if let [(tt, b)] = pts[..] {
            let _ = write!(
                s,
                r#"<circle class="series" cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"#,
                x(tt),
                y(b)
            );
        }
        let _ = write!(
            s,
            r#"<polyline class="series" fill="none" stroke="{color}" stroke-width="3" points="{}"/>"#,
            path.join(" ")
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" font-size="12" fill="{color}">{}</text>"#,
            pad + 10.0,
            pad + 14.0 + legend,
            esc(name)
        );
        legend += 15.0;
    };
    series(
        &mut s,
        "GPU memory used (NVML)",
        "#444",
        t.gpu
            .iter()
            .filter_map(|p| Some((p.t, p.memory_used_bytes? as f64)))
            .collect(),
    );
    for (i, p) in t.processes.iter().enumerate() {
        series(
            &mut s,
            &format!("pid {} {} (ledger)", p.pid, p.comm),
            COLORS[i % COLORS.len()],
            p.points.iter().map(|(tt, b)| (*tt, *b as f64)).collect(),
        );
    }
    for f in &t.failures {
        let _ = write!(
            s,
            r##"<circle class="failure" cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##,
            x(f.t),
            pad
        );
    }
    let _ = write!(
        s,
        r##"<line id="event" x1="{0:.1}" y1="{pad}" x2="{0:.1}" y2="{1}" stroke="#d62728" stroke-dasharray="4 3"/><text x="{2:.1}" y="{3}" font-size="12" fill="#d62728">{4}</text>"##,
        x(0.0),
        h - pad,
        x(0.0) - 60.0,
        pad - 8.0,
        esc(r.kind.as_str())
    );
    s.push_str("</svg>");
    s
}

pub fn html(r: &Report) -> String {
    let r = &printable(r);
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>inferscope {}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}}th{{background:#f3f3f3}}\
.summary{{font-size:1.2em;background:#fff4f4;border-left:4px solid #d62728;padding:.6em}}code{{font-size:12px}}</style></head><body>",
        esc(&r.id)
    );
    let _ = write!(
        s,
        "<h1>{} report</h1><p class=\"summary\">{}</p>",
        esc(r.kind.as_str()),
        esc(&r.summary)
    );
    let _ = write!(
        s,
        "<p>{} · pid {} ({}) <code>{}</code></p>",
        esc(&r.time),
        r.process.pid,
        esc(&r.process.comm),
        esc(&r.process.cmdline)
    );
    if let Some(pod) = pod_of(&r.process) {
        let _ = write!(s, "<p>pod {}</p>", esc(&pod));
    }
    s.push_str("<h2>Memory timeline</h2>");
    s.push_str(&svg(r));
    if let Some(c) = &r.cuda {
        let _ = write!(
            s,
            "<h2>Failed call</h2><p>{} of {} → {} ({})</p>",
            esc(&c.api),
            bytes(c.requested_bytes),
            esc(&c.error),
            c.code
        );
        let python = r
            .python
            .as_ref()
            .and_then(|p| p.threads.iter().find(|t| t.failing));
        match python {
            // The failing thread's Python frames beside the call's native ones.
            Some(t) => {
                s.push_str("<table><tr><th>native (the failing call)</th><th>Python (the failing thread)</th></tr>");
                for i in 0..c.stack.len().max(t.frames.len()) {
                    let _ = write!(
                        s,
                        "<tr><td><code>{}</code></td><td><code>{}</code></td></tr>",
                        c.stack.get(i).map(|f| esc(&frame(f))).unwrap_or_default(),
                        t.frames
                            .get(i)
                            .map(|f| esc(&python_frame(f)))
                            .unwrap_or_default()
                    );
                }
                s.push_str("</table>");
            }
            None => {
                s.push_str("<ol>");
                for f in &c.stack {
                    let _ = write!(s, "<li><code>{}</code></li>", esc(&frame(f)));
                }
                s.push_str("</ol>");
            }
        }
    }
    if let Some(p) = &r.python {
        let _ = write!(s, "<h2>Python stacks</h2><p>{}</p>", esc(&python_when(p)));
        if let Some(e) = &p.error {
            let _ = write!(s, "<p>not read: {}</p>", esc(e));
        }
        for t in &p.threads {
            let _ = write!(s, "<h3>{}</h3><ol>", esc(&thread_title(t)));
            for f in &t.frames {
                let _ = write!(s, "<li><code>{}</code></li>", esc(&python_frame(f)));
            }
            s.push_str("</ol>");
        }
    }
    if let Some(a) = &r.allocations {
        let _ = write!(s, "<h2>Live allocations</h2><p>{} in {} allocations; {:.1} allocs/s, {:.1} frees/s over the last minute</p>", bytes(a.bytes), a.count, a.alloc_rate_per_s, a.free_rate_per_s);
        s.push_str("<table><tr><th>size class</th><th>count</th><th>bytes</th></tr>");
        for c in &a.by_size_class {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.class),
                c.count,
                bytes(c.bytes)
            );
        }
        s.push_str("</table><table><tr><th>bytes</th><th>api</th><th>gpu</th><th>age (s)</th><th>allocated at</th></tr>");
        for row in &a.largest {
            let at = row
                .stack
                .first()
                .map(frame)
                .unwrap_or_else(|| row.stack_status.missing_text().into());
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td><code>{}</code></td></tr>",
                bytes(row.bytes),
                esc(&row.api),
                row.gpu,
                row.age_seconds,
                esc(&at)
            );
        }
        s.push_str("</table>");
    }
    if !r.gpu_processes.is_empty() {
        s.push_str("<h2>Processes on the GPU</h2><table><tr><th>pid</th><th>comm</th><th>ledger</th><th>NVML</th></tr>");
        for row in &r.gpu_processes {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                row.pid,
                esc(&row.comm),
                bytes(row.ledger_bytes),
                row.nvml_bytes.map_or("-".into(), bytes)
            );
        }
        s.push_str("</table>");
    }
    if let Some(h) = &r.host_oom {
        let _ = write!(s, "<h2>Host OOM kill</h2><p>anon rss {}, file rss {}, shmem {}, cgroup limit {}, usage {}</p>", bytes(h.anon_rss_bytes), bytes(h.file_rss_bytes), bytes(h.shmem_rss_bytes), h.cgroup_limit_bytes.map_or("?".into(), bytes), h.cgroup_usage_bytes.map_or("?".into(), bytes));
    }
    if !r.timeline.requests.is_empty() {
        s.push_str("<h2>Requests in flight</h2><table><tr><th>server pid</th><th>comm</th><th>at the event</th><th>peak</th></tr>");
        for srv in &r.timeline.requests {
            let ((now, body), peak) = now_and_peak(srv);
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{now} ({})</td><td>{peak}</td></tr>",
                srv.pid,
                esc(&srv.comm),
                bytes(body)
            );
        }
        s.push_str("</table>");
    }
    if let Some(q) = &r.requests {
        s.push_str("<h2>Requests at the failure</h2><table><tr><th></th><th>request</th><th>why it may be the trigger</th></tr>");
        for row in &q.in_flight {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                if row.likely_trigger {
                    "likely trigger"
                } else {
                    ""
                },
                esc(&request_line(row)),
                esc(row.trigger_reason.as_deref().unwrap_or(""))
            );
        }
        s.push_str("</table>");
        if let Some(why) = &q.no_trigger {
            let _ = write!(s, "<p>No likely trigger: {}</p>", esc(why));
        }
        if q.after_complete {
            let _ = write!(
                s,
                "<h2>Failed in the {} s after</h2><table><tr><th>request</th></tr>",
                q.after_window_secs
            );
            for row in &q.failed_after {
                let _ = write!(s, "<tr><td>{}</td></tr>", esc(&request_line(row)));
            }
            s.push_str("</table>");
        }
    }
    let _ = write!(
        s,
        "<h2>Details</h2><pre>{}</pre></body></html>",
        esc(&text(r))
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensics::report::tests::full;

    const HOSTILE: &str = "evil\x1b[2J\x1b]0;title\x07\nfake line\r\u{9b}31m\u{202e}txt.exe\x7f";

    fn no_controls(s: &str, keep_newlines: bool) {
        for c in s.chars() {
            if keep_newlines && c == '\n' {
                continue;
            }
            assert!(!needs_escape(c), "{c:?} reached the output: {s:?}");
        }
    }

    #[test]
    fn control_characters_are_made_visible() {
        assert_eq!(visible("plain ünïcode 模型"), None);
        assert_eq!(
            visible(HOSTILE).unwrap(),
            "evil\\x1b[2J\\x1b]0;title\\x07\\nfake line\\r\\u{9b}31m\\u{202e}txt.exe\\x7f"
        );
        assert_eq!(visible("a\tb").unwrap(), "a\\tb");
    }

    #[test]
    fn every_rendering_escapes_every_field() {
        let r = full(HOSTILE);
        let text = text(&r);
        no_controls(&text, true);
        // Each field is on a line of its own making: none starts with the injected text.
        assert!(!text.lines().any(|l| l.starts_with("fake line")), "{text}");
        no_controls(&list_line(&r), false);
        no_controls(&html(&r), true);
        assert!(html(&r).contains("evil\\x1b[2J"));
        let j = json(&r).unwrap();
        no_controls(&j, true);
        let back: Report = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r, "the JSON escapes are only a spelling");
    }
}
