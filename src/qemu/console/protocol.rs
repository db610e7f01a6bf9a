//! The console protocol, as pure functions over bytes: the lines the agent types, and a parser
//! that classifies every console byte (boot / stdout / shutdown) and spots the markers.
//!
//! Markers are `SQSIM_<token>_<WORD>\n` acknowledgements and the exit marker
//! `SQSIM_<token>:<code>;`. The token is random per request, and the typed text never contains
//! a marker literally (it is assembled by `printf` in the guest), so neither echoed input nor a
//! command's own output can fake one.

use crate::model::LogType;
use crate::qemu::launch::{PORT_ARTIFACTS, PORT_IN, PORT_STDERR, PORT_STDOUT};
use base64::Engine;
use regex::bytes::Regex;

/// What the agent learns from the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// The configured shell prompt is at the end of the output.
    Prompt,
    /// A `login:` prompt.
    Login,
    /// A `Password:` prompt.
    Password,
    /// `SQSIM_<token>_<WORD>` was printed.
    Ack(String),
    /// `SQSIM_<token>_<KEY>=<value>`: the guest reports a fact (e.g. its login shell).
    Report { key: String, value: String },
    /// The commands finished with this exit code.
    Exit(i32),
    /// The stderr port delivered everything the commands wrote to it.
    StderrEnd,
    /// The channel's stdout port delivered everything the commands wrote to it.
    StdoutEnd,
    /// The guest kernel panicked (the console showed `Kernel panic - not syncing…`).
    KernelPanic(String),
    /// While the commands ran, the output ended in something that matches the shell prompt:
    /// either the commands printed it, or the shell running them died and a new one started.
    PromptDuringCommand,
}

/// Ack words the agent uses.
pub const ACK_READY: &str = "READY";
pub const ACK_GO: &str = "GO";
/// Answers a probe: the shell is listening again.
pub const ACK_ALIVE: &str = "ALIVE";
/// Acknowledges the start of artifacts sent over the console (base64 until `ARTE`).
pub const ACK_ARTB: &str = "ARTB";
/// Report ending artifacts sent over the console: `<matches>:<tar status>`.
pub const REPORT_ARTE: &str = "ARTE";
/// Report key of the session set-up: the console shell's binary (`readlink /proc/$$/exe`).
pub const REPORT_SHELL: &str = "SHELL";
/// Report key of a clone's set-up: how the host's seed reached the guest's RNG (`reseeded` by
/// `sqsim-reseed`, or `mixed` into `/dev/urandom`).
pub const REPORT_RNG: &str = "RNG";
/// Bytes of host randomness a restored clone's RNG is seeded with.
pub const SEED_BYTES: usize = 64;
/// Report key of the session set-up: `virtio` when the guest has the channel's ports, else
/// `console`.
pub const REPORT_CHANNEL: &str = "CHANNEL";
/// Report key of artifacts sent over the channel: `<paths matched>:<tar's status>`.
pub const REPORT_ART: &str = "ART";

/// The guest's device of a channel port.
fn port(name: &str) -> String {
    format!("/dev/virtio-ports/{name}")
}

/// `s` as one shell word, single-quoted.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A guest glob as one shell word: its literal parts quoted, `*`, `?` and simple bracket
/// expressions left for the shell to expand.
pub fn glob_word(glob: &str) -> String {
    let mut out = String::new();
    let mut literal = String::new();
    let flush = |out: &mut String, literal: &mut String| {
        if !literal.is_empty() {
            out.push_str(&shell_quote(literal));
            literal.clear();
        }
    };
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' | '?' => {
                flush(&mut out, &mut literal);
                out.push(c);
            }
            '[' => {
                let close = chars[i + 1..]
                    .iter()
                    .position(|&c| c == ']')
                    .map(|p| i + 1 + p);
                let simple = close.is_some_and(|end| {
                    end > i + 1
                        && chars[i + 1..end]
                            .iter()
                            .all(|c| c.is_ascii_alphanumeric() || "._-!^".contains(*c))
                });
                match close {
                    Some(end) if simple => {
                        flush(&mut out, &mut literal);
                        out.extend(&chars[i..=end]);
                        i = end;
                    }
                    _ => literal.push(c),
                }
            }
            c => literal.push(c),
        }
        i += 1;
    }
    flush(&mut out, &mut literal);
    out
}

/// How the guest runs the uploaded script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// The script starts with `#!`: it is made executable and run as a program.
    Executable,
    /// An interpreter command line (checked words, e.g. `/bin/bash` or `/bin/busybox sh`),
    /// given the script's path.
    Shell(String),
}

