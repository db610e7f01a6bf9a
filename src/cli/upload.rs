//! `submit --upload LOCAL[:GUEST_PATH]`: local files and directories as the `file` parts of a
//! multipart submission, streamed from disk with their lengths declared up front. A directory
//! travels as a tar archive built on the fly (regular files, directories, and symbolic links
//! that stay inside it, checked by the same rules as the server's), extracted into its guest
//! directory with every member's mode.

use super::client::CliError;
use crate::tarball::{self, Entry, EntryKind, Extraction};
use axum::body::Bytes;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Bytes read from disk at a time.
const READ: usize = 256 * 1024;

/// One `--upload` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub local: PathBuf,
    /// Where it goes in the guest; `None`: `/root/<name>`.
    pub guest: Option<String>,
}

/// `LOCAL[:GUEST_PATH]`: the guest path starts at the first `:/` (guest paths are absolute).
pub fn parse_spec(s: &str) -> Result<Spec, String> {
    let (local, guest) = match s.find(":/") {
        Some(i) => (&s[..i], Some(s[i + 1..].to_string())),
        None => (s, None),
    };
    if local.is_empty() {
        return Err(format!(
            "{s:?}: give a local file or directory before the :"
        ));
    }
    Ok(Spec {
        local: PathBuf::from(local),
        guest,
    })
}

/// Checks `spec` and prepares its part, whose filename is its destination and whose length is
/// known; nothing is read until the part is sent.
pub fn prepare(spec: &Spec) -> Result<reqwest::multipart::Part, CliError> {
    let local = &spec.local;
    let meta = std::fs::metadata(local)
        .map_err(|e| CliError::Input(format!("--upload {}: {e}", local.display())))?;
    let name = std::fs::canonicalize(local)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| CliError::Input(format!("--upload {}: it has no name", local.display())))?;
    if meta.is_file() {
        let destination = match &spec.guest {
            None => format!("/root/{name}"),
            Some(g) if g.ends_with('/') => format!("{g}{name}"),
            Some(g) => g.clone(),
        };
        check_destination(&destination)?;
        let (path, size) = (local.clone(), meta.len());
        let body = produce(move |tx| async move { send_file(&tx, &path, size).await });
        let mut headers = reqwest::header::HeaderMap::new();
        let mode = format!("{:04o}", meta.mode() & 0o7777);
        headers.insert("x-mode", mode.parse().expect("octal digits"));
        return Ok(reqwest::multipart::Part::stream_with_length(body, size)
            .file_name(destination)
            .headers(headers));
    }
    if meta.is_dir() {
        let mut destination = spec.guest.clone().unwrap_or(format!("/root/{name}"));
        if !destination.ends_with('/') {
            destination.push('/');
        }
        check_destination(&destination)?;
        let members = walk(local)?;
        let length = members
            .iter()
            .map(|m| m.header.len() as u64 + m.size + tarball::padding(m.size) as u64)
            .sum::<u64>()
            + tarball::trailer().len() as u64;
        let body = produce(move |tx| async move { send_tar(&tx, members).await });
        return Ok(
            reqwest::multipart::Part::stream_with_length(body, length).file_name(destination)
        );
    }
    Err(CliError::Input(format!(
        "--upload {}: not a regular file or a directory",
        local.display()
    )))
}

/// What the part's filename can carry as it is: absolute, no control characters, no `"` or
/// `\` (the server checks the rest).
fn check_destination(d: &str) -> Result<(), CliError> {
    if !d.starts_with('/') || d.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err(CliError::Input(format!(
            "guest path {d:?}: use an absolute path without control characters, '\"' or '\\'"
        )));
    }
    Ok(())
}

/// One member of a directory's archive.
struct Member {
    header: Vec<u8>,
    /// A regular file's path and size (0 for the others).
    file: Option<PathBuf>,
    size: u64,
}

/// The directory's members, parents before children, names sorted; refused if anything in it
/// is not a regular file, a directory or a symbolic link that stays inside.
fn walk(root: &Path) -> Result<Vec<Member>, CliError> {
    let refuse = |what: &str| CliError::Input(format!("--upload {}: {what}", root.display()));
    let meta = std::fs::metadata(root).map_err(|e| refuse(&e.to_string()))?;
    let mut entries = vec![(
        Entry {
            path: "./".into(),
            kind: EntryKind::Directory,
            mode: meta.mode() & 0o7777,
            size: 0,
            link: String::new(),
        },
        None,
        meta.mtime().max(0) as u64,
    )];
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| refuse(&format!("{}: {e}", dir.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| refuse(&e.to_string()))?;
        names.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in names {
            let path = e.path();
            let name = e
                .file_name()
                .into_string()
                .map_err(|n| refuse(&format!("{:?} is not UTF-8", dir.join(n).display())))?;
            let rel = format!("{prefix}{name}");
            let m = std::fs::symlink_metadata(&path).map_err(|e| refuse(&e.to_string()))?;
            let mtime = m.mtime().max(0) as u64;
            let mode = m.mode() & 0o7777;
            let t = m.file_type();
            let (kind, size, link, file) = if t.is_dir() {
                subdirs.push((path.clone(), format!("{rel}/")));
                (EntryKind::Directory, 0, String::new(), None)
            } else if t.is_file() {
                (EntryKind::File, m.len(), String::new(), Some(path.clone()))
            } else if t.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| refuse(&e.to_string()))?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| refuse(&format!("the link {} is not UTF-8", path.display())))?;
                (EntryKind::Symlink, 0, target, None)
            } else {
                return Err(refuse(&format!(
                    "{} is a FIFO, socket or device: only regular files, directories and \
                     symbolic links are sent",
                    path.display()
                )));
            };
            entries.push((
                Entry {
                    path: rel,
                    kind,
                    mode,
                    size,
                    link,
                },
                file,
                mtime,
            ));
        }
        // Depth first, in name order.
        dirs.extend(subdirs.into_iter().rev());
    }
    let mut check = Extraction::new();
    entries
        .into_iter()
        .map(|(e, file, mtime)| {
            check.check(&e).map_err(|err| refuse(&err.to_string()))?;
            let header = match e.kind {
                EntryKind::Symlink => tarball::symlink_header(&e.path, &e.link, mtime),
                EntryKind::Directory if e.path != "./" => {
                    tarball::header(&format!("{}/", e.path), e.kind, e.mode, 0, mtime)
                }
                kind => tarball::header(&e.path, kind, e.mode, e.size, mtime),
            };
            Ok(Member {
                header,
                file,
                size: e.size,
            })
        })
        .collect()
}

