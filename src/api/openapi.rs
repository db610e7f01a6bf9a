//! The OpenAPI document, as this server serves it. The handlers' annotations give its static
//! part; [`document`] completes it for this server: every operation's error responses (taken
//! from [`super::error`], never written by hand), the VMs a submission may name (and those it
//! may ask to boot warm), the timeout maximum, and whether a bearer token is required. It is
//! built on every request, so it stays true when a VM config is added or removed while the
//! server runs.

use super::error::{self, ErrorCode};
use super::{access, artifacts, audit, hosts, logs, metrics, requests, tokens, vms, AppState};
use crate::auth::Permission;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sqlite-sim",
        description = "QMP-native QEMU VM supervisor. This document \
        describes the server that serves it: the `vm_name` enum lists its VMs, `timeout` is \
        bounded by its `SQLITE_SIM_MAX_TIMEOUT`, and bearer authentication (with `401`, and \
        `403` where not every role may) appears only when authentication is on \
        (`SQLITE_SIM_API_TOKEN` set, or tokens stored). Each operation names the roles that \
        may call it. Every error answer has the `Error` shape; each \
        operation lists the codes it can return."
    ),
    paths(
        requests::create,
        requests::list,
        requests::show,
        requests::set_status,
        requests::delete,
        requests::prune,
        artifacts::list,
        artifacts::one,
        artifacts::tar,
        logs::logs,
        logs::raw,
        logs::stream_logs,
        hosts::list_hosts,
        super::console::console,
        metrics::metrics,
        metrics::stats,
        vms::list_vms,
        vms::show_vm,
        vms::build_template,
        vms::delete_template,
        tokens::create_token,
        tokens::list_tokens,
        tokens::revoke_token,
        audit::list_audit,
        super::health,
    ),
    components(schemas(
        crate::model::Request,
        crate::model::AttemptRecord,
        crate::model::Status,
        crate::model::LogType,
        crate::model::ShutdownStep,
        crate::model::RequestId
    ))
)]
pub struct ApiDoc;

/// What the document states that depends on this server's settings and files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// VMs a submission may name: those whose config loads, or that only have an image.
    pub vm_names: Vec<String>,
    /// Those of them whose config sets `WARM="on"`: only they may be asked to boot warm.
    pub warm_vm_names: Vec<String>,
    pub max_timeout: u32,
    /// `SQLITE_SIM_MAX_KEEP`: the `keep_on_failure` maximum.
    pub max_keep: u32,
    /// Authentication is on: `SQLITE_SIM_API_TOKEN` is set or tokens are stored.
    pub token: bool,
    /// `SQLITE_SIM_WEBHOOK_ALLOW` lists a host: a `callback_url` can be accepted.
    pub webhooks: bool,
}

impl Facts {
    pub fn of(state: &AppState) -> Facts {
        let catalog = &state.catalog;
        let (mut vm_names, mut warm_vm_names) = (Vec::new(), Vec::new());
        // The same checks `POST /requests` makes, so what is listed is accepted.
        for name in catalog.available() {
            if let Ok(vm) = catalog.load(&name) {
                if vm.warm {
                    warm_vm_names.push(name.clone());
                }
                vm_names.push(name);
            }
        }
        Facts {
            vm_names,
            warm_vm_names,
            max_timeout: state.settings.max_timeout,
            max_keep: state.settings.max_keep,
            token: state.settings.api_token.is_some(),
            webhooks: state.settings.webhooks.enabled(),
        }
    }

    /// [`Facts::of`], with whether the store holds tokens (then authentication is on).
    pub async fn of_served(state: &AppState) -> Facts {
        let mut facts = Facts::of(state);
        // Unknown (store unreachable): documented as on, the safe side.
        facts.token = access::enabled(state).await.unwrap_or(true);
        facts
    }
}

/// `GET /openapi.json`.
pub async fn serve(State(state): State<AppState>) -> Json<Value> {
    Json(document(&Facts::of_served(&state).await))
}

