//! The guest channel with the real tiny guest: the commands' output on virtio-serial ports,
//! byte-exact and apart from the console, the console fallback for a guest without the driver,
//! and files carried in and artifacts collected out over both.

mod common;

use base64::Engine;
use common::{env_pairs, require_image, vm_slot, Options, Server};
use serde_json::{json, Value};
use sha2::Digest;
use sqlite_sim::model::RequestId;
use sqlite_sim::store::Store;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

/// The tiny image booted directly, with extra kernel switches and config lines.
fn conf(append: &str, extra: &str) -> String {
    let img = common::repo().join("vm_images");
    format!(
        "KERNEL=\"{}\"\nINITRD=\"{}\"\nAPPEND=\"console=ttyS0,115200 quiet {append}\"\n\
         IMAGE=\"{}\"\nMEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\n\
         BOOT_TIMEOUT=\"60\"\nSTDERR_DEVICE=\"/dev/ttyS1\"\n{extra}",
        img.join("tiny-vmlinuz").display(),
        img.join("tiny-initrd.gz").display(),
        img.join("tiny.qcow2").display(),
    )
}

async fn server(env: &[(&str, &str)]) -> (Server, common::VmSlot) {
    require_image();
    let slot = vm_slot();
    let s = Server::start(Options {
        configs: vec![
            ("v".into(), conf("", "")),
            ("nov".into(), conf("sqsim.virtio=0", "")),
            (
                "need".into(),
                conf("sqsim.virtio=0", "CHANNEL=\"virtio\"\n"),
            ),
            ("con".into(), conf("", "CHANNEL=\"console\"\n")),
        ],
        env: env_pairs(env),
        ..Default::default()
    })
    .await;
    (s, slot)
}

async fn finish(s: &Server, body: Value) -> (String, Value) {
    let (code, created) = s.submit_json(&body).await;
    assert_eq!(code, 201, "{created}");
    let id = created["uuid"].as_str().unwrap().to_string();
    let r = s.wait_terminal(&id, LIMIT).await;
    (id, r)
}

#[tokio::test]
async fn output_travels_the_channel_byte_exact_and_apart_from_the_console() {
    let (s, _slot) = server(&[]).await;
    // Every byte value on stdout, stderr apart, and a kernel message in the middle that must
    // never land in stdout; a background process left holding stdout must not hang the run.
    let script =
        "printf '%b' \"$(i=0; while [ $i -lt 256 ]; do printf '\\\\%03o' $i; i=$((i+1)); done)\"; \
                  echo '<0>sqsim-kernel-says-hi' > /dev/kmsg; printf 'to stderr\\n' >&2; \
                  (sleep 2; echo late) & exit 5";
    let (id, r) = finish(
        &s,
        json!({"vm_name": "v", "commands": script, "timeout": 60}),
    )
    .await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(5)),
        "{r}"
    );
    assert_eq!(r["channel"], "virtio");
    let out = s.raw(&id, Some("stdout")).await;
    let all: Vec<u8> = (0..=255u8).collect();
    assert!(out.starts_with(&all), "{:?}", &out[..out.len().min(300)]);
    assert!(!String::from_utf8_lossy(&out).contains("sqsim-kernel-says-hi"));
    assert_eq!(s.raw(&id, Some("stderr")).await, b"to stderr\n");
    let console = [
        s.raw(&id, Some("boot")).await,
        s.raw(&id, Some("shutdown")).await,
    ]
    .concat();
    assert!(
        String::from_utf8_lossy(&console).contains("sqsim-kernel-says-hi"),
        "the kernel's message stays on the console"
    );
    let system = s.output(&id, "system").await;
    assert!(
        system.contains("guest channel: virtio-serial ports"),
        "{system}"
    );
}

#[tokio::test]
async fn a_guest_without_the_driver_falls_back_to_the_console_unless_virtio_is_required() {
    let (s, _slot) = server(&[]).await;
    let (id, r) = finish(
        &s,
        json!({"vm_name": "nov", "commands": "echo via console; echo e >&2"}),
    )
    .await;
    assert_eq!(
        (r["status"].as_str(), r["channel"].as_str()),
        (Some("done"), Some("console")),
        "{r}"
    );
    assert_eq!(s.output(&id, "stdout").await, "via console\n");
    assert_eq!(s.output(&id, "stderr").await, "e\n");
    assert!(s
        .output(&id, "system")
        .await
        .contains("the guest has no /dev/virtio-ports"));
    let (id, r) = finish(&s, json!({"vm_name": "need", "commands": "echo x"})).await;
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("CHANNEL=\"virtio\""),
        "{r}"
    );
    assert_eq!(s.output(&id, "stdout").await, "");
    // CHANNEL="console": QEMU has no channel devices at all.
    let (id, r) = finish(&s, json!({"vm_name": "con", "commands": "echo x"})).await;
    assert_eq!(
        (r["status"].as_str(), r["channel"].as_str()),
        (Some("done"), Some("console"))
    );
    assert!(!s.output(&id, "system").await.contains("virtio-serial-pci"));
}

/// The artifacts stored for a request, straight from the store.
async fn stored(s: &Server, id: &str) -> (Store, Vec<sqlite_sim::model::Artifact>) {
    let store = Store::open(&s.db).await.unwrap();
    let id: RequestId = id.parse().unwrap();
    let list = store.artifacts(id).await.unwrap();
    (store, list)
}

