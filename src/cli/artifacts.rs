//! Artifacts on the client side: `cli artifacts` (list or download) and the download behind
//! `submit --artifacts-dir`.
//!
//! Names come from the guest, so each is checked before anything is written: it must stay
//! under the chosen directory component by component ([`relative_components`]), directories
//! are created and entered without following symbolic links (`openat` with `O_NOFOLLOW`), and a
//! file is written to a temporary name beside its place, checked against the listing's size
//! and SHA-256, and renamed over whatever was there (a link there is replaced, not followed).

use super::client::{ApiClient, CliError};
use super::render;
use crate::model::{Artifact, RequestId};
use futures_util::StreamExt;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The components of an artifact's guest path under the download directory: its leading `/`
/// (and empty components) dropped; `.`, `..`, a NUL or nothing at all refused.
pub fn relative_components(guest_path: &str) -> Result<Vec<&str>, CliError> {
    let refuse = |why: &str| {
        let shown: String = guest_path.chars().take(120).collect();
        CliError::Input(format!("refusing artifact name {shown:?}: {why}"))
    };
    let mut parts = Vec::new();
    for c in guest_path.split('/') {
        match c {
            "" => {}
            "." | ".." => return Err(refuse("a . or .. component would leave the directory")),
            c if c.contains('\0') => return Err(refuse("it holds a NUL byte")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(refuse("it names no file"));
    }
    Ok(parts)
}

/// A file being written under the download directory: a temporary name in its (opened)
/// parent directory, renamed into place by [`Target::commit`].
pub struct Target {
    dir: OwnedFd,
    name: String,
    temp: String,
    file: Option<File>,
    /// Where it ends up, for messages.
    pub path: PathBuf,
}

/// Creates the directories of `guest_path` under `root` (which is created if missing) and a
/// temporary file beside its place; never follows a symbolic link below `root`.
pub fn create_under(root: &Path, guest_path: &str) -> Result<Target, CliError> {
    let parts = relative_components(guest_path)?;
    std::fs::create_dir_all(root)
        .map_err(|e| CliError::Input(format!("creating {}: {e}", root.display())))?;
    let mut dir: OwnedFd = File::open(root)
        .map_err(|e| CliError::Input(format!("opening {}: {e}", root.display())))?
        .into();
    let (name, parents) = parts.split_last().expect("at least one component");
    let mut at = root.to_path_buf();
    for c in parents {
        at.push(c);
        match mkdirat(&dir, *c, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_error(&at, "creating", e)),
        }
        dir = openat(
            &dir,
            *c,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => CliError::Input(format!(
                "refusing to write {guest_path}: {} is a symbolic link or not a directory",
                at.display()
            )),
            e => io_error(&at, "opening", e),
        })?;
    }
    at.push(name);
    let temp = format!(
        ".{}.sqsim-{}-{:08x}",
        name.chars().take(100).collect::<String>(),
        std::process::id(),
        rand::random::<u32>()
    );
    let fd = openat(
        &dir,
        temp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| io_error(&at, "creating a temporary file for", e))?;
    Ok(Target {
        dir,
        name: name.to_string(),
        temp,
        file: Some(File::from(fd)),
        path: at,
    })
}

fn io_error(path: &Path, doing: &str, e: Errno) -> CliError {
    CliError::Input(format!("{doing} {}: {}", path.display(), e.desc()))
}

impl Target {
    pub fn write(&mut self, data: &[u8]) -> Result<(), CliError> {
        let file = self.file.as_mut().expect("open until committed");
        file.write_all(data)
            .map_err(|e| CliError::Input(format!("writing {}: {e}", self.path.display())))
    }

