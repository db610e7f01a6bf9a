//! The whole path with real QEMU (TCG) and the tiny guest: REST submission → agent → QMP →
//! serial console → SQLite logs → shutdown ladder. Each test boots at least one VM.

mod common;

use common::{require_image, sha256_file, vm_slot, Options, Server};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs `commands` on `vm` in a fresh server and returns (request, stdout).
async fn run_one(vm: &str, commands: &str, opts: Options) -> (serde_json::Value, String, Server) {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(opts).await;
    let id = s.submit(vm, commands, 60).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    let out = s.output(&id, "stdout").await;
    (r, out, s)
}

#[tokio::test]
async fn hello_world_reaches_done_with_every_log_type() {
    let (r, out, s) = run_one("tiny", "echo Hello World && uname -a", Options::default()).await;
    assert_eq!(r["status"], "done", "{r}");
    assert_eq!(r["exit_code"], 0);
    assert!(r["error"].is_null());
    assert_eq!(
        r["shutdown_step"], "powerdown",
        "ACPI power-off ends the tiny guest"
    );
    for f in ["created_at", "started_at", "finished_at", "agent_id"] {
        assert!(r[f].is_string(), "{f} missing: {r}");
    }
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("Hello World"));
    assert!(lines.next().unwrap().starts_with("Linux tiny "), "{out}");

    let id = r["uuid"].as_str().unwrap();
    let logs = s.logs_of(id).await;
    let ids: Vec<i64> = logs.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ordered by id");
    assert_eq!(
        s.output(id, "command").await,
        "echo Hello World && uname -a"
    );
    assert!(s.output(id, "boot").await.contains("root@tiny:~# "));
    let system = s.output(id, "system").await;
    for needle in [
        "QMP connected",
        "vCPUs started",
        "SHUTDOWN",
        "VM ended by guest powered off",
        // The last line before `finish`: the ownership fence lets the owner's run end stored.
        "commands exited with status 0",
    ] {
        assert!(
            system.contains(needle),
            "{needle:?} not in system log:\n{system}"
        );
    }
    for e in &logs {
        let ts = e["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.contains('T'), "RFC 3339 UTC: {ts}");
    }
    s.no_qemu_left().await;
    assert!(
        !s.run_dir.join(id).exists(),
        "run directory removed after success"
    );
}

#[tokio::test]
async fn false_gives_exit_code_1_and_status_done() {
    let (r, out, s) = run_one("tiny", "false", Options::default()).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(1)),
        "{r}"
    );
    assert_eq!(out, "");
    s.no_qemu_left().await;
}

#[tokio::test]
async fn multi_line_script_with_exit_3() {
    let script = "echo one\nfor i in 1 2 3; do\n  echo \"n=$i\"\ndone\nexit 3\necho never\n";
    let (r, out, _s) = run_one("tiny", script, Options::default()).await;
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(out, "one\nn=1\nn=2\nn=3\n");
}

#[tokio::test]
async fn quoting_heavy_and_non_ascii_commands_survive_byte_exact() {
    let script = r#"printf '%s\n' "double \"quoted\"" 'single '\''quoted'\''' back\\slash '$HOME' "$((6*7))"
echo "héllo wörld ✓ 日本語" `echo tick` $(echo dollar)
printf 'tab\there\nno newline at end'"#;
    let (r, out, _s) = run_one("tiny", script, Options::default()).await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(
        out,
        "double \"quoted\"\nsingle 'quoted'\nback\\slash\n$HOME\n42\n\
         héllo wörld ✓ 日本語 tick dollar\ntab\there\nno newline at end"
    );
}

