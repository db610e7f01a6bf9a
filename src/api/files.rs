//! Files a submission carries into its guest and the artifact globs it collects: the rules
//! for guest paths, and staging in the store (a refused submission leaves nothing behind).

use super::error::ApiError;
use crate::model::UploadKind;
use crate::store::{Store, CHUNK};
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Most files one submission may carry.
pub const MAX_FILES: usize = 64;
/// Most artifact globs one submission may give.
pub const MAX_GLOBS: usize = 64;
/// Longest guest path or glob.
pub const MAX_PATH: usize = 4096;

/// [`guest_path`]'s rules as a regular expression, for the document: slashes and components
/// of no control characters (Unicode `Cc`), none of them `.` or `..`, at least one.
pub fn guest_path_pattern() -> String {
    // A character of a component, and one that is not a dot either.
    let (c, d) = (r"[^/\x00-\x1f\x7f-\x9f]", r"[^/.\x00-\x1f\x7f-\x9f]");
    let component = format!(r"(?:{d}{c}*|\.{d}{c}*|\.\.{c}+)");
    format!("^/+(?:{component}/+)*{component}/*$")
}

/// Padded standard base64 whose last symbol carries no stray bits, which is what the decoder
/// takes.
pub const BASE64_PATTERN: &str =
    "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// An absolute guest path (or glob) as [`guest_path`] takes it.
pub struct GuestPath;

impl utoipa::PartialSchema for GuestPath {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_PATH))
            .pattern(Some(guest_path_pattern()))
            .description(Some(
                "An absolute guest path: components without control characters, none of them \
                 `.` or `..`; at most 4096 bytes of UTF-8 (`maxLength` counts characters).",
            ))
            .into()
    }
}

impl ToSchema for GuestPath {}

/// The bytes of an inline file.
pub struct Base64;

impl utoipa::PartialSchema for Base64 {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(BASE64_PATTERN))
            .description(Some("base64, standard alphabet, padded"))
            .into()
    }
}

impl ToSchema for Base64 {}

/// A small file carried inline in a JSON submission.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InlineFile {
    /// Absolute guest path of the file (its directories are created).
    #[schema(value_type = GuestPath)]
    pub path: String,
    /// The file's bytes, base64 (standard alphabet, padded).
    #[schema(value_type = Base64)]
    pub content_base64: String,
    /// Mode bits: a number (`493`) or octal digits (`"0755"`); default 0644.
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// File mode bits, as a number (a whole JSON number, `493` or `493.0`) or as octal digits.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Mode(serde_json::Value);

impl utoipa::PartialSchema for Mode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(0o7777)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^0?[0-7]{1,4}$")),
            )
            .description(Some("mode bits: a number (493) or octal digits (\"0755\")"))
            .into()
    }
}

impl ToSchema for Mode {}

impl Mode {
    /// Octal digits, as a multipart part's `X-Mode` header carries them.
    pub fn octal(digits: &str) -> Mode {
        Mode(serde_json::Value::String(digits.to_string()))
    }

    pub fn bits(&self) -> Result<u32, ApiError> {
        let bits = match &self.0 {
            serde_json::Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            }),
            serde_json::Value::String(s) if (1..=5).contains(&s.len()) => {
                u64::from_str_radix(s, 8).ok()
            }
            _ => None,
        };
        bits.filter(|b| *b <= 0o7777)
            .map(|b| b as u32)
            .ok_or_else(|| {
                ApiError::Validation(format!(
                    "mode {} is not file mode bits (0 to 0o7777, e.g. 493 or \"0755\")",
                    self.0
                ))
            })
    }
}

