//! Domain types shared by the store, the API and the agents: ids, states, log types.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;
use uuid::Uuid;

/// A request's id: a UUID, never a free-form string.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct RequestId(pub Uuid);

impl RequestId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
    /// The first 8 hex digits, for tables, run-dir names and log lines.
    pub fn short(&self) -> String {
        self.0.simple().to_string()[..8].to_string()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for RequestId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Identifies one agent (one claim loop) across processes: `host:pid:index`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentId(pub String);

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A capability label a host advertises and a request may require: 1-80 letters, digits,
/// '.', '_', '-' or ':', starting with a letter or digit (`kvm`, `accel:tcg`, `vm:tiny`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,79}$")]
pub struct Label(String);

/// Error for a label that is not well-formed.
#[derive(Debug, thiserror::Error)]
#[error("label {0:?} is invalid: use 1-80 letters, digits, '.', '_', '-' or ':', starting with a letter or digit")]
pub struct BadLabel(pub String);

impl Label {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Label {
    type Err = BadLabel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 80
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':'));
        if ok {
            Ok(Label(s.to_string()))
        } else {
            Err(BadLabel(s.chars().take(100).collect()))
        }
    }
}

impl TryFrom<String> for Label {
    type Error = BadLabel;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Submitted, waiting for an agent.
    #[default]
    Pending,
    /// Claimed by an agent, QEMU being prepared.
    Acknowledged,
    /// QEMU's vCPUs have been started.
    Running,
    /// Paused by an operator.
    Hold,
    /// The commands ran to completion (any exit code).
    Done,
    /// Infrastructure failure: see `error`.
    Failed,
    /// Cancelled by an operator.
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Acknowledged,
        Status::Running,
        Status::Hold,
        Status::Done,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Acknowledged => "acknowledged",
            Status::Running => "running",
            Status::Hold => "hold",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a status or log type name that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of: {expected}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub value: String,
    pub expected: String,
}

impl FromStr for Status {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "status",
                value: s.to_string(),
                expected: Status::ALL.map(Status::as_str).join(", "),
            })
    }
}

/// What a stored log chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogType {
    /// Console bytes before the commands start (firmware, kernel, init, login, session set-up).
    Boot,
    /// The submitted command text, exactly as submitted.
    Command,
    /// The commands' standard output, byte-exact.
    Stdout,
    /// The commands' standard error (second serial port), byte-exact.
    Stderr,
    /// Console bytes after the commands ended (the guest powering off).
    Shutdown,
    /// Supervisor steps and QMP events.
    System,
    /// Keystrokes typed into the console over `/requests/{uuid}/console`, one entry per
    /// batch: `who: bytes` with the bytes escaped (`\r`, `\x1b`, …), so who typed what stays
    /// on record.
    Input,
}

impl LogType {
    pub const ALL: [LogType; 7] = [
        LogType::Boot,
        LogType::Command,
        LogType::Stdout,
        LogType::Stderr,
        LogType::Shutdown,
        LogType::System,
        LogType::Input,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LogType::Boot => "boot",
            LogType::Command => "command",
            LogType::Stdout => "stdout",
            LogType::Stderr => "stderr",
            LogType::Shutdown => "shutdown",
            LogType::System => "system",
            LogType::Input => "input",
        }
    }
}

impl fmt::Display for LogType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogType {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "log type",
                value: s.to_string(),
                expected: LogType::ALL.map(LogType::as_str).join(", "),
            })
    }
}

/// How the VM of a finished run ended: the step of the shutdown ladder that stopped QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownStep {
    /// The guest powered itself off after QMP `system_powerdown` (ACPI).
    Powerdown,
    /// QMP `quit`.
    Quit,
    /// SIGTERM to QEMU's process group.
    Sigterm,
    /// SIGKILL to QEMU's process group.
    Sigkill,
    /// QEMU was already gone (crash, guest power-off or reset on its own).
    Exited,
}

