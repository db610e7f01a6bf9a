//! Fault injection: whatever breaks — the agent, the API, QEMU, the guest, the input, the load
//! — every request ends in a truthful state, every console byte that reached the host is
//! stored, and no QEMU outlives its request.

mod common;

use common::{
    eventually, require_image, rss_kib, signal_and_wait, vm_slot, Method, Mode, Options, Server,
};
use nix::sys::signal::Signal;
use serde_json::json;
use sha2::Digest;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

fn kernel_conf(append: &str, extra: &str) -> String {
    let img = common::repo().join("vm_images");
    format!(
        "KERNEL=\"{}\"\nINITRD=\"{}\"\nAPPEND=\"console=ttyS0,115200 quiet {append}\"\n\
         MEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\nBOOT_TIMEOUT=\"60\"\n\
         STDERR_DEVICE=\"/dev/ttyS1\"\n{extra}",
        img.join("tiny-vmlinuz").display(),
        img.join("tiny-initrd.gz").display(),
    )
}

async fn one_vm(opts: Options) -> (Server, common::VmSlot) {
    require_image();
    let slot = vm_slot();
    (Server::start(opts).await, slot)
}

#[tokio::test]
async fn agent_killed_mid_run_then_restarted() {
    let (s, _slot) = one_vm(Options {
        mode: Mode::Api,
        env: vec![("SQLITE_SIM_AGENT_LEASE".into(), "3".into())],
        ..Default::default()
    })
    .await;
    let mut agents = s.spawn_process(Mode::Agents);
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    assert_eq!(s.qemu_processes().len(), 1);
    signal_and_wait(&mut agents, Signal::SIGKILL);
    // PR_SET_PDEATHSIG takes QEMU down with its agent.
    assert!(
        eventually(Duration::from_secs(5), || s.qemu_processes().is_empty()).await,
        "QEMU survived its agent: {:?}",
        s.qemu_processes()
    );
    assert!(
        s.run_dir.join(&id).exists(),
        "the dead agent left its run directory"
    );
    let r = s.get(&id).await;
    assert_eq!(r["status"], "running", "nobody has noticed yet");

    // A new agents process recovers the request once the lease expires, and cleans up.
    let mut agents = s.spawn_process(Mode::Agents);
    let r = s.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(
        (r["status"].as_str(), r["error"].as_str()),
        (Some("failed"), Some("agent lost")),
        "{r}"
    );
    assert_eq!(
        s.output(&id, "stdout").await,
        "started\n",
        "logs up to the crash intact"
    );
    assert!(s
        .output(&id, "system")
        .await
        .contains("lost (lease expired)"));
    assert!(
        eventually(Duration::from_secs(10), || !s.run_dir.join(&id).exists()).await,
        "leftover run directory removed"
    );
    // And it takes new work.
    let next = s.submit("tiny", "echo fine", 60).await;
    assert_eq!(s.wait_terminal(&next, LIMIT).await["exit_code"], 0);
    signal_and_wait(&mut agents, Signal::SIGTERM);
}

#[tokio::test]
async fn api_killed_mid_burst_loses_no_accepted_request() {
    let mut s = Server::start(Options {
        mode: Mode::Api,
        ..Default::default()
    })
    .await;
    let pid = s.pid().unwrap();
    let accepted_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..400 {
        let (api, count) = (s.api(), accepted_so_far.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"vm_name": "tiny", "commands": format!("echo {i}")});
            let r = api
                .try_call(Method::POST, "/requests", Some(&body))
                .await
                .ok()?;
            if r.status != 201 {
                return None;
            }
            let v = r.try_json()?;
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(v["uuid"].as_str()?.to_string())
        }));
    }
    // Kill it mid-burst: after some answers, while others are in flight.
    let start = Instant::now();
    while accepted_so_far.load(std::sync::atomic::Ordering::SeqCst) < 50 {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let mut accepted = Vec::new();
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            accepted.push(id);
        }
    }
    s.stop();
    assert!(
        accepted.len() >= 50 && accepted.len() < 400,
        "{} accepted",
        accepted.len()
    );
    let c = rusqlite::Connection::open(&s.db).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    for id in &accepted {
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM requests WHERE uuid = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "request {id} got a 201 but is not stored");
    }
}