impl Runner {
    /// Whether `word` may appear unquoted in a typed command line.
    pub fn is_safe_word(word: &str) -> bool {
        !word.is_empty()
            && word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
    }

    /// The interpreter for the console shell the guest reported, `None` if it reported none
    /// usable. Busybox applets are run through the multi-call binary.
    pub fn for_login_shell(reported: &str) -> Option<Runner> {
        let path = reported.trim();
        if !path.starts_with('/') || !Self::is_safe_word(path) {
            return None;
        }
        let cmd = if path.rsplit('/').next() == Some("busybox") {
            format!("{path} sh")
        } else {
            path.to_string()
        };
        Some(Runner::Shell(cmd))
    }
}

/// Base64 characters per upload line: well under the tty's 4095-byte canonical line limit,
/// and one line at a time (each acknowledged) never overflows the guest's input buffer.
pub const UPLOAD_LINE: usize = 2048;

/// The text the agent types, for one request's token.
#[derive(Debug, Clone)]
pub struct Session {
    token: String,
    /// Names the guest's temporary files. Not the token: the commands can see their own
    /// script's path (`$0`), and must not learn how to fake the exit marker from it.
    file_tag: String,
    stderr_device: Option<String>,
    runner: Runner,
    /// The commands' output, uploads and artifacts travel over the channel's ports.
    channel: bool,
}

impl Session {
    pub fn new(token: impl Into<String>, stderr_device: Option<String>) -> Self {
        Session {
            token: token.into(),
            file_tag: Self::random_token(),
            stderr_device,
            runner: Runner::Shell("sh".into()),
            channel: false,
        }
    }

    /// The guest has the channel: output, files and artifacts use it (default: the console).
    pub fn set_channel(&mut self, on: bool) {
        self.channel = on;
    }

    /// Chooses how [`Session::run_line`] runs the script (default: `sh`).
    pub fn set_runner(&mut self, runner: Runner) {
        self.runner = runner;
    }