impl ShutdownStep {
    /// How the VM ended, in words for the `system` log.
    pub fn describe(self) -> &'static str {
        match self {
            ShutdownStep::Powerdown => "guest powered off (ACPI)",
            ShutdownStep::Quit => "QMP quit",
            ShutdownStep::Sigterm => "SIGTERM",
            ShutdownStep::Sigkill => "SIGKILL",
            ShutdownStep::Exited => "QEMU had already exited",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownStep::Powerdown => "powerdown",
            ShutdownStep::Quit => "quit",
            ShutdownStep::Sigterm => "sigterm",
            ShutdownStep::Sigkill => "sigkill",
            ShutdownStep::Exited => "exited",
        }
    }
}

impl FromStr for ShutdownStep {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const ALL: [ShutdownStep; 5] = [
            ShutdownStep::Powerdown,
            ShutdownStep::Quit,
            ShutdownStep::Sigterm,
            ShutdownStep::Sigkill,
            ShutdownStep::Exited,
        ];
        ALL.into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "shutdown step",
                value: s.to_string(),
                expected: ALL.map(ShutdownStep::as_str).join(", "),
            })
    }
}

/// One request as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Request {
    pub uuid: RequestId,
    pub vm_name: String,
    pub commands: String,
    /// Seconds (a `u32`, so wider than `int32`).
    #[schema(format = Int64)]
    pub timeout: u32,
    pub status: Status,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub agent_id: Option<String>,
    pub desired_status: Option<Status>,
    pub shutdown_step: Option<ShutdownStep>,
    /// Milliseconds from starting the vCPUs to the shell prompt.
    pub boot_ms: Option<i64>,
    /// Milliseconds the commands ran (time held excluded).
    pub run_ms: Option<i64>,
    /// Milliseconds the shutdown ladder took.
    pub shutdown_ms: Option<i64>,
    /// How the submission asked to boot; `null` takes the VM's default (`WARM`).
    #[serde(default)]
    pub boot: Option<BootChoice>,
    /// How the guest really got to its prompt: `cold`, `warm` (restored from the VM's template)
    /// or `pool` (a clone restored ahead of time).
    #[serde(default)]
    pub boot_mode: Option<BootMode>,
    /// Milliseconds from starting QEMU to the restored guest's readiness (warm and pool).
    #[serde(default)]
    pub restore_ms: Option<i64>,
    /// Guest paths (globs) collected as artifacts after the commands.
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// How the commands' output travelled: `virtio` (the guest channel) or `console`.
    #[serde(default)]
    pub channel: Option<Channel>,
    /// Labels a host must have to claim it: the VM config's `REQUIRES` and the submission's
    /// `requires`, sorted.
    #[serde(default)]
    pub requires: Vec<Label>,
    /// The host (`SQLITE_SIM_HOST_ID`) whose agent claimed it last; null while never claimed.
    #[serde(default)]
    pub host: Option<String>,
    /// Why a `pending` request is not being picked up, when no live host can claim it now
    /// (e.g. `no live host has labels kvm (h2 last seen …)`); null otherwise.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Seconds a failed run's VM is kept for debugging (`keep_on_failure` of the submission).
    #[serde(default)]
    #[schema(format = Int64)]
    pub keep_on_failure: Option<u32>,
    /// While a failed run's VM is kept (the request stays `running`): when it is shut down
    /// at the latest. Stays set afterwards, as the record of when the keep was due to end.
    #[serde(default)]
    pub kept_until: Option<String>,
    /// Milliseconds the VM was kept after the failure, once the keep ended.
    #[serde(default)]
    pub kept_ms: Option<i64>,
    /// The principal (token name) that submitted it; null when authentication was off.
    #[serde(default)]
    pub submitted_by: Option<String>,
    /// Where the submission asked for its webhooks to go (see `webhooks`).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The webhook deliveries of its events, to `callback_url` and `SQLITE_SIM_WEBHOOK_URL`:
    /// shown by `GET /requests/{uuid}` only (absent from lists and from webhook bodies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<Vec<crate::webhooks::Delivery>>,
    /// How many times a run that fails for an infrastructure reason (QEMU exiting, a boot
    /// timeout, the agent lost) is re-queued: 0 to `MAX_RETRIES`.
    #[serde(default)]
    #[schema(format = Int64, maximum = 10)]
    pub retries: u32,
    /// Which run this is (or the last one was), from 1; at most `retries + 1`.
    #[serde(default = "first_attempt")]
    #[schema(format = Int64, minimum = 1)]
    pub attempt: u32,
    /// The earlier attempts that failed for an infrastructure reason and were re-queued,
    /// oldest first (the current attempt's outcome is in the fields above).
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// From -100 to 100 (default 0): claims take the highest first.
    #[serde(default)]
    #[schema(minimum = -100, maximum = 100)]
    pub priority: i32,
    /// While `pending`: its place in the claim order (1 = the next to be claimed by a host
    /// that can run every pending request), counting only pending requests; null otherwise.
    #[serde(default)]
    #[schema(format = Int64, minimum = 1)]
    pub queue_position: Option<u64>,
}