/// The complete document for a server with these facts.
pub fn document(facts: &Facts) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    at(&mut doc, "/components/schemas")["Error"] = error_schema();
    if facts.token {
        at(&mut doc, "/components")["securitySchemes"] =
            json!({ "bearer": { "type": "http", "scheme": "bearer" } });
    }
    let paths = at(&mut doc, "/paths").as_object_mut().expect("paths");
    for (path, item) in paths.iter_mut() {
        for (method, op) in item.as_object_mut().expect("path item") {
            complete_operation(method, path, op, facts);
        }
    }
    at(&mut doc, "/paths/~1requests/post/requestBody/content")["multipart/form-data"] =
        multipart_submission();
    let body = at(&mut doc, "/components/schemas/CreateBody");
    at(body, "/properties/timeout")["maximum"] = json!(facts.max_timeout);
    at(body, "/properties/keep_on_failure")["maximum"] = json!(facts.max_keep);
    // An empty list is the truth when there is no VM: no submission can succeed.
    at(body, "/properties/vm_name")["enum"] = json!(facts.vm_names);
    let callback = at(body, "/properties/callback_url");
    callback["format"] = json!("uri");
    if !facts.webhooks {
        // No host is allowed, so only an absent or null callback_url is accepted.
        let description = callback["description"].clone();
        *callback = json!({
            "type": "null",
            "description": format!(
                "{} This server allows no host (`SQLITE_SIM_WEBHOOK_ALLOW` is empty).",
                description.as_str().unwrap_or_default()
            ),
        });
    }
    // `boot: "warm"` only for a warm VM, which JSON Schema can say without `not`: either the
    // boot is not warm, or the VM is one of these.
    body["anyOf"] = json!([
        { "properties": { "boot": { "enum": ["cold", null] } } },
        { "required": ["vm_name"], "properties": { "vm_name": { "enum": facts.warm_vm_names } } },
    ]);
    if let Some(vm) = facts.vm_names.first() {
        body["examples"] = json!([{
            "vm_name": vm,
            "commands": "echo Hello World && uname -a",
            "timeout": facts.max_timeout.min(300),
        }]);
    }
    doc
}

/// `POST /requests` as `multipart/form-data`. One `file` property stands for the `file` parts:
/// repeat it for more files. The `Content-Disposition` example gives a generated part a
/// destination, as every part needs.
fn multipart_submission() -> Value {
    json!({
        "schema": {
            "type": "object",
            "required": ["request"],
            "additionalProperties": false,
            "properties": {
                "request": { "$ref": "#/components/schemas/CreateBody" },
                "file": {
                    "type": "string",
                    "format": "binary",
                    "description": "A file part (repeat the part for more): its `filename` is \
                        its absolute guest destination, ending in `/` for a tar archive \
                        extracted into that directory. Tar members with absolute names or `..`, \
                        links that leave the directory, and special files are refused. At most \
                        64 parts; no destination twice (inline files included); with the inline \
                        files, at most `SQLITE_SIM_MAX_UPLOAD` bytes.",
                },
            },
        },
        "encoding": {
            "request": { "contentType": "application/json" },
            "file": {
                "contentType": "application/octet-stream",
                "headers": {
                    "Content-Disposition": {
                        "description": "`form-data; name=\"file\"; filename=\"DESTINATION\"`",
                        "schema": { "type": "string" },
                        "example": "form-data; name=\"file\"; filename=\"/root/upload.bin\"",
                    },
                    "X-Mode": {
                        "description": "A single file's mode bits in octal (default 0644); \
                            not for a tar, whose members keep their own.",
                        "schema": { "type": "string", "pattern": "^0?[0-7]{1,4}$" },
                    },
                },
            },
        },
    })
}

/// The value at `pointer`, which the annotations must have produced.
fn at<'a>(v: &'a mut Value, pointer: &str) -> &'a mut Value {
    v.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("the OpenAPI document has no {pointer}"))
}

