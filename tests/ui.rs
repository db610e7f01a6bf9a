//! The dashboard at `/ui/`: its files and headers over HTTP, and the page itself in a real
//! browser: Debian's Chromium driven by playwright-core (`tests/ui/run.mjs`) against a real
//! server with the tiny guest. Screenshots land in `<target>/ui-screens/`.
//!
//! The browser tests need `chromium`, `node` and `tests/ui/node_modules` (scripts/test.sh
//! installs them) and the bundle (`scripts/build-ui.sh`). Without them they skip loudly, except
//! under `CI=true`, where a missing piece fails.

mod common;

use common::{Mode, Options, Server};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `<target>/debug/sqlite-sim` → `<target>`, where build-ui.sh writes `ui/`.
fn target_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_sqlite-sim"));
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn bundle() -> PathBuf {
    target_dir().join("ui")
}

/// Whether the browser tests can run here; panics under CI when they cannot.
fn browser_ready() -> bool {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !Path::new(&chromium).exists() {
        missing.push(format!(
            "{chromium} (apt-get install chromium chromium-driver)"
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (apt-get install nodejs npm)".into());
    }
    if !common::repo()
        .join("tests/ui/node_modules/playwright-core")
        .exists()
    {
        missing.push("tests/ui/node_modules (npm ci in tests/ui)".into());
    }
    if !bundle().join("index.html").exists() {
        missing.push(format!(
            "the dashboard bundle {} (scripts/build-ui.sh)",
            bundle().display()
        ));
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "browser tests cannot run, missing: {}; scripts/test.sh installs and builds them",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    false
}

/// Runs the named scenarios of tests/ui/run.mjs against `s`; panics with their output.
async fn run_scenarios(s: &Server, scenarios: &[&str], token: Option<&str>) {
    let out = target_dir().join("ui-screens");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(common::repo().join("tests/ui/run.mjs"))
        .arg(&s.url)
        .arg(&out)
        .args(scenarios)
        .kill_on_drop(true);
    if let Some(t) = token {
        cmd.env("UI_TOKEN", t);
    }
    let run = tokio::time::timeout(std::time::Duration::from_secs(900), cmd.output())
        .await
        .expect("browser scenarios did not finish in 15 min")
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("{text}");
    assert!(run.status.success(), "browser scenarios failed:\n{text}");
}

#[tokio::test]
async fn dashboard_in_a_real_browser() {
    if !browser_ready() {
        return;
    }
    common::require_image();
    let _slot = common::vm_slot();
    let s = Server::start(Options {
        env: vec![("SQLITE_SIM_UI_DIR".into(), bundle().display().to_string())],
        ..Default::default()
    })
    .await;
    let mut scenarios = vec!["vms", "submit-live", "hold-resume-cancel"];
    // Keeping a failed run and typing into it need the console branch's keep_on_failure and
    // WebSocket; the scenario runs as soon as the server's schema has the field.
    let (_, doc) = s.get_json("/openapi.json").await;
    if doc.to_string().contains("\"keep_on_failure\"") {
        scenarios.push("keep-attach");
    } else {
        eprintln!("keep-attach scenario not run: this server has no keep_on_failure yet");
    }
    // Likewise the artifacts listing and download, with the files branch.
    if doc["paths"].get("/requests/{uuid}/artifacts").is_some() {
        scenarios.push("artifacts");
    } else {
        eprintln!(
            "artifacts scenario not run: this server has no GET /requests/{{uuid}}/artifacts"
        );
    }
    run_scenarios(&s, &scenarios, None).await;
}

#[tokio::test]
async fn dashboard_asks_for_the_token() {
    if !browser_ready() {
        return;
    }
    let token = "ui-test-token-3f9a";
    // API only: the requests the page submits stay pending, so no VM is needed (the console
    // scenario fakes its socket in the page).
    let s = Server::start(Options {
        mode: Mode::Api,
        // The shipped WARM keys kept: the VMs page may order a template (no agent builds it).
        warm: true,
        env: vec![
            ("SQLITE_SIM_UI_DIR".into(), bundle().display().to_string()),
            ("SQLITE_SIM_API_TOKEN".into(), token.into()),
            // The queue-webhooks scenario's callback goes to a closed local port.
            ("SQLITE_SIM_WEBHOOK_ALLOW".into(), "127.0.0.1".into()),
            ("SQLITE_SIM_WEBHOOK_SECRET".into(), "ui-test-secret".into()),
        ],
        ..Default::default()
    })
    .await;
    run_scenarios(
        &s,
        &[
            "token",
            "console-protocol",
            "vms-order",
            "paging",
            "queue-webhooks",
        ],
        Some(token),
    )
    .await;
}

#[tokio::test]
async fn ui_files_are_served_with_types_revalidation_and_csp() {
    let dir = tempfile::tempdir().unwrap();
    let ui = dir.path().join("ui");
    std::fs::create_dir_all(ui.join("assets")).unwrap();
    std::fs::write(ui.join("index.html"), "<!doctype html><p>page").unwrap();
    std::fs::write(ui.join("app.js"), "console.log(1)").unwrap();
    std::fs::write(ui.join(".key"), "hidden").unwrap();
    std::fs::write(dir.path().join("secret"), "outside").unwrap();
    let s = Server::start(Options {
        mode: Mode::Api,
        env: vec![
            ("SQLITE_SIM_UI_DIR".into(), ui.display().to_string()),
            ("SQLITE_SIM_API_TOKEN".into(), "t0k".into()),
        ],
        ..Default::default()
    })
    .await;

    // Public, although every API route needs the token: the page loads, then asks for it.
    let r = s.fetch("/ui/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(r.header("cache-control"), "no-cache");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    let csp = r.header("content-security-policy");
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'self'"));
    assert!(!csp.contains("script-src 'self' 'unsafe-inline'"), "{csp}");
    assert_eq!(r.text(), "<!doctype html><p>page");
    assert_eq!(s.fetch("/requests").await.status, 401);

    // Revalidation: the same ETag answers 304 without a body.
    let etag = r.header("etag").to_string();
    assert!(etag.starts_with('"'), "{etag}");
    let again = s
        .send(
            s.request(common::Method::GET, "/ui/app.js")
                .header("If-None-Match", "\"other\""),
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.header("content-type"),
        "text/javascript; charset=utf-8"
    );
    let js_etag = again.header("etag").to_string();
    let cached = s
        .send(
            s.request(common::Method::GET, "/ui/app.js")
                .header("If-None-Match", &js_etag),
        )
        .await;
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());

    // `/ui` redirects; nothing outside the bundle, hidden or missing is served.
    let redirect = s.fetch("/ui").await;
    assert!(
        redirect.status == 308 || redirect.status == 200,
        "{}",
        redirect.status
    );
    for path in [
        "/ui/a/..%2f..%2fsecret",
        "/ui/%2e%2e/secret",
        "/ui/.key",
        "/ui/nope.js",
        "/ui/assets",
    ] {
        let r = s.fetch(path).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(!r.text().contains("outside"), "{path}");
    }

    // Without a bundle: a page that says how to build it, not an error from the server.
    let empty = Server::start(Options {
        mode: Mode::Api,
        env: vec![(
            "SQLITE_SIM_UI_DIR".into(),
            dir.path().join("missing").display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    let r = empty.fetch("/ui/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
    assert!(r.text().contains("scripts/build-ui.sh"), "{}", r.text());
    assert!(r.text().contains("SQLITE_SIM_UI_DIR"));
}
