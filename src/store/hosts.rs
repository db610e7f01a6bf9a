//! The host registry: every agents process reports its host, labels, VMs and agents, and
//! renews the report with its leases' cadence. The registry answers `GET /hosts`, decides
//! whether a submission's labels can ever be met ([`place`]), and says why a pending request
//! waits.
//!
//! One row per agents process (`host:pid`), so several processes of one host do not
//! overwrite each other; rows of a host's earlier, dead processes are dropped when a new one
//! reports, so a host's labels are those it reported last.

use super::{Store, StoreError};
use crate::model::{AgentId, Label};
use crate::timefmt;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use utoipa::ToSchema;

/// What an agents process says about itself.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// `host:pid`: one agents process.
    pub process: String,
    pub host_id: String,
    /// Configured and automatic labels.
    pub labels: Vec<Label>,
    /// VMs this host can run (valid configs with their images).
    pub vms: Vec<String>,
    pub agents: Vec<AgentId>,
    pub max_vms: usize,
    /// The report counts as live this long after it was made.
    pub lease: Duration,
}

/// Who claims: the host and the labels it has.
#[derive(Debug, Clone)]
pub struct Capabilities {
    pub host_id: String,
    pub labels: Vec<Label>,
}

/// One host as `GET /hosts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    /// `SQLITE_SIM_HOST_ID` of its agents processes.
    pub host_id: String,
    /// Some agents process of it reported within its lease and has not stopped.
    pub live: bool,
    /// Labels it advertises: `SQLITE_SIM_AGENT_LABELS` plus `accel:kvm`/`accel:tcg` and
    /// `vm:NAME` per VM it can run (of its live processes; of its last one when down).
    pub labels: Vec<Label>,
    /// VMs it can run.
    pub vms: Vec<String>,
    /// Agent ids (`host:pid:index`) of its live processes (of its last one when down).
    pub agents: Vec<String>,
    /// Requests claimed by it and not finished.
    #[schema(format = Int64)]
    pub slots_in_use: u64,
    /// Its `SQLITE_SIM_MAX_CONCURRENT_VMS`.
    #[schema(format = Int64)]
    pub max_concurrent_vms: u64,
    /// Its latest report (RFC 3339).
    pub last_heartbeat: String,
}

/// Whether a set of required labels can be met by the registered hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No host has ever reported (an API started before its agents): nothing to judge by.
    NoHosts,
    /// A live host has every label.
    Live,
    /// Hosts with every label are known, but none is live now: the words say which.
    Down(String),
    /// No registered host has every label: the words name what is missing.
    Impossible(String),
}

/// Judges `requires` against `hosts`. Pure, so both engines share it.
pub fn place(requires: &[Label], hosts: &[Host]) -> Placement {
    if hosts.is_empty() {
        return Placement::NoHosts;
    }
    let has_all = |h: &Host| requires.iter().all(|l| h.labels.contains(l));
    let capable: Vec<&Host> = hosts.iter().filter(|h| has_all(h)).collect();
    let what = || {
        if requires.is_empty() {
            "no live host".to_string()
        } else {
            format!("no live host has labels {}", join(requires))
        }
    };
    if capable.iter().any(|h| h.live) {
        return Placement::Live;
    }
    if !capable.is_empty() {
        let seen: Vec<String> = capable
            .iter()
            .map(|h| format!("{} last seen {}", h.host_id, h.last_heartbeat))
            .collect();
        return Placement::Down(format!("{} ({})", what(), seen.join("; ")));
    }
    let lacks: Vec<String> = hosts
        .iter()
        .map(|h| {
            let missing: Vec<Label> = requires
                .iter()
                .filter(|l| !h.labels.contains(l))
                .cloned()
                .collect();
            format!("{} lacks {}", h.host_id, join(&missing))
        })
        .collect();
    Placement::Impossible(format!(
        "no registered host has labels {}: {}",
        join(requires),
        lacks.join("; ")
    ))
}