/// Adds the error responses an operation can produce: those its inputs imply, the ones its
/// handler declares (`error::…Response` markers) and those every operation has, one response
/// per status with the exact codes. Panics on anything it cannot account for, so that a new
/// kind of input is given its errors in `error.rs` rather than documented wrongly.
fn complete_operation(method: &str, path: &str, op: &mut Value, facts: &Facts) {
    let mut codes: BTreeSet<ErrorCode> = error::ANY_OPERATION.iter().copied().collect();
    // `get_mut`, not indexing: indexing a missing key would insert a `null` there.
    let parameters = op.get_mut("parameters").and_then(Value::as_array_mut);
    for p in parameters.into_iter().flatten() {
        not_null(&mut p["schema"]);
        match p["in"].as_str() {
            Some("path") => match p["name"].as_str() {
                Some("uuid") if p["schema"]["format"] == "uuid" => codes.extend(error::UUID_PATH),
                Some("name") if path.starts_with("/tokens/") => {
                    codes.extend([ErrorCode::Validation, ErrorCode::NotFound])
                }
                Some("name") if p["schema"]["pattern"] == vms::VM_NAME_PATTERN => {
                    codes.extend(error::NAME_PATH)
                }
                Some("path") if path.ends_with("/artifacts/{path}") => {
                    codes.extend(error::ARTIFACT_PATH)
                }
                _ => panic!(
                    "{method} {path}: a path parameter other than a request uuid or a VM name: {p}"
                ),
            },
            Some("query" | "header") => codes.extend(error::PARAMETERS),
            _ => panic!("{method} {path}: parameter {p} is not in the path, query or headers"),
        }
    }
    if let Some(body) = op.get("requestBody") {
        let types: Vec<&String> = body["content"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        for t in types {
            match t.as_str() {
                "application/json" => codes.extend(error::JSON_BODY),
                "multipart/form-data" if (method, path) == ("post", "/requests") => {
                    codes.extend(error::MULTIPART_BODY)
                }
                other => panic!("{method} {path}: a {other} body is not read"),
            }
        }
    }
    if !super::PUBLIC_PATHS.contains(&path) {
        let rule = access::rule(method, path);
        let roles = rule.permission.describe();
        let text = op["description"].as_str().unwrap_or("").to_string();
        let sep = if text.is_empty() { "" } else { "\n\n" };
        op["description"] = json!(format!(
            "{text}{sep}**Roles** (when authentication is on): {roles}."
        ));
        op["x-roles"] = json!(crate::auth::Role::ALL
            .into_iter()
            .filter(|r| *r >= rule.permission.least_role()
                || (rule.permission == Permission::ControlRequest
                    && *r == crate::auth::Role::Submitter))
            .map(|r| r.as_str())
            .collect::<Vec<_>>());
        if facts.token {
            codes.extend(error::AUTHENTICATED);
            if rule.permission != Permission::Read {
                codes.extend(error::AUTHORIZED);
            }
            op["security"] = json!([{ "bearer": [] }]);
        }
    }
    let responses = op["responses"].as_object_mut().expect("responses");
    let hand_written: Vec<String> = responses
        .keys()
        .filter(|status| status.parse::<u16>().is_ok_and(|s| s >= 400))
        .cloned()
        .collect();
    for status in hand_written {
        let declared = responses.remove(&status).expect("listed");
        let names = declared[error::DECLARED_CODES].as_array().unwrap_or_else(|| {
            panic!("{method} {path}: response {status} is written by hand; declare its codes with an error.rs marker")
        });
        for name in names {
            let code = ErrorCode::ALL
                .into_iter()
                .find(|c| name == c.as_str())
                .unwrap_or_else(|| panic!("{method} {path}: unknown error code {name}"));
            codes.insert(code);
        }
    }
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for code in codes {
        by_status
            .entry(code.status().as_u16())
            .or_default()
            .push(code);
    }
    for (status, codes) in by_status {
        responses.insert(status.to_string(), error_response(&codes));
    }
}

/// A parameter is optional by being absent (`required: false`); utoipa renders an `Option`
/// one as nullable too, which would invite clients to send the text `null`.
fn not_null(schema: &mut Value) {
    if let Some(types) = schema["type"].as_array_mut() {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            schema["type"] = only.clone();
        }
    }
}

