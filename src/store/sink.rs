//! Batched log writing: chunks are merged and committed in one transaction per flush, at the
//! latest 25 ms after the first byte of a batch or at 64 KiB. (The original wrote once a
//! second; 25 ms keeps live followers under 50 ms while a flood still batches by size.) The channel in front is bounded, so a slow disk slows the console pump
//! (and through QEMU's chardev, the guest) instead of growing memory.
//!
//! An agent's sink is fenced ([`LogSink::start_fenced`]): each batch is stored only while the
//! agent still owns the request. Once a batch is refused (the host was cut off past its lease
//! and the request recovered meanwhile), the sink stores nothing more, says so on the run's
//! lease watch, and drops what it is sent instead of retrying.

use super::{Store, StoreError};
use crate::model::{AgentId, LogType, RequestId};
use crate::timefmt;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest time a byte waits before it is committed.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(25);
/// Largest batch before an immediate flush.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Chunks queued before writers wait.
const CHANNEL_DEPTH: usize = 256;
/// Tries per batch (about 12 s of back-off in all) before its bytes count as lost.
const RETRIES: u32 = 12;

/// What travels to the writer: a log chunk, or raw console bytes (the console stream).
enum Chunk {
    Log(String, LogType, Vec<u8>),
    Console(Vec<u8>),
}

/// Sends log chunks of one request; cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::Sender<Chunk>,
}

/// The writer task; [`SinkTask::close`] waits until everything sent is committed.
pub struct SinkTask {
    join: JoinHandle<SinkStats>,
}

/// What the writer committed.
#[derive(Debug, Default, Clone)]
pub struct SinkStats {
    pub bytes: u64,
    pub rows: u64,
    pub flushes: u64,
    /// Bytes that could not be stored after every retry (the disk full, the database gone).
    pub lost_bytes: u64,
    /// Why the last lost batch could not be stored.
    pub last_error: Option<String>,
    /// A fenced sink found the request no longer the agent's: nothing was stored after that.
    pub lease_lost: bool,
    /// Bytes not stored because the claim was gone (not counted in `lost_bytes`).
    pub refused_bytes: u64,
}

/// Whose a fenced sink's writes are, and where it reports that the claim is gone.
struct Owner {
    agent: AgentId,
    lost: watch::Sender<bool>,
}

impl LogSink {
    /// An unfenced sink (work no agent claimed: tests, benchmarks).
    pub fn start(store: Store, id: RequestId) -> (LogSink, SinkTask) {
        Self::spawn(store, id, None)
    }

    /// `agent`'s sink for a request it claimed: every batch is stored only while the agent
    /// still owns the request; when one is refused, `lost` turns true and the sink stops.
    pub fn start_fenced(
        store: Store,
        id: RequestId,
        agent: AgentId,
        lost: watch::Sender<bool>,
    ) -> (LogSink, SinkTask) {
        Self::spawn(store, id, Some(Owner { agent, lost }))
    }

    fn spawn(store: Store, id: RequestId, owner: Option<Owner>) -> (LogSink, SinkTask) {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let join = tokio::spawn(writer(store, id, owner, rx));
        (LogSink { tx }, SinkTask { join })
    }

    /// A sink for work that belongs to no request (a template build): chunks go to `path`,
    /// each behind a `[type]` label where the type changes.
    pub fn to_file(path: &std::path::Path) -> std::io::Result<(LogSink, SinkTask)> {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let (tx, mut rx) = mpsc::channel::<Chunk>(CHANNEL_DEPTH);
        let join = tokio::task::spawn_blocking(move || {
            let mut stats = SinkStats::default();
            let mut last = None;
            while let Some(chunk) = rx.blocking_recv() {
                // No request, so no console stream: the labelled log types say it all.
                let Chunk::Log(_, ty, bytes) = chunk else {
                    continue;
                };
                let labelled = if last != Some(ty) {
                    last = Some(ty);
                    write!(file, "\n[{ty}] ")
                } else {
                    Ok(())
                };
                match labelled.and_then(|_| file.write_all(&bytes)) {
                    Ok(()) => stats.bytes += bytes.len() as u64,
                    Err(e) => {
                        stats.lost_bytes += bytes.len() as u64;
                        stats.last_error = Some(e.to_string());
                    }
                }
            }
            let _ = file.flush();
            stats
        });
        Ok((LogSink { tx }, SinkTask { join }))
    }

    /// Queues bytes; waits only when the writer is behind.
    pub async fn write(&self, ty: LogType, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if self
            .tx
            .send(Chunk::Log(timefmt::now(), ty, bytes))
            .await
            .is_err()
        {
            tracing::error!("log writer is gone; chunk dropped");
        }
    }

    /// Queues raw console bytes for the request's console stream (see `store::console`).
    pub async fn console(&self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if self.tx.send(Chunk::Console(bytes)).await.is_err() {
            tracing::error!("log writer is gone; console bytes dropped");
        }
    }

