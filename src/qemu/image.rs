//! Per-run copy-on-write overlays: QEMU writes to a qcow2 file in the run directory whose
//! backing file is the base image, so the base image is only ever opened read-only.
//!
//! An empty overlay depends only on its base's path, format and size, so runs do not pay for a
//! `qemu-img create` each (about 15 ms of process start and block-layer set-up, most of a
//! request's pickup): [`overlay_from_prototype`] makes one prototype per base with `qemu-img`
//! and copies it for each run (about 200 KB). A prototype is keyed by the base's path and
//! format and stamped with its file identity, size and times, so a base that is replaced or
//! rewritten gets a new prototype and the old one is removed.

use crate::config::vm::DiskFormat;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("VM image {0} not found")]
    Missing(PathBuf),
    #[error("VM image {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running qemu-img: {0}")]
    Spawn(std::io::Error),
    #[error("qemu-img could not create the overlay: {0}")]
    Failed(String),
}

/// The `qemu-img create` arguments for an overlay of `base`.
pub fn overlay_args(base: &Path, format: DiskFormat, overlay: &Path) -> Vec<String> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        format.as_str().into(),
        "-b".into(),
        base.display().to_string(),
        overlay.display().to_string(),
    ]
}

/// Creates `overlay` on top of `base` (made absolute, since a relative backing path would be
/// resolved against the run directory).
pub async fn create_overlay(
    qemu_img: &Path,
    base: &Path,
    format: DiskFormat,
    overlay: &Path,
) -> Result<(), ImageError> {
    let base = std::path::absolute(base).map_err(|source| ImageError::Unreadable {
        path: base.to_path_buf(),
        source,
    })?;
    match std::fs::File::open(&base) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::Missing(base));
        }
        Err(source) => return Err(ImageError::Unreadable { path: base, source }),
    }
    let out = tokio::process::Command::new(qemu_img)
        .args(overlay_args(&base, format, overlay))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(ImageError::Spawn)?;
    if !out.status.success() {
        return Err(ImageError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    // The guest's writes land here: private to this user, like the run directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(overlay, std::fs::Permissions::from_mode(0o600)).map_err(
        |source| ImageError::Unreadable {
            path: overlay.to_path_buf(),
            source,
        },
    )?;
    Ok(())
}

/// The directory under `SQLITE_SIM_RUN_DIR` that holds the prototypes (not a run directory:
/// start-up clean-up leaves it alone).
pub const PROTOTYPES: &str = "overlays";

/// Creates `overlay` on top of `base` as [`create_overlay`] would, by copying a prototype kept in
/// `prototypes` (made with `qemu_img` the first time this base, as it is now, is used).
pub async fn overlay_from_prototype(
    qemu_img: &Path,
    prototypes: &Path,
    base: &Path,
    format: DiskFormat,
    overlay: &Path,
) -> Result<(), ImageError> {
    let base = std::path::absolute(base).map_err(|source| ImageError::Unreadable {
        path: base.to_path_buf(),
        source,
    })?;
    let meta = match std::fs::metadata(&base) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::Missing(base));
        }
        Err(source) => return Err(ImageError::Unreadable { path: base, source }),
    };
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Unreadable { path, source }
    };
    let (key, stamp) = prototype_name(qemu_img, &base, format, &meta);
    let proto = prototypes.join(format!("{key}-{stamp}.qcow2"));
    if !proto.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(prototypes)
            .map_err(unreadable(prototypes))?;
        // Made aside and renamed into place, so concurrent runs never copy half a file.
        let tmp = prototypes.join(format!(".{key}-{stamp}.{}.tmp", uuid::Uuid::new_v4()));
        if let Err(e) = create_overlay(qemu_img, &base, format, &tmp).await {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &proto).map_err(unreadable(&proto))?;
        // Earlier prototypes of this base (it has changed since): never used again.
        if let Ok(entries) = std::fs::read_dir(prototypes) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{key}-")) && e.path() != proto {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    tokio::fs::copy(&proto, overlay)
        .await
        .map_err(unreadable(overlay))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(overlay, std::fs::Permissions::from_mode(0o600))
        .map_err(unreadable(overlay))?;
    Ok(())
}

/// Removes temporaries a crashed process left while making a prototype (any older than a
/// minute: a live process finishes one in milliseconds).
pub fn clean_leftovers(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir.join(PROTOTYPES)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60));
        if name.starts_with('.') && name.ends_with(".tmp") && old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A prototype's key (what the overlay refers to: the base's path and format, and the tool)
