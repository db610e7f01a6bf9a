//! `POST /requests` as `multipart/form-data`: a `request` part with the JSON submission and
//! `file` parts, each streamed into the store in chunks as it arrives (never held whole),
//! counted against `SQLITE_SIM_MAX_UPLOAD`, a tar part checked member by member as it
//! streams. A `file` part's `filename` is its absolute guest destination; one ending in `/`
//! is a tar archive extracted into that directory. Any refusal discards what was staged.

use super::error::ApiError;
use super::files::{self, Mode};
use super::input::Object;
use super::requests::{validate, CreateBody};
use super::AppState;
use crate::model::{NewRequest, UploadKind};
use crate::store::{Store, CHUNK};
use crate::tarball::Extraction;
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::time::Duration;

/// Largest `request` part. Larger than a JSON body may be: this route's limit is the upload's,
/// and a submission that breaks its schema is then refused for what it breaks.
pub const REQUEST_PART_LIMIT: usize = 1 << 20;
/// Room in a multipart body beyond its files' bytes: the `request` part, boundaries and part
/// headers.
pub const SLACK: u64 = 2 << 20;
/// The part header that sets a single file's mode bits (octal digits).
pub const MODE_HEADER: &str = "x-mode";
/// How long a refused body is still read, so that the client gets to see the answer.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The body limit of a route that takes multipart submissions.
pub fn body_limit(max_upload: u64) -> usize {
    usize::try_from(max_upload.saturating_add(SLACK)).unwrap_or(usize::MAX)
}

/// Whether a body is sent as `multipart/form-data`.
pub fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("multipart/form-data"))
}

/// Reads a multipart submission. Its files are staged in the store, in placement order (the
/// request's inline files first, then the parts as sent): creating the request links them, and
/// the caller discards them if that fails.
pub async fn submission(state: &AppState, req: Request) -> Result<NewRequest, ApiError> {
    let limit = state.settings.max_upload;
    let hard = limit.saturating_add(SLACK);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Refused before a byte is read, so a client that waits for `100 Continue` sends nothing.
    if declared.is_some_and(|n| n > hard) {
        return Err(ApiError::MultipartTooLarge { limit: hard });
    }
    let mut multipart = Multipart::from_request(req, state).await?;
    let mut s = Submission {
        store: &state.store,
        limit,
        hard,
        used: 0,
        inline: Vec::new(),
        parts: Vec::new(),
        destinations: HashSet::new(),
        request: None,
    };
    match s.read(state, &mut multipart).await {
        Ok(new) => Ok(new),
        Err(e) => {
            let staged: Vec<i64> = s.inline.iter().chain(&s.parts).copied().collect();
            if let Err(d) = state.store.discard_uploads(staged).await {
                // What stays is staged only, and the store drops stale staged files.
                tracing::warn!(error = %d, "discarding a refused submission's files");
            }
            if !matches!(
                e,
                ApiError::MalformedMultipart(_) | ApiError::MultipartTooLarge { .. }
            ) {
                drain(&mut multipart).await;
            }
            Err(e)
        }
    }
}

/// Reads (and drops) what is left of a refused body, up to the route's limit and for a
/// bounded time: answering while the client still sends would reset the connection under it.
async fn drain(multipart: &mut Multipart) {
    let rest = async {
        while let Ok(Some(mut field)) = multipart.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
    };
    let _ = tokio::time::timeout(DRAIN_LIMIT, rest).await;
}

/// A multipart submission being read.
struct Submission<'a> {
    store: &'a Store,
    /// `SQLITE_SIM_MAX_UPLOAD`, and the body limit.
    limit: u64,
    hard: u64,
    /// File bytes so far.
    used: u64,
    /// Staged ids: the request's inline files, and the file parts as sent.
    inline: Vec<i64>,
    parts: Vec<i64>,
    destinations: HashSet<String>,
    request: Option<NewRequest>,
}

