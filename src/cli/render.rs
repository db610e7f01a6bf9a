//! Human output: tables, ages and durations, VMs and their templates, and log entries (raw
//! bytes when piped; a label and colour per log type on a terminal).

use crate::api::vms::{AccelPolicy, TemplateHost, TemplateView, Vm};
use crate::model::{LogType, Request, Status, TemplateState};
use crate::timefmt;
use base64::Engine;
use serde_json::Value;
use std::io::Write;

/// `3s`, `5m`, `2h`, `4d`.
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 10.0 {
        format!("{s:.1}s")
    } else if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.0}h", s / 3600.0)
    } else {
        format!("{:.0}d", s / 86400.0)
    }
}

fn secs_between(a: &str, b: Option<&str>) -> Option<f64> {
    let a = timefmt::parse(a)?;
    let b = match b {
        Some(b) => timefmt::parse(b)?,
        None => time::OffsetDateTime::now_utc(),
    };
    Some((b - a).as_seconds_f64())
}

pub fn age(r: &Request) -> String {
    secs_between(&r.created_at, None)
        .map(human_secs)
        .unwrap_or_default()
}

/// From start to finish (or to now while it runs).
pub fn duration(r: &Request) -> String {
    match &r.started_at {
        Some(s) => secs_between(s, r.finished_at.as_deref())
            .map(human_secs)
            .unwrap_or_default(),
        None => "-".into(),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub fn status_cell(r: &Request) -> String {
    match r.desired_status {
        Some(d) if d != r.status => format!("{} → {d}", r.status),
        _ => r.status.to_string(),
    }
}

pub fn exit_cell(r: &Request) -> String {
    match (r.status, r.exit_code) {
        (_, Some(c)) => c.to_string(),
        (Status::Failed, None) => "err".into(),
        _ => "-".into(),
    }
}

/// `1/2`: the attempt, of the most the request allows (`retries + 1`).
pub fn attempt_cell(r: &Request) -> String {
    format!("{}/{}", r.attempt, r.retries + 1)
}

/// `800 KiB`, `412 MiB`, `1.5 GiB`.
pub fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    if n < 1024.0 * 1024.0 {
        format!("{:.0} KiB", n / 1024.0)
    } else if n < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.0} MiB", n / 1_048_576.0)
    } else {
        format!("{:.1} GiB", n / 1_073_741_824.0)
    }
}

