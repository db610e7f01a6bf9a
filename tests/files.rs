//! The files API with the real tiny guest: multipart submissions (single files with their
//! modes, a tar archive made by the host's own `tar`, extracted in the guest), artifacts listed,
//! downloaded one by one and as a tar, the CLI's `submit --upload/--artifact/--artifacts-dir`
//! and `cli artifacts`, and hostile multipart bodies refused with nothing stored.

mod common;

use common::http::FormPart;
use common::{require_image, vm_slot, Options, Server};
use serde_json::{json, Value};
use sha2::Digest;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

fn sha(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Deterministic bytes that are not all alike.
fn payload(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn server(env: &[(&str, &str)]) -> Server {
    Server::start(Options::with_env(env)).await
}

/// A directory tree (a file with its mode, a nested file, a link inside it) archived by the
/// host's `tar`, as a user would make it.
fn host_tar(dir: &Path) -> Vec<u8> {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    std::fs::write(src.join("tool.sh"), "#!/bin/sh\necho tool-ran\n").unwrap();
    std::fs::write(src.join("nested/deeper/data.bin"), payload(300_000, 7)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("tool.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("deeper/data.bin", src.join("nested/link")).unwrap();
    let out = Command::new("tar")
        .args(["-C", src.to_str().unwrap(), "-cf", "-", "."])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

#[tokio::test]
async fn multipart_files_in_and_artifacts_out_through_the_api() {
    require_image();
    let _slot = vm_slot();
    let s = server(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let tar = host_tar(tmp.path());
    let single = payload(1_500_000, 3);
    let body = json!({
        "vm_name": "tiny",
        "timeout": 150,
        "commands": "stat -c '%a %s' /root/in.bin /opt/t/tool.sh; \
                     sha256sum /root/in.bin /opt/t/nested/deeper/data.bin | cut -c1-64; \
                     readlink /opt/t/nested/link; /opt/t/tool.sh; cat /root/inline.txt; echo; \
                     mkdir -p /root/out/sub; cp /root/in.bin /root/out/sub/copy.bin; \
                     printf 'x%.0s' $(seq 1 10) > /root/out/artifacts.tar; \
                     echo '<ok/>' > /root/out/report.xml; chmod 0600 /root/out/report.xml; exit 4",
        "files": [{"path": "/root/inline.txt", "content_base64": "aGk="}],
        "artifacts": ["/root/out"]
    });
    let mut file = FormPart::file("/root/in.bin", single.clone());
    file.headers.push(("X-Mode", "0640"));
    let r = s
        .submit_multipart(&[
            FormPart::request(&body),
            file,
            FormPart::file("/opt/t/", tar.clone()),
        ])
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["uuid"].as_str().unwrap().to_string();
    let r = s.wait_terminal(&id, LIMIT).await;
    assert_eq!(
        (r["status"].as_str(), r["exit_code"].as_i64()),
        (Some("done"), Some(4)),
        "{r}"
    );
    let out = s.output(&id, "stdout").await;
    let expected = format!(
        "640 1500000\n750 24\n{}\n{}\ndeeper/data.bin\ntool-ran\nhi\n",
        sha(&single),
        sha(&payload(300_000, 7))
    );
    assert_eq!(out, expected);
    // The listing, then each file by its path, then the tar of them all.
    let (code, list) = s.get_json(&format!("/requests/{id}/artifacts")).await;
    assert_eq!(code, 200, "{list}");
    let list = list.as_array().unwrap().clone();
    let by = |p: &str| -> Value {
        list.iter()
            .find(|a| a["path"] == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p} in {list:?}"))
    };
    let copy = by("/root/out/sub/copy.bin");
    assert_eq!(copy["size"], 1_500_000);
    assert_eq!(copy["sha256"], sha(&single));
    let got = s
        .fetch(&format!("/requests/{id}/artifacts/root/out/sub/copy.bin"))
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-sha256"), sha(&single));
    assert_eq!(got.header("content-type"), "application/octet-stream");
    assert!(got.body == single, "artifact bytes differ");
    // Escaped slashes name the same file; a guest file named artifacts.tar is just a file.
    let escaped = s
        .fetch(&format!("/requests/{id}/artifacts/root%2Fout%2Freport.xml"))
        .await;
    assert_eq!(
        (escaped.status, escaped.body.as_slice()),
        (200, &b"<ok/>\n"[..])
    );
    let named_tar = s
        .fetch(&format!("/requests/{id}/artifacts/root/out/artifacts.tar"))
        .await;
    assert_eq!(named_tar.body, b"xxxxxxxxxx");
    for missing in ["root/out/nope", "root/out", "..%2Fetc%2Fpasswd"] {
        let r = s
            .fetch(&format!("/requests/{id}/artifacts/{missing}"))
            .await;
        assert_eq!(r.status, 404, "{missing}: {}", r.text());
    }

    let whole = s.fetch(&format!("/requests/{id}/artifacts.tar")).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("content-type"), "application/x-tar");
    assert_eq!(whole.header("content-length"), whole.body.len().to_string());
    let x = tmp.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    std::fs::write(tmp.path().join("a.tar"), &whole.body).unwrap();
    let st = Command::new("tar")
        .args(["-C", x.to_str().unwrap(), "-xf"])
        .arg(tmp.path().join("a.tar"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(x.join("root/out/sub/copy.bin")).unwrap(),
        single
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(x.join("root/out/report.xml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "modes kept in the tar");

    // Deleting the request deletes its files and artifacts with it.
    let (code, _) = s.delete_request(&id).await;
    assert_eq!(code, 204);
    let db = rusqlite::Connection::open(&s.db).unwrap();
    for table in ["uploads", "upload_chunks", "artifacts", "artifact_chunks"] {
        let n: i64 = db
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "{table} after DELETE");
    }
    assert_eq!(
        s.fetch(&format!("/requests/{id}/artifacts")).await.status,
        404
    );

    // Unknown requests are 404 on every artifacts route.
    let nobody = "00000000-0000-4000-8000-000000000000";
    for path in ["artifacts", "artifacts.tar", "artifacts/a/b"] {
        let r = s.fetch(&format!("/requests/{nobody}/{path}")).await;
        assert_eq!(r.status, 404, "{path}");
    }
}

#[tokio::test]
async fn cli_uploads_a_directory_and_downloads_the_artifacts() {
    require_image();
    let _slot = vm_slot();
    let s = server(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("proj");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("Makefile"), "all:\n").unwrap();
    std::fs::write(src.join("lib/blob"), payload(200_000, 11)).unwrap();
    let single = tmp.path().join("note.txt");
    std::fs::write(&single, "a note\n").unwrap();
    let out_dir = tmp.path().join("got");
    let out = s
        .cli(&[
            "submit",
            "--vm",
            "tiny",
            "--timeout",
            "150",
            "--upload",
            &format!("{}:/work/", src.display()),
            "--upload",
            single.to_str().unwrap(),
            "--artifact",
            "/work/out/*",
            "--artifacts-dir",
            out_dir.to_str().unwrap(),
            "-c",
            "mkdir -p /work/out; sha256sum /work/lib/blob | cut -c1-64 > /work/out/sum; \
             cat /root/note.txt > /work/out/note; ls /work > /work/out/ls",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("3 artifact(s) written"), "{stderr}");
    let read = |p: &str| std::fs::read_to_string(out_dir.join(p)).unwrap();
    assert_eq!(
        read("work/out/sum"),
        format!("{}\n", sha(&payload(200_000, 11)))
    );
    assert_eq!(read("work/out/note"), "a note\n");
    assert_eq!(read("work/out/ls"), "Makefile\nlib\nout\n");

    // `cli artifacts` lists them, and downloads them again elsewhere.
    let (_, list) = s.get_json("/requests?limit=1").await;
    let id = list["requests"][0]["uuid"].as_str().unwrap().to_string();
    let listed = s
        .cli(&["cli", "artifacts", &id[..8], "--json"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let v: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    let again = tmp.path().join("again");
    let dl = s
        .cli(&["cli", "artifacts", &id, "--out", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(dl.status.success(), "{dl:?}");
    assert_eq!(
        std::fs::read_to_string(again.join("work/out/note")).unwrap(),
        "a note\n"
    );
    // A missing local file is refused before anything is sent.
    let bad = s
        .cli(&[
            "submit",
            "--vm",
            "tiny",
            "--upload",
            "/nonexistent/file",
            "-c",
            "true",
        ])
        .output()
        .unwrap();
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/file"));
    let (_, list) = s.get_json("/requests").await;
    assert_eq!(list["total"], 1, "the refused submit stored nothing");
}

/// A tar archive of one member named `name`, made by hand (the host's tar refuses to write
/// hostile names).
fn tar_with(name: &str, kind: u8, link: &str) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(b"00000000000");
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test]
async fn hostile_multipart_bodies_are_refused_and_store_nothing() {
    // No VM runs: nothing is ever accepted.
    let s = server(&[("SQLITE_SIM_MAX_UPLOAD", "64K")]).await;
    let ok = json!({"vm_name": "tiny", "commands": "true"});
    let plain = |d: &'static str| FormPart::file(d, b"x".to_vec());
    let mut tar_mode = FormPart::file("/d/", tar_with("a", b'0', ""));
    tar_mode.headers.push(("X-Mode", "0755"));
    let mut bad_mode = plain("/m");
    bad_mode.headers.push(("X-Mode", "rwx"));
    let cases: Vec<(&str, Vec<FormPart>, u16)> = vec![
        ("no request part", vec![plain("/a")], 422),
        (
            "two request parts",
            vec![FormPart::request(&ok), FormPart::request(&ok)],
            422,
        ),
        (
            "a file part without a filename",
            vec![
                FormPart::request(&ok),
                FormPart {
                    name: "file",
                    filename: None,
                    headers: vec![],
                    body: b"x".to_vec(),
                },
            ],
            422,
        ),
        (
            "a relative destination",
            vec![FormPart::request(&ok), plain("etc/passwd")],
            422,
        ),
        (
            "a destination with ..",
            vec![FormPart::request(&ok), plain("/root/../etc/passwd")],
            422,
        ),
        (
            "one destination twice",
            vec![FormPart::request(&ok), plain("/a"), plain("/a")],
            422,
        ),
        (
            "an unknown part",
            vec![
                FormPart::request(&ok),
                FormPart {
                    name: "evil",
                    filename: None,
                    headers: vec![],
                    body: vec![],
                },
            ],
            422,
        ),
        (
            "a tar member that climbs out",
            vec![
                FormPart::request(&ok),
                FormPart::file("/d/", tar_with("../../etc/cron.d/x", b'0', "")),
            ],
            422,
        ),
        (
            "a tar link that points out",
            vec![
                FormPart::request(&ok),
                FormPart::file("/d/", tar_with("l", b'2', "/etc/shadow")),
            ],
            422,
        ),
        (
            "a tar that is not a tar",
            vec![
                FormPart::request(&ok),
                FormPart::file("/d/", vec![b'z'; 1024]),
            ],
            422,
        ),
        (
            "X-Mode on a tar",
            vec![FormPart::request(&ok), tar_mode],
            422,
        ),
        ("a bad X-Mode", vec![FormPart::request(&ok), bad_mode], 422),
        (
            "an unknown VM",
            vec![
                FormPart::request(&json!({"vm_name": "nope", "commands": "true"})),
                plain("/a"),
            ],
            422,
        ),
        (
            "a request part that is not JSON",
            vec![FormPart {
                name: "request",
                filename: None,
                headers: vec![],
                body: b"{not json".to_vec(),
            }],
            400,
        ),
        (
            "files past SQLITE_SIM_MAX_UPLOAD",
            vec![
                FormPart::request(&ok),
                FormPart::file("/big", payload(70_000, 1)),
            ],
            413,
        ),
    ];
    for (what, parts, code) in cases {
        let r = s.submit_multipart(&parts).await;
        assert_eq!(r.status, code, "{what}: {}", r.text());
        let msg = r.json_or_null();
        assert!(msg["error"]["message"].is_string(), "{what}: {msg}");
    }
    // A body whose framing is broken.
    let r = s
        .post_bytes(
            "/requests",
            b"--b\r\nnonsense".to_vec(),
            Some("multipart/form-data; boundary=b"),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A body that declares more than the limit is refused before a byte of it is sent: the
    // answer comes to the headers alone (as a client waiting for `100 Continue` would see).
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        conn,
        "POST /requests HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\n\r\n",
        (64 << 10) + (3 << 20)
    )
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // Nothing was kept: no request, no staged upload.
    let (_, list) = s.get_json("/requests").await;
    assert_eq!(list["total"], 0);
    let db = rusqlite::Connection::open(&s.db).unwrap();
    let staged: i64 = db
        .query_row("SELECT count(*) FROM uploads", [], |r| r.get(0))
        .unwrap();
    let chunks: i64 = db
        .query_row("SELECT count(*) FROM upload_chunks", [], |r| r.get(0))
        .unwrap();
    assert_eq!((staged, chunks), (0, 0), "refused files are discarded");
}
