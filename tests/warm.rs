//! Warm start with the real tiny guest: templates are built once, requests restore clones of
//! them, clones are isolated from each other and from the template, get their own randomness
//! and the host's clock, stale and broken templates never serve a request, and the pool hands
//! out clones restored ahead of time.

mod common;

use common::{env_pairs, require_image, sha256_file, vm_slot, Mode, Options, Server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LIMIT: Duration = Duration::from_secs(180);

/// The tiny image booted directly (so a test can edit its config freely), warm.
fn warm_conf(extra: &str) -> String {
    let img = common::repo().join("vm_images");
    format!(
        "KERNEL=\"{}\"\nINITRD=\"{}\"\nAPPEND=\"console=ttyS0,115200 quiet\"\n\
         IMAGE=\"{}\"\nMEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\n\
         BOOT_TIMEOUT=\"60\"\nSHUTDOWN_TIMEOUT=\"10\"\nSTDERR_DEVICE=\"/dev/ttyS1\"\nWARM=\"on\"\n{extra}",
        img.join("tiny-vmlinuz").display(),
        img.join("tiny-initrd.gz").display(),
        img.join("tiny.qcow2").display(),
    )
}

async fn server(configs: &[(&str, String)], env: &[(&str, &str)]) -> (Server, common::VmSlot) {
    require_image();
    let slot = vm_slot();
    let s = Server::start(Options {
        configs: configs
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect(),
        env: env_pairs(env),
        ..Default::default()
    })
    .await;
    (s, slot)
}

/// The directory of `vm`'s ready template, once there is one.
async fn template_dir(s: &Server, vm: &str) -> PathBuf {
    let start = Instant::now();
    loop {
        if let Some(d) = ready_templates(s, vm).into_iter().next() {
            return d;
        }
        assert!(
            start.elapsed() < LIMIT,
            "no template of {vm}; server log:\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready_templates(s: &Server, vm: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(s.run_dir.join("templates")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{vm}-")))
                && p.join("meta.json").exists()
        })
        .collect()
}

/// Runs `commands`; the finished request, its stdout and its system log.
async fn run(s: &Server, vm: &str, commands: &str) -> (Value, String, String) {
    let id = s.submit(vm, commands, 120).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    (
        r,
        s.output(&id, "stdout").await,
        s.output(&id, "system").await,
    )
}

fn done(r: &Value, system: &str) {
    assert_eq!(r["status"], "done", "{r}\n{system}");
}

#[tokio::test]
async fn requests_restore_clones_of_a_template_built_once() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    let dir = template_dir(&s, "w").await;
    let key = dir.file_name().unwrap().to_str().unwrap()[2..].to_string();
    let (r, out, system) = run(&s, "w", "echo hi; echo err >&2; exit 3").await;
    done(&r, &system);
    assert_eq!(r["exit_code"], 3);
    assert_eq!(out, "hi\n");
    assert_eq!(r["boot_mode"], "warm", "{r}");
    assert!(r["restore_ms"].as_i64().unwrap() > 0, "{r}");
    assert!(
        system.contains(&format!("restored from template {key}")),
        "{system}"
    );
    assert!(!system.contains("shell prompt after"), "no boot: {system}");
    assert!(
        system.contains("commands run by /bin/busybox sh (the console's login shell)"),
        "the template's login shell: {system}"
    );
    let id = r["uuid"].as_str().unwrap();
    assert_eq!(s.output(id, "stderr").await, "err\n");
    // The template serves every later request; it is not rebuilt.
    let (r, _, system) = run(&s, "w", "true").await;
    done(&r, &system);
    assert_eq!(r["boot_mode"], "warm");
    assert_eq!(s.logs().matches("building a template").count(), 1);
    // A request may still ask for a cold boot.
    let id = s
        .submit_json(&serde_json::json!({"vm_name": "w", "commands": "echo cold", "boot": "cold"}))
        .await
        .1["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["boot_mode"].as_str()),
        (Some("done"), Some("cold")),
        "{r}"
    );
    assert!(r["restore_ms"].is_null());
    assert!(s
        .output(&id, "system")
        .await
        .contains("cold boot (the request asked for it)"));
}

