//! Command line. Services and local checks live in [`service`]; the operator commands
//! (`cli …`, `submit`) talk to the REST API through [`client`], so they work against a remote
//! server exactly as against a local one.

pub mod artifacts;
mod attach;
mod client;
mod follow;
mod ops;
mod render;
mod service;
mod submit;
pub mod token;
mod upload;

use crate::config::Settings;
use crate::model::{LogType, Status};
use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

/// Exit codes of `submit --wait` and the operator commands, beyond the guest's own 0-255.
pub mod exit {
    /// Any other error (not found, ambiguous prefix, refused change, bad input).
    pub const ERROR: u8 = 1;
    /// The request ended `failed` (infrastructure: boot timeout, QEMU died, …).
    pub const FAILED: u8 = 240;
    /// The request ended `failed` because its timeout expired.
    pub const TIMEOUT: u8 = 241;
    /// The request ended `cancelled`.
    pub const CANCELLED: u8 = 242;
    /// The API could not be reached.
    pub const UNREACHABLE: u8 = 243;
    /// Interrupted with Ctrl-C (the request was cancelled unless `--detach`).
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, Parser)]
#[command(name = "sqlite-sim", version, about = "QMP-native QEMU VM supervisor")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API server and agents in one process (agents woken directly, no polling delay).
    All,
    /// The REST API server only.
    Api,
    /// The agents only (they poll the shared database).
    Agents,
    /// Print the effective settings and validate every VM config.
    Config,
    /// Check the database, QEMU, the accelerator and the VM images.
    Status,
    /// Boot a VM by hand with the agent's QEMU arguments, console on this terminal.
    Console {
        /// VM name (vm_configs/NAME.conf or vm_images/NAME.qcow2).
        name: String,
        /// Kill QEMU after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Operator commands over the REST API.
    Cli {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: CliCommand,
    },
    /// Submit commands to run in a VM; with --wait, exit with their exit code (for CI).
    Submit {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        args: submit::SubmitArgs,
    },
    /// Manage API tokens on the store directly (no API needed).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where the API is. The token comes from `SQLITE_SIM_API_TOKEN` (environment or `.env`), never
/// from a flag, so it does not show in `ps`.
#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// Base URL of the API.
    #[arg(
        long,
        env = "SQLITE_SIM_API_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub api_url: String,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// List requests, newest first.
    ListRequests {
        /// Only these statuses (repeatable).
        #[arg(long, value_parser = parse_status)]
        status: Vec<Status>,
        /// Only this VM.
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Everything about one request (a unique uuid prefix is enough).
    ShowRequest {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a request with its logs (an active one's VM is shut down first).
    DeleteRequest {
        id: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// A request's logs; raw bytes when piped, labelled and coloured on a terminal.
    ShowLogs {
        id: String,
        /// Only the last N entries.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_parser = parse_log_type)]
        log_type: Option<LogType>,
        /// Keep streaming until the request ends (like tail -f).
        #[arg(long, short)]
        follow: bool,
        /// JSON (a document, or JSON lines with --follow).
        #[arg(long)]
        json: bool,
    },
    /// Counts by status, VMs running, success rate, boot and run times, log volume.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a request.
    Cancel {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Hold a request: not started while pending, VM paused while running.
    Hold {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a held request.
    Resume {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Shut down a VM kept after a failure (keep_on_failure); the request keeps its outcome.
    Release {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The request's serial console in this terminal (raw mode); Ctrl-] detaches.
    Attach {
        id: String,
        /// Watch only; never type.
        #[arg(long)]
        read_only: bool,
    },
    /// A request's artifacts: a table, or with --out DIR downloaded to DIR/<guest path>.
    Artifacts {
        id: String,
        /// Download every stored artifact here (created if missing).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// The listing as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every agents host: live or not, slots in use, labels, agents, last heartbeat.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Every VM: valid or not, warm start, accelerator, template state and restore time.
    Vms {
        #[arg(long)]
        json: bool,
    },
    /// Build or delete a VM's warm-start template on every host.
    Template {
        #[command(subcommand)]
        action: TemplateAction,
    },
    /// Delete finished requests (and their logs) older than a duration: 30d, 12h, 90m, 3600s.
    Prune {
        #[arg(long, value_parser = parse_age)]
        older_than: u64,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TemplateAction {
    /// Order every host to build (or rebuild) the VM's template; needs WARM="on".
    Build {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Order every host to delete the VM's template.
    Delete {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `30d`, `12h`, `90m`, `45s` or plain seconds, as seconds.
fn parse_age(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30d, 12h, 90m or 3600s"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h, d or w")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn parse_status(s: &str) -> Result<Status, String> {
    s.parse()
        .map_err(|e: crate::model::UnknownName| e.to_string())
}

fn parse_log_type(s: &str) -> Result<LogType, String> {
    s.parse()
        .map_err(|e: crate::model::UnknownName| e.to_string())
}

/// Entry point used by `main`.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sqlite-sim",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Cli { conn, command } => client_runtime(|| ops::run(conn, command)),
        Command::Submit { conn, args } => client_runtime(|| submit::run(conn, args)),
        command => {
            let settings = match Settings::load() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sqlite-sim: configuration error: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = runtime(settings.api_workers)
                .and_then(|rt| rt.block_on(dispatch(command, settings)));
            match result {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("sqlite-sim: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs a client command; its errors are one line on stderr and a documented exit code.
fn client_runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<u8, client::CliError>>,
{
    let rt = match runtime(2) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sqlite-sim: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sqlite-sim: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(2))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::All => service::serve(settings, true, true).await,
        Command::Api => service::serve(settings, true, false).await,
        Command::Agents => service::serve(settings, false, true).await,
        Command::Status => service::status(&settings).await,
        Command::Config => service::print_config(&settings).await,
        Command::Console { name, timeout } => service::console(&settings, &name, timeout).await,
        Command::Token { command } => token::run(&settings, command).await,
        _ => unreachable!("client commands are dispatched in run()"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn api_url_is_accepted_before_and_after_the_subcommand() {
        for args in [
            &["sqlite-sim", "cli", "--api-url", "http://h:1", "stats"][..],
            &["sqlite-sim", "cli", "stats", "--api-url", "http://h:1"],
        ] {
            match Cli::parse_from(args).command {
                Command::Cli { conn, .. } => assert_eq!(conn.api_url, "http://h:1"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn ages() {
        assert_eq!(parse_age("30d"), Ok(30 * 86_400));
        assert_eq!(parse_age("12h"), Ok(12 * 3600));
        assert_eq!(parse_age("90m"), Ok(5400));
        assert_eq!(parse_age("45"), Ok(45));
        assert_eq!(parse_age("2w"), Ok(14 * 86_400));
        for bad in ["", "d", "3y", "-1d", "1.5h"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_and_log_types_are_checked_locally() {
        assert!(
            Cli::try_parse_from(["sqlite-sim", "cli", "list-requests", "--status", "paused"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["sqlite-sim", "cli", "show-logs", "x", "--log-type", "out"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["sqlite-sim", "cli", "list-requests", "--limit", "0"]).is_err()
        );
    }

    #[test]
    fn template_commands_take_a_name() {
        match Cli::parse_from(["sqlite-sim", "cli", "template", "delete", "tiny", "-y"]).command {
            Command::Cli {
                command:
                    CliCommand::Template {
                        action: TemplateAction::Delete { name, yes, json },
                    },
                ..
            } => assert_eq!((name.as_str(), yes, json), ("tiny", true, false)),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["sqlite-sim", "cli", "template", "build"]).is_err());
        assert!(Cli::try_parse_from(["sqlite-sim", "cli", "template", "rebuild", "x"]).is_err());
    }
}