/// Most retries a submission may ask for.
pub const MAX_RETRIES: u32 = 10;

fn first_attempt() -> u32 {
    1
}

/// An attempt that failed for an infrastructure reason and was re-queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttemptRecord {
    #[schema(format = Int64, minimum = 1)]
    pub attempt: u32,
    /// Why it failed.
    pub error: String,
    /// The agent and host that ran it.
    pub agent_id: Option<String>,
    pub host: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: String,
}

/// Lowest `priority` a submission may have.
pub const MIN_PRIORITY: i32 = -100;
/// Highest `priority` a submission may have.
pub const MAX_PRIORITY: i32 = 100;

/// How a run's commands talk to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// virtio-serial ports: byte-exact and fast.
    Virtio,
    /// The serial console (guests without the virtio console driver).
    Console,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Virtio => "virtio",
            Channel::Console => "console",
        }
    }
}

impl FromStr for Channel {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Channel::Virtio, Channel::Console]
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "channel",
                value: s.to_string(),
                expected: "virtio, console".into(),
            })
    }
}

/// What a file carried into the guest becomes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UploadKind {
    /// Written as one file at its path.
    File,
    /// A tar archive, extracted into the directory at its path.
    Tar,
}

impl UploadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadKind::File => "file",
            UploadKind::Tar => "tar",
        }
    }
}

/// A file carried into a request's guest, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Upload {
    /// Store id of the file's bytes.
    #[serde(skip)]
    pub id: i64,
    /// Absolute guest path: the file, or the directory a tar is extracted into.
    pub path: String,
    pub kind: UploadKind,
    /// Mode bits of a single file (a tar's entries keep their own).
    pub mode: Option<u32>,
    pub size: u64,
    pub sha256: Option<String>,
}

/// A file collected from a request's guest, or one that was left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    /// Store id of the file's bytes.
    #[serde(skip)]
    pub id: i64,
    /// The file's path in the guest.
    pub path: String,
    pub size: u64,
    /// SHA-256 of the bytes stored (null when left out).
    pub sha256: Option<String>,
    pub mode: Option<u32>,
    /// Why the file was not stored (the limit, not a regular file, the guest stopped
    /// answering); null for a stored file.
    pub left_out: Option<String>,
}

/// A validated submission, ready to store. `Default` (empty names, no options) is for tests
/// and benchmarks, which name the fields they care about: the API fills in every field.
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    pub vm_name: String,
    pub commands: String,
    pub timeout: u32,
    pub boot: Option<BootChoice>,
    /// Staged uploads (store ids, see `Store::stage_upload`), in the order they are placed.
    pub uploads: Vec<i64>,
    /// Guest globs collected after the commands.
    pub artifacts: Vec<String>,
    /// Labels the claiming host must have (sorted, no duplicates).
    pub requires: Vec<Label>,
    /// Seconds to keep the VM after a failure, for debugging.
    pub keep_on_failure: Option<u32>,
    /// The principal submitting it (`None` with authentication off).
    pub submitted_by: Option<String>,
    /// The submission's `callback_url`, as shown.
    pub callback_url: Option<String>,
    /// Every URL its events are delivered to (`callback_url` and `SQLITE_SIM_WEBHOOK_URL`),
    /// decided and checked at submission and stored with it.
    pub webhook_urls: Vec<String>,
    /// Re-queues allowed after infrastructure failures.
    pub retries: u32,
    /// [`MIN_PRIORITY`]..=[`MAX_PRIORITY`], checked by the API.
    pub priority: i32,
}

