//! Property tests for the byte-level parsers: the console protocol (markers, prompts, chunking)
//! and the `KEY="value"` config formats. Pure functions only: no VM, no network.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use sqlite_sim::config::kv;
use sqlite_sim::config::vm::VmConfig;
use sqlite_sim::model::LogType;
use sqlite_sim::qemu::console::protocol::{
    strip_ansi, ConsoleEvent, ConsoleParser, Parsed, Session, StreamParser, ACK_GO, ACK_READY,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

/// The prompt regex exactly as `VmConfig` builds it from `PROMPT="root@tiny:[^#]*# "`.
const PROMPT_RE: &str = r"(?:root@tiny:[^#]*# )$";

/// Compiled once: regex compilation dominates a debug-build case (`ConsoleParser::new` still
/// compiles its own login/password/ack regexes, ~13 ms per parser unoptimised), which is why the
/// console properties run fewer cases than the config ones.
static PROMPT: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(PROMPT_RE).unwrap());

/// `cases` per property, unless `PROPTEST_CASES` asks for more (or fewer), e.g. for a soak run:
/// `PROPTEST_CASES=20000 cargo test --release --test proptest_parsers`.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig::with_cases(cases)
}

/// Printed before every prompt (bash's bracketed-paste toggles): it also closes whatever escape
/// sequence arbitrary noise left open (lone ESC, CSI, OSC), so the prompt is visible as text.
const GUARD: &[u8] = b"\r\n\x1b[?2004l\x1b[?2004h";

/// A token that is not the session's (repaired away if it happens to be).
const OTHER_TOKEN: &str = "fedcba9876543210";

/// What the parser reports a kernel panic by, and lines that contain it.
const PANIC_NEEDLE: &str = "Kernel panic - not syncing";
const PANIC_LINES: &[&[u8]] = &[
    b"[   12.345678] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000\r\n",
    b"Kernel panic - not syncing: sysrq triggered crash\n",
    b"Kernel panic - not syncing",
];

const KERNEL_MSGS: &[&str] = &[
    "Linux version 6.1.0 (gcc 12.2.0) #1 SMP PREEMPT_DYNAMIC",
    "Command line: console=ttyS0 quiet",
    "virtio_blk virtio1: [vda] 2097152 512-byte logical blocks",
    "EXT4-fs (vda1): mounted filesystem with ordered data mode",
    "random: crng init done",
    "systemd[1]: Started Journal Service.",
    "Run /sbin/init as init process",
    "audit: type=1400 apparmor=\"STATUS\"",
];

const ESCAPES: &[&[u8]] = &[
    b"\x1b[0m",
    b"\x1b[0;32m",
    b"\x1b[1;31m",
    b"\x1b[?2004h",
    b"\x1b[6n",
    b"\x1b[2J\x1b[H",
    b"\x1b]0;title\x07",
    b"\x1b]2;t\x1b\\",
    b"\x1b(B",
    b"\x1bc",
    b"\x1b[",
    b"\x1b",
    b"\x1b]",
];

// ---------------------------------------------------------------------------------------------
// Helpers

/// Every log chunk and event of a run, with consecutive chunks of one type merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Collected {
    logs: Vec<(LogType, Vec<u8>)>,
    events: Vec<ConsoleEvent>,
}

impl Collected {
    fn add(&mut self, p: Parsed) {
        for (t, b) in p.logs {
            assert!(!b.is_empty(), "empty {t:?} chunk reported");
            match self.logs.last_mut() {
                Some((last, bytes)) if *last == t => bytes.extend_from_slice(&b),
                _ => self.logs.push((t, b)),
            }
        }
        self.events.extend(p.events);
    }

    fn bytes(&self, ty: LogType) -> Vec<u8> {
        self.logs
            .iter()
            .filter(|(t, _)| *t == ty)
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }

    fn total(&self) -> usize {
        self.logs.iter().map(|(_, b)| b.len()).sum()
    }
}

/// Splits events into the KernelPanic texts and all the others (in order).
fn split_panics(events: &[ConsoleEvent]) -> (Vec<ConsoleEvent>, Vec<String>) {
    let mut others = Vec::new();
    let mut panics = Vec::new();
    for e in events {
        match e {
            ConsoleEvent::KernelPanic(t) => panics.push(t.clone()),
            other => others.push(other.clone()),
        }
    }
    (others, panics)
}

fn console_parser(token: &str) -> ConsoleParser {
    ConsoleParser::new(token, PROMPT.clone())
}

/// Feeds `chunks` then `finish()`.
fn run_console(token: &str, chunks: &[&[u8]]) -> Collected {
    let mut p = console_parser(token);
    let mut all = Collected::default();
    for c in chunks {
        all.add(p.feed(c));
    }
    all.add(p.finish());
    all
}

/// How to cut a stream into reads.
#[derive(Debug, Clone)]
enum Split {
    /// Cut at these positions (scaled to the stream length).
    At(Vec<Index>),
    /// Reads of these sizes, cycled (1 = byte at a time); scaled up for streams over 4 KB so a
    /// case stays cheap (the parser rescans its up-to-8 KB pre-GO window on every read).
    Sizes(Vec<usize>),
}

fn split_strategy() -> impl Strategy<Value = Split> {
    prop_oneof![
        3 => vec(any::<Index>(), 0..24).prop_map(Split::At),
        2 => vec(1usize..=17, 1..6).prop_map(Split::Sizes),
        1 => Just(Split::Sizes(vec![1])),
    ]
}

