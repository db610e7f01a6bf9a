//! `sqlite-sim submit`: submit commands and, for CI, wait and exit with their exit code.

use super::client::{ApiClient, CliError};
use super::render::{self, LogPrinter};
use super::upload;
use super::{artifacts, exit, Conn};
use crate::model::{Request, RequestId, Status};
use clap::Args;
use serde_json::Value;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The VM to run in.
    #[arg(long)]
    pub vm: String,
    /// The commands, as one shell script.
    #[arg(short = 'c', long = "commands", value_name = "CMDS")]
    pub commands: Option<String>,
    /// Read the commands from FILE.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// `-` reads the commands from standard input.
    #[arg(value_name = "-", value_parser = ["-"])]
    pub stdin: Option<String>,
    /// Seconds (default: the server's SQLITE_SIM_DEFAULT_TIMEOUT).
    #[arg(long)]
    pub timeout: Option<u32>,
    /// From -100 to 100 (default 0): claims take the highest first. A submitter token may go
    /// up to the server's SQLITE_SIM_MAX_SUBMITTER_PRIORITY; operators and admins, anywhere.
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-100..=100))]
    pub priority: Option<i32>,
    /// On a failure after boot, keep the VM up this many seconds to attach to it.
    #[arg(long, value_name = "SECONDS")]
    pub keep_on_failure: Option<u32>,
    /// POST the request's JSON (signed) to URL once it is done, failed or cancelled; the
    /// server must allow its host (SQLITE_SIM_WEBHOOK_ALLOW).
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
    /// Re-queue the request up to N times when its run fails for an infrastructure reason
    /// (QEMU exiting, a boot timeout, the agent lost); default: the server's
    /// SQLITE_SIM_DEFAULT_RETRIES.
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Put LOCAL in the guest before the commands run: a file at GUEST_PATH (default
    /// /root/NAME; a GUEST_PATH ending in / is the directory it goes into), a directory
    /// extracted into GUEST_PATH (default /root/NAME/), modes kept. Repeatable.
    #[arg(long = "upload", value_name = "LOCAL[:GUEST_PATH]", value_parser = upload::parse_spec)]
    pub uploads: Vec<upload::Spec>,
    /// Collect the guest files matching GLOB (an absolute path, `*`, `?`, `[…]`) after the
    /// commands, also when they fail or time out. Repeatable.
    #[arg(long = "artifact", value_name = "GLOB")]
    pub artifacts: Vec<String>,
    /// When the request ends, download its artifacts to DIR/<guest path> (implies --wait).
    #[arg(long, value_name = "DIR")]
    pub artifacts_dir: Option<PathBuf>,
    /// Return when the request ends, with the commands' exit code (see the exit codes).
    #[arg(long)]
    pub wait: bool,
    /// Stream the output while waiting (implies --wait): on a terminal the whole console,
    /// labelled; piped, the commands' stdout to stdout and their stderr to stderr.
    #[arg(long)]
    pub follow: bool,
    /// On Ctrl-C, leave the request running instead of cancelling it.
    #[arg(long)]
    pub detach: bool,
    /// Print JSON: the submission, then (with --wait) the final request.
    #[arg(long)]
    pub json: bool,
}

fn read_commands(a: &SubmitArgs) -> Result<String, CliError> {
    let given = [a.commands.is_some(), a.file.is_some(), a.stdin.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(CliError::Input(
            "give the commands exactly one way: -c CMDS, -f FILE, or - (standard input)".into(),
        ));
    }
    if let Some(c) = &a.commands {
        return Ok(c.clone());
    }
    if let Some(f) = &a.file {
        return std::fs::read_to_string(f)
            .map_err(|e| CliError::Input(format!("reading {}: {e}", f.display())));
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| CliError::Input(format!("reading standard input: {e}")))?;
    Ok(s)
}

/// The exit code for a finished request.
pub fn exit_code_for(r: &Request) -> u8 {
    match r.status {
        Status::Done => match r.exit_code {
            Some(c @ 0..=255) => c as u8,
            _ => exit::FAILED,
        },
        Status::Cancelled => exit::CANCELLED,
        _ if r
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("timed out")) =>
        {
            exit::TIMEOUT
        }
        _ => exit::FAILED,
    }
}