#[tokio::test]
async fn clones_are_isolated_and_the_template_is_never_written() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    let dir = template_dir(&s, "w").await;
    let files = ["disk.qcow2", "ram", "state"];
    let before: Vec<String> = files.iter().map(|f| sha256_file(&dir.join(f))).collect();
    let base = common::repo().join("vm_images/tiny.qcow2");
    let base_sum = sha256_file(&base);
    // One clone writes to its disk and dirties lots of RAM while another looks.
    let writer = s
        .submit(
            "w",
            "echo secret > /root/mark; printf SECRET-MARK | dd of=/dev/vda bs=512 seek=100 \
             conv=fsync 2>/dev/null; head -c 60000000 /dev/zero > /tmp/fill; echo wrote; sleep 30",
            120,
        )
        .await;
    s.wait_output(&writer, "stdout", "wrote").await;
    // While it runs: its RAM file is mapped privately, the template disk opened read-only.
    let qemu = s.qemu_processes();
    assert!(!qemu.is_empty());
    for pid in &qemu {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        for line in maps
            .lines()
            .filter(|l| l.ends_with(&format!("{}/ram", dir.display())))
        {
            let perms = line.split_whitespace().nth(1).unwrap();
            assert!(
                perms.ends_with('p'),
                "mapped private (copy-on-write): {line}"
            );
        }
        check_read_only(*pid, &dir.join("disk.qcow2"));
    }
    let (r, out, system) = run(
        &s,
        "w",
        "cat /root/mark 2>/dev/null || echo absent; dd if=/dev/vda bs=512 skip=100 count=1 \
         2>/dev/null | grep -c SECRET-MARK",
    )
    .await;
    done(&r, &system);
    assert_eq!(
        out, "absent\n0\n",
        "one clone's RAM and disk are not another's"
    );
    s.put_status(&writer, "cancelled").await;
    s.wait_terminal(&writer, LIMIT).await;
    let after: Vec<String> = files.iter().map(|f| sha256_file(&dir.join(f))).collect();
    assert_eq!(before, after, "template files unchanged");
    assert_eq!(sha256_file(&base), base_sum, "base image unchanged");
}

