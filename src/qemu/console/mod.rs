//! The guest's serial console: transport (unix socket or pty), a pump that drains it into the
//! log sink at all times (a chardev nobody reads stalls the guest), and typing.

pub mod protocol;

use crate::store::sink::LogSink;
use protocol::{ConsoleEvent, ConsoleParser, Parsed, StderrParser};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("connecting to the console {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("writing to the console: {0}")]
    Write(std::io::Error),
}

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Connects to a unix-socket chardev.
pub async fn connect_socket(path: &Path) -> Result<(BoxRead, BoxWrite), ConsoleError> {
    let s = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| ConsoleError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (r, w) = s.into_split();
    Ok((Box::new(r), Box::new(w)))
}

/// Opens the slave side of a pty chardev as a serial port (raw mode, so nothing is echoed back
/// into the guest).
pub fn open_pty(path: &Path) -> Result<(BoxRead, BoxWrite), ConsoleError> {
    let builder = tokio_serial::new(path.to_string_lossy(), 115_200);
    let port = tokio_serial::SerialStream::open(&builder).map_err(|e| ConsoleError::Connect {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let (r, w) = tokio::io::split(port);
    Ok((Box::new(r), Box::new(w)))
}

/// A live console: events from the pumps, and a writer for typing.
pub struct Console {
    writer: BoxWrite,
    events: mpsc::UnboundedReceiver<ConsoleEvent>,
    parser: Arc<Mutex<ConsoleParser>>,
    pumps: Vec<JoinHandle<()>>,
    /// Console bytes received so far (to notice a silent console).
    received: Arc<AtomicU64>,
    /// The stderr port delivered its end marker (it may come before the exit marker).
    stderr_done: Arc<std::sync::atomic::AtomicBool>,
    _idle_writers: Vec<BoxWrite>,
}

impl Console {
    /// Starts draining `reader` (and the optional stderr port) into `sink`.
    pub fn start(
        reader: BoxRead,
        writer: BoxWrite,
        parser: ConsoleParser,
        stderr: Option<(BoxRead, BoxWrite, StderrParser)>,
        sink: LogSink,
    ) -> Console {
        let (tx, events) = mpsc::unbounded_channel();
        let parser = Arc::new(Mutex::new(parser));
        let received = Arc::new(AtomicU64::new(0));
        let mut pumps = Vec::new();
        {
            let (p1, p2) = (parser.clone(), parser.clone());
            let count = received.clone();
            pumps.push(spawn_pump(
                reader,
                move |d| {
                    count.fetch_add(d.len() as u64, Ordering::Relaxed);
                    p1.lock().expect("parser lock").feed(d)
                },
                move || p2.lock().expect("parser lock").finish(),
                sink.clone(),
                tx.clone(),
            ));
        }
        let mut keep = Vec::new();
        let stderr_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some((r, w, p)) = stderr {
            // Dropping a socket's write half shuts it down, which QEMU takes as a disconnect.
            keep.push(w);
            let p = Arc::new(Mutex::new(p));
            let p2 = p.clone();
            let done = stderr_done.clone();
            pumps.push(spawn_pump(
                r,
                move |d| {
                    let parsed = p.lock().expect("stderr lock").feed(d);
                    if parsed.events.contains(&ConsoleEvent::StderrEnd) {
                        done.store(true, Ordering::Relaxed);
                    }
                    parsed
                },
                move || p2.lock().expect("stderr lock").finish(),
                sink,
                tx,
            ));
        }
        Console {
            writer,
            events,
            parser,
            pumps,
            received,
            stderr_done,
            _idle_writers: keep,
        }
    }

    /// Whether the stderr port has delivered everything the commands wrote to it.
    pub fn stderr_done(&self) -> bool {
        self.stderr_done.load(Ordering::Relaxed)
    }

    /// Console bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Types `text` (already newline-terminated where needed).
    pub async fn send(&mut self, text: &str) -> Result<(), ConsoleError> {
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(ConsoleError::Write)?;
        self.writer.flush().await.map_err(ConsoleError::Write)
    }

    /// The next event; `None` once every pump has ended (QEMU closed the console).
    pub async fn next_event(&mut self) -> Option<ConsoleEvent> {
        self.events.recv().await
    }

    /// From now on console bytes are shutdown noise, not the commands' output.
    pub fn interrupt(&self) {
        self.parser.lock().expect("parser lock").interrupt();
    }

    /// Readable end of the console output.
    pub fn last_seen(&self) -> String {
        self.parser.lock().expect("parser lock").last_seen()
    }

    /// Waits (bounded) for the pumps to reach end of stream, so every byte QEMU delivered is
    /// queued to the sink; aborts them after `limit`.
    pub async fn drain(mut self, limit: Duration) {
        let _ = self.writer.shutdown().await;
        let deadline = tokio::time::Instant::now() + limit;
        for p in self.pumps.iter_mut() {
            if tokio::time::timeout_at(deadline, &mut *p).await.is_err() {
                p.abort();
            }
        }
    }
}

fn spawn_pump(
    mut reader: BoxRead,
    mut feed: impl FnMut(&[u8]) -> Parsed + Send + 'static,
    finish: impl FnOnce() -> Parsed + Send + 'static,
    sink: LogSink,
    tx: mpsc::UnboundedSender<ConsoleEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                // A pty reports EIO once the other side is gone: that is end of stream.
                Err(e) => {
                    tracing::debug!(error = %e, "console read ended");
                    break;
                }
            };
            deliver(feed(&buf[..n]), &sink, &tx).await;
        }
        deliver(finish(), &sink, &tx).await;
    })
}

async fn deliver(p: Parsed, sink: &LogSink, tx: &mpsc::UnboundedSender<ConsoleEvent>) {
    for (ty, bytes) in p.logs {
        sink.write(ty, bytes).await;
    }
    for e in p.events {
        let _ = tx.send(e);
    }
}