/// Sorted, deduplicated boundaries `0 = b0 < b1 < … < bn = len`, including `forced`.
fn boundaries(split: &Split, len: usize, forced: &[usize]) -> Vec<usize> {
    let mut cuts = vec![0, len];
    cuts.extend_from_slice(forced);
    match split {
        Split::At(ix) => cuts.extend(ix.iter().map(|i| i.index(len + 1))),
        Split::Sizes(sizes) => {
            let scale = len / 4096 + 1;
            let mut at = 0;
            for s in sizes.iter().cycle() {
                at += s * scale;
                if at >= len {
                    break;
                }
                cuts.push(at);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

fn chunks_at<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

/// Replaces every occurrence of `needle` in `data` by changing its byte at `at` to `with`
/// (`with` must not occur in `needle`, so no new occurrence can appear).
fn break_occurrences(data: &mut [u8], needle: &[u8], at: usize, with: u8) {
    debug_assert!(!needle.contains(&with));
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&data[from..], needle) {
        data[from + i + at] = with;
        from += i + 1;
    }
}

/// Fast deterministic filler for large inputs (splitmix64), so 70 KB cases stay cheap.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Arbitrary bytes: small ones shrink well, large ones are cheap to generate.
fn bytes_upto(small: usize, large: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..small),
        1 => (any::<u64>(), 0..=large).prop_map(|(seed, len)| pseudo_random(seed, len)),
    ]
}

fn exit_prefix(token: &str) -> Vec<u8> {
    format!("SQSIM_{token}:").into_bytes()
}

fn ack(token: &str, word: &str) -> Vec<u8> {
    format!("SQSIM_{token}_{word}\n").into_bytes()
}

/// How a guest with echo on shows typed text: `\n` becomes `\r\n`, optionally wrapped at 80.
fn echoed(typed: &str, wrap: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for line in typed.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        for (i, c) in body.as_bytes().chunks(80).enumerate() {
            if i > 0 && wrap {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(c);
        }
        if line.ends_with('\n') {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Console stream pieces

/// A piece of generated console output; the token-dependent ones are resolved per session.
#[derive(Debug, Clone)]
enum Seg {
    Bytes(Vec<u8>),
    Lit(&'static [u8]),
    Kernel(u32, u32, &'static str),
    /// A proper, non-empty prefix of the session's exit marker prefix `SQSIM_<tok>:`.
    MarkerPrefix(Index),
    /// The session's own ack line.
    OwnAck(&'static str),
    /// The session's own ack word without its newline (not an ack).
    OwnAckNoNewline(&'static str),
    /// A complete exit marker of the session (only where it is allowed).
    OwnExit(u8),
    /// An ack / exit marker of another token.
    OtherAck,
    OtherExit(u8),
}

impl Seg {
    fn resolve(&self, token: &str, out: &mut Vec<u8>) {
        match self {
            Seg::Bytes(b) => out.extend_from_slice(b),
            Seg::Lit(b) => out.extend_from_slice(b),
            Seg::Kernel(s, us, m) => {
                out.extend_from_slice(format!("[{s:5}.{us:06}] {m}\r\n").as_bytes())
            }
            Seg::MarkerPrefix(i) => {
                let p = exit_prefix(token);
                out.extend_from_slice(&p[..1 + i.index(p.len() - 1)]);
            }
            Seg::OwnAck(w) => out.extend_from_slice(&ack(token, w)),
            Seg::OwnAckNoNewline(w) => {
                out.extend_from_slice(format!("SQSIM_{token}_{w}").as_bytes())
            }
            Seg::OwnExit(c) => out.extend_from_slice(format!("SQSIM_{token}:{c};").as_bytes()),
            Seg::OtherAck => out.extend_from_slice(&ack(OTHER_TOKEN, ACK_GO)),
            Seg::OtherExit(c) => {
                out.extend_from_slice(format!("SQSIM_{OTHER_TOKEN}:{c};").as_bytes())
            }
        }
    }
}

fn resolve_all(segs: &[Seg], token: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        s.resolve(token, &mut out);
    }
    out
}

/// Boot noise: arbitrary bytes, kernel-like lines, escapes (complete or not), other tokens.
fn noise_seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..48).prop_map(Seg::Bytes),
        2 => (0u32..100_000, 0u32..1_000_000, select(KERNEL_MSGS))
            .prop_map(|(s, us, m)| Seg::Kernel(s, us, m)),
        2 => select(ESCAPES).prop_map(Seg::Lit),
        1 => select(vec![&b"\r\n"[..], b"\n", b"\r", b"SQSIM_", b"\x00", b"\xff\xfe"])
            .prop_map(Seg::Lit),
        1 => Just(Seg::OtherAck),
        1 => any::<u8>().prop_map(Seg::OtherExit),
    ]
}

/// Command output: anything except the session's full exit marker prefix.
fn stdout_seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..64).prop_map(Seg::Bytes),
        1 => select(vec![&b"\0"[..], b"\xff", b"\r\n", b"\n", b";", b":", b"SQSIM_"])
            .prop_map(Seg::Lit),
        3 => any::<Index>().prop_map(Seg::MarkerPrefix),
        1 => select(vec![ACK_READY, ACK_GO, "A1", "EOF"]).prop_map(Seg::OwnAck),
        1 => select(vec![ACK_GO, "A1"]).prop_map(Seg::OwnAckNoNewline),
        1 => any::<u8>().prop_map(Seg::OtherExit),
        1 => noise_seg(),
    ]
}

/// After the exit marker anything goes, including more markers.
fn shutdown_seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        8 => stdout_seg(),
        2 => any::<u8>().prop_map(Seg::OwnExit),
        1 => select(PANIC_LINES).prop_map(Seg::Lit),
    ]
}