#[tokio::test]
async fn script_near_the_size_limit_is_typed_intact() {
    // ~60 KiB of script: many upload lines, each acknowledged by the guest.
    let mut script = String::new();
    for i in 0..1500 {
        script.push_str(&format!("echo line-{i:05}-{}\n", "x".repeat(24)));
    }
    assert!(script.len() > 50_000 && script.len() < 64 * 1024);
    let (r, out, _s) = run_one("tiny", &script, Options::default()).await;
    assert_eq!(r["exit_code"], 0, "{r}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1500);
    assert_eq!(lines[1499], format!("line-01499-{}", "x".repeat(24)));
}

#[tokio::test]
async fn stderr_arrives_on_its_own_port() {
    let (r, out, s) = run_one(
        "tiny",
        "echo to-out; echo to-err >&2; ls /nonexistent",
        Options::default(),
    )
    .await;
    assert_eq!(r["status"], "done");
    assert_ne!(r["exit_code"], 0);
    assert_eq!(out, "to-out\n");
    let err = s.output(r["uuid"].as_str().unwrap(), "stderr").await;
    assert!(err.starts_with("to-err\n"), "{err:?}");
    assert!(err.contains("nonexistent"), "{err:?}");
}

#[tokio::test]
async fn base_image_is_never_written() {
    let img = common::repo().join("vm_images/tiny.qcow2");
    require_image();
    let before = sha256_file(&img);
    // Scribble over the guest's disk: the writes land in the per-run overlay.
    let (r, _out, _s) = run_one(
        "tiny",
        "dd if=/dev/zero of=/dev/vda bs=4096 count=64 conv=fsync 2>/dev/null; sync; echo wrote",
        Options::default(),
    )
    .await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(sha256_file(&img), before);
}

#[tokio::test]
async fn pty_console_transport_works_the_same() {
    let conf =
        "IMAGE=\"tiny.qcow2\"\nMEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\n\
                CONSOLE=\"pty\"\nSTDERR_DEVICE=\"/dev/ttyS1\"\nBOOT_TIMEOUT=\"60\"\n";
    let opts = Options {
        configs: vec![("tiny-pty".into(), conf.into())],
        ..Default::default()
    };
    let (r, out, s) = run_one("tiny-pty", "echo via pty; exit 5", opts).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(5)),
        "{r}"
    );
    assert_eq!(out, "via pty\n");
    let id = r["uuid"].as_str().unwrap();
    assert!(s
        .output(id, "system")
        .await
        .contains("console on pty /dev/pts/"));
    assert!(
        s.output(id, "boot").await.contains("BusyBox"),
        "boot bytes before the prompt kept"
    );
    s.no_qemu_left().await;
}

#[tokio::test]
async fn boot_timeout_says_what_the_console_showed_last() {
    let conf = "IMAGE=\"tiny.qcow2\"\nMEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"never-matches> \"\n\
                BOOT_TIMEOUT=\"25\"\nSHUTDOWN_TIMEOUT=\"3\"\n";
    let opts = Options {
        configs: vec![("wrong-prompt".into(), conf.into())],
        ..Default::default()
    };
    let (r, _out, s) = run_one("wrong-prompt", "echo hi", opts).await;
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("did not reach a shell prompt within 25 s"),
        "{err}"
    );
    assert!(
        err.contains("root@tiny"),
        "last console output quoted: {err}"
    );
    assert!(r["exit_code"].is_null());
    s.no_qemu_left().await;
}

#[tokio::test]
async fn timeout_fails_the_request_and_stops_the_vm() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options::default()).await;
    // Long enough to boot on a loaded 2-core machine, far shorter than the command.
    let id = s.submit("tiny", "echo started; sleep 600", 25).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["error"], "timed out after 25 s");
    assert_eq!(s.output(&id, "stdout").await, "started\n");
    assert!(r["shutdown_step"].is_string());
    s.no_qemu_left().await;
}

#[tokio::test]
async fn qemu_that_cannot_start_fails_with_its_stderr() {
    let conf = "IMAGE=\"tiny.qcow2\"\nACCEL=\"tcg\"\nADDITIONAL_ARGS=\"-no-such-option\"\n";
    let opts = Options {
        configs: vec![("broken".into(), conf.into())],
        ..Default::default()
    };
    let (r, _out, s) = run_one("broken", "echo hi", opts).await;
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(err.contains("QEMU exited during start-up"), "{err}");
    assert!(
        err.contains("no-such-option"),
        "QEMU's stderr included: {err}"
    );
    s.no_qemu_left().await;
}

#[tokio::test]
async fn missing_image_fails_clearly() {
    require_image();
    let conf = "IMAGE=\"does-not-exist.qcow2\"\nACCEL=\"tcg\"\n";
    let s = Server::start(Options {
        configs: vec![("ghost".into(), conf.into())],
        ..Default::default()
    })
    .await;
    let id = s.submit("ghost", "echo hi", 30).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "failed");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("does-not-exist.qcow2") && err.contains("not found"),
        "{err}"
    );
}