    /// A fresh random token (16 hex digits).
    pub fn random_token() -> String {
        format!("{:016x}", rand::random::<u64>())
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn ack(&self, word: &str) -> String {
        format!("printf 'SQSIM_%s_%s\\n' {} {word}", self.token)
    }

    fn file(&self, ext: &str) -> String {
        format!("/tmp/sqsim-{}.{ext}", self.file_tag)
    }

    /// Echo off, output unprocessed (byte-exact stdout), kernel quiet, empty prompts; the
    /// console shell's binary reported as `SHELL=…`; then READY.
    pub fn setup_line(&self) -> String {
        let mut s = String::from(
            "stty -echo -opost 2>/dev/null; dmesg -n 1 2>/dev/null; PS1=''; PS2=''; \
             unset PROMPT_COMMAND 2>/dev/null; bind 'set enable-bracketed-paste off' 2>/dev/null; ",
        );
        if let Some(dev) = &self.stderr_device {
            s.push_str(&format!("stty -F {dev} raw -echo 2>/dev/null; "));
        }
        s.push_str(&format!(
            "printf 'SQSIM_%s_{REPORT_SHELL}=%s\\n' {} \"$(readlink /proc/$$/exe 2>/dev/null)\"; ",
            self.token
        ));
        let ports = [PORT_STDOUT, PORT_STDERR, PORT_ARTIFACTS]
            .iter()
            .map(|p| format!("[ -w {} ]", port(p)))
            .chain([format!("[ -r {} ]", port(PORT_IN))])
            .collect::<Vec<_>>()
            .join(" && ");
        s.push_str(&format!(
            "if {ports}; then __sqsim_ch=virtio; else __sqsim_ch=console; fi; \
             printf 'SQSIM_%s_{REPORT_CHANNEL}=%s\\n' {} \"$__sqsim_ch\"; ",
            self.token
        ));
        s.push_str(&self.ack(ACK_READY));
        s.push('\n');
        s
    }

    /// A restored clone's set-up, typed into the template's already set-up shell: the host's
    /// seed into the guest's RNG (forcing a reseed where the guest has `sqsim-reseed`, so two
    /// clones never share random bytes), the host's clock (the template's is stale by its age),
    /// then READY. `now` is seconds since the epoch. Every process costs a fresh clone dearly
    /// (TCG translates all its code anew), so the seed is written by the shell's own `printf`,
    /// and `sqsim-reseed` sets the clock too: one program in all where the guest has it.
    pub fn resume_line(&self, seed: &[u8], now: f64) -> String {
        let octal: String = seed.iter().map(|b| format!("\\{b:03o}")).collect();
        format!(
            "if printf '{octal}' | sqsim-reseed @{now:.3} 2>/dev/null; then __sqsim_rng=reseeded; \
             else printf '{octal}' >/dev/urandom; __sqsim_rng=mixed; \
             date -u -s @{whole} >/dev/null 2>&1; fi; \
             printf 'SQSIM_%s_{REPORT_RNG}=%s\\n' {tok} \"$__sqsim_rng\"; {ready}\n",
            whole = now.round() as u64,
            tok = self.token,
            ready = self.ack(ACK_READY),
        )
    }

    /// The script as lines that write it with the shell's own `printf` (its bytes escaped
    /// only where the format needs it, so no decoding program runs in the guest), each
    /// followed by its own ack word (`A1`, `A2`, …).
    pub fn upload_lines(&self, script: &[u8]) -> Vec<(String, String)> {
        let file = self.file("sh");
        let mut lines = Vec::new();
        let mut payload = String::new();
        let flush = |payload: &mut String, lines: &mut Vec<(String, String)>| {
            let word = format!("A{}", lines.len() + 1);
            let redirect = if lines.is_empty() { ">" } else { ">>" };
            lines.push((
                format!("printf '{payload}' {redirect}{file}; {}\n", self.ack(&word)),
                word,
            ));
            payload.clear();
        };
        for &b in script {
            let piece = printf_escape(b);
            if payload.len() + piece.len() > UPLOAD_LINE {
                flush(&mut payload, &mut lines);
            }
            payload.push_str(&piece);
        }
        if !payload.is_empty() || lines.is_empty() {
            flush(&mut payload, &mut lines);
        }
        lines
    }

    /// `data` written into the guest's `file` as base64 lines, each acknowledged with
    /// `<prefix><n>`; the first line truncates the file when `fresh`.
    fn base64_lines(
        &self,
        data: &[u8],
        file: &str,
        prefix: &str,
        fresh: bool,
    ) -> Vec<(String, String)> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        let chunks: Vec<&[u8]> = if b64.is_empty() {
            vec![&[][..]]
        } else {
            b64.as_bytes().chunks(UPLOAD_LINE).collect()
        };
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let word = format!("{prefix}{}", i + 1);
                let redirect = if i == 0 && fresh { ">" } else { ">>" };
                let chunk = std::str::from_utf8(chunk).expect("base64 is ASCII");
                (
                    format!(
                        "printf %s '{chunk}' {redirect}{file}; {}\n",
                        self.ack(&word)
                    ),
                    word,
                )
            })
            .collect()
    }

    /// Places upload `n` (a file of `size` bytes, or a tar extracted into `path`) from the
    /// channel's input port, where the host writes its bytes; the guest reports `UP<n>=<status>`.
    pub fn place_line(&self, n: usize, path: &str, tar: bool, mode: u32, size: u64) -> String {
        // Exactly `size` bytes in 1 MiB reads: busybox `head -c` reads a byte at a time
        // (0.8 MB/s under TCG); `dd` with these flags is in busybox and GNU coreutils alike.
        let read = format!(
            "dd if={} bs=1048576 count={size} iflag=count_bytes,fullblock status=none",
            port(PORT_IN)
        );
        let place = if tar {
            format!(
                "mkdir -p -- {p} && {read} | tar -x -f - -C {p}",
                p = shell_quote(path)
            )
        } else {
            format!(
                "mkdir -p -- {d} && {read} >{p} && chmod {mode:o} {p}",
                d = shell_quote(parent(path)),
                p = shell_quote(path)
            )
        };
        format!("{place}; {}\n", self.report_status(&format!("UP{n}")))
    }

    /// The same over the console: one chunk of upload `n` as acknowledged base64 lines, then a
    /// line that decodes it onto the upload's temporary file (ack `D<n>C<chunk>`; ack words
    /// are capitals and digits only).
    pub fn chunk_lines(&self, n: usize, chunk: usize, data: &[u8]) -> Vec<(String, String)> {
        let (b64, bin) = (
            self.file(&format!("up{n}.b64")),
            self.file(&format!("up{n}")),
        );
        let mut lines = self.base64_lines(data, &b64, &format!("U{n}C{chunk}L"), true);
        let word = format!("D{n}C{chunk}");
        let redirect = if chunk == 0 { ">" } else { ">>" };
        lines.push((
            format!(
                "base64 -d {b64} {redirect}{bin} && rm -f {b64} && {}\n",
                self.ack(&word)
            ),
            word,
        ));
        lines
    }

    /// After [`Session::chunk_lines`]: puts upload `n`'s temporary file in place.
    pub fn place_from_temp_line(&self, n: usize, path: &str, tar: bool, mode: u32) -> String {
        let bin = self.file(&format!("up{n}"));
        let place = if tar {
            format!(
                "mkdir -p -- {p} && tar -x -f {bin} -C {p}; __sqsim_r=$?; rm -f {bin}; [ $__sqsim_r = 0 ]",
                p = shell_quote(path)
            )
        } else {
            format!(
                "mkdir -p -- {d} && touch {bin} && mv -f {bin} {p} && chmod {mode:o} {p}",
                d = shell_quote(parent(path)),
                p = shell_quote(path)
            )
        };
        format!("{place}; {}\n", self.report_status(&format!("UP{n}")))
    }

    /// Sends the files matching `globs` to the host as a tar stream: over the channel's
    /// artifacts port (report `ART=<matched>:<status>`), or over the console as base64 between
    /// `ARTB` and the `ARTE=<matched>:<status>` report.
    pub fn collect_line(&self, globs: &[String]) -> String {
        let words: Vec<String> = globs.iter().map(|g| glob_word(g)).collect();
        let select = format!(
            "set --; for __sqsim_f in {}; do if [ -e \"$__sqsim_f\" ] || [ -L \"$__sqsim_f\" ]; \
             then set -- \"$@\" \"$__sqsim_f\"; fi; done; ",
            words.join(" ")
        );
        let tok = &self.token;
        if self.channel {
            format!(
                "{select}if [ $# -gt 0 ]; then tar -c -f - -- \"$@\" >{art} 2>/dev/null; \
                 __sqsim_r=$?; else __sqsim_r=0; fi; \
                 printf 'SQSIM_%s_{REPORT_ART}=%s:%s\\n' {tok} $# $__sqsim_r\n",
                art = port(PORT_ARTIFACTS),
            )
        } else {
            let t = self.file("art.tar");
            format!(
                "{select}if [ $# -gt 0 ]; then tar -c -f {t} -- \"$@\" 2>/dev/null; __sqsim_r=$?; \
                 else __sqsim_r=0; : >{t}; fi; {artb}; base64 {t}; rm -f {t}; \
                 printf 'SQSIM_%s_{REPORT_ARTE}=%s:%s\\n' {tok} $# $__sqsim_r\n",
                artb = self.ack(ACK_ARTB),
            )
        }
    }

    /// Asks the shell whether it is listening (ack `ALIVE`).
    pub fn probe_line(&self) -> String {
        format!("{}\n", self.ack(ACK_ALIVE))
    }

    /// `printf` of report `key` with the last command's status.
    fn report_status(&self, key: &str) -> String {
        format!("printf 'SQSIM_%s_{key}=%s\\n' {} \"$?\"", self.token)
    }

    /// Runs the script with stdin from /dev/null, then prints the exit marker; its file is
    /// removed after the marker, off the run's critical path.
    pub fn run_line(&self) -> String {
        let sh = self.file("sh");
        let run = match &self.runner {
            Runner::Executable => format!("chmod 700 {sh}; {sh}"),
            Runner::Shell(cmd) => format!("{cmd} {sh}"),
        };
        if self.channel {
            // The ports are opened once for the whole group: a background process the commands
            // leave holding stdout would make a second open fail (a port has one opener).
            let eof = |fd| format!("printf 'SQSIM_%s_EOF\\n' {} >&{fd}", self.token);
            return format!(
                "{go}; {{ {run} </dev/null >&3 2>&4 3>&- 4>&-; \
                 __sqsim_rc=$?; {e3}; {e4}; }} 3>{out} 4>{err}; \
                 printf 'SQSIM_%s:%d;' {tok} $__sqsim_rc; rm -f {sh}\n",
                go = self.ack(ACK_GO),
                tok = self.token,
                e3 = eof(3),
                e4 = eof(4),
                out = port(PORT_STDOUT),
                err = port(PORT_STDERR),
            );
        }
        let (err, eof) = match &self.stderr_device {
            Some(dev) => (
                format!("2>{dev}"),
                format!(" printf 'SQSIM_%s_EOF\\n' {} >{dev};", self.token),
            ),
            None => ("2>&1".to_string(), String::new()),
        };
        format!(
            "{go}; {run} </dev/null {err}; __sqsim_rc=$?;{eof} \
             printf 'SQSIM_%s:%d;' {tok} $__sqsim_rc; rm -f {sh}\n",
            go = self.ack(ACK_GO),
            tok = self.token,
        )
    }
}

