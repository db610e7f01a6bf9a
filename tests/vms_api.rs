//! `/vms` and the template orders against a real `api` process, without booting anything: the
//! VMs listed with their effective configs, broken ones with their error, template rows as the
//! agents write them, order counters, and every refusal.

mod common;

use common::{Mode, Options, Server};
use serde_json::{json, Value};

const PASSWORD: &str = "pw-never-shown-7f3a";

/// An `api` server with, besides the shipped `tiny`, a warm VM and one whose config is broken.
async fn server() -> Server {
    Server::start(Options {
        mode: Mode::Api,
        configs: vec![
            (
                "warm".into(),
                format!(
                    "KERNEL=\"/nonexistent/vmlinuz\"\nMEMORY=\"256M\"\nWARM=\"on\"\n\
                     WARM_POOL=\"2\"\nWARM_WAIT=\"on\"\nPREPARE=\"mkdir -p /srv\"\n\
                     LOGIN_USER=\"root\"\nLOGIN_PASSWORD=\"{PASSWORD}\"\n\
                     ADDITIONAL_ARGS=\"-device virtio-rng-pci\"\n"
                ),
            ),
            ("broken".into(), "MEMROY=\"1G\"\n".into()),
        ],
        ..Default::default()
    })
    .await
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
}

/// Writes one host's template row, as that host's agents do.
fn put_row(s: &Server, host: &str, vm: &str, state: &str, extra: &[(&str, Value)]) {
    let c = rusqlite::Connection::open(&s.db).unwrap();
    c.execute(
        "INSERT OR REPLACE INTO templates (host_id, vm_name, state, updated_at)
         VALUES (?1, ?2, ?3, '2026-12-01T10:00:00.000000Z')",
        [host, vm, state],
    )
    .unwrap();
    for (column, value) in extra {
        let value: rusqlite::types::Value = match value {
            Value::String(t) => t.clone().into(),
            Value::Number(n) => n.as_i64().unwrap().into(),
            other => panic!("{other}"),
        };
        c.execute(
            &format!("UPDATE templates SET {column} = ?1 WHERE host_id = ?2 AND vm_name = ?3"),
            rusqlite::params![value, host, vm],
        )
        .unwrap();
    }
}