/// How a submission asks its guest to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootChoice {
    /// Boot from the disk image, as without a template.
    Cold,
    /// Restore a clone of the VM's template (or take one from its pool); cold when there is
    /// no usable template yet.
    Warm,
}

/// How a run's guest got to its shell prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    Cold,
    Warm,
    Pool,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::Cold => "cold",
            BootMode::Warm => "warm",
            BootMode::Pool => "pool",
        }
    }
}

impl BootChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BootChoice::Cold => "cold",
            BootChoice::Warm => "warm",
        }
    }
}

impl FromStr for BootMode {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [BootMode::Cold, BootMode::Warm, BootMode::Pool]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "boot mode",
                value: s.to_string(),
                expected: "cold, warm, pool".into(),
            })
    }
}

impl FromStr for BootChoice {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [BootChoice::Cold, BootChoice::Warm]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "boot choice",
                value: s.to_string(),
                expected: "cold, warm".into(),
            })
    }
}

/// Where a VM's template stands on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TemplateState {
    /// No template (never built, deleted, or the VM is not `WARM`).
    #[default]
    None,
    /// Being built now.
    Building,
    /// Ready: warm requests restore clones of it.
    Ready,
    /// The last build or restore failed; see `error`.
    Failed,
}

impl TemplateState {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateState::None => "none",
            TemplateState::Building => "building",
            TemplateState::Ready => "ready",
            TemplateState::Failed => "failed",
        }
    }
}

impl FromStr for TemplateState {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            TemplateState::None,
            TemplateState::Building,
            TemplateState::Ready,
            TemplateState::Failed,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| UnknownName {
            kind: "template state",
            value: s.to_string(),
            expected: "none, building, ready, failed".into(),
        })
    }
}

/// One stored log chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub id: i64,
    /// The run it belongs to, from 1 (see `Request::attempt`).
    pub attempt: u32,
    pub timestamp: String,
    pub log_type: LogType,
    pub output: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        let err = "finished".parse::<Status>().unwrap_err().to_string();
        assert!(err.contains("pending, acknowledged"), "{err}");
    }

    #[test]
    fn log_type_names_round_trip() {
        for t in LogType::ALL {
            assert_eq!(t.as_str().parse::<LogType>().unwrap(), t);
        }
        assert!("STDOUT".parse::<LogType>().is_err());
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, [Status::Done, Status::Failed, Status::Cancelled]);
    }

    #[test]
    fn request_id_short_and_parse() {
        let id = RequestId::new();
        assert_eq!(id.short().len(), 8);
        assert!(id.to_string().starts_with(&id.short()));
        assert_eq!(id.to_string().parse::<RequestId>().unwrap(), id);
        assert!("not-a-uuid".parse::<RequestId>().is_err());
    }
}

/// What an operator's status change does to a request in a given state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Written at once; no VM is involved (the request is not claimed).
    Immediate(Status),
    /// Recorded as desired state; the agent that owns the VM applies it through QMP.
    Desired(Status),
    /// Not allowed from here; the allowed targets, possibly none.
    Refused(Vec<Status>),
}

/// Targets an operator may ask for.
pub const CONTROL_TARGETS: [Status; 4] = [
    Status::Hold,
    Status::Pending,
    Status::Running,
    Status::Cancelled,
];