impl Submission<'_> {
    async fn read(
        &mut self,
        state: &AppState,
        multipart: &mut Multipart,
    ) -> Result<NewRequest, ApiError> {
        while let Some(field) = multipart.next_field().await.map_err(|e| self.broken(e))? {
            match field.name() {
                Some("request") => self.request_part(state, field).await?,
                Some("file") => self.file_part(field).await?,
                other => {
                    let shown: String = other.unwrap_or("").chars().take(40).collect();
                    return Err(ApiError::Validation(format!(
                        "a part named {shown:?}: send one `request` part and `file` parts"
                    )));
                }
            }
        }
        let mut new = self.request.take().ok_or_else(|| {
            ApiError::Validation("the `request` part (the submission's JSON) is missing".into())
        })?;
        new.uploads = self.inline.iter().chain(&self.parts).copied().collect();
        Ok(new)
    }

    fn broken(&self, e: MultipartError) -> ApiError {
        ApiError::from_multipart(e, self.hard)
    }

    /// The JSON submission, checked as the JSON route checks it; its inline files are staged.
    async fn request_part(
        &mut self,
        state: &AppState,
        mut field: Field<'_>,
    ) -> Result<(), ApiError> {
        if self.request.is_some() {
            return Err(ApiError::Validation("more than one `request` part".into()));
        }
        let mut json = Vec::new();
        while let Some(bytes) = field.chunk().await.map_err(|e| self.broken(e))? {
            if json.len() + bytes.len() > REQUEST_PART_LIMIT {
                return Err(ApiError::RequestPartTooLarge {
                    limit: REQUEST_PART_LIMIT,
                });
            }
            json.extend_from_slice(&bytes);
        }
        let body: CreateBody = serde_json::from_slice::<Object<CreateBody>>(&json)
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => {
                    ApiError::Validation(format!("the request part: {e}"))
                }
                _ => ApiError::MalformedJson(format!("the request part: {e}")),
            })?
            .0;
        let (new, pending) = validate(state, body)?;
        for p in &pending {
            self.claim(&p.path)?;
        }
        self.count(pending.iter().map(|p| p.data.len() as u64).sum())?;
        self.inline = files::stage(self.store, pending, u64::MAX).await?;
        self.request = Some(new);
        Ok(())
    }

    /// One file part, streamed into the store.
    async fn file_part(&mut self, mut field: Field<'_>) -> Result<(), ApiError> {
        let raw = field.file_name().map(str::to_owned).ok_or_else(|| {
            ApiError::Validation(
                "a `file` part has no filename: its filename is its absolute guest destination \
                 (ending in / for a tar archive extracted into that directory)"
                    .into(),
            )
        })?;
        let tar = raw.ends_with('/');
        let path = files::guest_path(&raw, "file destination")?;
        let mode = part_mode(field.headers(), &path, tar)?;
        if self.parts.len() >= files::MAX_FILES {
            return Err(ApiError::Validation(format!(
                "more than {} file parts",
                files::MAX_FILES
            )));
        }
        self.claim(&path)?;
        let kind = if tar {
            UploadKind::Tar
        } else {
            UploadKind::File
        };
        let id = self.store.stage_upload(path.clone(), kind, mode).await?;
        self.parts.push(id);
        let mut check = tar.then(Extraction::new);
        let (mut hash, mut size, mut seq) = (Sha256::new(), 0u64, 0i64);
        let mut buf = Vec::with_capacity(CHUNK);
        while let Some(bytes) = field.chunk().await.map_err(|e| self.broken(e))? {
            self.count(bytes.len() as u64)?;
            if let Some(c) = check.as_mut() {
                c.feed(&bytes).map_err(|e| refused_tar(&path, e))?;
            }
            hash.update(&bytes);
            size += bytes.len() as u64;
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let take = (CHUNK - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buf.len() == CHUNK {
                    let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK));
                    self.store.append_upload_chunk(id, seq, chunk).await?;
                    seq += 1;
                }
            }
        }
        if !buf.is_empty() {
            self.store.append_upload_chunk(id, seq, buf).await?;
        }
        if let Some(c) = &check {
            c.finish().map_err(|e| refused_tar(&path, e))?;
        }
        let digest = format!("{:x}", hash.finalize());
        self.store.finish_upload(id, size, digest).await?;
        Ok(())
    }

    /// Takes a destination, which no other file (inline or part) may have.
    fn claim(&mut self, path: &str) -> Result<(), ApiError> {
        if !self.destinations.insert(path.to_string()) {
            return Err(files::duplicate(path));
        }
        Ok(())
    }

    /// Counts file bytes against `SQLITE_SIM_MAX_UPLOAD`.
    fn count(&mut self, n: u64) -> Result<(), ApiError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.limit {
            return Err(ApiError::UploadTooLarge {
                size: self.used,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// A single file's mode from its `X-Mode` header; a tar's members keep their own.
fn part_mode(headers: &HeaderMap, path: &str, tar: bool) -> Result<Option<u32>, ApiError> {
    let Some(value) = headers.get(MODE_HEADER) else {
        return Ok(None);
    };
    if tar {
        return Err(ApiError::Validation(format!(
            "X-Mode on the tar part for {path}: a tar's members keep their own modes"
        )));
    }
    let digits = value
        .to_str()
        .map_err(|_| ApiError::Validation(format!("X-Mode of {path} is not octal digits")))?;
    Mode::octal(digits.trim()).bits().map(Some)
}

fn refused_tar(path: &str, e: crate::tarball::TarError) -> ApiError {
    ApiError::Validation(format!("the tar archive for {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_is_told_by_its_media_type() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, v.parse().unwrap());
            m
        };
        assert!(is_multipart(&h("multipart/form-data; boundary=x")));
        assert!(is_multipart(&h("Multipart/Form-Data;boundary=x")));
        assert!(is_multipart(&h("multipart/form-data")));
        for other in [
            "application/json",
            "multipart/mixed; boundary=x",
            "text/plain",
        ] {
            assert!(!is_multipart(&h(other)), "{other}");
        }
        assert!(!is_multipart(&HeaderMap::new()));
    }

    #[test]
    fn modes_come_from_the_part_header() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(MODE_HEADER, v.parse().unwrap());
            m
        };
        assert_eq!(part_mode(&h("0755"), "/a", false).unwrap(), Some(0o755));
        assert_eq!(part_mode(&h("600"), "/a", false).unwrap(), Some(0o600));
        assert_eq!(part_mode(&HeaderMap::new(), "/a", false).unwrap(), None);
        for bad in ["9", "rwx", "077777", ""] {
            assert!(part_mode(&h(bad), "/a", false).is_err(), "{bad}");
        }
        assert!(part_mode(&h("0755"), "/d", true).is_err(), "not on a tar");
    }
}
