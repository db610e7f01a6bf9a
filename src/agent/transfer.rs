//! Files across the guest boundary: uploads put in place before the commands run, and
//! artifacts collected after them, over the channel's ports (virtio speed) or, for a guest
//! without them, as acknowledged base64 over the console (slow, same limits).
//!
//! Artifacts arrive as a tar stream that is parsed as it comes and stored in chunks, so a
//! guest can neither make the agent hold a whole file nor write anything but rows of its own
//! request: names are checked, links and devices are listed as left out, and past
//! `SQLITE_SIM_MAX_ARTIFACTS` files are left out and, past several times it, the stream is cut
//! off.

use super::error::RunError;
use super::guest::{report, wait_ack, Ready};
use super::vm::{Deadline, Limit, Vm};
use crate::model::{Channel, RequestId, Upload, UploadKind};
use crate::qemu::console::files::write_into;
use crate::qemu::console::protocol::{REPORT_ART, REPORT_ARTE};
use crate::store::{Store, CHUNK};
use crate::tarball::{self, EntryKind, Event};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long placing files may take, beyond their size at the console's speed.
const PLACE_BASE: Duration = Duration::from_secs(60);
/// How long a collection may take.
const COLLECT_LIMIT_CHANNEL: Duration = Duration::from_secs(300);
const COLLECT_LIMIT_CONSOLE: Duration = Duration::from_secs(1800);
/// After the guest says it has sent everything, how long its last bytes may take.
const STREAM_GRACE: Duration = Duration::from_secs(5);
/// Past the limit, bytes the guest may still send (files left out) before it is cut off, as a
/// multiple of the limit.
const FLOOD_FACTOR: u64 = 4;

