//! The guest's serial console: transport (unix socket or pty), a pump that drains it into the
//! log sink at all times (a chardev nobody reads stalls the guest), and typing.

pub mod files;
pub mod protocol;

use crate::store::sink::LogSink;
use protocol::{ConsoleEvent, ConsoleParser, Parsed, StreamParser};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A stream of the commands' output and its parser: the stderr serial port, or a channel port.
pub type Stream = (BoxRead, BoxWrite, StreamParser);

/// The channel's file ports, both halves of each socket: `input` (files into the guest) and
/// `artifacts` (out of it). Every half is kept: dropping a write half shuts the socket down,
/// which QEMU takes as a disconnect, and every read half is drained.
pub struct FilePorts {
    pub input: (BoxRead, BoxWrite),
    pub artifacts: (BoxRead, BoxWrite),
}

/// A live console: events from the pumps, a writer for typing, and the channel's file ports.
pub struct Console {
    writer: BoxWrite,
    events: mpsc::UnboundedReceiver<ConsoleEvent>,
    parser: Arc<Mutex<ConsoleParser>>,
    pumps: Vec<JoinHandle<()>>,
    /// Console bytes received so far (to notice a silent console).
    received: Arc<AtomicU64>,
    /// End markers delivered by the output streams: (stdout, stderr).
    ends: Arc<(AtomicBool, AtomicBool)>,
    files: Option<files::Ports>,
    /// Artifacts sent over the console (base64 text between markers), while collected.
    captured: files::Tap,
    _idle_writers: Vec<BoxWrite>,
}

impl Console {
    /// Starts draining the console `reader` and every output stream into `sink`; `files`, the
    /// channel's file ports, are drained too (artifacts reach [`Console::artifacts`] only
    /// while a collection runs).
    pub fn start(
        reader: BoxRead,
        writer: BoxWrite,
        parser: ConsoleParser,
        streams: Vec<Stream>,
        files: Option<FilePorts>,
        sink: LogSink,
    ) -> Console {
        let (tx, events) = mpsc::unbounded_channel();
        let parser = Arc::new(Mutex::new(parser));
        let received = Arc::new(AtomicU64::new(0));
        let captured = files::Tap::default();
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
                Some(captured.clone()),
                true,
            ));
        }
        let mut keep = Vec::new();
        let ends = Arc::new((AtomicBool::new(false), AtomicBool::new(false)));
        for (r, w, p) in streams {
            // Dropping a socket's write half shuts it down, which QEMU takes as a disconnect.
            keep.push(w);
            let p = Arc::new(Mutex::new(p));
            let p2 = p.clone();
            let ends = ends.clone();
            pumps.push(spawn_pump(
                r,
                move |d| {
                    let parsed = p.lock().expect("stream lock").feed(d);
                    for e in &parsed.events {
                        match e {
                            ConsoleEvent::StdoutEnd => ends.0.store(true, Ordering::Relaxed),
                            ConsoleEvent::StderrEnd => ends.1.store(true, Ordering::Relaxed),
                            _ => {}
                        }
                    }
                    parsed
                },
                move || p2.lock().expect("stream lock").finish(),
                sink.clone(),
                tx.clone(),
                None,
                false,
            ));
        }
        let files = files.map(|f| {
            let (ports, drains) = files::Ports::start(f);
            pumps.extend(drains);
            ports
        });
        Console {
            writer,
            events,
            parser,
            pumps,
            received,
            ends,
            files,
            captured,
            _idle_writers: keep,
        }
    }

    /// Artifacts sent over the console from now on (base64 text), until
    /// [`Console::stop_capturing`].
    pub fn capture(&self) -> mpsc::Receiver<Vec<u8>> {
        self.captured.open()
    }

    pub fn stop_capturing(&self) {
        self.captured.close();
    }

    /// Whether the channel's stdout port has delivered everything the commands wrote to it.
    pub fn stdout_done(&self) -> bool {
        self.ends.0.load(Ordering::Relaxed)
    }

    /// The channel's file ports, if QEMU has them.
    pub fn files(&self) -> Option<&files::Ports> {
        self.files.as_ref()
    }

    /// Whether a stderr stream has delivered everything the commands wrote to it.
    pub fn stderr_done(&self) -> bool {
        self.ends.1.load(Ordering::Relaxed)
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

    /// Types raw bytes (keystrokes from a console viewer).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), ConsoleError> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(ConsoleError::Write)?;
        self.writer.flush().await.map_err(ConsoleError::Write)
    }

    /// The next event; `None` once every pump has ended (QEMU closed the console).
    pub async fn next_event(&mut self) -> Option<ConsoleEvent> {
        self.events.recv().await
    }

    /// The commands' output travels over the channel: console bytes while they run are not
    /// stdout (they stay `boot` until the exit marker, and `shutdown` after).
    pub fn output_on_channel(&self) {
        self.parser.lock().expect("parser lock").output_elsewhere();
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
    captured: Option<files::Tap>,
    raw_console: bool,
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
            if raw_console {
                // The exact stream a live viewer sees (`store::console`), before the parse.
                sink.console(buf[..n].to_vec()).await;
            }
            deliver(feed(&buf[..n]), &sink, &tx, captured.as_ref()).await;
        }
        deliver(finish(), &sink, &tx, captured.as_ref()).await;
    })
}

/// Logs, then captured bytes, then events: a collector has every byte before the event that
/// ends its stream.
async fn deliver(
    p: Parsed,
    sink: &LogSink,
    tx: &mpsc::UnboundedSender<ConsoleEvent>,
    captured: Option<&files::Tap>,
) {
    for (ty, bytes) in p.logs {
        sink.write(ty, bytes).await;
    }
    if let (Some(tap), false) = (captured, p.captured.is_empty()) {
        tap.pour(p.captured).await;
    }
    for e in p.events {
        let _ = tx.send(e);
    }
}