pub async fn run(conn: Conn, a: SubmitArgs) -> Result<u8, CliError> {
    let client = ApiClient::new(&conn.api_url);
    let commands = read_commands(&a)?;
    let mut body = serde_json::json!({ "vm_name": a.vm, "commands": commands });
    if let Some(t) = a.timeout {
        body["timeout"] = t.into();
    }
    if let Some(n) = a.retries {
        body["retries"] = n.into();
    }
    if let Some(p) = a.priority {
        body["priority"] = p.into();
    }
    if let Some(k) = a.keep_on_failure {
        body["keep_on_failure"] = k.into();
    }
    if let Some(u) = &a.callback_url {
        body["callback_url"] = u.clone().into();
    }
    if !a.artifacts.is_empty() {
        body["artifacts"] = a.artifacts.clone().into();
    }
    let post = client.request(reqwest::Method::POST, "/requests");
    // Files make it a multipart submission, each streamed from disk as it is sent.
    let post = if a.uploads.is_empty() {
        post.json(&body)
    } else {
        let prepared = a
            .uploads
            .iter()
            .map(upload::prepare)
            .collect::<Result<Vec<_>, _>>()?;
        let request = reqwest::multipart::Part::text(body.to_string())
            .mime_str("application/json")
            .map_err(|e| CliError::Protocol(e.to_string()))?;
        // Destinations go into the filename as they are: the server reads no %-escapes.
        let mut form = reqwest::multipart::Form::new()
            .percent_encode_noop()
            .part("request", request);
        for part in prepared {
            form = form.part("file", part);
        }
        post.multipart(form)
    };
    let created: Value = client.json(post).await?;
    let id: RequestId = created["uuid"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CliError::Protocol(format!("no uuid in {created}")))?;
    let wait = a.wait || a.follow || a.artifacts_dir.is_some();
    if a.json {
        println!("{created}");
    } else if a.follow {
        // Standard output carries the console only.
        eprintln!("submitted {id}");
    } else {
        println!("{id}");
    }
    if !wait {
        return Ok(0);
    }
    let started = Instant::now();
    let waited = async {
        if a.follow {
            let mut printer = LogPrinter::new(!a.json && std::io::stdout().is_terminal(), a.json);
            printer.split_streams = true;
            super::follow::follow(&client, id, None, |e| printer.print(e), |_| {}).await?;
        }
        poll_until_finished(&client, id, !a.follow && !a.json).await
    };
    let finished = tokio::select! {
        r = waited => r?,
        _ = tokio::signal::ctrl_c() => {
            clear_spinner();
            if a.detach {
                eprintln!("sqlite-sim: detached; request {id} keeps running");
            } else {
                // A cancel, not a DELETE: the logs of an interrupted CI job are worth keeping.
                client
                    .send(
                        client
                            .request(reqwest::Method::PUT, &format!("/requests/{id}/status"))
                            .json(&serde_json::json!({ "status": "cancelled" })),
                    )
                    .await?;
                eprintln!("sqlite-sim: interrupted; cancelled request {id}");
            }
            return Ok(exit::INTERRUPTED);
        }
    };
    clear_spinner();
    if a.json && !a.follow {
        println!("{}", serde_json::to_string(&finished).unwrap_or_default());
    }
    let code = exit_code_for(&finished);
    let how = match (&finished.status, finished.exit_code, &finished.error) {
        (Status::Done, Some(c), _) => format!("done, exit code {c}"),
        (_, _, Some(e)) => format!("{}: {e}", finished.status),
        (st, _, _) => st.to_string(),
    };
    if !a.json {
        eprintln!(
            "sqlite-sim: request {id} {how} ({})",
            render::human_secs(started.elapsed().as_secs_f64())
        );
    }
    if let Some(dir) = &a.artifacts_dir {
        let listed = artifacts::list(&client, id).await?;
        let done = artifacts::download(&client, id, &listed, dir).await?;
        if !a.json {
            eprintln!(
                "sqlite-sim: {} artifact(s) written under {}",
                done.written.len(),
                dir.display()
            );
        }
        // A job that asked for its artifacts and did not get them all fails (exit 1).
        done.report()?;
    }
    Ok(code)
}

/// Polls until the request is finished, with a progress line on a terminal.
async fn poll_until_finished(
    client: &ApiClient,
    id: RequestId,
    spinner: bool,
) -> Result<Request, CliError> {
    let spinner = spinner && std::io::stderr().is_terminal();
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let start = Instant::now();
    let mut unreachable_since: Option<Instant> = None;
    let mut told_kept = false;
    for i in 0.. {
        match client.get::<Request>(&format!("/requests/{id}")).await {
            Ok(r) if r.status.is_terminal() => return Ok(r),
            Ok(r) => {
                unreachable_since = None;
                if let (Some(until), false) = (&r.kept_until, told_kept) {
                    told_kept = true;
                    clear_spinner();
                    eprintln!(
                        "sqlite-sim: request {id} failed and its VM is kept until {until}; \
                         attach with:\n  sqlite-sim cli attach {id}\n\
                         and end it with: sqlite-sim cli release {id}"
                    );
                }
                if spinner {
                    eprint!(
                        "\r\x1b[2K{} {} {} ({})",
                        frames[i % frames.len()],
                        id.short(),
                        render::status_cell(&r),
                        render::human_secs(start.elapsed().as_secs_f64())
                    );
                    let _ = std::io::stderr().flush();
                }
            }
            // A restarting API is waited for, within reason.
            Err(e @ CliError::Unreachable { .. }) => {
                if unreachable_since.get_or_insert_with(Instant::now).elapsed()
                    > Duration::from_secs(60)
                {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    unreachable!("the loop only returns")
}

fn clear_spinner() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(status: Status, code: Option<i32>, error: Option<&str>) -> Request {
        let mut r: Request = serde_json::from_value(serde_json::json!({
            "uuid": "123e4567-e89b-12d3-a456-426614174000", "vm_name": "t", "commands": "x",
            "timeout": 1, "status": "pending", "created_at": "x", "updated_at": "x",
            "started_at": null, "finished_at": null, "exit_code": null, "error": null,
            "agent_id": null, "desired_status": null, "shutdown_step": null,
            "boot_ms": null, "run_ms": null, "shutdown_ms": null
        }))
        .unwrap();
        r.status = status;
        r.exit_code = code;
        r.error = error.map(String::from);
        r
    }

    #[test]
    fn exit_codes_tell_test_failures_from_infrastructure() {
        assert_eq!(exit_code_for(&req(Status::Done, Some(0), None)), 0);
        assert_eq!(exit_code_for(&req(Status::Done, Some(7), None)), 7);
        assert_eq!(
            exit_code_for(&req(Status::Failed, None, Some("timed out after 5 s"))),
            exit::TIMEOUT
        );
        assert_eq!(
            exit_code_for(&req(Status::Failed, None, Some("QEMU exited"))),
            exit::FAILED
        );
        assert_eq!(
            exit_code_for(&req(Status::Cancelled, None, None)),
            exit::CANCELLED
        );
    }
}
