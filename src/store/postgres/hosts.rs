//! The host registry on PostgreSQL (see `store/hosts.rs`): the same rows in `agent_processes`,
//! the same grouping into hosts and the same [`place`](crate::store::place) judgement. The claim
//! filter on labels is `jsonb` containment, `requires <@ labels`.

use super::Pg;
use crate::model::{Label, Request};
use crate::store::hosts::{
    any_pending, group_hosts, labels_json, report_json, say_why, HostsCache, ProcessRow,
};
use crate::store::{place, Host, HostReport, Placement, StoreError};
use crate::timefmt;
use tokio_postgres::types::Type;

/// The claim filter: every label the request requires is among the claimer's labels (a JSON
/// array bound at `$1`), as `store/hosts.rs`'s `ELIGIBLE` on SQLite.
pub(super) const ELIGIBLE: &str = "(requires IS NULL OR requires::jsonb <@ $1::text::jsonb)";

/// The registry as hosts, from the rows of their processes; `slots` counts each host's
/// unfinished claims (placement needs only labels and liveness, so it skips that).
pub(super) async fn hosts_in(
    c: &tokio_postgres::Client,
    slots: bool,
) -> Result<Vec<Host>, StoreError> {
    // `query_typed`: no prepare round trip (every read of a pending request asks).
    let rows = c
        .query_typed(
            "SELECT host_id, labels, vms, agents, max_vms, last_seen,
                    NOT stopped AND live_until >= $1
             FROM agent_processes ORDER BY host_id, last_seen DESC",
            &[(&timefmt::now(), Type::TEXT)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(ProcessRow {
                host_id: r.try_get(0)?,
                labels: r.try_get(1)?,
                vms: r.try_get(2)?,
                agents: r.try_get(3)?,
                max_vms: r.try_get(4)?,
                last_seen: r.try_get(5)?,
                live: r.try_get(6)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let in_use: std::collections::HashMap<String, i64> = if slots {
        c.query_typed(
            "SELECT host_id, COUNT(*) FROM requests
             WHERE host_id IS NOT NULL AND status IN ('acknowledged','running','hold')
             GROUP BY host_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, StoreError>>()?
    } else {
        Default::default()
    };
    group_hosts(&rows, &in_use)
}

/// Says why pending requests wait when no live host can claim them now.
pub(super) async fn fill_waiting(
    c: &tokio_postgres::Client,
    cache: &HostsCache,
    reqs: &mut [Request],
) -> Result<(), StoreError> {
    if !any_pending(reqs) {
        return Ok(());
    }
    let hosts = match cache.fresh() {
        Some(h) => h,
        None => cache.keep(hosts_in(c, false).await?),
    };
    say_why(reqs, &hosts);
    Ok(())
}

/// Answers [`Pg::claimable_exists`], which is synchronous (an agent asks on every wake-up,
/// between two `select!` arms): a thread of its own with a connection of its own, so the
/// caller blocks for one local round trip, never on the pool or on an outage.
pub(super) struct Checker {
    ask: std::sync::Mutex<std::sync::mpsc::Sender<(String, std::sync::mpsc::SyncSender<bool>)>>,
}

/// Longest an agent's wake-up waits for the answer; past it, the claim decides.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

impl Checker {
    pub(super) fn start(cfg: tokio_postgres::Config) -> Checker {
        let (ask, asked) =
            std::sync::mpsc::channel::<(String, std::sync::mpsc::SyncSender<bool>)>();
        let _ = std::thread::Builder::new()
            .name("pg-claimable".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build()
                else {
                    return;
                };
                let sql =
                    format!("SELECT EXISTS (SELECT 1 FROM requests WHERE status = 'pending' AND {ELIGIBLE})");
                let mut client: Option<tokio_postgres::Client> = None;
                // Ends when the store (the sender) is gone.
                while let Ok((labels, answer)) = asked.recv() {
                    let exists = rt.block_on(async {
                        if client.as_ref().is_none_or(|c| c.is_closed()) {
                            client = match cfg.connect(tokio_postgres::NoTls).await {
                                Ok((c, conn)) => {
                                    tokio::spawn(conn);
                                    Some(c)
                                }
                                Err(_) => None,
                            };
                        }
                        let c = client.as_ref()?;
                        let row = c
                            .query_typed_one(&sql, &[(&labels, Type::TEXT)])
                            .await
                            .ok()?;
                        row.try_get::<_, bool>(0).ok()
                    });
                    // Unknown (server unreachable): say yes, and let the claim find out.
                    let _ = answer.send(exists.unwrap_or(true));
                }
            });
        Checker {
            ask: std::sync::Mutex::new(ask),
        }
    }
}

impl Pg {
    /// Whether a pending request this host could claim exists (see `Store::claimable_exists`).
    pub(crate) fn claimable_exists(&self, caps: &crate::store::Capabilities) -> bool {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let sent = self
            .checker
            .ask
            .lock()
            .map(|ask| ask.send((labels_json(&caps.labels), tx)).is_ok())
            .unwrap_or(false);
        // Unknown (no checker, no answer in time): yes, and the claim finds out.
        !sent || rx.recv_timeout(CHECK_TIMEOUT).unwrap_or(true)
    }

    /// An upsert of this process's row: idempotent.
    pub(crate) async fn report_host(&self, r: HostReport) -> Result<(), StoreError> {
        let (labels, vms, agents) = report_json(&r);
        write_tx!(self, "report_host", |tx| async {
            let now_t = time::OffsetDateTime::now_utc();
            let now = timefmt::format(now_t);
            let until = timefmt::format(now_t + r.lease);
            tx.execute(
                "DELETE FROM agent_processes WHERE host_id = $1 AND process <> $2
                   AND (stopped OR live_until < $3)",
                &[&r.host_id, &r.process, &now],
            )
            .await?;
            tx.execute(
                "INSERT INTO agent_processes (process, host_id, labels, vms, agents, max_vms,
                                              live_until, started_at, last_seen, stopped)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, FALSE)
                 ON CONFLICT (process) DO UPDATE SET host_id = $2, labels = $3, vms = $4,
                     agents = $5, max_vms = $6, live_until = $7, last_seen = $8, stopped = FALSE",
                &[
                    &r.process,
                    &r.host_id,
                    &labels,
                    &vms,
                    &agents,
                    &(r.max_vms as i64),
                    &until,
                    &now,
                ],
            )
            .await?;
            Ok(())
        }
        .await)
        .inspect(|_| self.hosts.forget())
    }

    pub(crate) async fn host_stopped(&self, process: String) -> Result<(), StoreError> {
        write_tx!(self, "host_stopped", |tx| async {
            tx.execute(
                "UPDATE agent_processes SET stopped = TRUE, last_seen = $1 WHERE process = $2",
                &[&timefmt::now(), &process],
            )
            .await?;
            Ok(())
        }
        .await)
        .inspect(|_| self.hosts.forget())
    }

    pub(crate) async fn hosts(&self) -> Result<Vec<Host>, StoreError> {
        retry!(self, "hosts", |c| hosts_in(c, true).await)
    }

    pub(crate) async fn placement(&self, requires: Vec<Label>) -> Result<Placement, StoreError> {
        retry!(self, "placement", |c| Ok(place(
            &requires,
            &hosts_in(c, false).await?
        )))
    }
}