/// If QEMU has `path` open, it is open read-only.
fn check_read_only(pid: i32, path: &Path) {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() == Some(path) {
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
            assert_eq!(
                flags & 0o3,
                0,
                "{} opened O_RDONLY: {flags:o}",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn two_clones_read_different_random_bytes_right_after_restore() {
    // The template reads /dev/urandom just before it is saved: without a reseed, every clone
    // would continue from that same generator state.
    let conf = warm_conf("PREPARE=\"head -c 64 /dev/urandom >/dev/null\"\n");
    let (s, _slot) = server(&[("w", conf)], &[]).await;
    template_dir(&s, "w").await;
    let read = "head -c 16 /dev/urandom | od -An -tx1";
    let (a, b) = tokio::join!(run(&s, "w", read), run(&s, "w", read));
    done(&a.0, &a.2);
    done(&b.0, &b.2);
    assert_eq!(a.1.split_whitespace().count(), 16, "{}", a.1);
    assert_ne!(a.1, b.1, "clones share random bytes");
    for system in [&a.2, &b.2] {
        assert!(
            system.contains("guest RNG reseeded from 64 host bytes (sqsim-reseed)"),
            "{system}"
        );
    }
}

#[tokio::test]
async fn a_clone_has_the_hosts_clock_not_the_templates() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    template_dir(&s, "w").await;
    // Let the template age: its saved clock falls behind.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let (r, out, system) = run(&s, "w", "date +%s").await;
    let after = now();
    done(&r, &system);
    let guest: f64 = out.trim().parse().unwrap();
    // Whole seconds in the guest: within 1 s of the host, however long the run took.
    assert!(
        guest >= before.floor() - 1.0 && guest <= after.ceil() + 1.0,
        "guest {guest}, host {before}..{after}"
    );
}

#[tokio::test]
async fn a_stale_template_never_serves_a_request_and_is_rebuilt() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    let old = template_dir(&s, "w").await;
    // Any change to the config makes another template.
    let conf = s.config_dir.join("w.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{text}# changed\n")).unwrap();
    let (r, _, system) = run(&s, "w", "true").await;
    done(&r, &system);
    if r["boot_mode"] == "warm" {
        // The rebuild was quick enough to be ready already: then it is the new key.
        assert!(
            !system.contains(old.file_name().unwrap().to_str().unwrap()),
            "{system}"
        );
    } else {
        assert_eq!(r["boot_mode"], "cold", "{r}");
        assert!(
            system.contains("cold boot: its template is stale"),
            "{system}"
        );
    }
    let start = Instant::now();
    while old.exists() || ready_templates(&s, "w").is_empty() {
        assert!(start.elapsed() < LIMIT, "not rebuilt:\n{}", s.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r, _, system) = run(&s, "w", "true").await;
    done(&r, &system);
    assert_eq!(r["boot_mode"], "warm", "{system}");
}

#[tokio::test]
async fn a_clone_that_fails_to_restore_falls_back_to_a_cold_boot() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    let dir = template_dir(&s, "w").await;
    // A corrupt device state: QEMU refuses the migration.
    let state = dir.join("state");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(&state, b"not a migration stream").unwrap();
    let (r, out, system) = run(&s, "w", "echo still-runs").await;
    done(&r, &system);
    assert_eq!(out, "still-runs\n");
    assert_eq!(r["boot_mode"], "cold", "{r}");
    assert!(
        system.contains("falling back to a cold boot") && system.contains("marked failed"),
        "{system}"
    );
    // Rebuilt once, and warm again.
    let start = Instant::now();
    loop {
        let (r, _, system) = run(&s, "w", "true").await;
        done(&r, &system);
        if r["boot_mode"] == "warm" {
            break;
        }
        assert!(start.elapsed() < LIMIT, "never warm again:\n{}", s.logs());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(s.logs().matches("building a template").count(), 2);
}

#[tokio::test]
async fn prepare_runs_in_the_template_and_a_failing_one_never_breaks_requests() {
    let (s, _slot) = server(
        &[
            (
                "w",
                warm_conf("PREPARE=\"echo prepared > /root/prepared\"\n"),
            ),
            ("bad", warm_conf("PREPARE=\"exit 7\"\n")),
        ],
        &[],
    )
    .await;
    template_dir(&s, "w").await;
    let (r, out, system) = run(&s, "w", "cat /root/prepared").await;
    done(&r, &system);
    assert_eq!(
        (r["boot_mode"].as_str(), out.as_str()),
        (Some("warm"), "prepared\n")
    );
    // A PREPARE that fails: no template (it is tried twice, then given up); requests boot
    // cold and succeed.
    let start = Instant::now();
    while s.logs().matches("template build failed vm=\"bad\"").count() < 2 {
        assert!(start.elapsed() < LIMIT, "{}", s.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (r, out, system) = run(&s, "bad", "echo fine").await;
    done(&r, &system);
    assert_eq!(
        (r["boot_mode"].as_str(), out.as_str()),
        (Some("cold"), "fine\n")
    );
    assert!(
        system.contains("PREPARE commands exited with status 7"),
        "the reason is told: {system}"
    );
    assert!(ready_templates(&s, "bad").is_empty());
}

#[tokio::test]
async fn warm_wait_makes_the_first_request_wait_for_the_template() {
    let (s, _slot) = server(&[("w", warm_conf("WARM_WAIT=\"on\"\n"))], &[]).await;
    // Submitted at once, while the template is being built.
    let (r, _, system) = run(&s, "w", "echo hi").await;
    done(&r, &system);
    assert_eq!(r["boot_mode"], "warm", "{system}");
    assert!(system.contains("waiting for template"), "{system}");
}

#[tokio::test]
async fn the_pool_hands_out_clones_restored_ahead_and_refills() {
    let (s, _slot) = server(&[("w", warm_conf("WARM_POOL=\"2\"\n"))], &[]).await;
    template_dir(&s, "w").await;
    let pooled = || {
        std::fs::read_dir(&s.run_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("pool-"))
            .count()
    };
    let start = Instant::now();
    while pooled() < 2 {
        assert!(start.elapsed() < LIMIT, "pool never filled:\n{}", s.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r, out, system) = run(&s, "w", "echo pooled").await;
    done(&r, &system);
    assert_eq!(
        (r["boot_mode"].as_str(), out.as_str()),
        (Some("pool"), "pooled\n"),
        "{system}"
    );
    assert!(system.contains("from the pool"), "{system}");
    // Refilled to two paused clones.
    let start = Instant::now();
    while pooled() < 2 {
        assert!(start.elapsed() < LIMIT, "pool never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopping the agents kills the pool: no QEMU is left behind.
    let mut s = s;
    s.stop();
    assert!(
        common::eventually(Duration::from_secs(10), || s.qemu_processes().is_empty()).await,
        "pooled QEMU left behind"
    );
}

#[tokio::test]
async fn one_build_per_vm_across_agents_processes_and_crashes_leave_nothing() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    // Kill the server mid-build: a half-built template must never be used.
    let start = Instant::now();
    while !s.logs().contains("building a template") {
        assert!(start.elapsed() < LIMIT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = s;
    s.restart_hard(Mode::All).await;
    // And a second agents process beside it: only one of them builds.
    let _second = s.spawn_process(Mode::Agents);
    let dir = template_dir(&s, "w").await;
    assert!(dir.join("meta.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&s.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tpl-"))
        .collect();
    assert!(
        common::eventually(Duration::from_secs(20), || {
            std::fs::read_dir(&s.run_dir)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("tpl-"))
        })
        .await,
        "the crashed build's directory is cleaned up: {leftovers:?}"
    );
    // Started at most once per process life: the killed one, then one of the two.
    assert_eq!(
        s.logs().matches("template ready").count(),
        1,
        "{}",
        s.logs()
    );
    let (r, _, system) = run(&s, "w", "true").await;
    done(&r, &system);
    assert_eq!(r["boot_mode"], "warm");
}

#[tokio::test]
async fn templates_are_managed_over_the_api() {
    let (s, _slot) = server(&[("w", warm_conf(""))], &[]).await;
    template_dir(&s, "w").await;
    let (r, _, system) = run(&s, "w", "true").await;
    done(&r, &system);
    let (code, vm) = s.get_json("/vms/w").await;
    assert_eq!(code, 200, "{vm}");
    let t = &vm["template"];
    assert_eq!(t["state"], "ready", "{vm}");
    let host = &t["hosts"][0];
    assert!(host["size_bytes"].as_i64().unwrap() > 0, "{vm}");
    assert!(host["build_ms"].as_i64().unwrap() > 0, "{vm}");
    assert_eq!(host["built_from"]["vm"], "w", "{vm}");
    assert_eq!(t["restores"], 1, "{vm}");
    assert!(t["restore_p50_ms"].as_i64().unwrap() > 0);
    // Rebuild on order.
    let (code, v) = s.post_json("/vms/w/template", &serde_json::json!({})).await;
    assert_eq!(code, 202, "{v}");
    let start = Instant::now();
    while s.logs().matches("template ready").count() < 2 {
        assert!(start.elapsed() < LIMIT, "not rebuilt:\n{}", s.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Delete on order: gone, and it stays gone; requests boot cold and say why.
    let (code, v) = s.delete("/vms/w/template").await;
    assert_eq!(code, 202, "{v}");
    let start = Instant::now();
    loop {
        let (_, vm) = s.get_json("/vms/w").await;
        if vm["template"]["state"] == "none" && ready_templates(&s, "w").is_empty() {
            break;
        }
        assert!(start.elapsed() < LIMIT, "not deleted: {vm}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r, _, system) = run(&s, "w", "true").await;
    done(&r, &system);
    assert_eq!(r["boot_mode"], "cold");
    assert!(system.contains("deleted on order"), "{system}");
    assert!(
        ready_templates(&s, "w").is_empty(),
        "not rebuilt on its own"
    );
    assert_eq!(
        s.delete("/vms/w/template").await.0,
        404,
        "nothing left to delete"
    );
}
