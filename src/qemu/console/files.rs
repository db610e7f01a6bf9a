//! The channel's file ports: files go into the guest through one, artifacts come out through
//! the other as a tar stream. The artifacts port is drained at all times, like every chardev
//! (a port nobody reads stalls the guest); its bytes reach a reader only while a collection
//! runs, with backpressure then (a slow database slows the guest's `tar`, not memory).

use super::{BoxRead, BoxWrite, FilePorts};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks of artifact bytes queued before the guest waits.
const DEPTH: usize = 16;

pub struct Ports {
    to_guest: BoxWrite,
    collecting: Arc<AtomicBool>,
    rx: mpsc::Receiver<Vec<u8>>,
    _artifacts_writer: BoxWrite,
}

impl Ports {
    pub(super) fn start(ports: FilePorts) -> (Ports, Vec<JoinHandle<()>>) {
        let collecting = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(DEPTH);
        let (in_r, in_w) = ports.input;
        let (art_r, art_w) = ports.artifacts;
        let pumps = vec![
            tokio::spawn(drain(art_r, collecting.clone(), tx)),
            // Nothing comes back on the input port; whatever does is drained all the same.
            tokio::spawn(drain(
                in_r,
                Arc::new(AtomicBool::new(false)),
                mpsc::channel(1).0,
            )),
        ];
        (
            Ports {
                to_guest: in_w,
                collecting,
                rx,
                _artifacts_writer: art_w,
            },
            pumps,
        )
    }

    /// Writes bytes into the guest's file port (it reads them with `head -c`).
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.to_guest.write_all(data).await?;
        self.to_guest.flush().await
    }

    /// From now on the artifacts port's bytes reach [`Ports::next`]; anything the guest wrote
    /// before (nothing, normally) was discarded.
    pub fn begin_collecting(&mut self) {
        while self.rx.try_recv().is_ok() {}
        self.collecting.store(true, Ordering::Release);
    }

    /// Back to discarding.
    pub fn end_collecting(&mut self) {
        self.collecting.store(false, Ordering::Release);
        while self.rx.try_recv().is_ok() {}
    }

    /// The next bytes from the artifacts port; `None` once it closed.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

async fn drain(mut r: BoxRead, collecting: Arc<AtomicBool>, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if collecting.load(Ordering::Acquire) && tx.send(buf[..n].to_vec()).await.is_err() {
            break;
        }
    }
}