fn orders_in_db(s: &Server, vm: &str) -> Option<(i64, i64)> {
    let c = rusqlite::Connection::open(&s.db).unwrap();
    c.query_row(
        "SELECT build_order, delete_order FROM template_orders WHERE vm_name = ?1",
        [vm],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

#[tokio::test]
async fn every_vm_is_listed_with_its_effective_config() {
    let s = server().await;
    let r = s.fetch("/vms").await;
    assert_eq!(r.status, 200);
    assert!(
        !r.text().contains(PASSWORD),
        "the login password is never shown: {}",
        r.text()
    );
    let list = r.json();
    let vms = list["vms"].as_array().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["broken", "tiny", "warm"], "every VM, by name");

    let broken = &vms[0];
    assert_eq!(broken["valid"], false);
    assert!(
        broken["error"]
            .as_str()
            .unwrap()
            .contains("unknown key MEMROY"),
        "{broken}"
    );
    assert!(broken["config"].is_null() && broken["accelerator"].is_null());
    assert_eq!(broken["template"]["state"], "none");

    let tiny = &vms[1];
    assert_eq!(
        (&tiny["valid"], &tiny["error"]),
        (&json!(true), &Value::Null)
    );
    let c = &tiny["config"];
    assert_eq!(c["memory"], "128M");
    assert_eq!(c["prompt"], "root@tiny:[^#]*# ", "the PROMPT as written");
    assert_eq!(c["accel"], "tcg");
    assert_eq!(c["stderr_device"], "/dev/ttyS1");
    assert_eq!(c["warm"], false);
    assert!(c["image"]
        .as_str()
        .unwrap()
        .ends_with("vm_images/tiny.qcow2"));
    assert_eq!(tiny["accelerator"], "tcg (pinned by the VM config)");

    let warm = &vms[2];
    let c = &warm["config"];
    assert_eq!(
        (&c["warm"], &c["warm_pool"], &c["warm_wait"]),
        (&json!(true), &json!(2), &json!(true))
    );
    assert_eq!(c["prepare"], "mkdir -p /srv");
    assert_eq!(c["login_user"], "root");
    assert!(c.get("login_password").is_none(), "{c}");
    assert_eq!(c["kernel"], "/nonexistent/vmlinuz");
    assert!(c["image"].is_null(), "a kernel-only VM has no disk");
    assert_eq!(c["additional_args"], json!(["-device", "virtio-rng-pci"]));
    assert_eq!(
        (c["boot_timeout"].as_u64(), c["console"].as_str()),
        (Some(120), Some("socket"))
    );
    assert_eq!(warm["accelerator"], "tcg (pinned by SQLITE_SIM_ACCEL)");
    assert_eq!(
        warm["template"],
        json!({
            "state": "none", "hosts": [], "restores": 0,
            "restore_p50_ms": null, "restore_p99_ms": null,
            "orders": { "build": 0, "delete": 0, "outstanding": false },
        })
    );

    for v in vms {
        let name = v["name"].as_str().unwrap();
        let (code, one) = s.get_json(&format!("/vms/{name}")).await;
        assert_eq!((code, &one), (200, v), "GET /vms/{name} is its list entry");
    }
    // A config added while the server runs is listed at once.
    std::fs::write(s.config_dir.join("late.conf"), "CPU=\"2\"\n").unwrap();
    let (_, list) = s.get_json("/vms").await;
    assert_eq!(list["vms"][1]["name"], "late");
    assert_eq!(list["vms"][1]["config"]["cpus"], 2);
}

#[tokio::test]
async fn template_rows_show_per_host_and_in_summary() {
    let s = server().await;
    put_row(
        &s,
        "h1",
        "warm",
        "failed",
        &[
            ("error", json!("boot timeout after 120 s")),
            ("failures", json!(2)),
        ],
    );
    let (_, vm) = s.get_json("/vms/warm").await;
    assert_eq!(vm["template"]["state"], "failed", "failures show as state");
    assert_eq!(vm["template"]["hosts"][0]["failures"], 2);
    assert_eq!(
        vm["template"]["hosts"][0]["error"],
        "boot timeout after 120 s"
    );
    put_row(
        &s,
        "h2",
        "warm",
        "ready",
        &[
            ("template_key", json!("k1")),
            ("built_from", json!(r#"{"image": "none", "qemu": "7.2"}"#)),
            ("built_at", json!("2026-12-01T09:59:00.000000Z")),
            ("build_ms", json!(3200)),
            ("size_bytes", json!(432_013_312)),
            ("build_order", json!(1)),
        ],
    );
    let (_, vm) = s.get_json("/vms/warm").await;
    let t = &vm["template"];
    assert_eq!(t["state"], "ready", "ready on any host is ready");
    let h2 = &t["hosts"][1];
    assert_eq!(h2["host_id"], "h2");
    assert_eq!(
        h2["built_from"],
        json!({"image": "none", "qemu": "7.2"}),
        "stored as text, shown as JSON"
    );
    assert_eq!(
        (
            h2["size_bytes"].as_i64(),
            h2["build_ms"].as_i64(),
            h2["key"].as_str()
        ),
        (Some(432_013_312), Some(3200), Some("k1"))
    );
    assert_eq!(t["hosts"][0]["built_from"], Value::Null);
    // Another VM's rows stay its own.
    let (_, tiny) = s.get_json("/vms/tiny").await;
    assert_eq!(tiny["template"]["hosts"], json!([]));
}

#[tokio::test]
async fn template_orders_count_and_refusals_change_nothing() {
    let s = server().await;
    let (code, vm) = s.post_json("/vms/warm/template", &json!({})).await;
    assert_eq!(code, 202, "{vm}");
    assert_eq!(
        vm["template"]["orders"],
        json!({ "build": 1, "delete": 0, "outstanding": true })
    );
    assert_eq!(vm["name"], "warm");
    let r = s
        .call(common::Method::POST, "/vms/warm/template", None)
        .await;
    assert_eq!(r.status, 202, "no body needed");
    assert_eq!(r.json()["template"]["orders"]["build"], 2);
    assert_eq!(orders_in_db(&s, "warm"), Some((2, 0)));

    let refusals: [(&str, &str, u16, &str, &str); 8] = [
        ("POST", "/vms/tiny/template", 409, "not_warm", "WARM=\"on\""),
        (
            "POST",
            "/vms/broken/template",
            422,
            "validation_error",
            "MEMROY",
        ),
        (
            "POST",
            "/vms/nope/template",
            404,
            "not_found",
            "available: broken, tiny, warm",
        ),
        (
            "POST",
            "/vms/..x/template",
            400,
            "invalid_name",
            "is not a VM name",
        ),
        (
            "DELETE",
            "/vms/warm/template",
            404,
            "not_found",
            "VM warm has no template",
        ),
        (
            "DELETE",
            "/vms/nope/template",
            404,
            "not_found",
            "unknown VM",
        ),
        ("GET", "/vms/nope", 404, "not_found", "unknown VM \"nope\""),
        ("GET", "/vms/a%2Fb", 400, "invalid_name", "\"a/b\""),
    ];
    for (method, path, status, code, needle) in refusals {
        let r = s.call(method.parse().unwrap(), path, None).await;
        let body = r.json();
        assert_error(r.status, &body, status, code);
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{method} {path}: {msg}");
    }
    let long = format!("/vms/{}", "a".repeat(65));
    let (code, body) = s.get_json(&long).await;
    assert_error(code, &body, 400, "invalid_name");
    assert_eq!(
        orders_in_db(&s, "warm"),
        Some((2, 0)),
        "refusals order nothing"
    );
    for vm in ["tiny", "broken", "nope"] {
        assert_eq!(orders_in_db(&s, vm), None, "{vm}");
    }

    // A host that has carried out build 2 and has a template: deleting it is ordered.
    put_row(&s, "h1", "warm", "ready", &[("build_order", json!(2))]);
    let (_, vm) = s.get_json("/vms/warm").await;
    assert_eq!(vm["template"]["orders"]["outstanding"], false);
    let (code, vm) = s.delete("/vms/warm/template").await;
    assert_eq!(code, 202, "{vm}");
    assert_eq!(
        vm["template"]["orders"],
        // One sequence for builds and deletes: this order comes after builds 1 and 2.
        json!({ "build": 2, "delete": 3, "outstanding": true })
    );
    // Once the host reports it deleted (state `none`), there is nothing left to delete.
    put_row(
        &s,
        "h1",
        "warm",
        "none",
        &[("build_order", json!(2)), ("delete_order", json!(3))],
    );
    let (code, body) = s.delete("/vms/warm/template").await;
    assert_error(code, &body, 404, "not_found");
    assert_eq!(
        orders_in_db(&s, "warm"),
        Some((2, 3)),
        "a refusal orders nothing"
    );
    // A VM that is no longer warm may still have its leftover template deleted.
    put_row(&s, "h1", "tiny", "ready", &[]);
    assert_eq!(s.delete("/vms/tiny/template").await.0, 202);
}

#[tokio::test]
async fn warm_boots_are_only_for_warm_vms() {
    let s = server().await;
    let (code, body) = s
        .submit_json(&json!({"vm_name": "tiny", "commands": "echo x", "boot": "warm"}))
        .await;
    assert_error(code, &body, 422, "validation_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("WARM=\"on\"") && msg.contains("tiny"), "{msg}");
    let (code, body) = s
        .submit_json(&json!({"vm_name": "tiny", "commands": "echo x", "boot": "hot"}))
        .await;
    assert_error(code, &body, 422, "validation_error");

    let mut made = Vec::new();
    for (vm, boot) in [
        ("warm", json!("warm")),
        ("tiny", json!("cold")),
        ("tiny", Value::Null),
    ] {
        let (code, body) = s
            .submit_json(&json!({"vm_name": vm, "commands": "echo x", "boot": boot}))
            .await;
        assert_eq!(code, 201, "{vm} {boot}: {body}");
        made.push((body["uuid"].as_str().unwrap().to_string(), boot));
    }
    for (uuid, boot) in made {
        let r = s.get(&uuid).await;
        assert_eq!(r["boot"], boot, "{r}");
        assert!(r["boot_mode"].is_null() && r["restore_ms"].is_null(), "{r}");
    }
    // The document says so: boot warm only with a VM of this list.
    let (_, doc) = s.get_json("/openapi.json").await;
    let body = &doc["components"]["schemas"]["CreateBody"];
    assert_eq!(
        body["anyOf"][1]["properties"]["vm_name"]["enum"],
        json!(["warm"])
    );
    assert_eq!(
        body["anyOf"][0]["properties"]["boot"]["enum"],
        json!(["cold", null])
    );
}