fn join(labels: &[Label]) -> String {
    labels
        .iter()
        .map(Label::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Placement {
    /// What a pending request's `waiting_for` says under this placement.
    pub fn waiting_for(self) -> Option<String> {
        match self {
            Placement::Live => None,
            Placement::NoHosts => Some("no agents host has reported yet".into()),
            Placement::Down(why) | Placement::Impossible(why) => Some(why),
        }
    }
}

/// How long reads reuse the host registry to say why pending requests wait: the registry
/// changes at heartbeat pace (seconds), so a quarter of a second of staleness costs nothing,
/// and a `GET` of a pending request is one query instead of two (on PostgreSQL, one round
/// trip instead of three).
const HOSTS_FRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// The host registry as last read for `waiting_for`, reused for [`HOSTS_FRESH`]. Placement of a
/// new submission (its `422`) always reads the registry afresh, and this process's own reports
/// make it read afresh at once.
#[derive(Default)]
pub(super) struct HostsCache(
    std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Vec<Host>>)>>,
);

impl HostsCache {
    /// The registry if it was read less than [`HOSTS_FRESH`] ago.
    pub fn fresh(&self) -> Option<std::sync::Arc<Vec<Host>>> {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|(at, _)| at.elapsed() < HOSTS_FRESH)
            .map(|(_, hosts)| hosts.clone())
    }

    /// Forgets the registry: this process just changed it.
    pub fn forget(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Keeps `hosts`, just read; what to use.
    pub fn keep(&self, hosts: Vec<Host>) -> std::sync::Arc<Vec<Host>> {
        let hosts = std::sync::Arc::new(hosts);
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), hosts.clone()));
        hosts
    }
}

/// Whether any of `reqs` is pending: only then do reads need the registry (why it waits) and the
/// head of the queue (its position).
pub(super) fn any_pending(reqs: &[crate::model::Request]) -> bool {
    reqs.iter()
        .any(|r| r.status == crate::model::Status::Pending)
}

/// Fills in why each pending request of `reqs` waits, judged against `hosts`.
pub(super) fn say_why(reqs: &mut [crate::model::Request], hosts: &[Host]) {
    for r in reqs
        .iter_mut()
        .filter(|r| r.status == crate::model::Status::Pending)
    {
        r.waiting_for = place(&r.requires, hosts).waiting_for();
    }
}

pub(super) fn labels_json(labels: &[Label]) -> String {
    serde_json::to_string(labels).expect("labels serialise")
}

/// A report's `labels`, `vms` and `agents` as the JSON arrays both engines store.
pub(super) fn report_json(r: &HostReport) -> (String, String, String) {
    let agents: Vec<&str> = r.agents.iter().map(|a| a.0.as_str()).collect();
    (
        labels_json(&r.labels),
        serde_json::to_string(&r.vms).expect("json"),
        serde_json::to_string(&agents).expect("json"),
    )
}

/// One agents process's row of `agent_processes`, as both engines read it.
pub(super) struct ProcessRow {
    pub host_id: String,
    pub labels: String,
    pub vms: String,
    pub agents: String,
    pub max_vms: i64,
    pub last_seen: String,
    /// Not stopped, and reported within its lease.
    pub live: bool,
}

/// The registry as hosts, from its process rows ordered by host, newest report first, and
/// each host's unfinished claims (`in_use`, by host id; absent is none). Engine-neutral.
pub(super) fn group_hosts(
    rows: &[ProcessRow],
    in_use: &HashMap<String, i64>,
) -> Result<Vec<Host>, StoreError> {
    let bad = |e: serde_json::Error| StoreError::Corrupt(format!("agent_processes: {e}"));
    let mut hosts: Vec<Host> = Vec::new();
    for group in rows.chunk_by(|a, b| a.host_id == b.host_id) {
        let live_rows: Vec<&ProcessRow> = group.iter().filter(|r| r.live).collect();
        // Live processes speak for the host; a host that is down is shown as it last was.
        let shown: Vec<&ProcessRow> = if live_rows.is_empty() {
            vec![&group[0]]
        } else {
            live_rows
        };
        let (mut labels, mut vms, mut agents) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
        for r in &shown {
            labels.extend(serde_json::from_str::<Vec<Label>>(&r.labels).map_err(bad)?);
            vms.extend(serde_json::from_str::<Vec<String>>(&r.vms).map_err(bad)?);
            agents.extend(serde_json::from_str::<Vec<String>>(&r.agents).map_err(bad)?);
        }
        let id = &group[0].host_id;
        hosts.push(Host {
            live: group.iter().any(|r| r.live),
            labels: labels.into_iter().collect(),
            vms: vms.into_iter().collect(),
            agents,
            slots_in_use: in_use.get(id).copied().unwrap_or(0).max(0) as u64,
            max_concurrent_vms: shown.iter().map(|r| r.max_vms).max().unwrap_or(0).max(0) as u64,
            last_heartbeat: group[0].last_seen.clone(),
            host_id: id.clone(),
        });
    }
    Ok(hosts)
}

