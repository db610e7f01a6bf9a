//! The web dashboard at `/ui/`: static files from the bundle that `scripts/build-ui.sh` builds
//! (sources in `src/ui/web/`), read from `SQLITE_SIM_UI_DIR` at each request.
//!
//! The page is a client of the public API like the CLI, so this module only serves files: no
//! endpoint exists for the page alone. The files are public (they hold no data and the page has
//! to load before it can ask for a token); every call the page makes carries the token.
//!
//! Served from a directory rather than embedded so that a clean checkout builds without Node,
//! and so that the page can be rebuilt without recompiling the server. Without a bundle, `/ui/`
//! answers with a page that says how to build one.

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Only the page's own origin: scripts, fetches and sockets. Inline styles are allowed because
/// xterm.js's DOM renderer writes its geometry and theme into `<style>` elements; inline
/// scripts are not.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                       img-src 'self' data:; font-src 'self'; connect-src 'self'; \
                       object-src 'none'; base-uri 'none'; form-action 'self'; \
                       frame-ancestors 'none'";

/// The file every build writes; its absence means there is no bundle.
const INDEX: &str = "index.html";

/// Routes for `/ui` and everything under it, served without the bearer token.
pub fn router<S: Clone + Send + Sync + 'static>(dir: PathBuf) -> Router<S> {
    let dir = Arc::new(dir);
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(file))
        .with_state(dir)
}

/// Where the bundle is when `SQLITE_SIM_UI_DIR` is not set: `ui/` next to the binary, then the
/// build output beside a cargo profile directory (`target/debug/sqlite-sim` → `target/ui`,
/// where `scripts/build-ui.sh` writes it), then an installed `../share/sqlite-sim/ui`. With
/// none present, the build output's place, so the "not built" page names it.
pub fn default_dir() -> PathBuf {
    let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    else {
        return PathBuf::from("target/ui");
    };
    let candidates = [
        exe_dir.join("ui"),
        exe_dir.join("../ui"),
        exe_dir.join("../share/sqlite-sim/ui"),
    ];
    let found = candidates.iter().find(|d| d.join(INDEX).is_file());
    normalize(found.unwrap_or(&candidates[1]))
}

/// Removes `dir/..` pairs lexically, so settings show `target/ui`, not `target/debug/../ui`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

async fn index(State(dir): State<Arc<PathBuf>>, headers: HeaderMap) -> Response {
    serve(&dir, INDEX, &headers).await
}

async fn file(
    State(dir): State<Arc<PathBuf>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    serve(&dir, &path, &headers).await
}

/// A bundle file by its path below `/ui/`, or 404. Every answer is revalidated (`no-cache`
/// with an `ETag`), so a rebuilt bundle shows at the next load and an unchanged one costs a 304.
async fn serve(dir: &Path, rel: &str, headers: &HeaderMap) -> Response {
    let Some(rel) = safe_relative(rel) else {
        return not_found();
    };
    if !dir.join(INDEX).is_file() {
        return not_built(dir);
    }
    let path = dir.join(&rel);
    let Ok(meta) = tokio::fs::metadata(&path).await else {
        return not_found();
    };
    if !meta.is_file() {
        return not_found();
    }
    let etag = etag(&meta);
    let mut resp = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let mut r = Body::from(bytes).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type(&rel)),
                );
                r
            }
            Err(_) => return not_found(),
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(h);
    resp
}

/// The path below the bundle directory, if it stays inside it: plain names only, no `..`,
/// no absolute parts, no hidden files.
fn safe_relative(rel: &str) -> Option<PathBuf> {
    let rel = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}{INDEX}")
    } else {
        rel.to_string()
    };
    let mut out = PathBuf::new();
    for c in Path::new(&rel).components() {
        match c {
            Component::Normal(n) if !n.to_string_lossy().starts_with('.') => out.push(n),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn etag(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("\"{:x}-{:x}\"", meta.len(), mtime)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn not_found() -> Response {
    let mut r = (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found\n",
    )
        .into_response();
    security_headers(r.headers_mut());
    r
}

/// 404 with a page saying how to build the bundle: the server itself is fine.
fn not_built(dir: &Path) -> Response {
    let dir = html_escape(&dir.display().to_string());
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>sqlite-sim: dashboard not built</title></head><body>\n\
         <h1>The dashboard is not built</h1>\n\
         <p>This server looks for the dashboard's bundle in <code>{dir}</code> \
         (<code>SQLITE_SIM_UI_DIR</code>) and found no <code>index.html</code> there.</p>\n\
         <p>Build it from the repository with <code>scripts/build-ui.sh</code> (Node.js and npm; \
         <code>scripts/setup.sh</code> runs it), or point <code>SQLITE_SIM_UI_DIR</code> at a \
         built bundle. Then reload this page; the server need not restart.</p>\n\
         <p>The REST API works without it: <a href=\"/docs\">/docs</a>.</p>\n\
         </body></html>\n"
    );
    let mut r = (
        StatusCode::NOT_FOUND,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response();
    security_headers(r.headers_mut());
    r
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_inside_the_bundle_are_served() {
        assert_eq!(safe_relative(""), Some(PathBuf::from("index.html")));
        assert_eq!(safe_relative("assets/"), Some("assets/index.html".into()));
        assert_eq!(safe_relative("app.js"), Some("app.js".into()));
        for bad in ["../x", "a/../../x", "/etc/passwd", ".env", "a/.git/x", "./"] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(
            content_type(Path::new("index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("app.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("app.css")),
            "text/css; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.bin")), "application/octet-stream");
    }

    #[test]
    fn parent_components_are_folded() {
        assert_eq!(
            normalize(Path::new("/t/debug/../ui")),
            PathBuf::from("/t/ui")
        );
    }
}