    /// A `system` line (newline added).
    pub async fn system(&self, text: impl Into<String>) {
        let mut s = text.into();
        tracing::info!(target: "sqlite_sim::run", "{s}");
        s.push('\n');
        self.write(LogType::System, s.into_bytes()).await;
    }
}

impl SinkTask {
    /// Waits for every clone of the sink to be dropped and everything to be committed.
    pub async fn close(self) -> SinkStats {
        self.join.await.unwrap_or_default()
    }
}

/// A batch: log rows, and the console bytes that arrived with them.
#[derive(Default)]
struct Batch {
    rows: Vec<(String, LogType, Vec<u8>)>,
    console: Vec<u8>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.console.is_empty()
    }

    fn size(&self) -> usize {
        self.rows.iter().map(|c| c.2.len()).sum::<usize>() + self.console.len()
    }
}

async fn writer(
    store: Store,
    id: RequestId,
    owner: Option<Owner>,
    mut rx: mpsc::Receiver<Chunk>,
) -> SinkStats {
    let mut stats = SinkStats::default();
    let owner = owner.as_ref();
    let mut batch = Batch::default();
    let mut size = 0usize;
    let mut due: Option<Instant> = None;
    loop {
        let msg = match due {
            None => rx.recv().await,
            Some(at) => tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until(at) => {
                    flush(&store, id, owner, &mut batch, false, &mut stats).await;
                    size = batch.size();
                    due = (!batch.is_empty()).then(|| Instant::now() + FLUSH_INTERVAL);
                    continue;
                }
            },
        };
        match msg {
            None => {
                flush(&store, id, owner, &mut batch, true, &mut stats).await;
                return stats;
            }
            // The claim is gone: nothing more is stored, and senders are never held up.
            Some(chunk) if stats.lease_lost => {
                stats.refused_bytes += match &chunk {
                    Chunk::Log(_, _, b) | Chunk::Console(b) => b.len() as u64,
                };
                continue;
            }
            Some(Chunk::Console(bytes)) => {
                size += bytes.len();
                batch.console.extend_from_slice(&bytes);
            }
            Some(Chunk::Log(ts, ty, bytes)) => {
                size += bytes.len();
                match batch.rows.last_mut() {
                    Some((_, t, b)) if *t == ty => b.extend_from_slice(&bytes),
                    _ => batch.rows.push((ts, ty, bytes)),
                }
            }
        }
        due.get_or_insert_with(|| Instant::now() + FLUSH_INTERVAL);
        if size >= FLUSH_BYTES {
            flush(&store, id, owner, &mut batch, false, &mut stats).await;
            size = batch.size();
            due = (!batch.is_empty()).then(|| Instant::now() + FLUSH_INTERVAL);
        }
    }
}

/// Commits the batch, retrying with back-off. Unless `last`, an incomplete UTF-8 sequence at the
/// very end stays for the next flush, so no row splits a character.
async fn flush(
    store: &Store,
    id: RequestId,
    owner: Option<&Owner>,
    batch: &mut Batch,
    last: bool,
    stats: &mut SinkStats,
) {
    if batch.is_empty() {
        return;
    }
    let mut carry = None;
    if !last {
        if let Some((ts, ty, bytes)) = batch.rows.last_mut() {
            let keep = incomplete_utf8_suffix(bytes);
            if keep > 0 && keep < bytes.len() {
                carry = Some((ts.clone(), *ty, bytes.split_off(bytes.len() - keep)));
            }
        }
    }
    let Batch { rows, console } = std::mem::take(batch);
    let n_bytes: u64 = rows.iter().map(|r| r.2.len() as u64).sum();
    let n_rows = rows.len() as u64;
    // Retry with back-off (a locked database frees up, a full disk may get space). Once a
    // batch was lost, later ones get a single try until one succeeds, so a broken database
    // does not stall the guest's console for minutes per batch.
    let attempts = if stats.last_error.is_some() && stats.lost_bytes > 0 {
        1
    } else {
        RETRIES
    };
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    loop {
        let stored = match owner {
            Some(o) => {
                store
                    .append_agent_logs(id, &o.agent, rows.clone(), console.clone())
                    .await
            }
            None => store
                .append_logs_with_console(id, rows.clone(), console.clone())
                .await
                .map(|()| true),
        };
        match stored {
            Ok(false) => {
                tracing::error!(request = %id, "lease lost: log output is no longer stored");
                stats.lease_lost = true;
                // The held-back end of a character is refused with the rest.
                let held = carry.map_or(0, |c| c.2.len() as u64);
                stats.refused_bytes += n_bytes + console.len() as u64 + held;
                if let Some(o) = owner {
                    let _ = o.lost.send(true);
                }
                return;
            }
            Ok(true) => {
                stats.bytes += n_bytes;
                stats.rows += n_rows;
                stats.flushes += 1;
                stats.last_error = None;
                break;
            }
            Err(e) if attempt < attempts => {
                tracing::warn!(request = %id, error = %e, attempt, "log flush failed; retrying");
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                log_lost(id, n_bytes, &e);
                stats.lost_bytes += n_bytes;
                stats.last_error = Some(e.to_string());
                break;
            }
        }
    }
    batch.rows.extend(carry);
}