async fn bytes_of(store: &Store, a: &sqlite_sim::model::Artifact) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = 0;
    while let Some(c) = store.artifact_chunk(a.id, seq).await.unwrap() {
        out.extend(c);
        seq += 1;
    }
    out
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Files in with their modes, artifacts out byte-exact, links left out: over `vm`'s channel.
async fn files_round_trip(s: &Server, vm: &str) {
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let body = json!({
        "vm_name": vm,
        "timeout": 120,
        "commands": "ls -l /root/in | tail -n +2 | cut -c1-10; sha256sum /root/in/data.bin | cut -c1-64; \
                     mkdir -p /root/out/sub; cp /root/in/data.bin /root/out/sub/copy.bin; \
                     echo '<ok/>' > /root/out/report.xml; ln -s /etc/shadow /root/out/link; exit 3",
        "files": [
            {"path": "/root/in/data.bin", "content_base64": b64(&payload), "mode": "0600"},
            {"path": "/root/in/run.sh", "content_base64": b64(b"#!/bin/sh\n"), "mode": 493}
        ],
        "artifacts": ["/root/out", "/root/missing/*.log"]
    });
    let (id, r) = finish(s, body).await;
    // A failing exit still collects.
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(3)),
        "{r}"
    );
    let out = s.output(&id, "stdout").await;
    let digest = format!("{:x}", sha2::Sha256::digest(&payload));
    assert_eq!(out, format!("-rw-------\n-rwxr-xr-x\n{digest}\n"), "{vm}");
    let (store, list) = stored(s, &id).await;
    let find = |p: &str| {
        list.iter()
            .find(|a| a.path == p)
            .unwrap_or_else(|| panic!("{p} in {list:?}"))
    };
    let copy = find("/root/out/sub/copy.bin");
    assert_eq!(copy.sha256.as_deref(), Some(digest.as_str()));
    assert_eq!(bytes_of(&store, copy).await, payload);
    assert_eq!(
        bytes_of(&store, find("/root/out/report.xml")).await,
        b"<ok/>\n"
    );
    assert!(find("/root/out/link")
        .left_out
        .as_deref()
        .unwrap()
        .contains("symbolic link"));
    let system = s.output(&id, "system").await;
    assert!(system.contains("placed 2 files"), "{system}");
    assert!(system.contains("collected 2 artifacts"), "{system}");
}

#[tokio::test]
async fn files_in_and_artifacts_out_over_the_channel() {
    let (s, _slot) = server(&[]).await;
    files_round_trip(&s, "v").await;
}

#[tokio::test]
async fn files_in_and_artifacts_out_over_the_console() {
    let (s, _slot) = server(&[]).await;
    files_round_trip(&s, "nov").await;
}

#[tokio::test]
async fn artifacts_past_the_limit_are_listed_as_left_out_and_timeouts_still_collect() {
    let (s, _slot) = server(&[("SQLITE_SIM_MAX_ARTIFACTS", "64K")]).await;
    let body = json!({
        "vm_name": "v",
        // Long enough to boot on a busy machine; the command sleeps past it.
        "timeout": 25,
        "commands": "mkdir -p /o; head -c 40000 /dev/zero > /o/a; head -c 40000 /dev/zero > /o/b; \
                     echo small > /o/c; sleep 600",
        "artifacts": ["/o/*"]
    });
    let (id, r) = finish(&s, body).await;
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().starts_with("timed out"), "{r}");
    let (_, list) = stored(&s, &id).await;
    let left: Vec<_> = list.iter().filter(|a| a.left_out.is_some()).collect();
    assert_eq!(left.len(), 1, "{list:?}");
    assert!(left[0]
        .left_out
        .as_deref()
        .unwrap()
        .contains("SQLITE_SIM_MAX_ARTIFACTS"));
    assert_eq!(
        list.iter().filter(|a| a.left_out.is_none()).count(),
        2,
        "{list:?}"
    );
    let system = s.output(&id, "system").await;
    assert!(
        system.contains("interrupting the commands (Ctrl-C)"),
        "{system}"
    );
    assert!(system.contains("left out /o/"), "{system}");
}

#[tokio::test]
async fn bad_files_and_globs_are_refused_and_store_nothing() {
    let (s, _slot) = server(&[("SQLITE_SIM_MAX_UPLOAD", "1K")]).await;
    let f = |path: &str| json!({"path": path, "content_base64": "eA=="});
    for (body, code) in [
        (
            json!({"vm_name": "v", "commands": "x", "files": [f("rel/path")]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "files": [f("/a/../etc/passwd")]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "files": [f("/a"), f("/a/")]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "files": [{"path": "/a", "content_base64": "%%%"}]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "files": [{"path": "/a", "content_base64": "eA==", "mode": "9"}]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "artifacts": [""]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "artifacts": ["out/*.xml"]}),
            422,
        ),
        (
            json!({"vm_name": "v", "commands": "x", "files": [{"path": "/big", "content_base64": b64(&[0; 2000])}]}),
            413,
        ),
    ] {
        let (got, r) = s.submit_json(&body).await;
        assert_eq!(got, code, "{body} → {r}");
    }
    let (_, list) = s.get_json("/requests").await;
    assert_eq!(list["total"], 0, "nothing stored");
}