/// The generated parts of one session, before they are put together.
#[derive(Debug, Clone)]
struct SessionRaw {
    token: String,
    noise: Vec<Seg>,
    /// Rarely, 8-12 KB of extra noise (past the parser's 8 KB pre-GO window): before the
    /// prompt (`true`) or between READY and the first upload ack (`false`).
    big: Option<(bool, u64, usize)>,
    login: bool,
    motd: Vec<Seg>,
    prompt_dir: &'static str,
    prompt_suffix: &'static [u8],
    echo_setup: Option<bool>,
    stderr_device: bool,
    upload_noise: Vec<Vec<Seg>>,
    stdout: Vec<Seg>,
    code: u8,
    shutdown: Vec<Seg>,
}

/// A whole console stream with what the parser should make of it.
#[derive(Debug, Clone)]
struct SessionCase {
    token: String,
    stream: Vec<u8>,
    /// Reads always end here: at each prompt (`login:`, `Password:`, the shell prompt).
    forced: Vec<usize>,
    expected_events: Vec<ConsoleEvent>,
    /// The line of the first kernel panic message (only ever in the shutdown bytes).
    panic_line: Option<String>,
    /// End of the `GO` ack: everything before is Boot.
    boot_end: usize,
    stdout: Vec<u8>,
    code: u8,
}

prop_compose! {
    fn session_raw()(
        token in "[0-9a-f]{16}",
        noise in vec(noise_seg(), 0..16),
        big in proptest::option::weighted(0.1, (any::<bool>(), any::<u64>(), 8192usize..12_288)),
        login in any::<bool>(),
        motd in vec(noise_seg(), 0..4),
        prompt_dir in select(vec!["~", "/", "/tmp", "~/a b"]),
        prompt_suffix in select(vec![&b""[..], b"\x1b[6n", b"\x1b[0m"]),
        echo_setup in proptest::option::of(any::<bool>()),
        stderr_device in any::<bool>(),
        upload_noise in vec(vec(noise_seg(), 0..2), 1..5),
        stdout in vec(stdout_seg(), 0..16),
        code in any::<u8>(),
        shutdown in vec(shutdown_seg(), 0..8),
    ) -> SessionRaw {
        SessionRaw {
            token, noise, big, login, motd, prompt_dir, prompt_suffix, echo_setup, stderr_device,
            upload_noise, stdout, code, shutdown,
        }
    }
}

/// Noise never contains the token (so it can hold no ack or marker of this session).
fn token_free(segs: &[Seg], token: &str) -> Vec<u8> {
    let mut b = resolve_all(segs, token);
    break_occurrences(&mut b, token.as_bytes(), 0, b'g');
    b
}

fn build_session(raw: &SessionRaw) -> SessionCase {
    let tok = raw.token.as_str();
    let big = raw.big.map(|(before_prompt, seed, len)| {
        let mut b = pseudo_random(seed, len);
        break_occurrences(&mut b, tok.as_bytes(), 0, b'g');
        (before_prompt, b)
    });
    let mut s = Vec::new();
    if let Some((true, b)) = &big {
        s.extend_from_slice(b);
    }
    s.extend_from_slice(&token_free(&raw.noise, tok));
    let mut forced = Vec::new();
    let mut events = Vec::new();
    if raw.login {
        s.extend_from_slice(GUARD);
        s.extend_from_slice(b"Debian GNU/Linux 12 tiny ttyS0\r\n\r\ntiny login: ");
        forced.push(s.len());
        events.push(ConsoleEvent::Login);
        s.extend_from_slice(b"root\r\nPassword: ");
        forced.push(s.len());
        events.push(ConsoleEvent::Password);
        s.extend_from_slice(b"\r\n");
        s.extend_from_slice(&token_free(&raw.motd, tok));
    }
    s.extend_from_slice(GUARD);
    s.extend_from_slice(format!("root@tiny:{}# ", raw.prompt_dir).as_bytes());
    s.extend_from_slice(raw.prompt_suffix);
    forced.push(s.len());
    events.push(ConsoleEvent::Prompt);

    let dev = raw.stderr_device.then(|| "/dev/ttyS1".to_string());
    let session = Session::new(tok, dev);
    if let Some(wrap) = raw.echo_setup {
        s.extend_from_slice(&echoed(&session.setup_line(), wrap));
    }
    s.extend_from_slice(&ack(tok, ACK_READY));
    events.push(ConsoleEvent::Ack(ACK_READY.into()));
    if let Some((false, b)) = &big {
        s.extend_from_slice(b);
    }
    for (i, noise) in raw.upload_noise.iter().enumerate() {
        s.extend_from_slice(&token_free(noise, tok));
        let word = format!("A{}", i + 1);
        s.extend_from_slice(&ack(tok, &word));
        events.push(ConsoleEvent::Ack(word));
    }
    s.extend_from_slice(&ack(tok, ACK_GO));
    events.push(ConsoleEvent::Ack(ACK_GO.into()));
    let boot_end = s.len();

    let mut stdout = resolve_all(&raw.stdout, tok);
    let prefix = exit_prefix(tok);
    break_occurrences(&mut stdout, &prefix, prefix.len() - 1, b'.');
    s.extend_from_slice(&stdout);
    let marker_at = s.len();
    s.extend_from_slice(format!("SQSIM_{tok}:{};", raw.code).as_bytes());
    events.push(ConsoleEvent::Exit(raw.code.into()));
    let shutdown = resolve_all(&raw.shutdown, tok);
    // After the exit marker, the session's complete ack lines are the guest answering.
    let answers = regex::bytes::Regex::new(&format!(r"SQSIM_{tok}_([A-Z0-9]+)\r?\n")).unwrap();
    for m in answers.captures_iter(&shutdown) {
        events.push(ConsoleEvent::Ack(
            String::from_utf8_lossy(&m[1]).into_owned(),
        ));
    }
    s.extend_from_slice(&shutdown);
    // Only a panic before the exit marker is reported: after it, the guest is going down.
    let panic_line = memchr::memmem::find(&s[..marker_at], PANIC_NEEDLE.as_bytes()).map(|i| {
        let end = s[i..]
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .map_or(s.len(), |p| i + p);
        String::from_utf8_lossy(&s[i..end]).into_owned()
    });

    SessionCase {
        token: raw.token.clone(),
        stream: s,
        forced,
        expected_events: events,
        panic_line,
        boot_end,
        stdout,
        code: raw.code,
    }
}

