//! The binary's own commands: `config` and `status`, settings from the environment and `.env`.

mod common;

use std::process::Command;

fn sqlite_sim(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let repo = common::repo();
    let out = Command::new(env!("CARGO_BIN_EXE_sqlite-sim"))
        .args(args)
        .current_dir(dir)
        .env("SQLITE_SIM_VM_CONFIG_DIR", repo.join("vm_configs"))
        .env("SQLITE_SIM_VM_IMAGES_DIR", repo.join("vm_images"))
        .env("SQLITE_SIM_DB_PATH", dir.join("s.db"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_prints_every_setting_and_validates_vms() {
    common::require_image();
    let d = tempfile::tempdir().unwrap();
    let (code, out, _) = sqlite_sim(d.path(), &["config"], &[]);
    assert_eq!(code, 0, "{out}");
    for var in [
        "SQLITE_SIM_DB_PATH",
        "SQLITE_SIM_API_HOST=127.0.0.1",
        "SQLITE_SIM_API_PORT=8000",
        "SQLITE_SIM_AGENT_COUNT=2",
        "SQLITE_SIM_AGENT_POLL_INTERVAL=5",
        "SQLITE_SIM_MAX_CONCURRENT_VMS=10",
        "SQLITE_SIM_DEFAULT_TIMEOUT=300",
        "SQLITE_SIM_MAX_TIMEOUT=3600",
        "SQLITE_SIM_ENABLE_CORS=false",
        "SQLITE_SIM_ACCEL=auto",
        "SQLITE_SIM_RUN_DIR",
        "SQLITE_SIM_QEMU_BINARY=qemu-system-x86_64",
    ] {
        assert!(out.contains(var), "{var} missing from:\n{out}");
    }
    assert!(out.contains("VM tiny: ok"), "{out}");
}

#[test]
fn invalid_setting_is_refused_naming_the_variable() {
    let d = tempfile::tempdir().unwrap();
    let (code, _, err) = sqlite_sim(d.path(), &["config"], &[("SQLITE_SIM_API_PORT", "eighty")]);
    assert_eq!(code, 2);
    assert!(err.contains("SQLITE_SIM_API_PORT"), "{err}");
    let (code, _, err) = sqlite_sim(d.path(), &["all"], &[("SQLITE_SIM_ACCEL", "hvf")]);
    assert_eq!(code, 2, "services refuse to start too");
    assert!(err.contains("SQLITE_SIM_ACCEL"), "{err}");
}

#[test]
fn dot_env_is_read_and_the_environment_wins() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join(".env"),
        "# local settings\nSQLITE_SIM_API_PORT=\"9123\"\nSQLITE_SIM_AGENT_COUNT=\"3\"\n",
    )
    .unwrap();
    let (_, out, _) = sqlite_sim(d.path(), &["config"], &[("SQLITE_SIM_AGENT_COUNT", "5")]);
    assert!(out.contains("SQLITE_SIM_API_PORT=9123"), "{out}");
    assert!(out.contains("SQLITE_SIM_AGENT_COUNT=5"), "{out}");
}

#[test]
fn broken_vm_config_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let confs = d.path().join("confs");
    std::fs::create_dir_all(&confs).unwrap();
    std::fs::write(confs.join("bad.conf"), "MEMORY=\"lots\"\n").unwrap();
    let (code, out, _) = sqlite_sim(
        d.path(),
        &["config"],
        &[("SQLITE_SIM_VM_CONFIG_DIR", confs.to_str().unwrap())],
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("VM bad: INVALID") && out.contains("MEMORY"),
        "{out}"
    );
}

#[test]
fn status_checks_database_qemu_and_images() {
    common::require_image();
    let d = tempfile::tempdir().unwrap();
    let (code, out, _) = sqlite_sim(d.path(), &["status"], &[("SQLITE_SIM_ACCEL", "tcg")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("database: ok"), "{out}");
    assert!(out.contains("qemu: QEMU emulator version"), "{out}");
    assert!(out.contains("accelerator: tcg"), "{out}");
    assert!(out.contains("tiny"), "{out}");
    let (code, out, _) = sqlite_sim(
        d.path(),
        &["status"],
        &[("SQLITE_SIM_QEMU_BINARY", "/nonexistent/qemu")],
    );
    assert_eq!(code, 1);
    assert!(out.contains("qemu: ERROR"), "{out}");
}

#[test]
fn status_shows_the_templates_of_warm_vms() {
    let d = tempfile::tempdir().unwrap();
    let confs = d.path().join("confs");
    std::fs::create_dir_all(&confs).unwrap();
    std::fs::write(confs.join("warm.conf"), "KERNEL=\"/k\"\nWARM=\"on\"\n").unwrap();
    std::fs::write(confs.join("cold.conf"), "KERNEL=\"/k\"\n").unwrap();
    std::fs::write(confs.join("was-warm.conf"), "KERNEL=\"/k\"\n").unwrap();
    let env = [
        ("SQLITE_SIM_VM_CONFIG_DIR", confs.to_str().unwrap()),
        ("SQLITE_SIM_ACCEL", "tcg"),
    ];
    let (code, out, _) = sqlite_sim(d.path(), &["status"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("template warm: none (no host has reported one)"),
        "{out}"
    );
    assert!(!out.contains("template cold"), "only warm VMs: {out}");

    // Rows as the agents write them, in the database `status` just created.
    let c = rusqlite::Connection::open(d.path().join("s.db")).unwrap();
    c.execute_batch(
        "INSERT INTO templates (host_id, vm_name, state, error, failures, updated_at) VALUES
           ('h1', 'warm', 'failed', 'boot timeout after 120 s', 2, '2026-12-01T10:00:00.000000Z'),
           ('h2', 'warm', 'ready', NULL, 0, '2026-12-01T10:00:00.000000Z'),
           ('h1', 'was-warm', 'ready', NULL, 0, '2026-12-01T10:00:00.000000Z');
         UPDATE templates SET built_at = '2026-12-01T09:00:00.000000Z', size_bytes = 432013312
           WHERE host_id = 'h2';",
    )
    .unwrap();
    let (code, out, _) = sqlite_sim(d.path(), &["status"], &env);
    assert_eq!(code, 0, "a failed template is not ill health: {out}");
    assert!(
        out.contains(
            "template warm: failed 2× on h1: boot timeout after 120 s; \
             ready on h2 (built 2026-12-01T09:00:00.000000Z, 412 MiB)\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("template was-warm: ready on h1 (WARM is off: no request uses it)"),
        "{out}"
    );
}

#[test]
fn config_redacts_the_api_token() {
    let d = tempfile::tempdir().unwrap();
    let (_, out, _) = sqlite_sim(
        d.path(),
        &["config"],
        &[("SQLITE_SIM_API_TOKEN", "hunter2")],
    );
    assert!(
        out.contains("SQLITE_SIM_API_TOKEN=<set, redacted>"),
        "{out}"
    );
    assert!(!out.contains("hunter2"));
}
