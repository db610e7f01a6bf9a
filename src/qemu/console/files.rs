//! The channel's file ports: files go into the guest through one, artifacts come out through
//! the other as a tar stream. The artifacts port is drained at all times, like every chardev
//! (a port nobody reads stalls the guest); its bytes reach a reader only while a collection
//! runs, with backpressure then (a slow database slows the guest's `tar`, not memory).

use super::{BoxRead, BoxWrite, FilePorts};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks queued for a collector before the guest waits.
const DEPTH: usize = 16;

/// Where a drained stream's bytes go: nowhere, or to the current collector.
#[derive(Clone, Default)]
pub(super) struct Tap(Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>);

impl Tap {
    /// A receiver for the bytes from now on (replacing any earlier one).
    pub fn open(&self) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel(DEPTH);
        *self.0.lock().expect("tap lock") = Some(tx);
        rx
    }

    /// Back to discarding; the receiver sees the end of its stream.
    pub fn close(&self) {
        self.0.lock().expect("tap lock").take();
    }

    /// Hands `data` to the collector, if there is one (waiting while it is behind).
    pub async fn pour(&self, data: Vec<u8>) {
        let tx = self.0.lock().expect("tap lock").clone();
        if let Some(tx) = tx {
            let _ = tx.send(data).await;
        }
    }
}

pub struct Ports {
    to_guest: Arc<tokio::sync::Mutex<BoxWrite>>,
    artifacts: Tap,
    _artifacts_writer: BoxWrite,
}

impl Ports {
    pub(super) fn start(ports: FilePorts) -> (Ports, Vec<JoinHandle<()>>) {
        let artifacts = Tap::default();
        let (in_r, in_w) = ports.input;
        let (art_r, art_w) = ports.artifacts;
        let pumps = vec![
            tokio::spawn(drain(art_r, artifacts.clone())),
            // Nothing comes back on the input port; whatever does is drained all the same.
            tokio::spawn(drain(in_r, Tap::default())),
        ];
        (
            Ports {
                to_guest: Arc::new(tokio::sync::Mutex::new(in_w)),
                artifacts,
                _artifacts_writer: art_w,
            },
            pumps,
        )
    }

    /// The input port's writer (the guest reads what it gets with `head -c`), shareable with a
    /// task that streams a file while the run watches the guest.
    pub fn input(&self) -> Arc<tokio::sync::Mutex<BoxWrite>> {
        self.to_guest.clone()
    }

    /// The artifacts port's bytes from now on, until [`Ports::stop_collecting`].
    pub fn collect(&self) -> mpsc::Receiver<Vec<u8>> {
        self.artifacts.open()
    }

    pub fn stop_collecting(&self) {
        self.artifacts.close();
    }
}

/// Writes `data` into the guest's input port.
pub async fn write_into(port: &tokio::sync::Mutex<BoxWrite>, data: &[u8]) -> std::io::Result<()> {
    let mut w = port.lock().await;
    w.write_all(data).await?;
    w.flush().await
}

async fn drain(mut r: BoxRead, tap: Tap) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tap.pour(buf[..n].to_vec()).await,
        }
    }
}
