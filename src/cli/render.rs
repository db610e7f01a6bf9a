//! Human output: tables, ages and durations, and log entries (raw bytes when piped; a label
//! and colour per log type on a terminal).

use crate::model::{LogType, Request, Status};
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
    fn entry_bytes_prefer_the_exact_base64() {
        let e = serde_json::json!({"output": "a\u{fffd}", "output_base64": "Yf8="});
        assert_eq!(entry_bytes(&e), b"a\xff");
        let e = serde_json::json!({"output": "plain"});
        assert_eq!(entry_bytes(&e), b"plain");
    }
}
