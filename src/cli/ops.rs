//! `sqlite-sim cli …`: list, show, delete, logs, stats, cancel/hold/resume, VMs and their
//! templates.

use super::client::{ApiClient, CliError, Controlled};
use super::render::{self, LogPrinter};
use super::{exit, CliCommand, Conn, TemplateAction};
use crate::api::vms::{Vm, VmList};
use crate::model::{LogType, Request, Status};
use serde_json::Value;
use std::io::{IsTerminal, Write};

pub async fn run(conn: Conn, command: CliCommand) -> Result<u8, CliError> {
    let client = ApiClient::new(&conn.api_url);
    match command {
        CliCommand::ListRequests {
            status,
            vm,
            limit,
            json,
        } => list(&client, &status, vm.as_deref(), limit, json).await,
        CliCommand::ShowRequest { id, json } => show(&client, &id, json).await,
        CliCommand::DeleteRequest { id, yes } => delete(&client, &id, yes).await,
        CliCommand::ShowLogs {
            id,
            limit,
            log_type,
            follow,
            json,
        } => logs(&client, &id, limit, log_type, follow, json).await,
        CliCommand::Stats { json } => stats(&client, json).await,
        CliCommand::Cancel { id, json } => control(&client, &id, Action::Cancel, json).await,
        CliCommand::Hold { id, json } => control(&client, &id, Action::Hold, json).await,
        CliCommand::Resume { id, json } => control(&client, &id, Action::Resume, json).await,
        CliCommand::Release { id, json } => control(&client, &id, Action::Release, json).await,
        CliCommand::Attach { id, read_only } => {
            super::attach::attach(&client, &id, read_only).await
        }
        CliCommand::Prune {
            older_than,
            dry_run,
            json,
        } => prune(&client, older_than, dry_run, json).await,
        CliCommand::Artifacts { id, out, json } => {
            super::artifacts::run(&client, &id, out.as_deref(), json).await
        }
        CliCommand::Vms { json } => vms(&client, json).await,
        CliCommand::Hosts { json } => hosts(&client, json).await,
        CliCommand::Template { action } => template(&client, action).await,
    }
}

async fn hosts(client: &ApiClient, json: bool) -> Result<u8, CliError> {
    let v: Value = client.get("/hosts").await?;
    if json {
        print_json(&v)?;
        return Ok(0);
    }
    let hosts: Vec<crate::store::Host> = serde_json::from_value(v["hosts"].clone())
        .map_err(|e| CliError::Protocol(e.to_string()))?;
    if hosts.is_empty() {
        eprintln!("(no hosts: no agents process has reported to this store yet)");
    }
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.host_id.clone(),
                if h.live { "live" } else { "down" }.into(),
                format!("{}/{}", h.slots_in_use, h.max_concurrent_vms),
                h.last_heartbeat.clone(),
                h.agents.join(","),
                h.labels
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "HOST",
                "STATE",
                "SLOTS",
                "LAST HEARTBEAT",
                "AGENTS",
                "LABELS"
            ],
            &rows
        )
    );
    Ok(0)
}

async fn vms(client: &ApiClient, json: bool) -> Result<u8, CliError> {
    let v: Value = client.get("/vms").await?;
    if json {
        print_json(&v)?;
        return Ok(0);
    }
    let list: VmList = serde_json::from_value(v).map_err(|e| CliError::Protocol(e.to_string()))?;
    if list.vms.is_empty() {
        eprintln!("(no VMs: the server has no VM configs or images)");
    }
    print!("{}", render::vm_table(&list.vms));
    Ok(0)
}

/// `/vms/NAME/template`. A name is checked here as the server would check it: valid names need
/// no escaping, and a URL library would turn `..` into a different path.
fn template_path(name: &str) -> Result<String, CliError> {
    if !crate::config::vm::is_valid_vm_name(name) {
        return Err(CliError::Input(format!(
            "{name:?} is not a VM name: use 1-64 letters, digits, '.', '_' or '-', starting \
             with a letter or digit"
        )));
    }
    Ok(format!("/vms/{name}/template"))
}

async fn template(client: &ApiClient, action: TemplateAction) -> Result<u8, CliError> {
    let (path, json, building) = match action {
        TemplateAction::Build { name, json } => (template_path(&name)?, json, true),
        TemplateAction::Delete { name, yes, json } => {
            let path = template_path(&name)?;
            if !yes
                && std::io::stdin().is_terminal()
                && !confirm(&format!("Delete VM {name}'s template on every host?"))?
            {
                eprintln!("nothing done");
                return Ok(exit::ERROR);
            }
            (path, json, false)
        }
    };
    let method = if building {
        reqwest::Method::POST
    } else {
        reqwest::Method::DELETE
    };
    let vm: Vm = client.json(client.request(method, &path)).await?;
    if json {
        print_json(&vm)?;
        return Ok(0);
    }
    let (what, n) = if building {
        ("build", vm.template.orders.build)
    } else {
        ("deletion", vm.template.orders.delete)
    };
    println!(
        "{}: template {what} ordered (order {n}); each host's agents carry it out, \
         `sqlite-sim cli vms` shows the progress",
        vm.name
    );
    println!("now: {}", render::template_line(&vm.template));
    Ok(0)
}