/// One error status of one operation: the `Error` shape with `code` narrowed to these codes.
fn error_response(codes: &[ErrorCode]) -> Value {
    let names: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
    let description = codes
        .iter()
        .map(|c| format!("`{}`: {}", c.as_str(), c.meaning()))
        .collect::<Vec<_>>()
        .join("; ");
    let mut response = json!({
        "description": description,
        "content": { "application/json": { "schema": { "allOf": [
            { "$ref": "#/components/schemas/Error" },
            { "type": "object", "properties": { "error": { "type": "object",
                "properties": { "code": { "enum": names } } } } },
        ] } } },
    });
    if codes.contains(&ErrorCode::Unauthorized) {
        response["headers"] = json!({ "WWW-Authenticate": {
            "description": "The scheme to authenticate with.",
            "schema": { "type": "string", "const": "Bearer" },
        } });
    }
    response
}

/// `{"error": {"code", "message"}}`, with every code there is.
fn error_schema() -> Value {
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    json!({
        "type": "object",
        "description": "The shape of every error answer.",
        "required": ["error"],
        "additionalProperties": false,
        "properties": { "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": false,
            "properties": {
                "code": { "type": "string", "enum": names,
                    "description": "Stable and machine-readable; it fixes the HTTP status." },
                "message": { "type": "string", "description": "For people; it may change." },
            },
        } },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(token: bool) -> Facts {
        Facts {
            vm_names: vec!["alpha".into(), "tiny".into()],
            warm_vm_names: vec!["alpha".into()],
            max_timeout: 1234,
            max_keep: 600,
            token,
            webhooks: false,
        }
    }

    #[test]
    fn callback_url_is_documented_as_this_server_takes_it() {
        let off = document(&facts(false));
        let cb = &off["components"]["schemas"]["CreateBody"]["properties"]["callback_url"];
        assert_eq!(cb["type"], "null", "{cb}");
        assert!(cb["description"]
            .as_str()
            .unwrap()
            .contains("SQLITE_SIM_WEBHOOK_ALLOW"));
        let on = document(&Facts {
            webhooks: true,
            ..facts(false)
        });
        let cb = &on["components"]["schemas"]["CreateBody"]["properties"]["callback_url"];
        assert_eq!(
            (cb["format"].as_str(), cb["maxLength"].as_i64()),
            (Some("uri"), Some(2048))
        );
        // GET /requests/{uuid} documents the deliveries.
        let req = &on["components"]["schemas"]["Request"]["properties"];
        assert!(
            req.get("callback_url").is_some() && req.get("webhooks").is_some(),
            "{req}"
        );
        assert!(on["components"]["schemas"].get("Delivery").is_some());
    }

    /// Every operation as `(method, path, operation)`.
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                ops.push((method.clone(), path.clone(), op.clone()));
            }
        }
        ops
    }

    fn error_statuses(op: &Value) -> Vec<u16> {
        op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .filter_map(|k| k.parse::<u16>().ok())
            .filter(|s| *s >= 400)
            .collect()
    }

    #[test]
    fn every_operation_lists_the_errors_its_inputs_bring() {
        let doc = document(&facts(false));
        let want = |method: &str, path: &str| -> Vec<u16> {
            match (method, path) {
                ("post", "/requests") | ("post", "/prune") => vec![400, 413, 415, 422, 500, 503],
                ("get", p) if p.starts_with("/requests/{uuid}/artifacts") => {
                    vec![400, 404, 500, 503]
                }
                ("get", "/requests") => vec![422, 500, 503],
                ("get" | "delete", "/requests/{uuid}") => vec![400, 404, 500, 503],
                ("get", "/vms/{name}") | ("delete", "/vms/{name}/template") => {
                    vec![400, 404, 500, 503]
                }
                ("post", "/vms/{name}/template") => vec![400, 404, 409, 422, 500, 503],
                ("put", "/requests/{uuid}/status") => vec![400, 404, 409, 413, 415, 422, 500, 503],
                ("get", "/requests/{uuid}/console") => vec![400, 404, 422, 426, 500, 503],
                ("get", p) if p.starts_with("/requests/{uuid}/logs") => {
                    vec![400, 404, 422, 500, 503]
                }
                ("get", "/metrics" | "/stats" | "/health" | "/vms" | "/hosts" | "/tokens") => {
                    vec![500, 503]
                }
                ("get", "/audit") => vec![422, 500, 503],
                ("post", "/tokens") => vec![400, 403, 409, 413, 415, 422, 500, 503],
                ("delete", "/tokens/{name}") => vec![404, 422, 500, 503],
                other => panic!("an operation this test does not know: {other:?}"),
            }
        };
        let ops = operations(&doc);
        assert_eq!(ops.len(), 25);
        for (method, path, op) in &ops {
            assert_eq!(error_statuses(op), want(method, path), "{method} {path}");
            assert!(op.get("security").is_none(), "{method} {path}");
        }
        assert!(doc["components"].get("securitySchemes").is_none());
    }

    #[test]
    fn with_auth_on_operations_not_every_role_may_list_403_and_their_roles() {
        let doc = document(&facts(true));
        for (method, path, op) in operations(&doc) {
            if path == "/health" {
                assert!(op.get("x-roles").is_none());
                continue;
            }
            let listed = access::RULES
                .iter()
                .any(|(m, p, _)| m.eq_ignore_ascii_case(&method) && *p == path);
            // Every operation that changes something has its rule written down.
            assert!(
                method == "get" || listed,
                "{method} {path} has no access rule"
            );
            let forbidden = error_statuses(&op).contains(&403);
            assert_eq!(
                forbidden,
                access::rule(&method, &path).permission != Permission::Read,
                "{method} {path}"
            );
            // Refused with auth off too: documented either way.
            if (method.as_str(), path.as_str()) == ("post", "/tokens") {
                let off = document(&facts(false));
                assert!(off["paths"]["/tokens"]["post"]["responses"]["403"].is_object());
            }
            assert!(op["description"].as_str().unwrap().contains("**Roles**"));
            assert!(op["x-roles"].as_array().unwrap().contains(&json!("admin")));
        }
    }

    #[test]
    fn error_responses_carry_the_error_shape_and_their_exact_codes() {
        let doc = document(&facts(true));
        let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
                ["enum"],
            json!(names)
        );
        for (method, path, op) in operations(&doc) {
            for status in error_statuses(&op) {
                let r = &op["responses"][status.to_string()];
                let all_of = &r["content"]["application/json"]["schema"]["allOf"];
                assert_eq!(all_of[0]["$ref"], "#/components/schemas/Error");
                let codes = all_of[1]["properties"]["error"]["properties"]["code"]["enum"]
                    .as_array()
                    .unwrap();
                assert!(!codes.is_empty(), "{method} {path} {status}");
                for name in codes {
                    let code = ErrorCode::ALL.iter().find(|c| name == c.as_str()).unwrap();
                    assert_eq!(code.status().as_u16(), status, "{method} {path}: {name}");
                    let text = format!("`{}`", code.as_str());
                    assert!(r["description"].as_str().unwrap().contains(&text));
                }
                assert!(r.get(error::DECLARED_CODES).is_none());
            }
        }
    }

    #[test]
    fn a_token_adds_401_and_security_everywhere_but_the_public_paths() {
        let doc = document(&facts(true));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"],
            json!({ "type": "http", "scheme": "bearer" })
        );
        for (method, path, op) in operations(&doc) {
            let public = super::super::PUBLIC_PATHS.contains(&path.as_str());
            assert_eq!(
                error_statuses(&op).contains(&401),
                !public,
                "{method} {path}"
            );
            assert_eq!(op.get("security").is_some(), !public, "{method} {path}");
            if !public {
                assert_eq!(
                    op["responses"]["401"]["headers"]["WWW-Authenticate"]["schema"]["const"],
                    "Bearer"
                );
            }
        }
    }

    #[test]
    fn the_facts_of_the_server_bound_the_submission() {
        let doc = document(&facts(false));
        let body = &doc["components"]["schemas"]["CreateBody"]["properties"];
        assert_eq!(body["vm_name"]["enum"], json!(["alpha", "tiny"]));
        assert_eq!(body["timeout"]["maximum"], 1234);
        assert_eq!(body["timeout"]["minimum"], 1);
        assert_eq!(
            doc["components"]["schemas"]["CreateBody"]["examples"][0]["vm_name"], "alpha",
            "the example names a VM this server has"
        );
        let none = document(&Facts {
            vm_names: vec![],
            warm_vm_names: vec![],
            ..facts(false)
        });
        assert_eq!(
            none["components"]["schemas"]["CreateBody"]["properties"]["vm_name"]["enum"],
            json!([])
        );
    }

    /// Whether `body` satisfies one `anyOf` branch of `CreateBody`, read with the only keywords
    /// the branches use (`required`, `properties` with `enum`); any other keyword fails the test.
    fn satisfies(branch: &Value, body: &Value) -> bool {
        for key in branch.as_object().unwrap().keys() {
            assert!(["required", "properties"].contains(&key.as_str()), "{key}");
        }
        let required = branch["required"].as_array().into_iter().flatten();
        let present = required
            .into_iter()
            .all(|k| body.get(k.as_str().unwrap()).is_some());
        let props = branch["properties"].as_object().unwrap();
        present
            && props.iter().all(|(name, rule)| {
                assert_eq!(rule.as_object().unwrap().len(), 1, "{rule}");
                body.get(name)
                    .is_none_or(|v| rule["enum"].as_array().unwrap().contains(v))
            })
    }

    #[test]
    fn only_warm_vms_may_be_asked_to_boot_warm() {
        let doc = document(&facts(false));
        let any_of = doc["components"]["schemas"]["CreateBody"]["anyOf"]
            .as_array()
            .unwrap();
        for (body, ok) in [
            (
                json!({"vm_name": "alpha", "commands": "x", "boot": "warm"}),
                true,
            ),
            (
                json!({"vm_name": "tiny", "commands": "x", "boot": "warm"}),
                false,
            ),
            (
                json!({"vm_name": "tiny", "commands": "x", "boot": "cold"}),
                true,
            ),
            (
                json!({"vm_name": "tiny", "commands": "x", "boot": null}),
                true,
            ),
            (json!({"vm_name": "tiny", "commands": "x"}), true),
            (json!({"commands": "x", "boot": "warm"}), false),
        ] {
            let admitted = any_of.iter().any(|b| satisfies(b, &body));
            assert_eq!(admitted, ok, "{body}");
        }
    }

    #[test]
    fn path_parameters_are_uuids_vm_names_or_artifact_paths_and_never_null() {
        let doc = document(&facts(false));
        for (method, path, op) in operations(&doc) {
            for p in op["parameters"].as_array().into_iter().flatten() {
                assert!(
                    !p["schema"]["type"].to_string().contains("null"),
                    "{method} {path}: {p}"
                );
                if p["in"] == "path" {
                    let (name, schema) = (&p["name"], &p["schema"]);
                    assert!(
                        (name == "uuid" && schema["format"] == "uuid")
                            || (name == "name" && schema["pattern"] == vms::VM_NAME_PATTERN)
                            || (name == "path" && path.ends_with("/artifacts/{path}")),
                        "{method} {path}: {p}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "written by hand")]
    fn hand_written_error_responses_are_refused() {
        let mut op = json!({ "responses": {
            "200": { "description": "ok" },
            "404": { "description": "not found" },
        } });
        complete_operation("get", "/x", &mut op, &facts(false));
    }

    #[test]
    #[should_panic(expected = "a path parameter other than a request uuid or a VM name")]
    fn unknown_path_parameters_are_refused() {
        let mut op = json!({
            "parameters": [{ "name": "id", "in": "path", "schema": { "type": "integer" } }],
            "responses": { "200": { "description": "ok" } },
        });
        complete_operation("get", "/x/{id}", &mut op, &facts(false));
    }
}