/// The registry as hosts, from the rows of their processes; `slots` counts each host's
/// unfinished claims (placement needs only labels and liveness, so it skips that).
pub(super) fn hosts_in(c: &Connection, slots: bool) -> Result<Vec<Host>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT host_id, labels, vms, agents, max_vms, last_seen,
                stopped = 0 AND live_until >= ?1
         FROM agent_processes ORDER BY host_id, last_seen DESC",
    )?;
    let rows = stmt
        .query_map([timefmt::now()], |r| {
            Ok(ProcessRow {
                host_id: r.get(0)?,
                labels: r.get(1)?,
                vms: r.get(2)?,
                agents: r.get(3)?,
                max_vms: r.get(4)?,
                last_seen: r.get(5)?,
                live: r.get(6)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let in_use: HashMap<String, i64> = if slots {
        c.prepare_cached(
            "SELECT host_id, COUNT(*) FROM requests
             WHERE host_id IS NOT NULL AND status IN ('acknowledged','running','hold')
             GROUP BY host_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?
    } else {
        HashMap::new()
    };
    group_hosts(&rows, &in_use)
}

impl Store {
    /// Records (or renews) an agents process's report. Rows of the same host's earlier
    /// processes that are no longer live are dropped: they were previous lives of this host.
    pub async fn report_host(&self, r: HostReport) -> Result<(), StoreError> {
        on_pg!(self.report_host(r));
        self.call_write(move |c| {
            let now_t = time::OffsetDateTime::now_utc();
            let now = timefmt::format(now_t);
            let until = timefmt::format(now_t + r.lease);
            let (labels, vms, agents) = report_json(&r);
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM agent_processes WHERE host_id = ?1 AND process <> ?2
                   AND (stopped = 1 OR live_until < ?3)",
                params![r.host_id, r.process, now],
            )?;
            tx.execute(
                "INSERT INTO agent_processes (process, host_id, labels, vms, agents, max_vms,
                                              live_until, started_at, last_seen, stopped)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, 0)
                 ON CONFLICT (process) DO UPDATE SET host_id = ?2, labels = ?3, vms = ?4,
                     agents = ?5, max_vms = ?6, live_until = ?7, last_seen = ?8, stopped = 0",
                params![
                    r.process,
                    r.host_id,
                    labels,
                    vms,
                    agents,
                    r.max_vms as i64,
                    until,
                    now
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
        .inspect(|_| {
            self.inner.hosts.forget();
            self.bump()
        })
    }

    /// An agents process stopping: its host is no longer live through it.
    pub async fn host_stopped(&self, process: String) -> Result<(), StoreError> {
        on_pg!(self.host_stopped(process));
        self.call_write(move |c| {
            c.execute(
                "UPDATE agent_processes SET stopped = 1, last_seen = ?1 WHERE process = ?2",
                params![timefmt::now(), process],
            )?;
            Ok(())
        })
        .await
        .inspect(|_| {
            self.inner.hosts.forget();
            self.bump()
        })
    }

    /// Every registered host, by id.
    pub async fn hosts(&self) -> Result<Vec<Host>, StoreError> {
        on_pg!(self.hosts());
        self.call(|c| hosts_in(c, true)).await
    }

    /// Whether the registered hosts can meet `requires` ([`place`]).
    pub async fn placement(&self, requires: Vec<Label>) -> Result<Placement, StoreError> {
        on_pg!(self.placement(requires));
        self.call(move |c| Ok(place(&requires, &hosts_in(c, false)?)))
            .await
    }

    /// Whether a pending request this host could claim exists: a cheap read that decides
    /// whether a wake-up is worth a claim (a write transaction).
    pub fn claimable_exists(&self, caps: &Capabilities) -> Result<bool, StoreError> {
        if let Some(pg) = &self.pg {
            return Ok(pg.claimable_exists(caps));
        }
        let labels = labels_json(&caps.labels);
        self.call_point_read(move |c| {
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM requests WHERE status = 'pending' AND {ELIGIBLE})"
            );
            Ok(c.prepare_cached(&sql)?
                .query_row(params![labels], |r| r.get(0))?)
        })
    }
}

/// The claim filter: every label the request requires is among the claimer's labels (bound
/// as a JSON array at `?1`). SQLite's `json_each` here; PostgreSQL would use `<@` on arrays.
pub(super) const ELIGIBLE: &str = "(requires IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_each(requests.requires) AS need
        WHERE need.value NOT IN (SELECT value FROM json_each(?1))))";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NewRequest;
    use crate::store::test_support::temp_store;

    fn l(s: &str) -> Label {
        s.parse().unwrap()
    }

    fn report(host: &str, pid: u32, labels: &[&str], lease: Duration) -> HostReport {
        HostReport {
            process: format!("{host}:{pid}"),
            host_id: host.into(),
            labels: labels.iter().map(|s| l(s)).collect(),
            vms: vec!["tiny".into()],
            agents: vec![AgentId(format!("{host}:{pid}:0"))],
            max_vms: 3,
            lease,
        }
    }

    fn needing(labels: &[&str]) -> NewRequest {
        NewRequest {
            vm_name: "tiny".into(),
            commands: "x".into(),
            timeout: 5,
            requires: labels.iter().map(|s| l(s)).collect(),
            ..Default::default()
        }
    }

    fn caps(host: &str, labels: &[&str]) -> Capabilities {
        Capabilities {
            host_id: host.into(),
            labels: labels.iter().map(|s| l(s)).collect(),
        }
    }

    #[tokio::test]
    async fn claims_only_what_the_host_can_run_oldest_first() {
        let (s, _d) = temp_store().await;
        let kvm = s.create(needing(&["kvm"])).await.unwrap();
        let plain = s.create(needing(&[])).await.unwrap();
        let both = s.create(needing(&["kvm", "big"])).await.unwrap();
        let lease = Duration::from_secs(30);
        let small = caps("h1", &["accel:tcg"]);
        let a1 = AgentId("h1:1:0".into());
        assert!(s.claimable_exists(&small).unwrap());
        let got = s.claim_as(&a1, &small, lease).await.unwrap().unwrap();
        assert_eq!(
            got.uuid, plain.uuid,
            "the oldest it can run, not the oldest"
        );
        assert_eq!(got.host.as_deref(), Some("h1"));
        assert!(s.claim_as(&a1, &small, lease).await.unwrap().is_none());
        assert!(!s.claimable_exists(&small).unwrap());
        let big = caps("h2", &["kvm", "big", "x"]);
        let a2 = AgentId("h2:1:0".into());
        let first = s.claim_as(&a2, &big, lease).await.unwrap().unwrap();
        assert_eq!(first.uuid, kvm.uuid);
        assert_eq!(first.requires, [l("kvm")]);
        let second = s.claim_as(&a2, &big, lease).await.unwrap().unwrap();
        assert_eq!(second.uuid, both.uuid);
        assert_eq!(second.requires, [l("big"), l("kvm")], "sorted");
        assert_eq!(second.host.as_deref(), Some("h2"));
    }

    #[tokio::test]
    async fn registry_liveness_and_placement() {
        let (s, _d) = temp_store().await;
        assert_eq!(
            place(&[l("kvm")], &s.hosts().await.unwrap()),
            Placement::NoHosts
        );
        s.report_host(report("h1", 1, &["big"], Duration::from_secs(30)))
            .await
            .unwrap();
        s.report_host(report("h2", 7, &["kvm"], Duration::from_millis(1)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let hosts = s.hosts().await.unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!((hosts[0].host_id.as_str(), hosts[0].live), ("h1", true));
        assert_eq!((hosts[1].host_id.as_str(), hosts[1].live), ("h2", false));
        assert_eq!(hosts[0].agents, ["h1:1:0"]);
        assert_eq!(hosts[0].max_concurrent_vms, 3);
        assert_eq!(place(&[l("big")], &hosts), Placement::Live);
        assert_eq!(place(&[], &hosts), Placement::Live);
        match place(&[l("kvm")], &hosts) {
            Placement::Down(why) => {
                assert!(
                    why.starts_with("no live host has labels kvm (h2 last seen "),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        match place(&[l("kvm"), l("big")], &hosts) {
            Placement::Impossible(why) => assert_eq!(
                why,
                "no registered host has labels kvm, big: h1 lacks kvm; h2 lacks big"
            ),
            other => panic!("{other:?}"),
        }
        // A pending request that only the down host can run says why it waits.
        let r = s.create(needing(&["kvm"])).await.unwrap();
        let got = s.get(r.uuid).await.unwrap().unwrap();
        assert!(
            got.waiting_for.as_deref().unwrap().contains("h2 last seen"),
            "{got:?}"
        );
        let none = s.create(needing(&["big"])).await.unwrap();
        assert_eq!(s.get(none.uuid).await.unwrap().unwrap().waiting_for, None);
        // h2 comes back as a new process: its old row goes, it is live again.
        s.report_host(report("h2", 8, &["kvm"], Duration::from_secs(30)))
            .await
            .unwrap();
        let hosts = s.hosts().await.unwrap();
        assert!(hosts[1].live);
        assert_eq!(hosts[1].agents, ["h2:8:0"], "the dead process is gone");
        assert_eq!(s.get(r.uuid).await.unwrap().unwrap().waiting_for, None);
        // Slots in use are its unfinished claims; stopping makes it not live.
        s.claim_as(
            &AgentId("h2:8:0".into()),
            &caps("h2", &["kvm"]),
            Duration::from_secs(9),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(s.hosts().await.unwrap()[1].slots_in_use, 1);
        s.host_stopped("h2:8".into()).await.unwrap();
        assert!(!s.hosts().await.unwrap()[1].live);
    }
}
