//! `ACCEL=auto` on every kind of host. `tests/support/fake-kvm-qemu` stands in for QEMU and makes
//! KVM abort, vanish, hang or work (really TCG), so these tests mean the same on an Intel host
//! whose KVM hangs, an AMD host whose KVM aborts, and a host with no KVM at all.

mod common;

use common::{require_image, vm_slot, Options, Server};
use serde_json::Value;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);

/// A server whose QEMU behaves like a host with `mode` KVM, with `SQLITE_SIM_ACCEL=auto`.
async fn host(mode: &str, extra: &[(&str, &str)]) -> (Server, common::VmSlot) {
    require_image();
    let slot = vm_slot();
    let mut env: Vec<(String, String)> = vec![
        ("SQLITE_SIM_ACCEL".into(), "auto".into()),
        (
            "SQLITE_SIM_QEMU_BINARY".into(),
            common::repo()
                .join("tests/support/fake-kvm-qemu")
                .display()
                .to_string(),
        ),
        ("SQSIM_FAKE_KVM".into(), mode.into()),
        // A "device" that opens read-write on any machine, so QEMU's behaviour decides.
        ("SQLITE_SIM_KVM_DEVICE".into(), "/dev/null".into()),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    // `tiny` pins TCG; this VM leaves the choice to SQLITE_SIM_ACCEL.
    let conf = "IMAGE=\"tiny.qcow2\"\nMEMORY=\"128M\"\nPROMPT=\"root@tiny:[^#]*# \"\n\
                BOOT_TIMEOUT=\"60\"\nSHUTDOWN_TIMEOUT=\"10\"\n";
    let s = Server::start(Options {
        configs: vec![
            ("tiny-auto".into(), conf.into()),
            ("tiny-kvm".into(), format!("{conf}ACCEL=\"kvm\"\n")),
        ],
        env,
        ..Default::default()
    })
    .await;
    (s, slot)
}

async fn run_ok(s: &Server, vm: &str) -> (Value, String) {
    let id = s.submit(vm, "echo hi", 120).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    let system = s.output(&id, "system").await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(0)),
        "{r}\n{system}"
    );
    assert_eq!(s.output(&id, "stdout").await, "hi\n");
    (r, system)
}

fn stdout_of(s: &Server, args: &[&str]) -> String {
    let out = s.run_command(args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The accelerator line of a run's `system` log.
fn accel_line(system: &str) -> &str {
    system
        .lines()
        .find(|l| l.starts_with("accelerator: "))
        .unwrap_or_else(|| panic!("no accelerator line in {system}"))
}

fn verdict(s: &Server) -> Value {
    let text = std::fs::read_to_string(s.run_dir.join("accel.json")).expect("verdict remembered");
    serde_json::from_str::<Value>(&text).unwrap()["verdict"].clone()
}

#[tokio::test]
async fn kvm_that_aborts_qemu_is_found_by_the_probe_and_never_used() {
    let (s, _slot) = host("aborts", &[]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    let line = accel_line(&system);
    assert!(
        line.starts_with("accelerator: tcg (auto, SQLITE_SIM_ACCEL; kvm: unusable: QEMU exited (killed by SIGABRT): error: failed to set MSR 0x10a"),
        "{line}"
    );
    assert!(!system.contains("(kvm)"), "KVM was never started: {system}");
    assert!(!system.contains("retrying under TCG"), "{system}");
    // `status` and `config` say what was chosen and why.
    for cmd in ["status", "config"] {
        let out = stdout_of(&s, &[cmd]);
        assert!(
            out.contains("accelerator: tcg (auto, SQLITE_SIM_ACCEL; kvm: unusable: QEMU exited (killed by SIGABRT): error: failed to set MSR 0x10a to 0x69"),
            "{cmd}: {out}"
        );
    }
    assert_eq!(verdict(&s)["source"], "probe");
}

#[tokio::test]
async fn kvm_whose_guest_never_runs_is_found_by_the_probe() {
    let (s, _slot) = host("hangs", &[]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    let line = accel_line(&system);
    assert!(
        line.contains("tcg (auto")
            && line
                .contains("kvm: unusable: the probe guest printed nothing within 5 s (KVM hangs)"),
        "{line}"
    );
    assert!(!system.contains("(kvm)"), "{system}");
}

#[tokio::test]
async fn no_kvm_at_all_means_tcg_without_asking_qemu() {
    let (s, _slot) = host("works", &[("SQLITE_SIM_KVM_DEVICE", "/nonexistent/kvm")]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    assert!(
        accel_line(&system).contains("kvm: unusable: /nonexistent/kvm: No such file or directory"),
        "{system}"
    );
    // A device that exists but a kernel without the module: QEMU's own words.
    let (s, _slot2) = host("absent", &[]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    assert!(
        accel_line(&system).contains("failed to initialize kvm: No such file or directory"),
        "{system}"
    );
}

#[tokio::test]
async fn working_kvm_is_chosen() {
    let (s, _slot) = host("works", &[]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    assert!(
        accel_line(&system).starts_with(
            "accelerator: kvm (auto, SQLITE_SIM_ACCEL; kvm: usable: the probe guest ran in real, protected and long mode"
        ),
        "{system}"
    );
    assert!(system.contains("(kvm)"), "{system}");
    assert!(stdout_of(&s, &["status"]).contains("accelerator: kvm (auto"));
}

#[tokio::test]
async fn kvm_that_passes_the_probe_but_hangs_a_guest_is_retried_under_tcg_and_remembered() {
    let (s, _slot) = host("hangs-after-probe", &[]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    assert!(
        accel_line(&system).starts_with("accelerator: kvm (auto"),
        "{system}"
    );
    assert!(
        system.contains("KVM failed (no console output within 15 s): retrying under TCG"),
        "{system}"
    );
    assert!(system.contains("(tcg)"), "{system}");
    assert!(
        system.contains("KVM is marked unusable on this host"),
        "{system}"
    );
    let v = verdict(&s);
    assert_eq!(v["usable"], false);
    assert!(v["source"].as_str().unwrap().starts_with("request "), "{v}");
    // The next run goes straight to TCG.
    let (_, system) = run_ok(&s, "tiny-auto").await;
    assert!(
        accel_line(&system).contains("tcg (auto")
            && accel_line(&system).contains("kvm: unusable: no console output within 15 s"),
        "{system}"
    );
    assert!(!system.contains("(kvm)"), "{system}");
}

#[tokio::test]
async fn kvm_that_passes_the_probe_but_aborts_a_run_is_retried_under_tcg() {
    let (s, _slot) = host("aborts-after-probe", &[]).await;
    let (_, system) = run_ok(&s, "tiny-auto").await;
    assert!(
        system.contains("KVM failed (QEMU exited during start-up (killed by SIGABRT)")
            && system.contains("failed to set MSR 0x10a")
            && system.contains("retrying under TCG"),
        "{system}"
    );
    assert_eq!(verdict(&s)["usable"], false);
    assert!(stdout_of(&s, &["status"]).contains("kvm: unusable: QEMU exited during start-up"));
}

#[tokio::test]
async fn pinned_kvm_on_a_broken_host_fails_with_qemus_words_and_no_retry() {
    let (s, _slot) = host("aborts", &[]).await;
    let id = s.submit("tiny-kvm", "echo hi", 60).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(r["status"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("failed to set MSR 0x10a to 0x69"), "{error}");
    let system = s.output(&id, "system").await;
    assert!(
        accel_line(&system).starts_with("accelerator: kvm (pinned by the VM config)"),
        "{system}"
    );
    assert!(!system.contains("retrying"), "{system}");
}