#[tokio::test]
async fn host_vm_limit_is_respected() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options {
        env: vec![
            ("SQLITE_SIM_AGENT_COUNT".into(), "2".into()),
            ("SQLITE_SIM_MAX_CONCURRENT_VMS".into(), "1".into()),
        ],
        ..Default::default()
    })
    .await;
    let a = s.submit("tiny", "sleep 1; echo a", 60).await;
    let b = s.submit("tiny", "sleep 1; echo b", 60).await;
    let ra = s.wait_terminal(&a, LIMIT).await;
    let rb = s.wait_terminal(&b, LIMIT).await;
    assert_eq!(
        (ra["exit_code"].as_i64(), rb["exit_code"].as_i64()),
        (Some(0), Some(0))
    );
    let (first, second) = if ra["started_at"].as_str() < rb["started_at"].as_str() {
        (&ra, &rb)
    } else {
        (&rb, &ra)
    };
    assert!(
        first["finished_at"].as_str().unwrap() <= second["started_at"].as_str().unwrap(),
        "runs overlapped with MAX_CONCURRENT_VMS=1: {first} {second}"
    );
}

#[tokio::test]
async fn separate_api_and_agents_processes_run_each_request_once() {
    require_image();
    let _slot = vm_slot();
    let s = Server::start(Options {
        mode: common::Mode::Api,
        env: vec![("SQLITE_SIM_MAX_CONCURRENT_VMS".into(), "2".into())],
        ..Default::default()
    })
    .await;
    // Two agents processes compete for the same database.
    let mut agents = [
        s.spawn_process(common::Mode::Agents),
        s.spawn_process(common::Mode::Agents),
    ];
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(s.submit("tiny", &format!("echo job-{i}"), 60).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let r = s.wait_terminal(id, LIMIT).await;
        assert_eq!(r["exit_code"], 0, "{r}");
        assert_eq!(s.output(id, "stdout").await, format!("job-{i}\n"));
        let claims = s
            .output(id, "system")
            .await
            .matches("claimed by agent")
            .count();
        assert_eq!(claims, 1, "request {id} claimed {claims} times");
    }
    for a in agents.iter_mut() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = a.wait();
    }
    s.no_qemu_left().await;
}

fn kernel_conf(extra_append: &str, extra: &str) -> String {
    let img = common::repo().join("vm_images");
    format!(
        "KERNEL=\"{k}\"\nINITRD=\"{i}\"\nAPPEND=\"console=ttyS0,115200 quiet{extra_append}\"\n\
         MEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\nBOOT_TIMEOUT=\"60\"\n\
         SHUTDOWN_TIMEOUT=\"10\"\nSTDERR_DEVICE=\"/dev/ttyS1\"\n{extra}",
        k = img.join("tiny-vmlinuz").display(),
        i = img.join("tiny-initrd.gz").display(),
    )
}

#[tokio::test]
async fn direct_kernel_boot_needs_no_disk() {
    let opts = Options {
        configs: vec![("tiny-kernel".into(), kernel_conf("", ""))],
        ..Default::default()
    };
    let (r, out, s) = run_one("tiny-kernel", "cat /proc/cmdline; ls /dev/vda 2>&1", opts).await;
    assert_eq!(r["status"], "done", "{r}");
    assert!(out.starts_with("console=ttyS0,115200 quiet\n"), "{out}");
    assert!(out.contains("No such file"), "no disk attached: {out}");
    let system = s.output(r["uuid"].as_str().unwrap(), "system").await;
    assert!(
        system.contains("-kernel") && !system.contains("-drive"),
        "{system}"
    );
}

#[tokio::test]
async fn login_and_password_prompts_are_answered_from_the_config() {
    let conf = kernel_conf(
        " sqsim.login=1",
        "LOGIN_USER=\"root\"\nLOGIN_PASSWORD=\"sqsim\"\n",
    );
    let opts = Options {
        configs: vec![("tiny-login".into(), conf)],
        ..Default::default()
    };
    // Run in the logged-in session on the console: its controlling terminal is ttyS0
    // (major 4, minor 64: tty_nr 1088), whatever the commands' own stdout is.
    let (r, out, s) = run_one("tiny-login", "id -u; cut -d' ' -f7 /proc/self/stat", opts).await;
    assert_eq!(r["status"], "done", "{r}");
    assert_eq!(out, "0\n1088\n");
    let boot = s.output(r["uuid"].as_str().unwrap(), "boot").await;
    assert!(
        boot.contains("tiny login: ") && boot.contains("Password: "),
        "{boot}"
    );
    assert!(
        !boot.contains("sqsim\r\n"),
        "the password is never echoed: {boot}"
    );
}

#[tokio::test]
async fn login_prompt_without_credentials_fails_clearly() {
    let opts = Options {
        configs: vec![("tiny-nologin".into(), kernel_conf(" sqsim.login=1", ""))],
        ..Default::default()
    };
    let (r, _out, s) = run_one("tiny-nologin", "true", opts).await;
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["error"].as_str().unwrap().contains("LOGIN_USER"), "{r}");
    s.no_qemu_left().await;
}