/// One byte as it is written in a `printf` format (POSIX: `\\`, `%%`, `\n` and three-digit
/// octal escapes mean the same to dash, bash, busybox and zsh), inside single quotes.
pub fn printf_escape(b: u8) -> String {
    match b {
        b'\\' => "\\\\".into(),
        b'%' => "%%".into(),
        b'\n' => "\\n".into(),
        b'\'' => "\\047".into(),
        0x20..=0x7e => (b as char).to_string(),
        _ => format!("\\{b:03o}"),
    }
}

/// The directory part of an absolute guest path (`/` for a top-level one).
fn parent(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

/// Finds a fixed needle in a byte stream split into arbitrary chunks, holding back only a
/// possible partial needle at the end of a chunk.
#[derive(Debug)]
struct Splitter {
    needle: Vec<u8>,
    held: Vec<u8>,
}

impl Splitter {
    fn new(needle: Vec<u8>) -> Self {
        Splitter {
            needle,
            held: Vec::new(),
        }
    }

    /// Returns the bytes before the needle, and the bytes from the needle on if it was found.
    fn feed(&mut self, data: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        if let Some(i) = memchr::memmem::find(&buf, &self.needle) {
            let after = buf.split_off(i);
            return (buf, Some(after));
        }
        let keep = (1..self.needle.len().min(buf.len() + 1))
            .rev()
            .find(|&k| buf.ends_with(&self.needle[..k]))
            .unwrap_or(0);
        self.held = buf.split_off(buf.len() - keep);
        (buf, None)
    }

    fn take_held(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

#[derive(Debug)]
enum Phase {
    /// Before `GO`: boot, login, session set-up, upload.
    Pre,
    /// Between `GO` and the exit marker: the commands' stdout.
    Command,
    /// Inside the exit marker, waiting for its `;`.
    ExitMarker(Vec<u8>),
    /// After the exit marker: the guest shutting down, or answering (artifact collection).
    After,
    /// Between `ARTB` and `ARTE`: artifacts sent over the console, as base64 text.
    Capture,
    /// Inside the `ARTE=` report, waiting for its end of line.
    CaptureEnd(Vec<u8>),
}

/// Output of one [`ConsoleParser::feed`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub logs: Vec<(LogType, Vec<u8>)>,
    pub events: Vec<ConsoleEvent>,
    /// Artifact bytes (base64 text) the console carried between `ARTB` and `ARTE`.
    pub captured: Vec<u8>,
}

impl Parsed {
    fn log(&mut self, ty: LogType, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.logs.last_mut() {
            Some((t, b)) if *t == ty => b.extend_from_slice(bytes),
            _ => self.logs.push((ty, bytes.to_vec())),
        }
    }
}

/// Scan window for prompts and acks before the commands run.
const TAIL_MAX: usize = 8192;
/// How much of the output end a prompt is matched against.
const PROMPT_WINDOW: usize = 512;

/// Classifies the console byte stream of one run.
#[derive(Debug)]
pub struct ConsoleParser {
    phase: Phase,
    prompt: regex::Regex,
    login: regex::Regex,
    password: regex::Regex,
    ack: Regex,
    exit_prefix: Vec<u8>,
    stdout: Splitter,
    tail: Vec<u8>,
    scan_from: usize,
    last_seen: Vec<u8>,
    /// Stdout held back when the command was interrupted, emitted with the next output.
    interrupted_stdout: Vec<u8>,
    /// End of the previous chunk, so a panic message split across reads is still seen.
    panic_tail: Vec<u8>,
    panicked: bool,
    /// End of the commands' output, to notice a shell prompt there.
    command_tail: Vec<u8>,
    /// How console bytes between `GO` and the exit marker are logged: `stdout`, or `boot`
    /// when the commands' output travels over the channel.
    command_log: LogType,
    /// Finds the end of artifacts sent over the console.
    capture: Splitter,
}

const PANIC: &[u8] = b"Kernel panic - not syncing";

impl ConsoleParser {
    pub fn new(token: &str, prompt: regex::Regex) -> Self {
        let exit_prefix = format!("SQSIM_{token}:").into_bytes();
        ConsoleParser {
            phase: Phase::Pre,
            prompt,
            login: regex::Regex::new(r"(?i)login: ?$").expect("static regex"),
            password: regex::Regex::new(r"(?i)password: ?$").expect("static regex"),
            ack: Regex::new(&format!(
                r"SQSIM_{}_([A-Z0-9]+)(?:=([^\r\n]{{0,255}}))?\r?\n",
                regex::escape(token)
            ))
            .expect("token is hex"),
            stdout: Splitter::new(exit_prefix.clone()),
            exit_prefix,
            tail: Vec::new(),
            scan_from: 0,
            last_seen: Vec::new(),
            interrupted_stdout: Vec::new(),
            panic_tail: Vec::new(),
            panicked: false,
            command_tail: Vec::new(),
            command_log: LogType::Stdout,
            capture: Splitter::new(format!("SQSIM_{token}_{REPORT_ARTE}=").into_bytes()),
        }
    }

    /// The commands' output travels elsewhere (the channel): the console's bytes while they
    /// run are logged as `boot`, never as `stdout`.
    pub fn output_elsewhere(&mut self) {
        self.command_log = LogType::Boot;
    }

    /// Looks for a kernel panic message in any phase, across chunk boundaries.
    fn scan_panic(&mut self, data: &[u8], out: &mut Parsed) {
        if self.panicked {
            return;
        }
        let mut buf = std::mem::take(&mut self.panic_tail);
        buf.extend_from_slice(data);
        if let Some(i) = memchr::memmem::find(&buf, PANIC) {
            self.panicked = true;
            let line_end = buf[i..]
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .map_or(buf.len(), |p| i + p);
            let line = String::from_utf8_lossy(&buf[i..line_end]).into_owned();
            out.events.push(ConsoleEvent::KernelPanic(line));
            return;
        }
        let keep = buf.len().min(PANIC.len() - 1);
        self.panic_tail = buf.split_off(buf.len() - keep);
    }

    /// The agent gave up on the commands (timeout, cancel, fault): whatever the console prints
    /// from now on is the guest going down, not the commands' output.
    pub fn interrupt(&mut self) {
        match std::mem::replace(&mut self.phase, Phase::After) {
            Phase::Command => self.interrupted_stdout = self.stdout.take_held(),
            Phase::ExitMarker(buf) => self.interrupted_stdout = buf,
            other => self.phase = other,
        }
    }

    /// The end of what the console printed, readable (for "boot timed out; last seen: …").
    pub fn last_seen(&self) -> String {
        let text = strip_ansi(&self.last_seen);
        let text = String::from_utf8_lossy(&text);
        let t: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        t.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    pub fn feed(&mut self, data: &[u8]) -> Parsed {
        let mut out = Parsed::default();
        out.log(
            self.command_log,
            &std::mem::take(&mut self.interrupted_stdout),
        );
        self.last_seen.extend_from_slice(data);
        if self.last_seen.len() > 400 {
            self.last_seen.drain(..self.last_seen.len() - 300);
        }
        let was_after = matches!(self.phase, Phase::After);
        // Bytes of `data` consumed before the commands' exit marker completed.
        let mut before_exit = data.len();
        let mut rest = data.to_vec();
        while !rest.is_empty() {
            rest = self.step(&rest, &mut out);
            if !was_after && before_exit == data.len() && matches!(self.phase, Phase::After) {
                before_exit = data.len() - rest.len();
            }
        }
        // A panic only matters while the commands have not finished; it is reported before
        // the exit, as it came before it.
        if !was_after {
            let mut panic = Parsed::default();
            self.scan_panic(&data[..before_exit], &mut panic);
            if let Some(ev) = panic.events.pop() {
                let at = out
                    .events
                    .iter()
                    .position(|e| matches!(e, ConsoleEvent::Exit(_)))
                    .unwrap_or(out.events.len());
                out.events.insert(at, ev);
            }
        }
        out
    }

    /// End of stream: release anything held back.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        out.log(
            self.command_log,
            &std::mem::take(&mut self.interrupted_stdout),
        );
        match &mut self.phase {
            Phase::Command => out.log(self.command_log, &self.stdout.take_held()),
            Phase::ExitMarker(buf) => out.log(LogType::Shutdown, buf),
            _ => {}
        }
        out
    }

    /// Consumes a prefix of `data` in the current phase; returns what belongs to the next phase.
    fn step(&mut self, data: &[u8], out: &mut Parsed) -> Vec<u8> {
        match &mut self.phase {
            Phase::Pre => {
                let base = self.tail.len();
                self.tail.extend_from_slice(data);
                let mut go_end = None;
                while let Some(m) = self.ack.captures_at(&self.tail, self.scan_from) {
                    let whole = m.get(0).expect("group 0");
                    let word = String::from_utf8_lossy(&m[1]).into_owned();
                    self.scan_from = whole.end();
                    if let Some(value) = m.get(2) {
                        out.events.push(ConsoleEvent::Report {
                            key: word,
                            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                        });
                        continue;
                    }
                    let is_go = word == ACK_GO;
                    out.events.push(ConsoleEvent::Ack(word));
                    if is_go {
                        go_end = Some(whole.end() - base);
                        break;
                    }
                }
                if let Some(end) = go_end {
                    out.log(LogType::Boot, &data[..end]);
                    self.tail.clear();
                    self.scan_from = 0;
                    self.phase = Phase::Command;
                    return data[end..].to_vec();
                }
                out.log(LogType::Boot, data);
                self.check_prompts(out);
                if self.tail.len() > TAIL_MAX {
                    let cut = self.tail.len() - TAIL_MAX / 2;
                    self.tail.drain(..cut);
                    self.scan_from = self.scan_from.saturating_sub(cut);
                }
                Vec::new()
            }
            Phase::Command => {
                let (before, found) = self.stdout.feed(data);
                out.log(self.command_log, &before);
                match found {
                    Some(after) => {
                        self.phase = Phase::ExitMarker(Vec::new());
                        after
                    }
                    None => {
                        self.check_command_prompt(&before, out);
                        Vec::new()
                    }
                }
            }
            Phase::ExitMarker(buf) => {
                buf.extend_from_slice(data);
                let prefix = self.exit_prefix.len();
                // The marker is exactly 1-3 digits and `;`, decided by content alone, so the
                // outcome never depends on how the bytes were split into reads.
                match marker_end(&buf[prefix..]) {
                    None => Vec::new(),
                    Some(Some(len)) => {
                        let end = prefix + len;
                        let code = std::str::from_utf8(&buf[prefix..end - 1])
                            .ok()
                            .and_then(|s| s.parse::<i32>().ok())
                            .unwrap_or(-1);
                        let marker = buf[..end].to_vec();
                        let rest = buf[end..].to_vec();
                        out.log(LogType::Shutdown, &marker);
                        out.events.push(ConsoleEvent::Exit(code));
                        self.phase = Phase::After;
                        self.tail.clear();
                        self.scan_from = 0;
                        rest
                    }
                    Some(None) => {
                        // Not a marker after all: it was output.
                        let bytes = std::mem::take(buf);
                        self.phase = Phase::Command;
                        out.log(self.command_log, &bytes[..prefix]);
                        bytes[prefix..].to_vec()
                    }
                }
            }
            Phase::After => {
                let base = self.tail.len();
                self.tail.extend_from_slice(data);
                let mut capture_from = None;
                while let Some(m) = self.ack.captures_at(&self.tail, self.scan_from) {
                    let whole = m.get(0).expect("group 0");
                    let word = String::from_utf8_lossy(&m[1]).into_owned();
                    self.scan_from = whole.end();
                    match m.get(2) {
                        Some(v) => out.events.push(ConsoleEvent::Report {
                            key: word,
                            value: String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        }),
                        None => {
                            let begins = word == ACK_ARTB;
                            out.events.push(ConsoleEvent::Ack(word));
                            if begins {
                                capture_from = Some(whole.end() - base);
                                break;
                            }
                        }
                    }
                }
                if let Some(end) = capture_from {
                    out.log(LogType::Shutdown, &data[..end]);
                    self.tail.clear();
                    self.scan_from = 0;
                    self.phase = Phase::Capture;
                    return data[end..].to_vec();
                }
                out.log(LogType::Shutdown, data);
                if self.tail.len() > TAIL_MAX {
                    let cut = self.tail.len() - TAIL_MAX / 2;
                    self.tail.drain(..cut);
                    self.scan_from = self.scan_from.saturating_sub(cut);
                }
                Vec::new()
            }
            Phase::Capture => {
                let (before, found) = self.capture.feed(data);
                out.captured.extend_from_slice(&before);
                match found {
                    Some(after) => {
                        let rest = after[self.capture.needle.len()..].to_vec();
                        self.phase = Phase::CaptureEnd(Vec::new());
                        rest
                    }
                    None => Vec::new(),
                }
            }
            Phase::CaptureEnd(buf) => match memchr::memchr(b'\n', data) {
                None => {
                    buf.extend_from_slice(data);
                    Vec::new()
                }
                Some(i) => {
                    buf.extend_from_slice(&data[..i]);
                    let value = String::from_utf8_lossy(buf)
                        .trim_end_matches('\r')
                        .to_string();
                    out.events.push(ConsoleEvent::Report {
                        key: REPORT_ARTE.into(),
                        value,
                    });
                    self.phase = Phase::After;
                    data[i + 1..].to_vec()
                }
            },
        }
    }

    fn check_command_prompt(&mut self, stdout: &[u8], out: &mut Parsed) {
        if stdout.is_empty() {
            return;
        }
        self.command_tail.extend_from_slice(stdout);
        if self.command_tail.len() > PROMPT_WINDOW {
            let cut = self.command_tail.len() - PROMPT_WINDOW;
            self.command_tail.drain(..cut);
        }
        let text = strip_ansi(&self.command_tail);
        if self.prompt.is_match(&String::from_utf8_lossy(&text)) {
            out.events.push(ConsoleEvent::PromptDuringCommand);
            self.command_tail.clear();
        }
    }

    fn check_prompts(&mut self, out: &mut Parsed) {
        let start = self.tail.len().saturating_sub(PROMPT_WINDOW);
        let text = strip_ansi(&self.tail[start..]);
        let text = String::from_utf8_lossy(&text);
        let event = if self.prompt.is_match(&text) {
            Some(ConsoleEvent::Prompt)
        } else if self.password.is_match(&text) {
            Some(ConsoleEvent::Password)
        } else if self.login.is_match(&text) {
            Some(ConsoleEvent::Login)
        } else {
            None
        };
        if let Some(e) = event {
            out.events.push(e);
            // Each prompt is reported once.
            self.tail.clear();
            self.scan_from = 0;
        }
    }
}

/// After the exit prefix: `None` while undecided, `Some(Some(n))` when the first `n` bytes are
/// `<1-3 digits>;`, `Some(None)` when it cannot be a marker.
fn marker_end(after_prefix: &[u8]) -> Option<Option<usize>> {
    for (i, &b) in after_prefix.iter().enumerate() {
        match b {
            b'0'..=b'9' if i < 3 => continue,
            b';' if i > 0 => return Some(Some(i + 1)),
            _ => return Some(None),
        }
    }
    None
}

/// Splits a stream of the commands' output (the stderr serial port, or a channel port) at its
/// end marker, `SQSIM_<token>_EOF\n`, written after the commands exited.
#[derive(Debug)]
pub struct StreamParser {
    splitter: Splitter,
    done: bool,
    log: LogType,
    end: ConsoleEvent,
}

impl StreamParser {
    /// The commands' stderr.
    pub fn stderr(token: &str) -> Self {
        Self::new(token, LogType::Stderr, ConsoleEvent::StderrEnd)
    }

    /// The commands' stdout (the channel's port).
    pub fn stdout(token: &str) -> Self {
        Self::new(token, LogType::Stdout, ConsoleEvent::StdoutEnd)
    }

    fn new(token: &str, log: LogType, end: ConsoleEvent) -> Self {
        StreamParser {
            splitter: Splitter::new(format!("SQSIM_{token}_EOF\n").into_bytes()),
            done: false,
            log,
            end,
        }
    }

    pub fn feed(&mut self, data: &[u8]) -> Parsed {
        let mut out = Parsed::default();
        if self.done {
            out.log(self.log, data);
            return out;
        }
        let (before, found) = self.splitter.feed(data);
        out.log(self.log, &before);
        if let Some(after) = found {
            self.done = true;
            let marker_len = self.splitter.needle.len();
            out.events.push(self.end.clone());
            out.log(self.log, &after[marker_len..]);
        }
        out
    }

    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        out.log(self.log, &self.splitter.take_held());
        out
    }
}

/// Removes ANSI escape sequences (CSI, OSC, two-byte ESC) so prompts match as text.
pub fn strip_ansi(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] != 0x1b {
            out.push(input[i]);
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(b'[') => {
                i += 2;
                while i < input.len() && !(0x40..=0x7e).contains(&input[i]) {
                    i += 1;
                }
                i += 1;
            }
            Some(b']') => {
                i += 2;
                while i < input.len() && input[i] != 0x07 && input[i] != 0x1b {
                    i += 1;
                }
                i += if input.get(i) == Some(&0x1b) { 2 } else { 1 };
            }
            Some(_) => i += 2,
            None => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests;
