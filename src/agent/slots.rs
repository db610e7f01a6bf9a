//! Host-wide VM slots: `SQLITE_SIM_MAX_CONCURRENT_VMS` holds across every agents process on this
//! host. Each slot is an `flock` on a file in the run directory; the kernel releases it when the
//! process dies, so a crashed agent never leaks a slot.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct HostSlots {
    dir: PathBuf,
    count: usize,
    /// In-process bound, so local agents wait on a semaphore instead of polling locks.
    local: Arc<Semaphore>,
    poll: Duration,
}

/// A held slot; released on drop.
pub struct Slot {
    _lock: Flock<File>,
    _permit: OwnedSemaphorePermit,
    pub index: usize,
}

impl HostSlots {
    pub fn new(dir: PathBuf, count: usize, poll: Duration) -> Self {
        HostSlots {
            dir,
            count,
            local: Arc::new(Semaphore::new(count)),
            poll: poll.min(Duration::from_millis(250)),
        }
    }

    /// Waits for a free slot on this host.
    pub async fn acquire(&self) -> std::io::Result<Slot> {
        let permit = self
            .local
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        std::fs::create_dir_all(&self.dir)?;
        loop {
            for index in 0..self.count {
                let path = self.dir.join(format!("slot-{index}.lock"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&path)?;
                if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    return Ok(Slot {
                        _lock: lock,
                        _permit: permit,
                        index,
                    });
                }
            }
            // Every slot is held by another process on this host.
            tokio::time::sleep(self.poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let a = HostSlots::new(d.path().into(), 2, Duration::from_millis(10));
        // A second "process" (separate locks on the same files).
        let b = HostSlots::new(d.path().into(), 2, Duration::from_millis(10));
        let s1 = a.acquire().await.unwrap();
        let s2 = b.acquire().await.unwrap();
        assert_ne!(s1.index, s2.index);
        let waiting = tokio::time::timeout(Duration::from_millis(100), b.acquire()).await;
        assert!(waiting.is_err(), "no third slot");
        drop(s1);
        let s3 = tokio::time::timeout(Duration::from_secs(2), b.acquire())
            .await
            .expect("slot freed")
            .unwrap();
        drop((s2, s3));
    }
}