/// Puts `uploads` in place in the guest, in order, before the commands run.
pub(super) async fn place(
    ready: &mut Ready,
    vm: &mut Vm,
    store: &Store,
    uploads: &[Upload],
) -> Result<(), RunError> {
    if uploads.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    let total: u64 = uploads.iter().map(|u| u.size).sum();
    // Bounded by what the slow path needs at ~50 KB/s, so a guest that stops reading ends.
    let limit = PLACE_BASE + Duration::from_secs(total / 50_000);
    let deadline = Vm::deadline(
        tokio::time::Instant::now(),
        limit,
        Limit::Files(limit.as_secs()),
    );
    for (n, up) in uploads.iter().enumerate() {
        let n = n + 1;
        let tar = up.kind == UploadKind::Tar;
        let mode = up.mode.unwrap_or(0o644);
        let status = match ready.channel {
            Channel::Virtio => {
                let line = ready.session.place_line(n, &up.path, tar, mode, up.size);
                vm.console.send(&line).await?;
                let port = vm
                    .console
                    .files()
                    .expect("a virtio guest has file ports")
                    .input();
                let (store, id) = (store.clone(), up.id);
                // Stream the bytes while the run watches the guest: one that stops reading must
                // not hang the agent.
                let mut feed = tokio::spawn(async move {
                    let mut seq = 0;
                    while let Some(chunk) = store.upload_chunk(id, seq).await? {
                        write_into(&port, &chunk).await.map_err(|e| {
                            crate::store::StoreError::Task(format!("writing into the guest: {e}"))
                        })?;
                        seq += 1;
                    }
                    Ok::<_, crate::store::StoreError>(())
                });
                let key = format!("UP{n}");
                let reported = report(vm, &key, deadline);
                tokio::pin!(reported);
                tokio::select! {
                    r = &mut reported => {
                        feed.abort();
                        r?
                    }
                    fed = &mut feed => {
                        fed.map_err(|e| RunError::Upload(e.to_string()))?
                            .map_err(|e| RunError::Upload(e.to_string()))?;
                        reported.await?
                    }
                }
            }
            Channel::Console => {
                let mut seq = 0;
                while let Some(chunk) = store.upload_chunk(up.id, seq).await? {
                    for (line, word) in ready.session.chunk_lines(n, seq as usize, &chunk) {
                        vm.console.send(&line).await?;
                        wait_ack(vm, &word, deadline).await?;
                    }
                    seq += 1;
                }
                if seq == 0 {
                    // An empty file: one empty chunk makes its temporary file.
                    for (line, word) in ready.session.chunk_lines(n, 0, &[]) {
                        vm.console.send(&line).await?;
                        wait_ack(vm, &word, deadline).await?;
                    }
                }
                vm.console
                    .send(&ready.session.place_from_temp_line(n, &up.path, tar, mode))
                    .await?;
                report(vm, &format!("UP{n}"), deadline).await?
            }
        };
        if status != "0" {
            return Err(RunError::Upload(format!(
                "placing {} {} failed in the guest (status {status})",
                if tar { "the archive into" } else { "the file" },
                up.path
            )));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    vm.sink
        .system(format!(
            "placed {} file{} ({}) in {secs:.2} s over the {}, {:.1} MB/s",
            uploads.len(),
            if uploads.len() == 1 { "" } else { "s" },
            human_bytes(total),
            channel_words(ready.channel),
            total as f64 / 1e6 / secs.max(1e-6)
        ))
        .await;
    Ok(())
}

/// What a collection stored.
#[derive(Debug, Default)]
pub(super) struct Collected {
    pub files: u64,
    pub bytes: u64,
    pub left_out: Vec<(String, String)>,
    /// Why the stream ended early, if it did.
    pub cut: Option<String>,
}

/// Collects the files matching `globs` from the guest into the store.
pub(super) async fn collect(
    ready: &mut Ready,
    vm: &mut Vm,
    store: &Store,
    id: RequestId,
    globs: &[String],
    limit: u64,
) -> Result<Collected, RunError> {
    let start = Instant::now();
    let (rx, key, budget) = match ready.channel {
        Channel::Virtio => (
            vm.console
                .files()
                .expect("a virtio guest has file ports")
                .collect(),
            REPORT_ART,
            COLLECT_LIMIT_CHANNEL,
        ),
        Channel::Console => (vm.console.capture(), REPORT_ARTE, COLLECT_LIMIT_CONSOLE),
    };
    let mut consumer = tokio::spawn(consume(
        rx,
        ready.channel == Channel::Console,
        store.clone(),
        id,
        limit,
    ));
    vm.console.send(&ready.session.collect_line(globs)).await?;
    let deadline = Deadline {
        at: tokio::time::Instant::now() + budget,
        limit: Limit::Files(budget.as_secs()),
    };
    let answered = report(vm, key, deadline).await;
    // The guest is done sending (or gave up): let the last bytes arrive, then end the stream.
    let mut got = match tokio::time::timeout(STREAM_GRACE, &mut consumer).await {
        Ok(r) => r.unwrap_or_default(),
        Err(_) => {
            stop(vm, ready.channel);
            consumer.await.unwrap_or_default()
        }
    };
    stop(vm, ready.channel);
    let matched = match &answered {
        Ok(v) => v.split(':').next().unwrap_or("0").to_string(),
        Err(e) => {
            got.cut
                .get_or_insert_with(|| format!("the guest did not finish sending: {e}"));
            "?".into()
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let mut line = format!(
        "collected {} artifact{} ({}) from {matched} matching path{} in {secs:.2} s over the {}",
        got.files,
        if got.files == 1 { "" } else { "s" },
        human_bytes(got.bytes),
        if matched == "1" { "" } else { "s" },
        channel_words(ready.channel),
    );
    for (path, why) in &got.left_out {
        line.push_str(&format!("; left out {path}: {why}"));
    }
    if let Some(cut) = &got.cut {
        line.push_str(&format!("; {cut}"));
    }
    vm.sink.system(line).await;
    // A guest that never answered is not one to keep talking to.
    answered?;
    Ok(got)
}

fn stop(vm: &Vm, channel: Channel) {
    match channel {
        Channel::Virtio => {
            if let Some(f) = vm.console.files() {
                f.stop_collecting();
            }
        }
        Channel::Console => vm.console.stop_capturing(),
    }
}

/// Reads the tar stream (base64 text over the console) and stores its files.
async fn consume(
    mut rx: mpsc::Receiver<Vec<u8>>,
    base64_text: bool,
    store: Store,
    id: RequestId,
    limit: u64,
) -> Collected {
    let mut c = Collected::default();
    let mut reader = tarball::Reader::new();
    let mut text = Vec::new();
    let mut current: Option<Current> = None;
    let mut seen: u64 = 0;
    while let Some(data) = rx.recv().await {
        let bytes = if base64_text {
            match decode_base64(&mut text, &data) {
                Ok(b) => b,
                Err(e) => {
                    c.cut = Some(format!(
                        "the console sent something that is not base64: {e}"
                    ));
                    break;
                }
            }
        } else {
            data
        };
        seen += bytes.len() as u64;
        if seen > limit.saturating_mul(FLOOD_FACTOR) {
            c.cut = Some(format!(
                "the guest sent more than {} on the artifacts stream: cut off",
                human_bytes(limit.saturating_mul(FLOOD_FACTOR))
            ));
            break;
        }
        let events = match reader.feed(&bytes) {
            Ok(ev) => ev,
            Err(e) => {
                c.cut = Some(format!("the artifacts stream is not a tar archive: {e}"));
                break;
            }
        };
        for ev in events {
            if let Err(e) = on_event(ev, &mut current, &mut c, &store, id, limit).await {
                c.cut = Some(format!("storing artifacts failed: {e}"));
                return c;
            }
        }
        if reader.is_done() {
            break;
        }
    }
    if let Some(cur) = current.take() {
        // The stream ended inside a file: keep what came, and say so.
        let why = c
            .cut
            .clone()
            .unwrap_or_else(|| "the stream ended inside the file".into());
        let _ = finish_current(cur, &mut c, &store, Some(why)).await;
    }
    c
}

/// A file being stored.
struct Current {
    artifact: Option<i64>,
    path: String,
    buf: Vec<u8>,
    seq: i64,
    size: u64,
    hash: Sha256,
}

async fn on_event(
    ev: Event,
    current: &mut Option<Current>,
    c: &mut Collected,
    store: &Store,
    id: RequestId,
    limit: u64,
) -> Result<(), crate::store::StoreError> {
    match ev {
        Event::Entry(e) => {
            let path = match tarball::safe_relative(&e.path) {
                Some(p) => format!("/{p}"),
                None => {
                    leave_out(store, id, c, &e.path, "its name leaves its directory").await?;
                    return Ok(());
                }
            };
            match e.kind {
                EntryKind::File => {
                    if c.bytes + e.size > limit {
                        let why = format!(
                            "{} would pass SQLITE_SIM_MAX_ARTIFACTS ({})",
                            human_bytes(e.size),
                            human_bytes(limit)
                        );
                        leave_out(store, id, c, &path, &why).await?;
                        *current = Some(Current {
                            artifact: None,
                            path,
                            buf: Vec::new(),
                            seq: 0,
                            size: 0,
                            hash: Sha256::new(),
                        });
                        return Ok(());
                    }
                    let artifact = store.begin_artifact(id, path.clone(), Some(e.mode)).await?;
                    *current = Some(Current {
                        artifact: Some(artifact),
                        path,
                        buf: Vec::new(),
                        seq: 0,
                        size: 0,
                        hash: Sha256::new(),
                    });
                }
                EntryKind::Directory => {}
                EntryKind::Symlink => {
                    let why = format!("a symbolic link (to {}): not collected", e.link);
                    leave_out(store, id, c, &path, &why).await?;
                }
                EntryKind::HardLink => {
                    let why = format!("a hard link (to {}): not collected", e.link);
                    leave_out(store, id, c, &path, &why).await?;
                }
                EntryKind::Other(t) => {
                    let why = format!("not a regular file (tar type {:?})", t as char);
                    leave_out(store, id, c, &path, &why).await?;
                }
            }
        }
        Event::Data(d) => {
            if let Some(cur) = current.as_mut() {
                if let Some(artifact) = cur.artifact {
                    cur.hash.update(&d);
                    cur.size += d.len() as u64;
                    cur.buf.extend_from_slice(&d);
                    while cur.buf.len() >= CHUNK {
                        let rest = cur.buf.split_off(CHUNK);
                        let chunk = std::mem::replace(&mut cur.buf, rest);
                        store
                            .append_artifact_chunk(artifact, cur.seq, chunk)
                            .await?;
                        cur.seq += 1;
                    }
                }
            }
        }
        Event::EntryEnd => {
            if let Some(cur) = current.take() {
                finish_current(cur, c, store, None).await?;
            }
        }
        Event::End => {}
    }
    Ok(())
}

async fn finish_current(
    mut cur: Current,
    c: &mut Collected,
    store: &Store,
    incomplete: Option<String>,
) -> Result<(), crate::store::StoreError> {
    let Some(artifact) = cur.artifact else {
        return Ok(()); // left out: its bytes were only counted
    };
    if !cur.buf.is_empty() {
        store
            .append_artifact_chunk(artifact, cur.seq, std::mem::take(&mut cur.buf))
            .await?;
    }
    let digest = format!("{:x}", cur.hash.finalize());
    c.bytes += cur.size;
    if let Some(why) = &incomplete {
        c.left_out.push((cur.path.clone(), why.clone()));
    } else {
        c.files += 1;
    }
    store
        .end_artifact(artifact, cur.size, Some(digest), incomplete)
        .await
}

async fn leave_out(
    store: &Store,
    id: RequestId,
    c: &mut Collected,
    path: &str,
    why: &str,
) -> Result<(), crate::store::StoreError> {
    c.left_out.push((path.to_string(), why.to_string()));
    store
        .leave_out_artifact(id, path.to_string(), why.to_string())
        .await
}

/// Decodes the complete base64 quads in `pending` + `data` (line breaks ignored), keeping the
/// rest for the next call.
fn decode_base64(pending: &mut Vec<u8>, data: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    pending.extend(data.iter().copied().filter(|b| !b.is_ascii_whitespace()));
    let whole = pending.len() / 4 * 4;
    let out = base64::engine::general_purpose::STANDARD.decode(&pending[..whole])?;
    pending.drain(..whole);
    Ok(out)
}

fn channel_words(c: Channel) -> &'static str {
    match c {
        Channel::Virtio => "virtio channel",
        Channel::Console => "console",
    }
}

/// `12.3 MB`, `512 B`.
pub(super) fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{pending_request, temp_store};

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (p, d) in entries {
            out.extend(tarball::header(
                p,
                EntryKind::File,
                0o600,
                d.len() as u64,
                0,
            ));
            out.extend_from_slice(d);
            out.extend(std::iter::repeat_n(0u8, tarball::padding(d.len() as u64)));
        }
        out.extend(tarball::trailer());
        out
    }

    async fn run_consume(
        stream: Vec<u8>,
        base64_text: bool,
        limit: u64,
    ) -> (
        Collected,
        Store,
        RequestId,
        crate::store::test_support::TempStore,
    ) {
        let (store, dir) = temp_store().await;
        let r = pending_request(&store).await;
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(consume(rx, base64_text, store.clone(), r.uuid, limit));
        for piece in stream.chunks(1000) {
            if tx.send(piece.to_vec()).await.is_err() {
                break; // the consumer cut the stream off
            }
        }
        drop(tx);
        (task.await.unwrap(), store, r.uuid, dir)
    }

    #[tokio::test]
    async fn files_are_stored_with_digests_and_the_limit_leaves_files_out() {
        let big = vec![9u8; 3 * CHUNK + 7];
        let tar = tar_of(&[
            ("root/out/a.xml", b"<a/>"),
            ("root/out/big", &big),
            ("root/out/c", b"c"),
        ]);
        let (c, store, id, _d) = run_consume(tar, false, (CHUNK * 2) as u64).await;
        assert_eq!((c.files, c.cut.as_deref()), (2, None), "{c:?}");
        assert_eq!(c.left_out.len(), 1);
        assert!(
            c.left_out[0].1.contains("SQLITE_SIM_MAX_ARTIFACTS"),
            "{c:?}"
        );
        let list = store.artifacts(id).await.unwrap();
        let a = list.iter().find(|a| a.path == "/root/out/a.xml").unwrap();
        assert_eq!(a.size, 4);
        assert_eq!(
            a.sha256.as_deref(),
            Some(format!("{:x}", Sha256::digest(b"<a/>")).as_str())
        );
        assert_eq!(
            store.artifact_chunk(a.id, 0).await.unwrap().unwrap(),
            b"<a/>"
        );
        let big = list.iter().find(|a| a.path == "/root/out/big").unwrap();
        assert!(big.left_out.is_some() && big.sha256.is_none());
    }

    #[tokio::test]
    async fn chunks_reassemble_byte_exact() {
        let data: Vec<u8> = (0..(2 * CHUNK + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let tar = tar_of(&[("f", &data)]);
        let (c, store, id, _d) = run_consume(tar, false, u64::MAX / 8).await;
        assert_eq!(c.files, 1);
        let a = &store.artifacts(id).await.unwrap()[0];
        let mut back = Vec::new();
        let mut seq = 0;
        while let Some(chunk) = store.artifact_chunk(a.id, seq).await.unwrap() {
            back.extend(chunk);
            seq += 1;
        }
        assert_eq!(back, data);
        assert_eq!(
            a.sha256.as_deref(),
            Some(format!("{:x}", Sha256::digest(&data)).as_str())
        );
    }

    #[tokio::test]
    async fn over_the_console_base64_lines_decode_the_same() {
        let tar = tar_of(&[("x/y", b"hello")]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&tar);
        let lines: Vec<u8> = b64
            .as_bytes()
            .chunks(76)
            .flat_map(|l| l.iter().copied().chain(*b"\n"))
            .collect();
        let (c, store, id, _d) = run_consume(lines, true, 1 << 20).await;
        assert_eq!(c.files, 1, "{c:?}");
        assert_eq!(store.artifacts(id).await.unwrap()[0].path, "/x/y");
    }

    #[tokio::test]
    async fn hostile_streams_are_cut_off_and_escaping_names_left_out() {
        // Not tar at all.
        let (c, ..) = run_consume(vec![b'x'; 5000], false, 1 << 20).await;
        assert!(c.cut.unwrap().contains("not a tar archive"));
        // A flood: far more than the limit.
        let huge = vec![0u8; 64 * 1024];
        let mut flood = tar_of(&[("a", &huge)]);
        flood.truncate(flood.len() - 1024); // no end: keeps "going"
        let mut stream = Vec::new();
        for _ in 0..10 {
            stream.extend_from_slice(&flood);
        }
        let (c, ..) = run_consume(stream, false, 8 * 1024).await;
        assert!(c.cut.unwrap().contains("cut off"), "a flood is cut off");
        // Names with `..`, and links, are listed as left out, never stored.
        let mut tar = Vec::new();
        tar.extend(tarball::header(
            "../../etc/evil",
            EntryKind::File,
            0o644,
            1,
            0,
        ));
        tar.extend_from_slice(b"x");
        tar.extend(std::iter::repeat_n(0u8, tarball::padding(1)));
        tar.extend(tarball::trailer());
        let (c, store, id, _d) = run_consume(tar, false, 1 << 20).await;
        assert_eq!(c.files, 0);
        let list = store.artifacts(id).await.unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0]
            .left_out
            .as_deref()
            .unwrap()
            .contains("leaves its directory"));
    }
}
