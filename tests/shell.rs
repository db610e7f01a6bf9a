//! The commands run in the guest's own shell: the console's login shell by default (busybox
//! `sh` on `tiny`, bash where bash is the login shell), a `#!` line picks the interpreter, and
//! the VM config's `SHELL` overrides the default. Exit codes, stdout/stderr and byte-exactness
//! are the same whatever the shell.

mod common;

use common::{require_image, vm_slot, Options, Server};
use serde_json::Value;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

/// The tiny image booted directly, with `sqsim.shell=` choosing the console's login shell.
fn tiny_conf(login_shell: &str, extra: &str) -> String {
    let img = common::repo().join("vm_images");
    format!(
        "KERNEL=\"{}\"\nINITRD=\"{}\"\nAPPEND=\"console=ttyS0,115200 quiet sqsim.shell={login_shell}\"\n\
         MEMORY=\"128M\"\nACCEL=\"tcg\"\nPROMPT=\"root@tiny:[^#]*# \"\nBOOT_TIMEOUT=\"60\"\n\
         STDERR_DEVICE=\"/dev/ttyS1\"\n{extra}",
        img.join("tiny-vmlinuz").display(),
        img.join("tiny-initrd.gz").display(),
    )
}

async fn server() -> (Server, common::VmSlot) {
    require_image();
    let slot = vm_slot();
    let s = Server::start(Options {
        configs: vec![
            ("tiny-bash".into(), tiny_conf("/bin/bash", "")),
            ("tiny-ash".into(), tiny_conf("/bin/sh", "")),
            (
                "tiny-shell-bash".into(),
                tiny_conf("/bin/sh", "SHELL=\"/bin/bash\"\n"),
            ),
        ],
        ..Default::default()
    })
    .await;
    (s, slot)
}

/// Runs `commands` on `vm`; the finished request, its stdout, stderr and system log.
async fn run(s: &Server, vm: &str, commands: &str) -> (Value, String, String, String) {
    let id = s.submit(vm, commands, 120).await;
    let r = s.wait_terminal(&id, LIMIT).await;
    (
        r,
        s.output(&id, "stdout").await,
        s.output(&id, "stderr").await,
        s.output(&id, "system").await,
    )
}

fn done_with(r: &Value, code: i64) {
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(code)),
        "{r}"
    );
}

#[tokio::test]
async fn a_bash_login_shell_runs_bash_syntax() {
    let (s, _slot) = server().await;
    // The issue's own request: it must not end with dash's `Illegal option -o pipefail`.
    let (r, out, err, system) = run(
        &s,
        "tiny-bash",
        "echo \"bash=${BASH_VERSION%%.*}\"\nset -o pipefail\nfalse | true; echo \"pipe=$?\"\n\
         arr=(a b c); [[ ${#arr[@]} -eq 3 ]] && echo \"array=${arr[2]}\"\necho oops >&2\nexit 3\n",
    )
    .await;
    done_with(&r, 3);
    assert_eq!(out, "bash=5\npipe=1\narray=c\n", "{system}");
    assert_eq!(err, "oops\n");
    assert!(
        system.contains("commands run by /bin/bash (the console's login shell)"),
        "{system}"
    );
}

#[tokio::test]
async fn busybox_login_shell_stays_the_default_on_tiny() {
    let (s, _slot) = server().await;
    let (r, out, _, system) = run(&s, "tiny-ash", "echo \"bash=${BASH_VERSION:-none}\"").await;
    done_with(&r, 0);
    assert_eq!(out, "bash=none\n");
    assert!(
        system.contains("commands run by /bin/busybox sh (the console's login shell)"),
        "{system}"
    );
}

#[tokio::test]
async fn a_shebang_line_picks_the_interpreter() {
    let (s, _slot) = server().await;
    // Under a bash login shell and a bash SHELL override, `#!/bin/sh` still gets busybox sh.
    for vm in ["tiny-bash", "tiny-shell-bash"] {
        let (r, out, _, system) = run(
            &s,
            vm,
            "#!/bin/sh\necho \"bash=${BASH_VERSION:-none} args=$#\"\nexit 4\n",
        )
        .await;
        done_with(&r, 4);
        assert_eq!(out, "bash=none args=0\n", "{vm}");
        assert!(
            system.contains("commands run by their own #! line (#!/bin/sh)"),
            "{vm}: {system}"
        );
    }
    // And `#!/bin/bash` gets bash where the login shell is busybox.
    let (r, out, _, _) = run(&s, "tiny-ash", "#!/bin/bash\necho \"${BASH_VERSION%%.*}\"").await;
    done_with(&r, 0);
    assert_eq!(out, "5\n");
}

#[tokio::test]
async fn the_vm_configs_shell_overrides_the_login_shell() {
    let (s, _slot) = server().await;
    let (r, out, _, system) = run(
        &s,
        "tiny-shell-bash",
        "set -o pipefail; false | true; echo \"pipe=$? ${BASH_VERSION%%.*}\"",
    )
    .await;
    done_with(&r, 0);
    assert_eq!(out, "pipe=1 5\n");
    assert!(
        system.contains("commands run by /bin/bash (SHELL in the VM config)"),
        "{system}"
    );
}

#[tokio::test]
async fn bytes_and_size_limit_are_the_same_under_bash() {
    let (s, _slot) = server().await;
    // Quoting, non-ASCII, no trailing newline, and a script near the 64 KiB limit.
    let filler = format!("# {}\n", "x".repeat(1000)).repeat(60);
    let script = format!("{filler}printf '%s' 'a\"b'\\''c $HOME \\\\n é ✓'\nprintf 'tail' >&2\n");
    assert!(script.len() > 60_000 && script.len() < 64 * 1024);
    let (r, out, err, _) = run(&s, "tiny-bash", &script).await;
    done_with(&r, 0);
    assert_eq!(out, "a\"b'c $HOME \\\\n é ✓");
    assert_eq!(err, "tail");
}