async fn prune(
    client: &ApiClient,
    older_than: u64,
    dry_run: bool,
    json: bool,
) -> Result<u8, CliError> {
    let req = client
        .request(reqwest::Method::POST, "/prune")
        .json(&serde_json::json!({ "older_than_seconds": older_than, "dry_run": dry_run }));
    let v: Value = client.json(req).await?;
    if json {
        print_json(&v)?;
    } else {
        println!(
            "{} {} finished requests ({:.1} MiB of logs) that finished before {}",
            if dry_run { "would delete" } else { "deleted" },
            v["requests"],
            v["log_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0,
            v["finished_before"].as_str().unwrap_or("?")
        );
        if !dry_run && v["requests"].as_u64().unwrap_or(0) > 0 {
            eprintln!("(the database file shrinks only after VACUUM; see the README)");
        }
    }
    Ok(0)
}

fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(|e| CliError::Protocol(e.to_string()))?;
    writeln!(out)?;
    Ok(())
}

async fn list(
    client: &ApiClient,
    statuses: &[Status],
    vm: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<u8, CliError> {
    let mut q: Vec<(&str, String)> = statuses.iter().map(|s| ("status", s.to_string())).collect();
    if let Some(vm) = vm {
        q.push(("vm_name", vm.to_string()));
    }
    q.push(("limit", limit.to_string()));
    let req = client.request(reqwest::Method::GET, "/requests").query(&q);
    let page: Value = client.json(req).await?;
    if json {
        print_json(&page)?;
        return Ok(0);
    }
    let requests: Vec<Request> = serde_json::from_value(page["requests"].clone())
        .map_err(|e| CliError::Protocol(e.to_string()))?;
    let rows: Vec<Vec<String>> = requests
        .iter()
        .map(|r| {
            vec![
                r.uuid.short(),
                r.vm_name.clone(),
                render::status_cell(r),
                render::exit_cell(r),
                render::attempt_cell(r),
                r.host.clone().unwrap_or_else(|| "-".into()),
                r.priority.to_string(),
                r.queue_position
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                render::age(r),
                render::duration(r),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "UUID", "VM", "STATUS", "EXIT", "ATTEMPT", "HOST", "PRIO", "QUEUE", "AGE",
                "DURATION"
            ],
            &rows
        )
    );
    let total = page["total"].as_u64().unwrap_or(0);
    if total > requests.len() as u64 {
        eprintln!("({} of {total} shown; --limit raises it)", requests.len());
    }
    Ok(0)
}

async fn show(client: &ApiClient, id: &str, json: bool) -> Result<u8, CliError> {
    let r = client.resolve(id).await?;
    if json {
        print_json(&r)?;
        return Ok(0);
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let ms = |v: Option<i64>| {
        v.map(|m| format!("{:.2} s", m as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    let mut lines = vec![
        ("uuid", r.uuid.to_string()),
        ("vm", r.vm_name.clone()),
        ("status", render::status_cell(&r)),
        (
            "exit code",
            r.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("attempt", render::attempt_cell(&r)),
        ("timeout", format!("{} s", r.timeout)),
        ("priority", r.priority.to_string()),
        (
            "queue",
            r.queue_position
                .map(|p| format!("position {p}"))
                .unwrap_or_else(|| "-".into()),
        ),
        ("created", r.created_at.clone()),
        ("started", opt(&r.started_at)),
        ("finished", opt(&r.finished_at)),
        ("duration", render::duration(&r)),
        ("boot", ms(r.boot_ms)),
        ("run", ms(r.run_ms)),
        (
            "shutdown",
            match r.shutdown_step {
                Some(step) => format!("{} in {}", step.as_str(), ms(r.shutdown_ms)),
                None => "-".into(),
            },
        ),
        ("agent", opt(&r.agent_id)),
    ];
    if let Some(e) = &r.error {
        lines.push(("error", e.clone()));
    }
    for a in &r.attempts {
        let host = a.host.as_deref().unwrap_or("-");
        lines.push((
            "retried",
            format!("attempt {} on {host}: {}", a.attempt, a.error),
        ));
    }
    for (k, v) in lines {
        println!("{k:<10} {v}");
    }
    println!("commands:");
    for l in r.commands.lines() {
        println!("  {l}");
    }
    Ok(0)
}

fn confirm(question: &str) -> Result<bool, CliError> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn delete(client: &ApiClient, id: &str, yes: bool) -> Result<u8, CliError> {
    let r = client.resolve(id).await?;
    let finished = r.status.is_terminal();
    if !yes && std::io::stdin().is_terminal() {
        let q = if finished {
            format!("Delete request {} and its logs?", r.uuid)
        } else {
            format!(
                "Request {} is {}: stop it and delete it with its logs? (`cancel` keeps them)",
                r.uuid, r.status
            )
        };
        if !confirm(&q)? {
            eprintln!("nothing done");
            return Ok(exit::ERROR);
        }
    }
    let resp = client
        .send(client.request(reqwest::Method::DELETE, &format!("/requests/{}", r.uuid)))
        .await?;
    if resp.status() == reqwest::StatusCode::NO_CONTENT {
        println!("deleted {}", r.uuid);
    } else {
        println!("deleting {}: its VM is being shut down", r.uuid);
    }
    Ok(0)
}

async fn logs(
    client: &ApiClient,
    id: &str,
    limit: Option<usize>,
    log_type: Option<LogType>,
    follow: bool,
    json: bool,
) -> Result<u8, CliError> {
    let r = client.resolve(id).await?;
    let pretty = !json && std::io::stdout().is_terminal();
    if follow {
        let mut printer = LogPrinter::new(pretty, json);
        super::follow::follow(client, r.uuid, log_type, |e| printer.print(e), |_| {}).await?;
        return Ok(0);
    }
    // Page through everything, keeping only the last `limit` entries.
    let mut kept: std::collections::VecDeque<Value> = Default::default();
    let mut after = 0i64;
    loop {
        let mut q = vec![("after", after.to_string()), ("limit", "1000".to_string())];
        if let Some(t) = log_type {
            q.push(("log_type", t.to_string()));
        }
        let req = client
            .request(reqwest::Method::GET, &format!("/requests/{}/logs", r.uuid))
            .query(&q);
        let page: Vec<Value> = client.json(req).await?;
        let n = page.len();
        for e in page {
            after = e["id"].as_i64().unwrap_or(after);
            kept.push_back(e);
            if limit.is_some_and(|l| kept.len() > l) {
                kept.pop_front();
            }
        }
        if n < 1000 {
            break;
        }
    }
    if json {
        print_json(&kept)?;
        return Ok(0);
    }
    let mut printer = LogPrinter::new(pretty, false);
    for e in &kept {
        printer.print(e)?;
    }
    Ok(0)
}

async fn stats(client: &ApiClient, json: bool) -> Result<u8, CliError> {
    let s: Value = client.get("/stats").await?;
    if json {
        print_json(&s)?;
        return Ok(0);
    }
    let by: Vec<String> = Status::ALL
        .iter()
        .map(|st| format!("{st} {}", s["by_status"][st.as_str()].as_u64().unwrap_or(0)))
        .collect();
    let secs = |v: &Value| {
        v.as_f64()
            .map(|ms| format!("{:.2} s", ms / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!("requests      {}", by.join(", "));
    println!("vms running   {}", s["vms_running"]);
    println!(
        "success rate  {}",
        s["success_rate"]
            .as_f64()
            .map(|r| format!("{:.1}% of {} finished", r * 100.0, s["finished"]))
            .unwrap_or_else(|| "- (nothing finished yet)".into())
    );
    for (name, key) in [("boot time", "boot"), ("run time", "run")] {
        println!(
            "{name:<13} mean {}, p95 {} ({} runs)",
            secs(&s[key]["mean_ms"]),
            secs(&s[key]["p95_ms"]),
            s[key]["count"]
        );
    }
    println!(
        "log volume    {:.1} MiB",
        s["log_bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0
    );
    Ok(0)
}

#[derive(Clone, Copy)]
enum Action {
    Cancel,
    Hold,
    Resume,
    Release,
}

async fn control(client: &ApiClient, id: &str, action: Action, json: bool) -> Result<u8, CliError> {
    let r = client.resolve(id).await?;
    let (target, verb) = match action {
        Action::Cancel => (Status::Cancelled.as_str(), "cancel"),
        Action::Hold => (Status::Hold.as_str(), "hold"),
        // Resuming a request that has no VM yet re-queues it; a paused VM continues.
        Action::Resume if r.agent_id.is_none() => (Status::Pending.as_str(), "resume"),
        Action::Resume => (Status::Running.as_str(), "resume"),
        Action::Release => ("release", "release"),
    };
    let req = client
        .request(
            reqwest::Method::PUT,
            &format!("/requests/{}/status", r.uuid),
        )
        .json(&serde_json::json!({ "status": target }));
    let c: Controlled = client.json(req).await?;
    if json {
        print_json(&serde_json::json!({ "request": c.request, "applied": c.applied }))?;
    } else {
        report_control(&c, verb);
    }
    Ok(0)
}

fn report_control(c: &Controlled, verb: &str) {
    let r = &c.request;
    if c.applied {
        println!("{verb}: {} is now {}", r.uuid, r.status);
    } else {
        println!(
            "{verb}: requested for {} (now {}); its agent applies it shortly",
            r.uuid, r.status
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_paths_take_vm_names_only() {
        assert_eq!(template_path("tiny").unwrap(), "/vms/tiny/template");
        for bad in ["..", "a/b", "", "a b", "-x"] {
            assert!(
                matches!(template_path(bad), Err(CliError::Input(_))),
                "{bad:?}"
            );
        }
    }
}