/// `14 ms`, `3.2 s`.
pub fn millis(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `text`, cut to `max` characters with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= max && line.len() == text.len() {
        line.to_string()
    } else {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// One host's template in words: `ready on h1 (built …, 412 MiB, in 3.2 s)`,
/// `failed 2× on h1: boom`.
pub fn template_host(h: &TemplateHost) -> String {
    let failures = match (h.failures, &h.error) {
        (0, _) | (_, None) => String::new(),
        (n, Some(e)) => format!(", {n}× failed since: {}", e.trim_end()),
    };
    match h.state {
        TemplateState::Ready => {
            let mut about = Vec::new();
            if let Some(at) = &h.built_at {
                about.push(format!("built {at}"));
            }
            if let Some(size) = h.size_bytes {
                about.push(bytes(size));
            }
            if let Some(ms) = h.build_ms {
                about.push(format!("in {}", millis(ms)));
            }
            let about = if about.is_empty() {
                String::new()
            } else {
                format!(" ({})", about.join(", "))
            };
            format!("ready on {}{about}{failures}", h.host_id)
        }
        TemplateState::Building => format!("building on {} (since {})", h.host_id, h.updated_at),
        TemplateState::Failed => {
            let times = if h.failures > 1 {
                format!(" {}×", h.failures)
            } else {
                String::new()
            };
            let error = h
                .error
                .as_deref()
                .map_or("no error recorded", str::trim_end);
            format!("failed{times} on {}: {error}", h.host_id)
        }
        TemplateState::None => format!("none on {}", h.host_id),
    }
}

/// The orders some host has not carried out yet: `build ordered`, `delete ordered`.
pub fn pending_orders(t: &TemplateView) -> Option<String> {
    if !t.orders.outstanding {
        return None;
    }
    let behind = |n: i64, done: fn(&TemplateHost) -> i64| {
        n > 0 && (t.hosts.is_empty() || t.hosts.iter().any(|h| done(h) < n))
    };
    let mut pending = Vec::new();
    if behind(t.orders.build, |h| h.build_order) {
        pending.push("build ordered");
    }
    if behind(t.orders.delete, |h| h.delete_order) {
        pending.push("delete ordered");
    }
    Some(pending.join(", "))
}

/// A VM's template in one line, as `status` prints it.
pub fn template_line(t: &TemplateView) -> String {
    let mut line = if t.hosts.is_empty() {
        "none (no host has reported one)".to_string()
    } else {
        t.hosts
            .iter()
            .map(template_host)
            .collect::<Vec<_>>()
            .join("; ")
    };
    if let Some(p50) = t.restore_p50_ms {
        line.push_str(&format!(
            "; restore p50 {} over {} runs",
            millis(p50),
            t.restores
        ));
    }
    if let Some(pending) = pending_orders(t) {
        line.push_str(&format!(" [{pending}, not yet carried out]"));
    }
    line
}

/// The `cli vms` table.
pub fn vm_table(vms: &[Vm]) -> String {
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let t = &vm.template;
            let (warm, pool, accel) = match (&vm.config, &vm.accelerator) {
                (Some(c), Some(a)) => {
                    // The description starts with the accelerator chosen.
                    let chosen = a.split_whitespace().next().unwrap_or("?");
                    let accel = if c.accel == AccelPolicy::Auto {
                        format!("{chosen} (auto)")
                    } else {
                        chosen.to_string()
                    };
                    let warm = if c.warm { "on" } else { "off" };
                    (warm.to_string(), c.warm_pool.to_string(), accel)
                }
                _ => (dash(), dash(), dash()),
            };
            let mut state = t.state.as_str().to_string();
            let failures: i64 = t.hosts.iter().map(|h| h.failures).sum();
            if failures > 0 {
                state.push_str(&format!(", {failures}× failed"));
            }
            if let Some(pending) = pending_orders(t) {
                state.push_str(&format!(", {pending}"));
            }
            let size = t
                .hosts
                .iter()
                .filter(|h| h.state == TemplateState::Ready)
                .filter_map(|h| h.size_bytes)
                .max()
                .map_or_else(dash, bytes);
            let restore = t.restore_p50_ms.map_or_else(dash, millis);
            // The config's error, else the latest template error of any host.
            let error = vm.error.clone().or_else(|| {
                t.hosts
                    .iter()
                    .filter(|h| h.error.is_some())
                    .max_by(|a, b| a.updated_at.cmp(&b.updated_at))
                    .map(|h| format!("{}: {}", h.host_id, h.error.as_deref().unwrap_or("")))
            });
            vec![
                vm.name.clone(),
                if vm.valid { "yes" } else { "no" }.to_string(),
                warm,
                pool,
                accel,
                state,
                size,
                restore,
                error.map_or_else(dash, |e| shorten(&e, 80)),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "VALID",
            "WARM",
            "POOL",
            "ACCEL",
            "TEMPLATE",
            "SIZE",
            "RESTORE P50",
            "ERROR",
        ],
        &rows,
    )
}

/// The exact bytes of a log entry as the API returned it.
pub fn entry_bytes(e: &Value) -> Vec<u8> {
    match e["output_base64"].as_str() {
        Some(b) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default(),
        None => e["output"].as_str().unwrap_or("").as_bytes().to_vec(),
    }
}

/// Writes log entries to stdout.
pub struct LogPrinter {
    /// Labels and colours (stdout is a terminal).
    pub pretty: bool,
    /// One JSON document per entry.
    pub json_lines: bool,
    /// Only the commands' output: `stdout` entries to stdout, `stderr` entries to stderr
    /// (what `submit --follow` does when piped).
    pub split_streams: bool,
    last_type: Option<String>,
}

impl LogPrinter {
    pub fn new(pretty: bool, json_lines: bool) -> Self {
        LogPrinter {
            pretty,
            json_lines,
            split_streams: false,
            last_type: None,
        }
    }

    pub fn print(&mut self, e: &Value) -> std::io::Result<()> {
        if self.json_lines {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{e}")?;
            return out.flush();
        }
        let bytes = entry_bytes(e);
        if self.split_streams && !self.pretty {
            return match e["log_type"].as_str() {
                Some("stdout") => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)?;
                    out.flush()
                }
                Some("stderr") => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&bytes)?;
                    err.flush()
                }
                _ => Ok(()),
            };
        }
        let mut out = std::io::stdout().lock();
        if self.pretty {
            let ty = e["log_type"].as_str().unwrap_or("").to_string();
            let colour = match ty.parse::<LogType>() {
                Ok(LogType::Stdout) => "",
                Ok(LogType::Stderr) => "\x1b[31m",
                Ok(LogType::Command) => "\x1b[36m",
                Ok(LogType::System) => "\x1b[33m",
                _ => "\x1b[2m",
            };
            if self.last_type.as_deref() != Some(ty.as_str()) {
                writeln!(out, "\x1b[1;34m── {ty} ──\x1b[0m")?;
                self.last_type = Some(ty);
            }
            out.write_all(colour.as_bytes())?;
            out.write_all(&bytes)?;
            if !colour.is_empty() {
                out.write_all(b"\x1b[0m")?;
            }
            if !bytes.ends_with(b"\n") {
                // Keep the next label on its own line.
                out.write_all(b"\n")?;
            }
        } else {
            out.write_all(&bytes)?;
        }
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_secs(3.21), "3.2s");
        assert_eq!(human_secs(75.0), "75s");
        assert_eq!(human_secs(600.0), "10m");
        assert_eq!(human_secs(3.0 * 3600.0), "3h");
        assert_eq!(human_secs(5.0 * 86400.0), "5d");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB", "C"],
            &[vec!["xxx".into(), "y".into(), "z".into()]],
        );
        assert_eq!(t, "A    BB  C\nxxx  y   z\n");
    }

    #[test]
    fn sizes_and_times_read_naturally() {
        assert_eq!(bytes(800 * 1024), "800 KiB");
        assert_eq!(bytes(412 * 1024 * 1024), "412 MiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(millis(14), "14 ms");
        assert_eq!(millis(3210), "3.2 s");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
        assert_eq!(shorten("a\nb", 4), "a…", "one line only");
    }

    fn host(state: TemplateState) -> TemplateHost {
        TemplateHost {
            host_id: "h1".into(),
            state,
            key: None,
            built_at: None,
            built_from: None,
            build_ms: None,
            size_bytes: None,
            error: None,
            failures: 0,
            build_order: 1,
            delete_order: 0,
            updated_at: "2026-12-01T10:00:00.000000Z".into(),
        }
    }

    #[test]
    fn template_hosts_in_words() {
        let ready = TemplateHost {
            built_at: Some("2026-12-01T09:00:00.000000Z".into()),
            size_bytes: Some(412 * 1024 * 1024),
            build_ms: Some(3200),
            ..host(TemplateState::Ready)
        };
        assert_eq!(
            template_host(&ready),
            "ready on h1 (built 2026-12-01T09:00:00.000000Z, 412 MiB, in 3.2 s)"
        );
        let failed = TemplateHost {
            failures: 2,
            error: Some("boot timeout".into()),
            ..host(TemplateState::Failed)
        };
        assert_eq!(template_host(&failed), "failed 2× on h1: boot timeout");
        assert_eq!(
            template_host(&host(TemplateState::Building)),
            "building on h1 (since 2026-12-01T10:00:00.000000Z)"
        );
        let mut t = TemplateView {
            state: TemplateState::Failed,
            hosts: vec![failed],
            restores: 3,
            restore_p50_ms: Some(14),
            restore_p99_ms: Some(20),
            orders: crate::api::vms::OrdersView {
                build: 2,
                delete: 0,
                outstanding: true,
            },
        };
        assert_eq!(
            template_line(&t),
            "failed 2× on h1: boot timeout; restore p50 14 ms over 3 runs \
             [build ordered, not yet carried out]"
        );
        t.hosts.clear();
        t.restore_p50_ms = None;
        assert_eq!(
            template_line(&t),
            "none (no host has reported one) [build ordered, not yet carried out]"
        );
    }

    #[test]
    fn entry_bytes_prefer_the_exact_base64() {
        let e = serde_json::json!({"output": "a\u{fffd}", "output_base64": "Yf8="});
        assert_eq!(entry_bytes(&e), b"a\xff");
        let e = serde_json::json!({"output": "plain"});
        assert_eq!(entry_bytes(&e), b"plain");
    }
}
