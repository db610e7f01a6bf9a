//! The console protocol against the real router and a real store, over a real WebSocket; the
//! agent's side is played by writing the store directly.

use super::*;
use crate::config::Settings;
use crate::model::{AgentId, LogType};
use crate::store::test_support::{pending_request, temp_store};
use crate::store::Finish;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMsg;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Api {
    addr: SocketAddr,
    store: Store,
    agent: AgentId,
    _dir: crate::store::test_support::TempStore,
}

async fn api(token: Option<&str>) -> Api {
    let (store, dir) = temp_store().await;
    let token = token.map(str::to_string);
    let settings = Settings::from_lookup(|k| match k {
        "SQLITE_SIM_API_TOKEN" => token.clone(),
        _ => None,
    })
    .unwrap();
    let state = AppState::new(
        Arc::new(settings),
        store.clone(),
        Arc::new(tokio::sync::Notify::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = super::super::router(state).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Api {
        addr,
        store,
        agent: AgentId("a".into()),
        _dir: dir,
    }
}

impl Api {
    async fn running(&self) -> RequestId {
        let r = pending_request(&self.store).await;
        self.store
            .claim(&self.agent, Duration::from_secs(60))
            .await
            .unwrap();
        self.store.mark_running(r.uuid, &self.agent).await.unwrap();
        r.uuid
    }

    async fn console(&self, id: RequestId, bytes: &[u8]) {
        self.store
            .append_logs_with_console(
                id,
                None,
                vec![("t".into(), LogType::Boot, bytes.to_vec())],
                bytes.to_vec(),
            )
            .await
            .unwrap();
    }

    async fn finish(&self, id: RequestId) {
        let fin = Finish {
            status: Status::Done,
            exit_code: Some(0),
            ..Default::default()
        };
        assert!(self.store.finish(id, &self.agent, fin).await.unwrap());
    }

    async fn connect(&self, id: RequestId, query: &str) -> Ws {
        let url = format!("ws://{}/requests/{id}/console{query}", self.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws
    }
}

/// The next frame, within 10 s.
async fn next(ws: &mut Ws) -> WsMsg {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a frame within 10 s")
        .expect("the socket is open")
        .expect("a valid frame")
}

async fn next_json(ws: &mut Ws) -> Value {
    match next(ws).await {
        WsMsg::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn next_binary(ws: &mut Ws) -> Vec<u8> {
    match next(ws).await {
        WsMsg::Binary(b) => b.to_vec(),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

#[test]
fn a_viewer_too_far_behind_skips_to_the_head_only_after_catching_up() {
    let mut c = Cursor {
        offset: 0,
        caught_up_at: 5000,
    };
    assert_eq!(c.skip_if_behind(10_000, 100), None, "still catching up");
    c.offset = 5000;
    assert_eq!(c.skip_if_behind(5100, 100), None, "within the window");
    assert_eq!(c.skip_if_behind(5101, 100), Some(101));
    assert_eq!(c.offset, 5101);
}

#[tokio::test]
async fn frames_start_at_the_offset_follow_the_stream_and_end_with_the_request() {
    let api = api(None).await;
    let id = api.running().await;
    api.console(id, b"hello ").await;
    api.console(id, b"world").await;
    let mut late = api.connect(id, "?from=3").await;
    assert_eq!(
        next_json(&mut late).await,
        json!({"type": "hello", "offset": 3, "status": "running", "typist": null})
    );
    let mut got = next_binary(&mut late).await;
    while got.len() < 8 {
        got.extend(next_binary(&mut late).await);
    }
    assert_eq!(got, b"lo world");
    let mut whole = api.connect(id, "").await;
    assert_eq!(next_json(&mut whole).await["offset"], 0);
    let mut all = Vec::new();
    while all.len() < 11 {
        all.extend(next_binary(&mut whole).await);
    }
    assert_eq!(all, b"hello world", "a late viewer gets the whole screen");
    // Past the end: the stream starts at its end.
    let mut past = api.connect(id, "?from=999").await;
    assert_eq!(next_json(&mut past).await["offset"], 11);
    api.console(id, b"\r\nmore").await;
    assert_eq!(next_binary(&mut late).await, b"\r\nmore");
    assert_eq!(next_binary(&mut past).await, b"\r\nmore");
    api.finish(id).await;
    assert_eq!(
        next_json(&mut late).await,
        json!({"type": "status", "status": "done"})
    );
    match next(&mut late).await {
        WsMsg::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected a normal close, got {other:?}"),
    }
}

#[tokio::test]
async fn one_typist_at_a_time_takeovers_are_announced_and_read_only_viewers_never_type() {
    let api = api(None).await;
    let id = api.running().await;
    let mut a = api.connect(id, "").await;
    let mut b = api.connect(id, "").await;
    let mut ro = api.connect(id, "?read_only=1").await;
    for ws in [&mut a, &mut b, &mut ro] {
        assert_eq!(next_json(ws).await["type"], "hello");
    }
    // Not the typist yet: refused, and nothing is queued.
    a.send(WsMsg::Binary(b"ls\r".to_vec().into()))
        .await
        .unwrap();
    let e = next_json(&mut a).await;
    assert_eq!(e["type"], "error");
    assert!(e["message"].as_str().unwrap().contains("not the typist"));
    assert!(api.store.take_input(id).await.unwrap().is_empty());

    a.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
        .await
        .unwrap();
    let ta = next_json(&mut a).await;
    assert_eq!(
        (ta["type"].as_str(), ta["you"].as_bool()),
        (Some("typist"), Some(true))
    );
    let who_a = ta["who"].as_str().unwrap().to_string();
    assert!(who_a.starts_with("anonymous@127.0.0.1:"), "{who_a}");
    for ws in [&mut b, &mut ro] {
        assert_eq!(
            next_json(ws).await,
            json!({"type": "typist", "who": who_a, "you": false})
        );
    }
    a.send(WsMsg::Binary(b"echo hi\r".to_vec().into()))
        .await
        .unwrap();
    let mut typed = Vec::new();
    for _ in 0..100 {
        typed.extend(api.store.take_input(id).await.unwrap());
        if !typed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(typed.len(), 1);
    assert_eq!(
        (typed[0].who.as_str(), &typed[0].bytes[..]),
        (who_a.as_str(), &b"echo hi\r"[..])
    );

    // B takes over: A is told it is no longer the typist, and its input is refused.
    b.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
        .await
        .unwrap();
    let tb = next_json(&mut b).await;
    assert_eq!(tb["you"], true);
    let ta = next_json(&mut a).await;
    assert_eq!(
        (ta["who"].clone(), ta["you"].clone()),
        (tb["who"].clone(), json!(false))
    );
    assert_ne!(
        tb["who"],
        json!(who_a),
        "viewers are told apart by their peer"
    );
    assert_eq!(next_json(&mut ro).await["who"], tb["who"]);
    a.send(WsMsg::Binary(b"x".to_vec().into())).await.unwrap();
    assert_eq!(next_json(&mut a).await["type"], "error");

    // Read-only: can never take, never type.
    ro.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
        .await
        .unwrap();
    let e = next_json(&mut ro).await;
    assert!(e["message"].as_str().unwrap().contains("read-only"), "{e}");
    ro.send(WsMsg::Binary(b"x".to_vec().into())).await.unwrap();
    assert!(next_json(&mut ro).await["message"]
        .as_str()
        .unwrap()
        .contains("read-only"));
    assert!(api.store.take_input(id).await.unwrap().is_empty());

    // The typist leaves: everyone left is told there is none.
    b.close(None).await.unwrap();
    assert_eq!(
        next_json(&mut a).await,
        json!({"type": "typist", "who": null, "you": false})
    );
    // A new viewer's hello names no typist; input to a finished request is refused.
    a.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut a).await["you"], true);
    let mut c = api.connect(id, "").await;
    assert_eq!(next_json(&mut c).await["typist"], json!(who_a));
    api.store.control(id, Status::Hold).await.unwrap();
    api.store
        .apply_desired(id, &api.agent, Status::Hold)
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut a).await,
        json!({"type": "status", "status": "hold"})
    );
    a.send(WsMsg::Binary(b"x".to_vec().into())).await.unwrap();
    assert!(next_json(&mut a).await["message"]
        .as_str()
        .unwrap()
        .contains("not running"));
}

#[tokio::test]
async fn a_slow_viewer_is_told_what_it_missed_while_a_fast_one_sees_every_byte() {
    let api = api(None).await;
    let id = api.running().await;
    let mut fast = api.connect(id, "").await;
    let mut slow = api.connect(id, "").await;
    assert_eq!(next_json(&mut fast).await["offset"], 0);
    assert_eq!(next_json(&mut slow).await["offset"], 0);
    // 32 MiB of distinguishable bytes, far more than the socket buffers and MAX_LAG hold.
    let total: usize = 32 << 20;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    // The fast viewer is fast by construction: the writer never gets more than half the
    // window ahead of it, however loaded the machine is; the slow one reads nothing meanwhile.
    let read = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let read = read.clone();
        async move {
            let mut got = Vec::with_capacity(total);
            while got.len() < total {
                got.extend(next_binary(&mut fast).await);
                read.store(got.len() as u64, Ordering::Relaxed);
            }
            got
        }
    });
    let mut written = 0u64;
    for chunk in data.chunks(64 * 1024) {
        while written > read.load(Ordering::Relaxed) + MAX_LAG / 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        api.console(id, chunk).await;
        written += chunk.len() as u64;
    }
    let fast_got = reader.await.unwrap();
    assert!(
        fast_got == data,
        "the fast viewer sees every byte, in order"
    );
    api.finish(id).await;
    // Now the slow viewer reads: every byte is either received or reported missed, and the
    // bytes it gets are the stream's at the offsets the `missed` frames give.
    let (mut pos, mut missed, mut reports) = (0usize, 0u64, 0);
    loop {
        match next(&mut slow).await {
            WsMsg::Binary(b) => {
                assert!(b[..] == data[pos..pos + b.len()], "bytes at offset {pos}");
                pos += b.len();
            }
            WsMsg::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str().unwrap() {
                    "missed" => {
                        let (bytes, offset) =
                            (v["bytes"].as_u64().unwrap(), v["offset"].as_u64().unwrap());
                        assert_eq!(offset, pos as u64 + bytes, "{v}");
                        assert!(bytes > MAX_LAG, "only a viewer past the window drops: {v}");
                        missed += bytes;
                        reports += 1;
                        pos = offset as usize;
                    }
                    "status" => assert_eq!(v["status"], "done"),
                    other => panic!("unexpected {other}: {v}"),
                }
            }
            WsMsg::Close(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(reports > 0, "the slow viewer was told it missed bytes");
    assert_eq!(pos, total, "it ends at the end of the stream");
    assert!(missed > 0 && missed < total as u64);
}

#[tokio::test]
async fn the_token_is_accepted_as_a_subprotocol_and_required() {
    let api = api(Some("s3cret")).await;
    let id = api.running().await;
    let url = format!("ws://{}/requests/{id}/console", api.addr);
    let refused = tokio_tungstenite::connect_async(url.clone()).await;
    assert!(refused.is_err(), "no token, no console");
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "sqlite-sim.console, bearer.s3cret".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "sqlite-sim.console",
        "the token is never echoed back"
    );
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    ws.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
        .await
        .unwrap();
    let who = next_json(&mut ws).await["who"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        who.starts_with("admin@") && !who.contains("s3cret"),
        "{who}"
    );
    let mut bad = url.into_client_request().unwrap();
    bad.headers_mut().insert(
        "sec-websocket-protocol",
        "sqlite-sim.console, bearer.wrong".parse().unwrap(),
    );
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
}

#[tokio::test]
async fn plain_http_gets_upgrade_required_and_bad_queries_are_refused() {
    let api = api(None).await;
    let id = api.running().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}/requests/{id}/console", api.addr);
    let r = client.get(&base).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 426);
    assert_eq!(r.headers()["upgrade"], "websocket");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upgrade_required");
    for q in [
        "?from=-1",
        "?from=9223372036854775808",
        "?read_only=yes",
        "?bogus=1",
    ] {
        let r = client.get(format!("{base}{q}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 422, "{q}");
    }
    let other = RequestId::new();
    let r = client
        .get(format!("http://{}/requests/{other}/console", api.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

/// Opens the console of `id` with `token` as the subprotocol entry.
async fn connect_as(api: &Api, id: RequestId, token: &str) -> Ws {
    let url = format!("ws://{}/requests/{id}/console", api.addr);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("sqlite-sim.console, bearer.{token}")
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    ws
}

async fn stored_token(store: &Store, name: &str, role: crate::auth::Role) -> String {
    let secret = crate::auth::Secret::generate().unwrap();
    store
        .create_token(crate::store::NewToken {
            name: crate::auth::TokenName::new(name).unwrap(),
            role,
            digest: crate::auth::digest(secret.expose()),
            expires_at: None,
            created_by: None,
        })
        .await
        .unwrap();
    secret.expose().to_string()
}

#[tokio::test]
async fn viewers_watch_and_only_those_who_may_control_the_request_type() {
    use crate::auth::Role;
    let api = api(None).await;
    let viewer = stored_token(&api.store, "watcher", Role::Viewer).await;
    let other = stored_token(&api.store, "other-ci", Role::Submitter).await;
    let op = stored_token(&api.store, "oncall", Role::Operator).await;
    let id = api.running().await;
    for token in [&viewer, &other] {
        let mut ws = connect_as(&api, id, token).await;
        ws.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
            .await
            .unwrap();
        let e = next_json(&mut ws).await;
        assert_eq!(e["type"], "error", "{e}");
        assert!(e["message"].as_str().unwrap().contains("read-only"), "{e}");
    }
    let mut ws = connect_as(&api, id, &op).await;
    ws.send(WsMsg::Text(r#"{"type":"take"}"#.into()))
        .await
        .unwrap();
    let m = next_json(&mut ws).await;
    assert_eq!(m["type"], "typist", "{m}");
    assert!(m["who"].as_str().unwrap().starts_with("oncall@"), "{m}");
}