fn log_lost(id: RequestId, n: u64, e: &StoreError) {
    tracing::error!(request = %id, bytes = n, error = %e, "log output could not be stored after retries");
}

/// Length of a trailing, possibly incomplete UTF-8 sequence (0 if the end is complete).
fn incomplete_utf8_suffix(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue; // continuation byte: look further back
        }
        let need = match c {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{pending_request, temp_store};
    use crate::store::LogQuery;

    #[test]
    fn utf8_suffix() {
        assert_eq!(incomplete_utf8_suffix(b"abc"), 0);
        assert_eq!(incomplete_utf8_suffix("é".as_bytes()), 0);
        assert_eq!(incomplete_utf8_suffix(&"é".as_bytes()[..1]), 1);
        assert_eq!(incomplete_utf8_suffix(&"€".as_bytes()[..2]), 2);
        assert_eq!(incomplete_utf8_suffix(&"😀".as_bytes()[..3]), 3);
        assert_eq!(incomplete_utf8_suffix(b"\xff"), 0);
    }

    #[tokio::test]
    async fn batches_merge_and_everything_is_committed_on_close() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        let (sink, task) = LogSink::start(s.clone(), r.uuid);
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let chunk = format!("line {i} é\n").into_bytes();
            expected.extend_from_slice(&chunk);
            // Split inside the two-byte é now and then.
            let cut = chunk.len() - 2;
            sink.write(LogType::Stdout, chunk[..cut].to_vec()).await;
            sink.write(LogType::Stdout, chunk[cut..].to_vec()).await;
        }
        sink.system("done").await;
        drop(sink);
        let stats = task.close().await;
        assert_eq!(stats.lost_bytes, 0);
        let logs = s.logs(r.uuid, LogQuery::default()).await.unwrap();
        let stdout: Vec<u8> = logs
            .iter()
            .filter(|e| e.log_type == LogType::Stdout)
            .flat_map(|e| e.output.clone())
            .collect();
        assert_eq!(stdout, expected);
        assert!(logs.len() < 100, "merged into few rows, got {}", logs.len());
        for e in &logs {
            assert!(
                std::str::from_utf8(&e.output).is_ok(),
                "row {} splits a char",
                e.id
            );
        }
        assert_eq!(logs.last().unwrap().output, b"done\n");
    }

    #[tokio::test]
    async fn bytes_are_visible_within_the_flush_interval() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        let (sink, task) = LogSink::start(s.clone(), r.uuid);
        sink.write(LogType::Boot, b"x".to_vec()).await;
        tokio::time::sleep(FLUSH_INTERVAL * 3).await;
        assert_eq!(s.logs(r.uuid, LogQuery::default()).await.unwrap().len(), 1);
        drop(sink);
        task.close().await;
    }

    /// A fenced sink whose claim was recovered stores nothing more, reports the lost lease on
    /// its watch, and never holds up its senders (more chunks than the channel holds).
    #[tokio::test]
    async fn a_fenced_sink_stops_when_the_claim_is_gone() {
        let (s, _d) = temp_store().await;
        let r = pending_request(&s).await;
        let a = AgentId("h1:1:0".into());
        s.claim(&a, Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        let (lost_tx, mut lost) = watch::channel(false);
        let (sink, task) = LogSink::start_fenced(s.clone(), r.uuid, a.clone(), lost_tx);
        sink.system("mine").await;
        tokio::time::sleep(FLUSH_INTERVAL * 3).await;
        s.reap_expired().await.unwrap();
        for i in 0..(CHANNEL_DEPTH * 2) {
            sink.write(LogType::Stdout, format!("late {i}\n").into_bytes())
                .await;
        }
        sink.console(b"late".to_vec()).await;
        tokio::time::timeout(Duration::from_secs(10), lost.wait_for(|l| *l))
            .await
            .expect("the lost lease is reported")
            .unwrap();
        drop(sink);
        let stats = task.close().await;
        assert!(stats.lease_lost && stats.refused_bytes > 0, "{stats:?}");
        assert_eq!(stats.lost_bytes, 0, "refused is not lost: {stats:?}");
        let logs = s.logs(r.uuid, LogQuery::default()).await.unwrap();
        assert_eq!(logs.len(), 2, "{logs:?}");
        assert_eq!(logs[0].output, b"mine\n");
        assert!(String::from_utf8_lossy(&logs[1].output).contains("lost (lease expired)"));
        assert!(s
            .console_since(r.uuid, 0, 1 << 20)
            .await
            .unwrap()
            .bytes
            .is_empty());
    }
}