/// A guest path as the agents type it: absolute, normalised, with no `.`, `..` or control
/// characters (they would change where it lands, or the line it is typed on).
pub fn guest_path(raw: &str, what: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        let shown: String = raw.chars().take(80).collect();
        ApiError::Validation(format!("{what} {shown:?} {why}"))
    };
    if raw.len() > MAX_PATH {
        return Err(bad(&format!("is longer than {MAX_PATH} bytes")));
    }
    if !raw.starts_with('/') {
        return Err(bad("is not an absolute guest path"));
    }
    if raw.chars().any(|c| c.is_control()) {
        return Err(bad("holds control characters"));
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" => {}
            "." | ".." => return Err(bad("holds a . or .. component")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(bad("names the root directory"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// An artifact glob: a guest path whose components may hold `*`, `?` and `[…]`.
pub fn glob(raw: &str) -> Result<String, ApiError> {
    if raw.trim().is_empty() {
        return Err(ApiError::Validation("an artifact glob is empty".into()));
    }
    guest_path(raw, "artifact glob")
}

/// Checks a submission's artifact globs.
pub fn globs(raw: Vec<String>) -> Result<Vec<String>, ApiError> {
    if raw.len() > MAX_GLOBS {
        return Err(ApiError::Validation(format!(
            "{} artifact globs; at most {MAX_GLOBS}",
            raw.len()
        )));
    }
    raw.iter().map(|g| glob(g)).collect()
}

/// One file to stage: where it goes, what it is, and its bytes.
pub struct Pending {
    pub path: String,
    pub kind: UploadKind,
    pub mode: Option<u32>,
    pub data: Vec<u8>,
}

/// Checks inline files: paths, modes, base64, count, no destination twice.
pub fn inline(files: Vec<InlineFile>) -> Result<Vec<Pending>, ApiError> {
    if files.len() > MAX_FILES {
        return Err(ApiError::Validation(format!(
            "{} files; at most {MAX_FILES}",
            files.len()
        )));
    }
    let pending = files
        .into_iter()
        .map(|f| {
            let path = guest_path(&f.path, "file path")?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(f.content_base64.as_bytes())
                .map_err(|e| {
                    ApiError::Validation(format!("content_base64 of {path} is not base64: {e}"))
                })?;
            let mode = f.mode.as_ref().map(Mode::bits).transpose()?;
            Ok(Pending {
                path,
                kind: UploadKind::File,
                mode,
                data,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    distinct(pending.iter().map(|p| p.path.as_str()))?;
    Ok(pending)
}

/// No destination twice.
pub fn distinct<'a>(paths: impl Iterator<Item = &'a str>) -> Result<(), ApiError> {
    let mut seen = std::collections::HashSet::new();
    for p in paths {
        if !seen.insert(p) {
            return Err(duplicate(p));
        }
    }
    Ok(())
}

/// The refusal of a destination given twice.
pub fn duplicate(path: &str) -> ApiError {
    ApiError::Validation(format!("{path} is the destination of more than one file"))
}

/// Stages `files` in the store, in order; on any error nothing stays staged.
pub async fn stage(
    store: &Store,
    files: Vec<Pending>,
    max_upload: u64,
) -> Result<Vec<i64>, ApiError> {
    let total: u64 = files.iter().map(|f| f.data.len() as u64).sum();
    if total > max_upload {
        return Err(ApiError::UploadTooLarge {
            size: total,
            limit: max_upload,
        });
    }
    let mut ids = Vec::new();
    let staged = async {
        for f in files {
            let id = store.stage_upload(f.path, f.kind, f.mode).await?;
            ids.push(id);
            for (seq, chunk) in f.data.chunks(CHUNK).enumerate() {
                store
                    .append_upload_chunk(id, seq as i64, chunk.to_vec())
                    .await?;
            }
            let digest = format!("{:x}", Sha256::digest(&f.data));
            store.finish_upload(id, f.data.len() as u64, digest).await?;
        }
        Ok::<_, crate::store::StoreError>(())
    }
    .await;
    match staged {
        Ok(()) => Ok(ids),
        Err(e) => {
            let _ = store.discard_uploads(ids).await;
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_stay_where_they_say() {
        assert_eq!(guest_path("/root//src/", "p").unwrap(), "/root/src");
        assert_eq!(guest_path("/a b/it's", "p").unwrap(), "/a b/it's");
        for bad in [
            "",
            "rel/x",
            "/",
            "//",
            "/a/../etc",
            "/a/./b",
            "/a\nb",
            "/a\0b",
            "/x\u{1b}",
        ] {
            assert!(guest_path(bad, "p").is_err(), "{bad:?}");
        }
        assert!(guest_path(&format!("/{}", "a".repeat(MAX_PATH)), "p").is_err());
        assert!(glob("/root/out/*.xml").is_ok());
        assert!(glob("  ").is_err() && glob("*.xml").is_err());
    }

    #[test]
    fn the_documented_patterns_are_the_rules_applied() {
        let re = regex::Regex::new(&guest_path_pattern()).unwrap();
        for p in [
            "/a",
            "/root//src/",
            "/a b/it's",
            "/.x",
            "/..x",
            "/...",
            "/a/.b/c..",
            "/é/\u{3000}",
            "",
            "a",
            "/",
            "//",
            "/.",
            "/..",
            "/a/./b",
            "/a/../b",
            "/a/..",
            "/a\nb",
            "/a\u{0}",
            "/x\u{85}",
            "/x\u{7f}",
            "/x\u{a0}",
            "./a",
        ] {
            assert_eq!(re.is_match(p), guest_path(p, "p").is_ok(), "{p:?}");
        }
        let re = regex::Regex::new(BASE64_PATTERN).unwrap();
        let decodes = |t: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(t.as_bytes())
                .is_ok()
        };
        for t in [
            "", "eA==", "eHk=", "eHl6", "eB==", "eHz=", "eA=", "eA", "e===", "eHl6\n", "e A==",
            "_-8=", "AAAA", "QUJD", "QQ==", "QUI=",
        ] {
            assert_eq!(re.is_match(t), decodes(t), "{t:?}");
        }
    }

    #[test]
    fn modes_and_duplicates() {
        let m = |v: serde_json::Value| Mode(v);
        assert_eq!(m(493.into()).bits().unwrap(), 0o755);
        assert_eq!(m(serde_json::json!(493.0)).bits().unwrap(), 0o755);
        assert_eq!(m("0755".into()).bits().unwrap(), 0o755);
        assert_eq!(Mode::octal("755").bits().unwrap(), 0o755);
        for bad in [
            m(0o10000.into()),
            m("9".into()),
            m("".into()),
            m(serde_json::json!(1.5)),
            m(true.into()),
        ] {
            assert!(bad.bits().is_err(), "{bad:?}");
        }
        let f = |p: &str| InlineFile {
            path: p.into(),
            content_base64: "eA==".into(),
            mode: None,
        };
        assert!(
            inline(vec![f("/a"), f("//a/")]).is_err(),
            "the same destination twice"
        );
        assert!(inline(vec![InlineFile {
            content_base64: "not base64!".into(),
            ..f("/a")
        }])
        .is_err());
        assert_eq!(inline(vec![f("/a")]).unwrap()[0].data, b"x");
    }
}