/// The control state machine. `claimed`: an agent owns the request (a VM exists or is being
/// prepared); `desired`: a change already requested and not yet applied.
pub fn transition(
    current: Status,
    claimed: bool,
    desired: Option<Status>,
    target: Status,
) -> Transition {
    use Status::*;
    let verdict = |target| -> Option<Transition> {
        if desired == Some(Cancelled) {
            // A cancellation in progress is final.
            return (target == Cancelled).then_some(Transition::Desired(Cancelled));
        }
        match (current, claimed, target) {
            (Pending, _, Hold) => Some(Transition::Immediate(Hold)),
            (Pending, _, Cancelled) => Some(Transition::Immediate(Cancelled)),
            (Hold, false, Pending) => Some(Transition::Immediate(Pending)),
            (Hold, false, Cancelled) => Some(Transition::Immediate(Cancelled)),
            (Acknowledged | Running, _, Hold) => Some(Transition::Desired(Hold)),
            // Withdraws a hold the agent has not applied yet.
            (Acknowledged | Running, _, Running) if desired == Some(Hold) => {
                Some(Transition::Desired(Running))
            }
            (Hold, true, Running) => Some(Transition::Desired(Running)),
            (Acknowledged | Running | Hold, _, Cancelled) => Some(Transition::Desired(Cancelled)),
            _ => None,
        }
    };
    verdict(target).unwrap_or_else(|| {
        Transition::Refused(
            CONTROL_TARGETS
                .into_iter()
                .filter(|t| verdict(*t).is_some())
                .collect(),
        )
    })
}

#[cfg(test)]
mod transition_tests {
    use super::Status::*;
    use super::*;

    #[test]
    fn pending_can_be_held_and_cancelled_at_once() {
        assert_eq!(
            transition(Pending, false, None, Hold),
            Transition::Immediate(Hold)
        );
        assert_eq!(
            transition(Pending, false, None, Cancelled),
            Transition::Immediate(Cancelled)
        );
        assert_eq!(
            transition(Pending, false, None, Running),
            Transition::Refused(vec![Hold, Cancelled])
        );
    }

    #[test]
    fn unclaimed_hold_resumes_to_pending_only() {
        assert_eq!(
            transition(Hold, false, None, Pending),
            Transition::Immediate(Pending)
        );
        assert_eq!(
            transition(Hold, false, None, Running),
            Transition::Refused(vec![Pending, Cancelled])
        );
    }

    #[test]
    fn vm_states_go_through_the_agent() {
        for st in [Acknowledged, Running] {
            assert_eq!(transition(st, true, None, Hold), Transition::Desired(Hold));
            assert_eq!(
                transition(st, true, None, Cancelled),
                Transition::Desired(Cancelled)
            );
            assert_eq!(
                transition(st, true, None, Pending),
                Transition::Refused(vec![Hold, Cancelled])
            );
        }
        assert_eq!(
            transition(Hold, true, None, Running),
            Transition::Desired(Running)
        );
        assert_eq!(
            transition(Hold, true, None, Cancelled),
            Transition::Desired(Cancelled)
        );
        assert_eq!(
            transition(Hold, true, None, Pending),
            Transition::Refused(vec![Running, Cancelled])
        );
    }

    #[test]
    fn a_pending_hold_can_be_withdrawn() {
        assert_eq!(
            transition(Running, true, Some(Hold), Running),
            Transition::Desired(Running)
        );
    }

    #[test]
    fn cancellation_in_progress_is_final() {
        assert_eq!(
            transition(Running, true, Some(Cancelled), Hold),
            Transition::Refused(vec![Cancelled])
        );
        assert_eq!(
            transition(Running, true, Some(Cancelled), Cancelled),
            Transition::Desired(Cancelled)
        );
    }

    #[test]
    fn terminal_states_and_agent_only_targets_are_refused() {
        for st in [Done, Failed, Cancelled] {
            for target in Status::ALL {
                assert_eq!(
                    transition(st, true, None, target),
                    Transition::Refused(vec![]),
                    "{st} → {target}"
                );
            }
        }
        for target in [Done, Failed, Acknowledged] {
            assert!(matches!(
                transition(Running, true, None, target),
                Transition::Refused(_)
            ));
        }
    }
}