type Chunks = mpsc::Sender<std::io::Result<Bytes>>;

/// A body whose bytes `f` sends, with its error (if any) ending the body.
fn produce<F, Fut>(f: F) -> reqwest::Body
where
    F: FnOnce(Chunks) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let work = f(tx.clone());
    tokio::spawn(async move {
        if let Err(e) = work.await {
            let _ = tx.send(Err(e)).await;
        }
    });
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    reqwest::Body::wrap_stream(chunks)
}

async fn put(tx: &Chunks, bytes: Vec<u8>) -> std::io::Result<()> {
    tx.send(Ok(Bytes::from(bytes)))
        .await
        .map_err(|_| std::io::Error::other("the request was dropped"))
}

/// Exactly `size` bytes of the file at `path` (never through a link): a file that shrank or
/// grew since it was measured ends the body with an error instead of sending other bytes.
async fn send_file(tx: &Chunks, path: &Path, size: u64) -> std::io::Result<()> {
    let changed = |how: &str| {
        std::io::Error::other(format!("{} {how} while it was being sent", path.display()))
    };
    let mut f = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await?;
    let mut left = size;
    while left > 0 {
        let mut buf = vec![0u8; READ.min(left as usize)];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Err(changed("shrank"));
        }
        buf.truncate(n);
        left -= n as u64;
        put(tx, buf).await?;
    }
    if f.read(&mut [0u8; 1]).await? != 0 {
        return Err(changed("grew"));
    }
    Ok(())
}

async fn send_tar(tx: &Chunks, members: Vec<Member>) -> std::io::Result<()> {
    for m in members {
        put(tx, m.header).await?;
        if let Some(path) = &m.file {
            send_file(tx, path, m.size).await?;
        }
        let pad = tarball::padding(m.size);
        if pad > 0 {
            put(tx, vec![0u8; pad]).await?;
        }
    }
    put(tx, tarball::trailer()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_at_the_guest_path() {
        let s = parse_spec("src:/root/src/").unwrap();
        assert_eq!(
            (s.local, s.guest.as_deref()),
            (PathBuf::from("src"), Some("/root/src/"))
        );
        let s = parse_spec("/abs/run.sh").unwrap();
        assert_eq!((s.local, s.guest), (PathBuf::from("/abs/run.sh"), None));
        let s = parse_spec("a:b:/x").unwrap();
        assert_eq!(s.local, PathBuf::from("a:b"));
        assert!(parse_spec(":/x").is_err());
        assert!(check_destination("/root/a b").is_ok());
        for bad in ["root/x", "/a\"b", "/a\\b", "/a\nb"] {
            assert!(check_destination(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_directory_becomes_an_archive_the_server_would_take() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/f"), b"hello").unwrap();
        std::fs::write(src.join("run.sh"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("sub/f", src.join("link")).unwrap();
        let members = walk(&src).unwrap();
        let length: u64 = members
            .iter()
            .map(|m| m.header.len() as u64 + m.size + tarball::padding(m.size) as u64)
            .sum::<u64>()
            + 1024;
        let (tx, mut rx) = mpsc::channel(64);
        send_tar(&tx, members).await.unwrap();
        drop(tx);
        let mut tar = Vec::new();
        while let Some(chunk) = rx.recv().await {
            tar.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(tar.len() as u64, length, "the declared length");
        let mut x = Extraction::new();
        x.feed(&tar).unwrap();
        x.finish().unwrap();
        // The system's tar reads it back the same.
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut child = std::process::Command::new("tar")
            .args(["-x", "-f", "-", "-C"])
            .arg(&out)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&tar).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(out.join("sub/f")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            PathBuf::from("sub/f")
        );
        // A link that leaves the directory, or a FIFO, is refused before anything is sent.
        std::os::unix::fs::symlink("../../etc/passwd", src.join("sub/evil")).unwrap();
        let e = walk(&src).err().unwrap().to_string();
        assert!(e.contains("sub/evil"), "{e}");
        std::fs::remove_file(src.join("sub/evil")).unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = walk(&src).err().unwrap().to_string();
        assert!(e.contains("FIFO"), "{e}");
    }
}
