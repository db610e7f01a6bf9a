//! Schema migrations, tracked with `PRAGMA user_version`. Each step runs in one transaction.

use super::StoreError;
use rusqlite::{Connection, TransactionBehavior};

/// Ordered migrations; index + 1 is the schema version they produce.
const MIGRATIONS: &[&str] = &[
    // v1: requests + one work_log table for all requests (not a table per request).
    r#"
    CREATE TABLE requests (
        uuid              TEXT PRIMARY KEY,
        vm_name           TEXT NOT NULL,
        commands          TEXT NOT NULL,
        timeout           INTEGER NOT NULL CHECK (timeout > 0),
        status            TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
                            ('pending','acknowledged','running','hold','done','failed','cancelled')),
        created_at        TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        started_at        TEXT,
        finished_at       TEXT,
        exit_code         INTEGER,
        error             TEXT,
        agent_id          TEXT,
        lease_expires_at  TEXT,
        desired_status    TEXT,
        shutdown_step     TEXT
    );
    CREATE INDEX requests_by_status ON requests (status, created_at);
    CREATE INDEX requests_by_created ON requests (created_at);
    CREATE TABLE work_log (
        request_uuid  TEXT NOT NULL REFERENCES requests (uuid) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        timestamp     TEXT NOT NULL,
        log_type      TEXT NOT NULL CHECK (log_type IN
                        ('boot','command','stdout','stderr','shutdown','system')),
        output        BLOB NOT NULL,
        PRIMARY KEY (request_uuid, seq)
    );
    "#,
    // v2: phase durations, for metrics across processes.
    r#"
    ALTER TABLE requests ADD COLUMN boot_ms INTEGER;
    ALTER TABLE requests ADD COLUMN run_ms INTEGER;
    ALTER TABLE requests ADD COLUMN shutdown_ms INTEGER;
    "#,
    // v3: DELETE of an active request hides it at once; its agent removes it once its VM is down.
    r#"
    ALTER TABLE requests ADD COLUMN deleting INTEGER NOT NULL DEFAULT 0;
    "#,
    // v4: warm start. How each request asked to boot and how it did; per-host templates and
    // the build/delete orders the API gives them.
    r#"
    ALTER TABLE requests ADD COLUMN boot TEXT CHECK (boot IN ('cold','warm'));
    ALTER TABLE requests ADD COLUMN boot_mode TEXT CHECK (boot_mode IN ('cold','warm','pool'));
    ALTER TABLE requests ADD COLUMN restore_ms INTEGER;
    CREATE INDEX requests_by_vm_restore ON requests (vm_name, finished_at) WHERE restore_ms IS NOT NULL;
    CREATE TABLE templates (
        host_id        TEXT NOT NULL,
        vm_name        TEXT NOT NULL,
        state          TEXT NOT NULL CHECK (state IN ('none','building','ready','failed')),
        template_key   TEXT,
        built_from     TEXT,
        built_at       TEXT,
        build_ms       INTEGER,
        size_bytes     INTEGER,
        error          TEXT,
        failures       INTEGER NOT NULL DEFAULT 0,
        build_order    INTEGER NOT NULL DEFAULT 0,
        delete_order   INTEGER NOT NULL DEFAULT 0,
        updated_at     TEXT NOT NULL,
        PRIMARY KEY (host_id, vm_name)
    );
    CREATE TABLE template_orders (
        vm_name        TEXT PRIMARY KEY,
        build_order    INTEGER NOT NULL DEFAULT 0,
        delete_order   INTEGER NOT NULL DEFAULT 0,
        updated_at     TEXT NOT NULL
    );
    "#,
    // v5: files carried into a request's guest (staged before the request exists, then linked
    // to it) and files collected from it, both in 1 MiB chunks so neither side ever holds a
    // whole file; the artifact globs and the channel a request used.
    r#"
    ALTER TABLE requests ADD COLUMN artifact_globs TEXT;
    ALTER TABLE requests ADD COLUMN channel TEXT CHECK (channel IN ('virtio','console'));
    CREATE TABLE uploads (
        id            INTEGER PRIMARY KEY,
        request_uuid  TEXT REFERENCES requests (uuid) ON DELETE CASCADE,
        seq           INTEGER NOT NULL DEFAULT 0,
        path          TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('file','tar')),
        mode          INTEGER,
        size          INTEGER NOT NULL DEFAULT 0,
        sha256        TEXT,
        staged_at     TEXT NOT NULL
    );
    CREATE INDEX uploads_by_request ON uploads (request_uuid, seq);
    CREATE TABLE upload_chunks (
        upload_id  INTEGER NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,
        data       BLOB NOT NULL,
        PRIMARY KEY (upload_id, seq)
    );
    CREATE TABLE artifacts (
        id            INTEGER PRIMARY KEY,
        request_uuid  TEXT NOT NULL REFERENCES requests (uuid) ON DELETE CASCADE,
        path          TEXT NOT NULL,
        mode          INTEGER,
        size          INTEGER NOT NULL DEFAULT 0,
        sha256        TEXT,
        complete      INTEGER NOT NULL DEFAULT 0,
        left_out      TEXT,
        UNIQUE (request_uuid, path)
    );
    CREATE TABLE artifact_chunks (
        artifact_id  INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
        seq          INTEGER NOT NULL,
        data         BLOB NOT NULL,
        PRIMARY KEY (artifact_id, seq)
    );
    "#,
    // v6: hands on the VM. The raw serial-console stream (offset-addressable, for
    // `/requests/{uuid}/console`), keystrokes waiting for the owning agent, the `input` log
    // type (work_log is rebuilt: SQLite cannot alter a CHECK), and keep-on-failure.
    r#"
    CREATE TABLE work_log_v6 (
        request_uuid  TEXT NOT NULL REFERENCES requests (uuid) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        timestamp     TEXT NOT NULL,
        log_type      TEXT NOT NULL CHECK (log_type IN
                        ('boot','command','stdout','stderr','shutdown','system','input')),
        output        BLOB NOT NULL,
        PRIMARY KEY (request_uuid, seq)
    );
    INSERT INTO work_log_v6 SELECT request_uuid, seq, timestamp, log_type, output FROM work_log;
    DROP TABLE work_log;
    ALTER TABLE work_log_v6 RENAME TO work_log;
    CREATE TABLE console_log (
        request_uuid  TEXT NOT NULL REFERENCES requests (uuid) ON DELETE CASCADE,
        offset        INTEGER NOT NULL,
        bytes         BLOB NOT NULL,
        PRIMARY KEY (request_uuid, offset)
    );
    CREATE TABLE console_input (
        id            INTEGER PRIMARY KEY,
        request_uuid  TEXT NOT NULL REFERENCES requests (uuid) ON DELETE CASCADE,
        who           TEXT NOT NULL,
        bytes         BLOB NOT NULL,
        created_at    TEXT NOT NULL
    );
    CREATE INDEX console_input_by_request ON console_input (request_uuid, id);
    ALTER TABLE requests ADD COLUMN keep_on_failure INTEGER;
    ALTER TABLE requests ADD COLUMN kept_until TEXT;
    ALTER TABLE requests ADD COLUMN kept_ms INTEGER;
    ALTER TABLE requests ADD COLUMN kept_released TEXT;
    "#,
    // v7: hosts. Agents processes report themselves (labels, slots, heartbeat); requests record
    // the labels they need and the host that claimed them.
    r#"
    ALTER TABLE requests ADD COLUMN requires TEXT;
    ALTER TABLE requests ADD COLUMN host_id TEXT;
    CREATE TABLE agent_processes (
        process       TEXT PRIMARY KEY,
        host_id       TEXT NOT NULL,
        labels        TEXT NOT NULL,
        vms           TEXT NOT NULL,
        agents        TEXT NOT NULL,
        slots_in_use  INTEGER NOT NULL DEFAULT 0,
        max_vms       INTEGER NOT NULL,
        live_until    TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        last_seen     TEXT NOT NULL,
        stopped       INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX agent_processes_by_host ON agent_processes (host_id);
    "#,
    // v8: users and audit. Who submitted each request; tokens (only their SHA-256 digests;
    // at most one active token per name); the audit log of control actions.
    r#"
    ALTER TABLE requests ADD COLUMN submitted_by TEXT;
    CREATE INDEX requests_by_submitter ON requests (submitted_by, created_at);
    CREATE TABLE tokens (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL,
        role          TEXT NOT NULL CHECK (role IN ('viewer','submitter','operator','admin')),
        digest        TEXT NOT NULL UNIQUE,
        created_at    TEXT NOT NULL,
        created_by    TEXT,
        expires_at    TEXT,
        revoked_at    TEXT,
        revoked_by    TEXT
    );
    CREATE UNIQUE INDEX tokens_active_name ON tokens (name) WHERE revoked_at IS NULL;
    CREATE TABLE audit_log (
        id            INTEGER PRIMARY KEY,
        at            TEXT NOT NULL,
        principal     TEXT,
        role          TEXT,
        address       TEXT,
        action        TEXT NOT NULL,
        request_uuid  TEXT,
        target        TEXT,
        outcome       TEXT NOT NULL CHECK (outcome IN ('allowed','refused')),
        status        INTEGER NOT NULL,
        detail        TEXT
    );
    CREATE INDEX audit_log_by_principal ON audit_log (principal, id);
    CREATE INDEX audit_log_by_request ON audit_log (request_uuid, id);
    CREATE INDEX audit_log_by_action ON audit_log (action, id);
    "#,
    // v9: webhooks. The submission's callback_url (shown) and every target URL (JSON); one row
    // per delivery, queued with the state change that causes it and gone with its request.
    r#"
    ALTER TABLE requests ADD COLUMN callback_url TEXT;
    ALTER TABLE requests ADD COLUMN webhook_urls TEXT;
    CREATE TABLE webhook_deliveries (
        id               INTEGER PRIMARY KEY,
        delivery_id      TEXT NOT NULL UNIQUE,
        request_uuid     TEXT NOT NULL REFERENCES requests (uuid) ON DELETE CASCADE,
        event            TEXT NOT NULL CHECK (event IN ('finished')),
        url              TEXT NOT NULL,
        state            TEXT NOT NULL CHECK (state IN ('pending','delivered','failed','gave_up')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  TEXT NOT NULL,
        leased_until     TEXT,
        last_status      INTEGER,
        last_error       TEXT,
        created_at       TEXT NOT NULL,
        updated_at       TEXT NOT NULL,
        delivered_at     TEXT
    );
    CREATE INDEX webhook_deliveries_by_request ON webhook_deliveries (request_uuid, id);
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
        WHERE state = 'pending';
    "#,
    // v10: retries of infrastructure failures. How many re-queues a request allows, which
    // attempt it is on, the earlier attempts' failures (JSON), and the attempt of each log row.
    r#"
    ALTER TABLE requests ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE requests ADD COLUMN attempts TEXT;
    ALTER TABLE work_log ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    "#,
    // v11: priorities and fair queueing (`store/queue.rs`). `queue_tag` is the request's
    // round-robin turn within its priority level, given at submission. The indexes: the claim
    // order (also what queue positions count), a submitter's latest pending turn per level, and
    // the latest turn served per level.
    r#"
    ALTER TABLE requests ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN queue_tag INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX requests_queue ON requests (status, priority DESC, queue_tag, created_at);
    CREATE INDEX requests_lane ON requests (priority, COALESCE(submitted_by, ''), queue_tag)
        WHERE status = 'pending';
    CREATE INDEX requests_served ON requests (priority, queue_tag)
        WHERE host_id IS NOT NULL AND requires IS NULL;
    "#,
    // v12: a submitter's lane leads with the submitter, so that it serves only lookups that
    // name one. Led by the priority, it also offered a planner a scan of a whole level for
    // queries about the level alone (the head of the queue, the requests ahead of one): on
    // PostgreSQL, before statistics caught up with a fast-growing table, it took that offer.
    r#"
    DROP INDEX requests_lane;
    CREATE INDEX requests_lane ON requests (COALESCE(submitted_by, ''), priority, queue_tag)
        WHERE status = 'pending';
    "#,
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > supported {
        return Err(StoreError::TooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("m.db")).unwrap();
        migrate(&mut c).unwrap();
        migrate(&mut c).unwrap(); // idempotent
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        c.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            migrate(&mut c),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    /// `.cargo/config.toml` builds the bundled SQLite without the process-wide page-cache
    /// group and allocation counters (two mutexes every point read queued on); a build that
    /// lost the flags (a moved config, a changed env) fails here rather than only in figure 6.
    #[test]
    fn bundled_sqlite_has_no_process_wide_cache_or_memstatus_mutexes() {
        let c = Connection::open_in_memory().unwrap();
        let used = |opt: &str| -> bool {
            c.query_row("SELECT sqlite_compileoption_used(?1)", [opt], |r| r.get(0))
                .unwrap()
        };
        assert!(!used("ENABLE_MEMORY_MANAGEMENT"));
        assert!(used("DEFAULT_MEMSTATUS=0"));
        assert!(used("THREADSAFE=1"));
    }
}