async fn kill_qemu(s: &Server) {
    let pids = s.qemu_processes();
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn qemu_killed_during_boot_or_command_fails_with_its_status() {
    let (s, _slot) = one_vm(Options::default()).await;
    // During a command.
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    kill_qemu(&s).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("QEMU exited unexpectedly (killed by SIGKILL)"),
        "{err}"
    );
    assert_eq!(r["shutdown_step"], "exited");
    // During boot.
    let id = s.submit("tiny", "echo never", 300).await;
    let start = Instant::now();
    while s.qemu_processes().is_empty() {
        assert!(start.elapsed() < LIMIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_qemu(&s).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "failed", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("killed by SIGKILL"),
        "{r}"
    );
}

#[tokio::test]
async fn guest_that_ignores_acpi_is_ended_by_quit() {
    let conf = kernel_conf("sqsim.acpi=0", "SHUTDOWN_TIMEOUT=\"3\"\n");
    let (s, _slot) = one_vm(Options {
        configs: vec![("tiny-noacpi".into(), conf)],
        ..Default::default()
    })
    .await;
    let id = s.submit("tiny-noacpi", "echo hi; exit 5", 60).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(5)),
        "{r}"
    );
    assert_eq!(r["shutdown_step"], "quit");
    let ms = r["shutdown_ms"].as_i64().unwrap();
    assert!(
        (3000..8000).contains(&ms),
        "powerdown waited SHUTDOWN_TIMEOUT then quit: {ms} ms"
    );
    assert!(s
        .output(&id, "system")
        .await
        .contains("VM ended by QMP quit"));
    assert!(s.qemu_processes().is_empty());
}

#[tokio::test]
async fn guest_panic_fails_promptly() {
    let (s, _slot) = one_vm(Options::default()).await;
    let id = s
        .submit(
            "tiny",
            "echo about to panic; echo c > /proc/sysrq-trigger; sleep 600",
            300,
        )
        .await;
    s.wait_output(&id, "stdout", "about to panic").await;
    let start = Instant::now();
    let r = s.wait_terminal(&id, LIMIT).await;
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "not after the 300 s timeout"
    );
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(err.starts_with("guest panicked"), "{err}");
    assert!(s.qemu_processes().is_empty());
}

#[tokio::test]
async fn guest_reboot_and_dying_shells_end_truthfully() {
    let (s, _slot) = one_vm(Options::default()).await;
    // A reboot ends the VM (-no-reboot) and the request fails, saying so.
    let id = s.submit("tiny", "echo rebooting; reboot -f", 120).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("guest shut down before the commands finished") && err.contains("reset"),
        "{err}"
    );
    // The script's own shell killed: its exit status (128+9).
    let id = s.submit("tiny", "echo x; kill -9 $$", 120).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(137)),
        "{r}"
    );
    // The login shell that runs the script killed: init starts a new one, the agent notices.
    let id = s
        .submit("tiny", "echo bye; kill -9 $PPID; sleep 600", 120)
        .await;
    let start = Instant::now();
    let r = s.wait_terminal(&id, LIMIT).await;
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "well before the 120 s timeout"
    );
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["error"].as_str().unwrap().contains("shell exited"), "{r}");
    assert!(s.qemu_processes().is_empty());
}