/// and its stamp (which file is there now: device, inode, size, modification and change
/// times), as hex digests.
fn prototype_name(
    qemu_img: &Path,
    base: &Path,
    format: DiskFormat,
    meta: &std::fs::Metadata,
) -> (String, String) {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let hex = |d: &[u8]| {
        d[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let key = Sha256::new()
        .chain_update(base.as_os_str().as_encoded_bytes())
        .chain_update([0])
        .chain_update(format.as_str())
        .chain_update([0])
        .chain_update(qemu_img.as_os_str().as_encoded_bytes())
        .finalize();
    let stamp = Sha256::new()
        .chain_update(
            format!(
                "{} {} {} {}.{} {}.{}",
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec()
            )
            .as_bytes(),
        )
        .finalize();
    (hex(&key), hex(&stamp))
}

/// `qemu-img` next to the configured QEMU binary when there is one, else from `PATH`.
pub fn qemu_img_for(qemu_binary: &Path) -> PathBuf {
    match qemu_binary.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && dir.join("qemu-img").exists() => {
            dir.join("qemu-img")
        }
        _ => PathBuf::from("qemu-img"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_backing_format() {
        let a = overlay_args(Path::new("/b/x.img"), DiskFormat::Raw, Path::new("/r/o"));
        assert_eq!(
            a,
            ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/b/x.img", "/r/o"]
        );
    }

    #[tokio::test]
    async fn missing_base_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let err = create_overlay(
            Path::new("qemu-img"),
            &d.path().join("nope.qcow2"),
            DiskFormat::Qcow2,
            &d.path().join("o.qcow2"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImageError::Missing(_)), "{err}");
    }

    #[tokio::test]
    async fn overlay_leaves_base_untouched() {
        if std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("qemu-img not installed; skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 65536]).unwrap();
        let before = std::fs::read(&base).unwrap();
        let overlay = d.path().join("o.qcow2");
        create_overlay(Path::new("qemu-img"), &base, DiskFormat::Raw, &overlay)
            .await
            .unwrap();
        assert!(overlay.exists());
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }

    fn have_qemu_img() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok()
    }

    /// A copied prototype is exactly what `qemu-img create` makes; later overlays of the same
    /// base need no `qemu-img`; a rewritten base gets a new prototype and the old one goes.
    #[tokio::test]
    async fn overlays_are_copies_of_a_prototype_renewed_when_the_base_changes() {
        if !have_qemu_img() {
            eprintln!("qemu-img not installed; skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let protos = d.path().join("overlays");
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 65536]).unwrap();
        let fresh = d.path().join("fresh.qcow2");
        create_overlay(Path::new("qemu-img"), &base, DiskFormat::Raw, &fresh)
            .await
            .unwrap();
        let first = d.path().join("a.qcow2");
        overlay_from_prototype(
            Path::new("qemu-img"),
            &protos,
            &base,
            DiskFormat::Raw,
            &first,
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(&first).unwrap(),
            std::fs::read(&fresh).unwrap()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&first).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let listed = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let before = listed(&protos);
        assert_eq!(before.len(), 1, "one prototype, no temporaries: {before:?}");
        // The next overlay is a copy of the same prototype file, not a new `qemu-img` run.
        use std::os::unix::fs::MetadataExt;
        let proto = protos.join(&before[0]);
        let ino = std::fs::metadata(&proto).unwrap().ino();
        let second = d.path().join("b.qcow2");
        overlay_from_prototype(
            Path::new("qemu-img"),
            &protos,
            &base,
            DiskFormat::Raw,
            &second,
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(&second).unwrap(),
            std::fs::read(&fresh).unwrap()
        );
        assert_eq!(listed(&protos), before);
        assert_eq!(std::fs::metadata(&proto).unwrap().ino(), ino, "reused");
        // The base grows: its overlays must say the new size, so a new prototype is made.
        std::fs::write(&base, vec![7u8; 2 * 65536]).unwrap();
        let third = d.path().join("c.qcow2");
        overlay_from_prototype(
            Path::new("qemu-img"),
            &protos,
            &base,
            DiskFormat::Raw,
            &third,
        )
        .await
        .unwrap();
        let after = listed(&protos);
        assert_eq!(after.len(), 1, "the old prototype is removed: {after:?}");
        assert_ne!(after, before);
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&third)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 2 * 65536, "{info}");
        // A missing base is the same clear error as without prototypes.
        let err = overlay_from_prototype(
            Path::new("qemu-img"),
            &protos,
            &d.path().join("nope.raw"),
            DiskFormat::Raw,
            &d.path().join("x.qcow2"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImageError::Missing(_)), "{err}");
    }
}