fn session_case() -> impl Strategy<Value = SessionCase> {
    session_raw().prop_map(|r| build_session(&r))
}

/// Garbage for the console: random bytes densely mixed with this session's markers.
fn garbage_seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..64).prop_map(Seg::Bytes),
        2 => stdout_seg(),
        1 => any::<u8>().prop_map(Seg::OwnExit),
        1 => select(vec![&b"0"[..], b"-1", b"999999999999", b";", b"login: ", b"Password: "])
            .prop_map(Seg::Lit),
        1 => select(vec![&b"root@tiny:~# "[..], b"\x1b[?2004hroot@tiny:/# \x1b[6n"])
            .prop_map(Seg::Lit),
        1 => select(PANIC_LINES).prop_map(Seg::Lit),
        1 => select(vec![&b"Kernel pan"[..], b"ic - not syncing", b"Kernel panic"])
            .prop_map(Seg::Lit),
    ]
}

fn stderr_seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..64).prop_map(Seg::Bytes),
        2 => select(vec!["EOF", "EO", "E", "GO"]).prop_map(Seg::OwnAckNoNewline),
        1 => select(vec![&b"SQSIM_"[..], b"\n", b"\r\n", b"\0\xff"]).prop_map(Seg::Lit),
        1 => any::<Index>().prop_map(Seg::MarkerPrefix),
    ]
}

// ---------------------------------------------------------------------------------------------
// Config pieces

/// How a value is written in a `KEY=value` line.
#[derive(Debug, Clone)]
enum Quoted {
    /// `"value"`, the value has no `$`, backquote, `"` or `\`.
    Double(String),
    /// `'value'`, the value has no `'`.
    Single(String),
    /// `"value"` with `\`, `"`, `$` and backquote escaped; the value is anything but a newline.
    Escaped(String),
    /// `value` with no quotes.
    Bare(String),
}

impl Quoted {
    fn value(&self) -> &str {
        match self {
            Quoted::Double(v) | Quoted::Single(v) | Quoted::Escaped(v) | Quoted::Bare(v) => v,
        }
    }

    fn written(&self) -> String {
        match self {
            Quoted::Double(v) => format!("\"{v}\""),
            Quoted::Single(v) => format!("'{v}'"),
            Quoted::Escaped(v) => format!("\"{}\"", escape_double(v)),
            Quoted::Bare(v) => v.clone(),
        }
    }
}

fn escape_double(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn quoted_value() -> impl Strategy<Value = Quoted> {
    prop_oneof![
        3 => r#"[^$`"\\\p{C}]{0,40}"#.prop_map(Quoted::Double),
        2 => r"[^'\p{C}]{0,40}".prop_map(Quoted::Single),
        2 => r"[^\n]{0,40}".prop_map(Quoted::Escaped),
        1 => r"[A-Za-z0-9_./:,=+@%#-]{0,20}".prop_map(Quoted::Bare),
    ]
}

fn valid_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Z_][A-Z0-9_]{0,20}",
        // A small pool, so duplicates (later wins) are common.
        1 => select(vec!["A", "MEMORY", "CPU", "_", "X_1"]).prop_map(String::from),
    ]
}

/// One line of a generated kv file.
#[derive(Debug, Clone)]
enum KvLine {
    Blank(String),
    Comment(String),
    Assign {
        lead: &'static str,
        key: String,
        value: Quoted,
        trail: &'static str,
    },
}

fn kv_line() -> impl Strategy<Value = KvLine> {
    prop_oneof![
        1 => "[ \t]{0,4}".prop_map(KvLine::Blank),
        1 => r"[ \t]{0,2}#[^\n]{0,30}".prop_map(KvLine::Comment),
        4 => (
            select(vec!["", "  ", "export ", "\texport  "]),
            valid_key(),
            quoted_value(),
            select(vec!["", " ", "\t", " # trailing comment", "  #"]),
        )
            .prop_map(|(lead, key, value, trail)| KvLine::Assign { lead, key, value, trail }),
    ]
}

const VM_KEYS: &[&str] = sqlite_sim::config::vm::KEYS;