#[tokio::test]
async fn console_flood_arrives_byte_exact_with_bounded_memory() {
    // 100 MB takes the TCG serial port many minutes; CI floods SQLITE_SIM_FLOOD_MB (default 4),
    // scripts/bench.sh the full 100 MB.
    let mb: u64 = std::env::var("SQLITE_SIM_FLOOD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let lines = mb * 1_000_000 / 8; // `seq` lines average ~8 bytes here
    let (s, _slot) = one_vm(Options::default()).await;
    let pid = s.pid().unwrap();
    let id = s
        .submit(
            "tiny",
            &format!("seq 1 {lines} | sha256sum >&2; seq 1 {lines}"),
            3600,
        )
        .await;
    let mut max_rss = 0;
    let start = Instant::now();
    loop {
        max_rss = max_rss.max(rss_kib(pid).unwrap_or(0));
        let r = s.get(&id).await;
        if matches!(r["status"].as_str(), Some("done" | "failed" | "cancelled")) {
            assert_eq!(r["exit_code"], 0, "{r}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "flood too slow"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let raw = s.raw(&id, None).await;
    assert!(raw.len() as u64 >= lines * 6, "{} bytes", raw.len());
    let host = format!("{:x}", sha2::Sha256::digest(&raw));
    let guest = s.output(&id, "stderr").await;
    assert_eq!(
        guest.split_whitespace().next(),
        Some(host.as_str()),
        "guest and store disagree"
    );
    assert!(
        max_rss < 200 * 1024,
        "supervisor RSS peaked at {max_rss} KiB"
    );
}

#[tokio::test]
async fn burst_of_50_never_exceeds_the_vm_limit() {
    require_image();
    // This test runs two VMs at once: take two of the suite's slots.
    let _a = vm_slot();
    let _b = vm_slot();
    let s = Server::start(Options {
        env: vec![
            ("SQLITE_SIM_AGENT_COUNT".into(), "4".into()),
            ("SQLITE_SIM_MAX_CONCURRENT_VMS".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let api = s.api();
        tasks.push(tokio::spawn(async move {
            let (code, v) = api
                .submit_json(&json!({"vm_name": "tiny", "commands": format!("echo job {i}")}))
                .await;
            assert_eq!(code, 201);
            v["uuid"].as_str().unwrap().to_string()
        }));
    }
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let mut max_qemu = 0;
    let start = Instant::now();
    loop {
        max_qemu = max_qemu.max(s.qemu_processes().len());
        let done = s.get_json("/requests?status=done&limit=1").await.1["total"]
            .as_u64()
            .unwrap();
        if done == 50 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "only {done} of 50 done"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(max_qemu <= 2, "{max_qemu} QEMU processes at once");
    assert_eq!(max_qemu, 2, "both slots were used");
    for id in &ids {
        let r = s.get(id).await;
        assert_eq!(r["exit_code"], 0, "{r}");
    }
}

#[tokio::test]
async fn a_locked_database_delays_logs_but_loses_none() {
    let (s, _slot) = one_vm(Options::default()).await;
    let id = s
        .submit(
            "tiny",
            "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.5; done",
            120,
        )
        .await;
    s.wait_output(&id, "stdout", "line 1").await;
    // Another process holds the write lock for 4 s (under the 10 s busy timeout).
    let db = s.db.clone();
    tokio::task::spawn_blocking(move || {
        let c = rusqlite::Connection::open(db).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE").unwrap();
        std::thread::sleep(Duration::from_secs(4));
        c.execute_batch("COMMIT").unwrap();
    })
    .await
    .unwrap();
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["exit_code"], 0, "{r}");
    let want: String = (1..=8).map(|i| format!("line {i}\n")).collect();
    assert_eq!(s.output(&id, "stdout").await, want);
}

#[tokio::test]
async fn a_full_disk_is_reported_not_silently_dropped() {
    require_image();
    let _slot = vm_slot();
    // The database on a 4 MiB tmpfs (1 MiB of it the store's reserve); the command prints more.
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root (the suite runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let s = Server::start(Options {
        env: vec![(
            "SQLITE_SIM_DB_PATH".into(),
            mnt.path().join("sim.db").display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let id = s.submit("tiny", "seq 1 700000", 300).await;
    let start = Instant::now();
    let path = format!("/requests/{id}");
    let r = loop {
        if let Ok(resp) = s.try_call(Method::GET, &path, None).await {
            if let Some(r) = resp.try_json() {
                if matches!(r["status"].as_str(), Some("done" | "failed")) {
                    break r;
                }
            }
        }
        assert!(start.elapsed() < LIMIT, "no final state:\n{}", s.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The outcome says what was lost.
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("could not be stored") && err.contains("bytes"),
        "{err}"
    );
    assert!(
        s.logs().contains("could not be stored"),
        "and the agent's log says so"
    );
    assert!(s.qemu_processes().is_empty());
}

#[tokio::test]
async fn smuggled_qemu_options_never_break_the_agents_sockets() {
    let extra_qmp = "/tmp/sqs-extra-qmp.sock";
    let ok = format!(
        "IMAGE=\"tiny.qcow2\"\nMEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\n\
         ADDITIONAL_ARGS=\"-qmp unix:{extra_qmp},server=on,wait=off -nographic -serial null -name other\"\n"
    );
    let bad =
        "IMAGE=\"tiny.qcow2\"\nADDITIONAL_ARGS=\"-chardev socket,id=sqsim-console,path=/tmp/x\"\n";
    let (s, _slot) = one_vm(Options {
        configs: vec![("extra".into(), ok), ("hijack".into(), bad.into())],
        ..Default::default()
    })
    .await;
    let id = s.submit("extra", "echo still mine", 60).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(s.output(&id, "stdout").await, "still mine\n");
    let _ = std::fs::remove_file(extra_qmp);
    // Reusing the agent's chardev ids is refused before anything is stored.
    let (code, v) = s
        .submit_json(&json!({"vm_name": "hijack", "commands": "true"}))
        .await;
    assert_eq!(code, 422);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserved id prefix"),
        "{v}"
    );
}

#[tokio::test]
async fn run_directory_is_private_and_the_base_image_read_only() {
    let (s, _slot) = one_vm(Options::default()).await;
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    let dir = s.run_dir.join(&id);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for sock in ["qmp.sock", "console.sock", "stderr.sock"] {
        assert_eq!(mode(&dir.join(sock)) & 0o077, 0, "{sock} is private");
    }
    assert_eq!(
        mode(&dir.join("disk.qcow2")) & 0o077,
        0,
        "overlay is private"
    );
    // QEMU holds the base image open read-only.
    let pid = s.qemu_processes()[0];
    let base = std::fs::canonicalize(common::repo().join("vm_images/tiny.qcow2")).unwrap();
    let mut found = false;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(fd.path()).ok().as_deref() == Some(base.as_path()) {
            found = true;
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            assert_eq!(flags & 0o3, 0, "O_RDONLY: flags {flags:o}");
        }
    }
    assert!(found, "QEMU has the base image open");
    s.put_status(&id, "cancelled").await;
    s.wait_terminal(&id, LIMIT).await;
}

#[tokio::test]
async fn sigterm_stops_gracefully_shutting_vms_down() {
    let (mut s, _slot) = one_vm(Options::default()).await;
    let id = s.submit("tiny", "echo started; sleep 600", 300).await;
    s.wait_output(&id, "stdout", "started").await;
    let start = Instant::now();
    s.stop(); // SIGTERM, then waits for the process to exit
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
    assert!(s.qemu_processes().is_empty(), "no QEMU left");
    let c = rusqlite::Connection::open(&s.db).unwrap();
    let (status, error, step): (String, String, String) = c
        .query_row(
            "SELECT status, error, shutdown_step FROM requests WHERE uuid = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (status.as_str(), error.as_str()),
        ("failed", "agent stopping")
    );
    assert_eq!(step, "powerdown", "shut down through ACPI, not killed");
    assert!(s.logs().contains("stopping: shutting running VMs down"));
}