    /// Gives the file its mode (the guest's permission bits; never set-id or sticky) and puts
    /// it in place.
    pub fn commit(mut self, mode: u32) -> Result<PathBuf, CliError> {
        let file = self.file.take().expect("open until committed");
        fchmod(&file, Mode::from_bits_truncate(mode & 0o777))
            .map_err(|e| io_error(&self.path, "setting the mode of", e))?;
        drop(file);
        renameat(&self.dir, self.temp.as_str(), &self.dir, self.name.as_str())
            .map_err(|e| io_error(&self.path, "renaming into", e))?;
        // Committed: nothing left for Drop to remove.
        self.temp.clear();
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if !self.temp.is_empty() {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                self.temp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// What a download did.
#[derive(Debug, Default)]
pub struct Downloaded {
    pub written: Vec<(PathBuf, u64)>,
    /// Listed without bytes: `(guest path, why)`.
    pub left_out: Vec<(String, String)>,
    /// Not written: `(guest path, why)`.
    pub failed: Vec<(String, String)>,
}

impl Downloaded {
    /// One line per file left out or not written, on stderr; an error if any was not written.
    pub fn report(&self) -> Result<(), CliError> {
        for (p, why) in &self.left_out {
            eprintln!("sqlite-sim: artifact {p} was left out: {why}");
        }
        for (p, why) in &self.failed {
            eprintln!("sqlite-sim: artifact {p} not written: {why}");
        }
        match self.failed.len() {
            0 => Ok(()),
            n => Err(CliError::Input(format!(
                "{n} artifact(s) could not be written"
            ))),
        }
    }
}

/// The request's artifacts, as listed.
pub async fn list(client: &ApiClient, id: RequestId) -> Result<Vec<Artifact>, CliError> {
    client.get(&format!("/requests/{id}/artifacts")).await
}

/// Downloads every stored artifact of `id` to `dir/<guest path without its leading />`.
pub async fn download(
    client: &ApiClient,
    id: RequestId,
    listed: &[Artifact],
    dir: &Path,
) -> Result<Downloaded, CliError> {
    let mut done = Downloaded::default();
    for a in listed {
        if let Some(why) = &a.left_out {
            done.left_out.push((a.path.clone(), why.clone()));
            continue;
        }
        match fetch(client, id, a, dir).await {
            Ok(path) => done.written.push((path, a.size)),
            // An unreachable API stops everything; a bad file only itself.
            Err(e @ CliError::Unreachable { .. }) => return Err(e),
            Err(e) => done.failed.push((a.path.clone(), e.to_string())),
        }
    }
    Ok(done)
}

/// One artifact, streamed into its place and checked against the listing.
async fn fetch(
    client: &ApiClient,
    id: RequestId,
    a: &Artifact,
    dir: &Path,
) -> Result<PathBuf, CliError> {
    let mut target = create_under(dir, &a.path)?;
    let mut segments = vec!["requests".to_string(), id.to_string(), "artifacts".into()];
    segments.extend(relative_components(&a.path)?.into_iter().map(String::from));
    let resp = client
        .send(client.request_segments(reqwest::Method::GET, &segments)?)
        .await?;
    let mut body = resp.bytes_stream();
    let (mut hash, mut size) = (Sha256::new(), 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CliError::Protocol(format!("reading {}: {e}", a.path)))?;
        size += chunk.len() as u64;
        hash.update(&chunk);
        target.write(&chunk)?;
    }
    let digest = format!("{:x}", hash.finalize());
    if size != a.size || a.sha256.as_deref() != Some(digest.as_str()) {
        return Err(CliError::Protocol(format!(
            "{} arrived as {size} bytes with SHA-256 {digest}; the listing says {} bytes, {}",
            a.path,
            a.size,
            a.sha256.as_deref().unwrap_or("no digest")
        )));
    }
    target.commit(a.mode.unwrap_or(0o644))
}

/// `cli artifacts`: the table, the JSON list, or a download into `out`.
pub async fn run(
    client: &ApiClient,
    id: &str,
    out: Option<&Path>,
    json: bool,
) -> Result<u8, CliError> {
    let r = client.resolve(id).await?;
    let listed = list(client, r.uuid).await?;
    if json {
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut stdout, &listed)
            .map_err(|e| CliError::Protocol(e.to_string()))?;
        writeln!(stdout)?;
    } else if out.is_none() {
        if listed.is_empty() {
            eprintln!("(request {} has no artifacts)", r.uuid);
        }
        print!("{}", table(&listed));
    }
    if let Some(dir) = out {
        let done = download(client, r.uuid, &listed, dir).await?;
        if !json {
            for (path, size) in &done.written {
                println!("{}  {}", path.display(), size_cell(*size));
            }
        }
        done.report()?;
    }
    Ok(0)
}

/// Exact below 1 KiB, where `render::bytes` would say 0 KiB.
fn size_cell(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        render::bytes(n as i64)
    }
}

/// PATH, SIZE, SHA256 (a prefix), MODE, LEFT OUT.
pub fn table(listed: &[Artifact]) -> String {
    let rows: Vec<Vec<String>> = listed
        .iter()
        .map(|a| {
            vec![
                a.path.clone(),
                size_cell(a.size),
                a.sha256
                    .as_deref()
                    .map(|s| s.chars().take(12).collect())
                    .unwrap_or_else(|| "-".into()),
                a.mode
                    .map(|m| format!("{m:04o}"))
                    .unwrap_or_else(|| "-".into()),
                a.left_out.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render::table(&["PATH", "SIZE", "SHA256", "MODE", "LEFT OUT"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_under_the_directory() {
        assert_eq!(
            relative_components("/root/out/a.xml").unwrap(),
            ["root", "out", "a.xml"]
        );
        assert_eq!(relative_components("a//b/").unwrap(), ["a", "b"]);
        for bad in [
            "",
            "/",
            "../x",
            "/root/../../etc/passwd",
            "/a/./b",
            "a\0b",
            "..",
        ] {
            assert!(relative_components(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn files_land_under_the_directory_and_links_there_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("out");
        let mut t = create_under(&root, "/root/out/a.xml").unwrap();
        t.write(b"<a/>").unwrap();
        let p = t.commit(0o4755).unwrap();
        assert_eq!(p, root.join("root/out/a.xml"));
        assert_eq!(std::fs::read(&p).unwrap(), b"<a/>");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o755,
            "no set-id bit from the guest"
        );
        // A directory that is a link to elsewhere is refused, and nothing lands there.
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("evil")).unwrap();
        let e = create_under(&root, "/evil/x").err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // A link at the file's own place is replaced, not written through.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("f")).unwrap();
        let mut t = create_under(&root, "/f").unwrap();
        t.write(b"new").unwrap();
        t.commit(0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(root.join("f"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
        // An abandoned file leaves no temporary behind.
        drop(create_under(&root, "/g").unwrap());
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("sqsim")), "{names:?}");
        assert!(create_under(&root, "/../x").is_err());
    }
}