/// Values that are near the edge of what each key accepts, plus arbitrary text.
fn vm_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => r"[^\n]{0,30}",
        2 => select(vec![
            "", "0", "1", "64", "65", "3600", "3601", "-1", "+5", "18446744073709551616",
            "512M", "2G", "0M", "1k", "5MM", "M", "99999999999999999999G", "1.5G", " 1G",
            "qcow2", "raw", "vmdk", "auto", "KVM", "tcg", "socket", "pty",
            "/dev/ttyS1", "/dev/tty S1", "/dev/'x", "ttyS1", "/dev/",
            "[#$] $", "(", ")", "a{2,1}", "\\", "(?i)root@.*# ", "\\p{Greek}+", "[",
            "-x 'unclosed", "-a \"b c\" d\\ e", "'", "\"", "\\\\",
            "rel/path", "/abs/path", "..", "x.img", "x.raw", "é",
        ])
        .prop_map(String::from),
    ]
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(64))]

    /// 1. Chunking invariance: however a session stream (boot noise, optional login, prompt,
    /// acks, GO, arbitrary stdout, exit marker, shutdown) is cut into reads — with each prompt
    /// ending a read, as the agent types nothing before it — the merged per-type logs and the
    /// event sequence are those of feeding it in one read per prompt; and by the time the Exit
    /// event is reported, all of the stdout has been reported. A kernel panic in the shutdown
    /// bytes (after the exit marker) is not reported; one before it is compared apart: reported
    /// once, with as much of its line as had arrived.
    #[test]
    fn console_chunking_invariance(case in session_case(), split in split_strategy()) {
        let s = &case.stream;
        let whole_cuts = boundaries(&Split::At(vec![]), s.len(), &case.forced);
        let whole = run_console(&case.token, &chunks_at(s, &whole_cuts));
        let (whole_events, whole_panics) = split_panics(&whole.events);
        prop_assert_eq!(&whole_events, &case.expected_events);
        prop_assert_eq!(&whole_panics, &Vec::from_iter(case.panic_line.clone()));

        let cuts = boundaries(&split, s.len(), &case.forced);
        let mut p = console_parser(&case.token);
        let mut got = Collected::default();
        for c in chunks_at(s, &cuts) {
            got.add(p.feed(c));
            if got.events.iter().any(|e| matches!(e, ConsoleEvent::Exit(_))) {
                prop_assert_eq!(got.bytes(LogType::Stdout), case.stdout.clone());
            }
            let _ = p.last_seen();
        }
        got.add(p.finish());
        prop_assert_eq!(&got.logs, &whole.logs);
        let (events, panics) = split_panics(&got.events);
        prop_assert_eq!(&events, &whole_events);
        prop_assert_eq!(panics.len(), whole_panics.len());
        for (part, line) in panics.iter().zip(&whole_panics) {
            prop_assert!(part.starts_with(PANIC_NEEDLE) && line.starts_with(part.as_str()));
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// 2. Exactness, in any chunking: Boot is everything up to the GO ack, Stdout is exactly the
    /// generated output, Shutdown is the exit marker and what follows, the Exit event carries
    /// the generated code, and no byte is lost or duplicated.
    #[test]
    fn console_exactness(case in session_case(), split in split_strategy()) {
        let s = &case.stream;
        let cuts = boundaries(&split, s.len(), &case.forced);
        let got = run_console(&case.token, &chunks_at(s, &cuts));
        prop_assert_eq!(got.total(), s.len());
        prop_assert_eq!(got.bytes(LogType::Boot), s[..case.boot_end].to_vec());
        prop_assert_eq!(got.bytes(LogType::Stdout), case.stdout.clone());
        prop_assert_eq!(
            got.bytes(LogType::Shutdown),
            s[case.boot_end + case.stdout.len()..].to_vec()
        );
        let exits: Vec<_> = got
            .events
            .iter()
            .filter(|e| matches!(e, ConsoleEvent::Exit(_)))
            .cloned()
            .collect();
        prop_assert_eq!(exits, vec![ConsoleEvent::Exit(case.code.into())]);
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// 3. Robustness: arbitrary garbage (dense with this session's markers and prompts), in any
    /// chunking, with `interrupt()` at an arbitrary point and `finish()` at the end, never
    /// panics, logs every input byte exactly once, keeps the types in Boot → Stdout → Shutdown
    /// order, reports prompts and acks only up to GO, at most one GO and one Exit (Exit only
    /// after GO, nothing after Exit), PromptDuringCommand only between them, nothing more
    /// once interrupted after GO — a kernel panic apart: at most once, anywhere.
    #[test]
    fn console_garbage_never_panics(
        token in "[0-9a-f]{16}",
        segs in vec(garbage_seg(), 0..24),
        split in split_strategy(),
        interrupt_at in proptest::option::of(any::<Index>()),
    ) {
        let data = resolve_all(&segs, &token);
        let cuts = boundaries(&split, data.len(), &[]);
        let chunks = chunks_at(&data, &cuts);
        let interrupt_at = interrupt_at.map(|i| i.index(chunks.len() + 1));
        let mut p = console_parser(&token);
        let mut got = Collected::default();
        let mut events_before_interrupt = None;
        for (i, c) in chunks.iter().enumerate() {
            if interrupt_at == Some(i) {
                p.interrupt();
                events_before_interrupt = Some(got.events.len());
            }
            got.add(p.feed(c));
            let _ = p.last_seen();
        }
        if interrupt_at == Some(chunks.len()) {
            p.interrupt();
            events_before_interrupt = Some(got.events.len());
        }
        got.add(p.finish());
        let _ = p.last_seen();

        prop_assert_eq!(got.total(), data.len());
        let rank = |t: &LogType| match t {
            LogType::Boot => 0,
            LogType::Stdout => 1,
            LogType::Shutdown => 2,
            other => panic!("console logged {other:?}"),
        };
        let ranks: Vec<_> = got.logs.iter().map(|(t, _)| rank(t)).collect();
        prop_assert!(ranks.windows(2).all(|w| w[0] < w[1]), "log order {:?}", got.logs);

        let (events, panics) = split_panics(&got.events);
        prop_assert!(panics.len() <= 1, "{:?}", panics);
        prop_assert!(panics.iter().all(|t| t.starts_with(PANIC_NEEDLE)), "{:?}", panics);
        let go = ConsoleEvent::Ack(ACK_GO.into());
        prop_assert!(events.iter().filter(|e| **e == go).count() <= 1);
        let go_at = events.iter().position(|e| *e == go).unwrap_or(events.len());
        let exit_at = events
            .iter()
            .position(|e| matches!(e, ConsoleEvent::Exit(_)))
            .unwrap_or(events.len());
        // After the exit marker the guest may still answer (artifact collection): only its
        // acks and reports are told.
        let answer = |e: &ConsoleEvent| matches!(e, ConsoleEvent::Ack(_) | ConsoleEvent::Report { .. });
        for (i, e) in events.iter().enumerate() {
            let ok = match e {
                ConsoleEvent::Prompt | ConsoleEvent::Login | ConsoleEvent::Password => i <= go_at,
                ConsoleEvent::Ack(_) | ConsoleEvent::Report { .. } => i <= go_at || i > exit_at,
                ConsoleEvent::PromptDuringCommand => i > go_at && i < exit_at,
                ConsoleEvent::Exit(_) => {
                    i > go_at && events[i + 1..].iter().all(answer)
                }
                ConsoleEvent::StderrEnd | ConsoleEvent::StdoutEnd => false,
                _ => true,
            };
            prop_assert!(ok, "{:?} at {} in {:?}", e, i, events);
        }
        if let Some(n) = events_before_interrupt {
            // Once interrupted after GO, only a kernel panic and the guest's answers (acks,
            // reports) may still be reported.
            let before = split_panics(&got.events[..n]).0;
            if before.contains(&go) {
                prop_assert_eq!(&events[..before.len()], &before[..], "events before interrupt");
                prop_assert!(events[before.len()..].iter().all(answer), "after interrupt: {:?}", events);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// 4. Echoed typed text (set-up line, every upload line, run line — as a guest with echo on
    /// shows them, optionally wrapped at 80 columns) never produces an Ack or Exit event.
    #[test]
    fn echoed_typed_text_is_not_a_marker(
        token in "[0-9a-f]{16}",
        script in bytes_upto(512, 12_000),
        stderr_device in proptest::option::of("/dev/[a-zA-Z0-9]{1,8}"),
        wrap in any::<bool>(),
        split in split_strategy(),
    ) {
        let session = Session::new(token.as_str(), stderr_device);
        let mut typed = session.setup_line();
        for (line, _) in session.upload_lines(&script) {
            typed.push_str(&line);
        }
        typed.push_str(&session.run_line());
        let echo = echoed(&typed, wrap);
        let cuts = boundaries(&split, echo.len(), &[]);
        let got = run_console(&token, &chunks_at(&echo, &cuts));
        prop_assert!(
            !got.events.iter().any(|e| matches!(e, ConsoleEvent::Ack(_) | ConsoleEvent::Exit(_))),
            "{:?}", got.events
        );
        prop_assert_eq!(got.bytes(LogType::Boot), echo);
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// 5. Upload round trip: the `printf` formats of `upload_lines(script)`, interpreted as
    /// POSIX printf does and concatenated, give back the script (up to 70 KB); the formats are
    /// printable ASCII without a bare quote, lines are under the tty's 4095-byte limit, acked
    /// `A1`, `A2`, … in order, and each line ends with its own ack command.
    #[test]
    fn upload_lines_round_trip(
        token in "[0-9a-f]{16}",
        script in bytes_upto(4096, 70 * 1024),
    ) {
        let session = Session::new(token.as_str(), None);
        let lines = session.upload_lines(&script);
        prop_assert!(!lines.is_empty());
        let mut written = Vec::new();
        for (i, (line, word)) in lines.iter().enumerate() {
            prop_assert!(line.len() < 4000, "line {} is {} bytes", i, line.len());
            prop_assert_eq!(word, &format!("A{}", i + 1));
            prop_assert!(line.ends_with(&format!(" {token} {word}\n")), "{}", line);
            prop_assert_eq!(line.matches('\n').count(), 1);
            prop_assert!(line.starts_with("printf '"), "{}", line);
            let start = "printf '".len();
            let end = start + line[start..].find('\'').unwrap();
            let format = &line[start..end];
            prop_assert!(format.bytes().all(|b| (0x20..0x7f).contains(&b)), "{}", format);
            written.extend(printf_format(format));
        }
        prop_assert_eq!(written, script);
    }
}

/// What POSIX `printf FORMAT` (no arguments) writes, for the escapes an upload uses:
/// `\\`, `\n`, `\ddd` (one to three octal digits) and `%%`.
fn printf_format(format: &str) -> Vec<u8> {
    let b = format.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if b.get(i + 1) == Some(&b'n') => {
                out.push(b'\n');
                i += 2;
            }
            b'\\' if b.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            b'\\' => {
                let digits = b[i + 1..]
                    .iter()
                    .take(3)
                    .take_while(|d| (b'0'..=b'7').contains(d))
                    .count();
                assert!(digits > 0, "unexpected escape in {format:?}");
                let value = b[i + 1..i + 1 + digits]
                    .iter()
                    .fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 1 + digits;
            }
            b'%' => {
                assert_eq!(b.get(i + 1), Some(&b'%'), "bare % in {format:?}");
                out.push(b'%');
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(config(256))]

    /// 6. `StreamParser` (stderr): for arbitrary stderr (without the marker) followed by
    /// `SQSIM_<tok>_EOF\n` and arbitrary trailing bytes, any chunking logs exactly the stderr
    /// and trailing bytes (the marker itself dropped), all as Stderr, reports exactly one
    /// StderrEnd, and has reported all of the stderr by the time it reports StderrEnd.
    #[test]
    fn stderr_parser_exact(
        token in "[0-9a-f]{16}",
        segs in vec(stderr_seg(), 0..16),
        trailing in vec(any::<u8>(), 0..32),
        split in split_strategy(),
    ) {
        let marker = format!("SQSIM_{token}_EOF\n").into_bytes();
        let mut stderr = resolve_all(&segs, &token);
        break_occurrences(&mut stderr, &marker, marker.len() - 1, b'.');
        let data = [stderr.as_slice(), &marker, &trailing].concat();
        let cuts = boundaries(&split, data.len(), &[]);
        let mut p = StreamParser::stderr(&token);
        let mut got = Collected::default();
        for c in chunks_at(&data, &cuts) {
            let before = got.events.len();
            got.add(p.feed(c));
            if got.events.len() > before {
                prop_assert!(got.bytes(LogType::Stderr).starts_with(&stderr));
            }
        }
        got.add(p.finish());
        prop_assert!(got.logs.iter().all(|(t, _)| *t == LogType::Stderr), "{:?}", got.logs);
        prop_assert_eq!(got.bytes(LogType::Stderr), [stderr, trailing].concat());
        prop_assert_eq!(got.events, vec![ConsoleEvent::StderrEnd]);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// 7. `strip_ansi` never panics; its output has no ESC at all (so never ESC `[`), only
    /// removes bytes (the output is a subsequence of the input), leaves ESC-free input alone,
    /// and is idempotent.
    #[test]
    fn strip_ansi_removes_escapes(
        input in prop_oneof![
            vec(any::<u8>(), 0..256),
            vec(
                select(vec![&b"\x1b"[..], b"[", b"]", b"\x07", b"\\", b"0", b";", b"?", b"m", b"a",
                    b"\x1b[", b"\x1b]", b"\xff", b" "]),
                0..64,
            )
            .prop_map(|v| v.concat()),
        ],
    ) {
        let out = strip_ansi(&input);
        prop_assert!(!out.contains(&0x1b), "{:?}", out);
        prop_assert!(!out.windows(2).any(|w| w == b"\x1b["));
        let mut rest = input.iter();
        prop_assert!(out.iter().all(|b| rest.any(|x| x == b)), "not a subsequence");
        if !input.contains(&0x1b) {
            prop_assert_eq!(&out, &input);
        }
        prop_assert_eq!(strip_ansi(&out), out);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// 8. `kv::parse` never panics on arbitrary text (or arbitrary lines, kv-like or not, with
    /// LF, CRLF or CR line ends); an error names a line number within the text and its message
    /// starts with `line N: `; a success holds valid, unique keys.
    #[test]
    fn kv_parse_never_panics(
        text in prop_oneof![
            any::<String>(),
            (
                vec(
                    prop_oneof![
                        r#"[ \t]*(export )?[A-Za-z0-9_ .-]{0,6}=?["'$`\\;&|# a-z]{0,10}"#,
                        kv_line().prop_map(|l| match l {
                            KvLine::Blank(b) => b,
                            KvLine::Comment(c) => c,
                            KvLine::Assign { lead, key, value, trail } =>
                                format!("{lead}{key}={}{trail}", value.written()),
                        }),
                        any::<String>(),
                    ],
                    0..12,
                ),
                select(vec!["\n", "\r\n", "\r"]),
            )
                .prop_map(|(lines, nl)| lines.join(nl)),
        ],
    ) {
        match kv::parse(&text) {
            Ok(pairs) => {
                let mut seen = std::collections::HashSet::new();
                for (k, _) in &pairs {
                    prop_assert!(seen.insert(k.clone()), "duplicate key {}", k);
                    let mut chars = k.chars();
                    prop_assert!(chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_'));
                    prop_assert!(chars.all(|c| c.is_ascii_alphanumeric() || c == '_'), "{}", k);
                }
            }
            Err(e) => {
                let lines = text.lines().count();
                prop_assert!(e.line >= 1 && e.line <= lines, "line {} of {}", e.line, lines);
                let prefix = format!("line {}: ", e.line);
                prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// 9. Round trip: valid keys with values written `"double"` (no `$`, backquote, `"`, `\`),
    /// `'single'` (no `'`), `"escaped"` (anything but a newline, with `\ " $` backquote
    /// escaped) or bare, between blank lines and comments, with `export`, indentation,
    /// trailing comments and LF or CRLF line ends, parse back to the same pairs, the later
    /// assignment of a key winning.
    #[test]
    fn kv_round_trip(
        lines in vec(kv_line(), 0..24),
        nl in select(vec!["\n", "\r\n"]),
        final_newline in any::<bool>(),
    ) {
        let mut text = String::new();
        let mut expected = BTreeMap::new();
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                text.push_str(nl);
            }
            match line {
                KvLine::Blank(b) => text.push_str(b),
                KvLine::Comment(c) => text.push_str(c),
                KvLine::Assign { lead, key, value, trail } => {
                    text.push_str(&format!("{lead}{key}={}{trail}", value.written()));
                    expected.insert(key.clone(), value.value().to_string());
                }
            }
        }
        if final_newline {
            text.push_str(nl);
        }
        let pairs = kv::parse(&text);
        prop_assert!(pairs.is_ok(), "{:?}\n{}", pairs, text);
        let pairs = pairs.unwrap();
        prop_assert_eq!(pairs.len(), expected.len(), "duplicates: {:?}", pairs);
        let got: BTreeMap<_, _> = pairs.into_iter().collect();
        prop_assert_eq!(got, expected);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// 10. `VmConfig::parse` never panics, neither on arbitrary text nor on arbitrary values for
    /// every known key; every error message starts with the config's path; a success has CPU
    /// 1..=64, timeouts of 1..=3600 s and the MEMORY that was given (or the default).
    #[test]
    fn vm_config_parse_never_panics(
        text in prop_oneof![
            1 => any::<String>(),
            4 => vec((select(VM_KEYS), vm_value(), any::<bool>()), 0..8).prop_map(|kvs| {
                kvs.into_iter()
                    .map(|(k, v, single)| {
                        if single && !v.contains('\'') {
                            format!("{k}='{v}'\n")
                        } else {
                            format!("{k}=\"{}\"\n", escape_double(&v))
                        }
                    })
                    .collect::<String>()
            }),
        ],
        path in select(vec![
            "vm_configs/t.conf",
            "/etc/sqlite-sim/vm_configs/tiny.conf",
            "c f.conf",
        ]),
    ) {
        let path = Path::new(path);
        match VmConfig::parse(
            "t",
            &text,
            path,
            Path::new("/nonexistent-sqsim/images"),
            Path::new("/nonexistent-sqsim/configs"),
        ) {
            Ok(vm) => {
                prop_assert!((1..=64).contains(&vm.cpus));
                for t in [vm.boot_timeout, vm.shutdown_timeout] {
                    prop_assert!((1..=3600).contains(&t.as_secs()));
                }
                let given = kv::parse(&text)
                    .unwrap()
                    .into_iter()
                    .find(|(k, _)| k == "MEMORY")
                    .map(|(_, v)| v)
                    .filter(|v| !v.is_empty());
                prop_assert_eq!(vm.memory, given.unwrap_or_else(|| "512M".into()));
            }
            Err(e) => {
                let msg = e.to_string();
                let prefix = format!("{}: ", path.display());
                prop_assert!(msg.starts_with(&prefix), "{}", msg);
            }
        }
    }
}

/// Regression (found by property 1 with forged markers in stdout): whether bytes that start
/// like the exit marker end the command must not depend on how they were split into reads. The
/// marker is exactly 1-3 digits and `;`; anything else after the prefix is output.
#[test]
fn exit_marker_lookahead_is_chunking_dependent() {
    let tok = "0123456789abcdef";
    let head = format!("root@tiny:~# SQSIM_{tok}_GO\n");
    let at = head.find("# ").unwrap() + 2;
    // 13 digits: parses as 0, but is one byte past the 12-byte look-ahead.
    let stream = format!("{head}SQSIM_{tok}:0000000000000;");
    let s = stream.as_bytes();
    let whole = run_console(tok, &[&s[..at], &s[at..]]);
    let mut reads = vec![&s[..at]];
    reads.extend(s[at..].chunks(1));
    let bytewise = run_console(tok, &reads);
    // 13 digits is not a marker, however the bytes arrive.
    assert_eq!(bytewise.events, whole.events);
    assert!(!whole
        .events
        .iter()
        .any(|e| matches!(e, ConsoleEvent::Exit(_))));
    assert_eq!(bytewise.logs, whole.logs);
}

/// Regression: a kernel panic reported in one read must not overtake the events of bytes
/// that came before it; a panic after the exit marker (the guest going down) is not reported.
#[test]
fn kernel_panic_event_follows_byte_order() {
    let tok = "0123456789abcdef";
    let head = format!("root@tiny:~# SQSIM_{tok}_GO\n");
    let at = head.find("# ").unwrap() + 2;
    let stream = format!("{head}out\nSQSIM_{tok}:0;\r\nKernel panic - not syncing: x\r\n");
    let s = stream.as_bytes();
    let whole = run_console(tok, &[&s[..at], &s[at..]]);
    let mut reads = vec![&s[..at]];
    reads.extend(s[at..].chunks(1));
    let bytewise = run_console(tok, &reads);
    let kinds = |c: &Collected| -> Vec<ConsoleEvent> {
        c.events
            .iter()
            .map(|e| match e {
                ConsoleEvent::KernelPanic(_) => ConsoleEvent::KernelPanic(String::new()),
                other => other.clone(),
            })
            .collect()
    };
    assert_eq!(kinds(&whole), kinds(&bytewise));
    assert_eq!(
        kinds(&whole),
        [
            ConsoleEvent::Prompt,
            ConsoleEvent::Ack("GO".into()),
            ConsoleEvent::Exit(0)
        ]
    );
}
