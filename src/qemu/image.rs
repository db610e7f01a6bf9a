//! Per-run copy-on-write overlays: QEMU writes to a qcow2 file in the run directory whose
//! backing file is the base image, so the base image is only ever opened read-only.

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
}
