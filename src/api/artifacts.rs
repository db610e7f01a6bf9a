//! A request's artifacts: the list (left-out files included, with the reason), one file's
//! bytes, and every stored file as one tar archive, both streamed from the store chunk by
//! chunk. `/artifacts.tar` and `/artifacts/{path}` never meet: a guest file named
//! `artifacts.tar` is `/artifacts/artifacts.tar` (or deeper).

use super::error::ApiError;
use super::requests::{load, parse_id};
use super::AppState;
use crate::model::{Artifact, RequestId};
use crate::store::Store;
use crate::tarball::{self, EntryKind};
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use std::future::ready;

/// The response header that carries a file's SHA-256 (hex), as the listing shows it.
pub const SHA256_HEADER: &str = "x-sha256";

/// A request's artifacts by path: the issue's `path`, `size`, `sha256`, `mode`, and
/// `left_out`, which says why a listed file has no bytes here (the limit, not a regular file,
/// a name that leaves its directory, the guest stopped answering).
#[utoipa::path(get, path = "/requests/{uuid}/artifacts", tag = "artifacts", operation_id = "list_artifacts",
    params(("uuid" = inline(RequestId), Path, description = "request id")),
    responses((status = 200, body = Vec<Artifact>,
        description = "every file collected or left out, by path")))]
pub async fn list(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Json<Vec<Artifact>>, ApiError> {
    let req = load(&state, &uuid).await?;
    Ok(Json(state.store.artifacts(req.uuid).await?))
}

/// One stored artifact's bytes, exactly as collected.
#[utoipa::path(get, path = "/requests/{uuid}/artifacts/{path}", tag = "artifacts", operation_id = "get_artifact",
    params(
        ("uuid" = inline(RequestId), Path, description = "request id"),
        ("path" = String, Path, min_length = 1, pattern = r"^(?:[^.]|\.[^.]|\.\.[\s\S])[\s\S]*$",
            description = "The artifact's guest path without its leading `/` (its slashes as \
            they are, or as `%2F`), e.g. `root/out/a.xml`."),
    ),
    responses((status = 200, content_type = "application/octet-stream",
        description = "the file's bytes; unknown and left-out paths are `404`",
        headers(
            ("X-Sha256" = String, description = "SHA-256 of the bytes (hex), as listed"),
            ("Content-Length" = u64, description = "the file's size"),
        ))))]
pub async fn one(
    State(state): State<AppState>,
    uri: Uri,
    params: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (uuid, path) = match params {
        Ok(Path(p)) => p,
        Err(_) => {
            // A path that does not decode to UTF-8 names no artifact; a bad id still says so.
            let raw = uri.path().split('/').nth(2).unwrap_or("");
            let id = parse_id(raw)?;
            return Err(ApiError::NotFound(format!(
                "request {id} has no artifact at that path"
            )));
        }
    };
    let req = load(&state, &uuid).await?;
    let wanted = format!("/{}", path.trim_start_matches('/'));
    let shown: String = wanted.chars().take(200).collect();
    let artifacts = state.store.artifacts(req.uuid).await?;
    let a = artifacts
        .into_iter()
        .find(|a| a.path == wanted)
        .ok_or_else(|| {
            ApiError::NotFound(format!("request {} has no artifact {shown:?}", req.uuid))
        })?;
    if let Some(why) = &a.left_out {
        return Err(ApiError::NotFound(format!(
            "artifact {shown:?} of request {} was left out: {why}",
            req.uuid
        )));
    }
    let mut headers = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, a.size.to_string()),
    ];
    if let Some(sha) = &a.sha256 {
        headers.push((header::HeaderName::from_static(SHA256_HEADER), sha.clone()));
    }
    let body = Body::from_stream(chunks(state.store.clone(), a.id, a.size));
    Ok((axum::response::AppendHeaders(headers), body).into_response())
}

/// Every stored artifact as one tar archive: paths relative (`root/out/a.xml`), modes kept,
/// left-out files absent (the listing says why).
#[utoipa::path(get, path = "/requests/{uuid}/artifacts.tar", tag = "artifacts", operation_id = "artifacts_tar",
    params(("uuid" = inline(RequestId), Path, description = "request id")),
    responses((status = 200, content_type = "application/x-tar",
        description = "a ustar archive of the stored artifacts, streamed",
        headers(("Content-Length" = u64, description = "the archive's size")))))]
pub async fn tar(
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Response, ApiError> {
    let req = load(&state, &uuid).await?;
    let stored: Vec<Artifact> = state
        .store
        .artifacts(req.uuid)
        .await?
        .into_iter()
        .filter(|a| a.left_out.is_none())
        .collect();
    let mtime = req
        .finished_at
        .as_deref()
        .and_then(crate::timefmt::parse)
        .map_or(0, |t| t.unix_timestamp().max(0) as u64);
    let members: Vec<(Artifact, Vec<u8>)> = stored
        .into_iter()
        .map(|a| {
            let name = a.path.trim_start_matches('/').to_string();
            let h = tarball::header(
                &name,
                EntryKind::File,
                a.mode.unwrap_or(0o644),
                a.size,
                mtime,
            );
            (a, h)
        })
        .collect();
    let trailer = tarball::trailer();
    let length: u64 = members
        .iter()
        .map(|(a, h)| h.len() as u64 + a.size + tarball::padding(a.size) as u64)
        .sum::<u64>()
        + trailer.len() as u64;
    let store = state.store.clone();
    let body = stream::iter(members)
        .flat_map(move |(a, h)| {
            let pad = vec![0u8; tarball::padding(a.size)];
            stream::once(ready(Ok(Bytes::from(h))))
                .chain(chunks(store.clone(), a.id, a.size))
                .chain(stream::once(ready(Ok(Bytes::from(pad)))))
        })
        .chain(stream::once(ready(Ok(Bytes::from(trailer)))));
    let disposition = format!("attachment; filename=\"{}-artifacts.tar\"", req.uuid);
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// An artifact's chunks in order, checked against its size: a short or long file ends the
/// body with an error rather than passing for complete.
fn chunks(
    store: Store,
    artifact: i64,
    size: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    stream::unfold(Some((0i64, 0u64)), move |at| {
        let store = store.clone();
        async move {
            let (seq, sent) = at?;
            let wrong = |sent: u64| {
                std::io::Error::other(format!(
                    "artifact {artifact} holds {sent} bytes, not its {size}"
                ))
            };
            match store.artifact_chunk(artifact, seq).await {
                Ok(Some(data)) => {
                    let sent = sent + data.len() as u64;
                    if sent > size {
                        return Some((Err(wrong(sent)), None));
                    }
                    Some((Ok(Bytes::from(data)), Some((seq + 1, sent))))
                }
                Ok(None) if sent == size => None,
                Ok(None) => Some((Err(wrong(sent)), None)),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    })
}
