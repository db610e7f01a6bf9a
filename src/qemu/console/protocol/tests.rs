use super::*;
use crate::model::LogType;

const TOK: &str = "0123456789abcdef";

fn parser() -> ConsoleParser {
    ConsoleParser::new(TOK, regex::Regex::new(r"(?:root@tiny:[^#]*# )$").unwrap())
}

/// Feeds `chunks`, merging logs per type, collecting events.
fn run(p: &mut ConsoleParser, chunks: &[&[u8]]) -> (Vec<(LogType, Vec<u8>)>, Vec<ConsoleEvent>) {
    let mut all = Parsed::default();
    for c in chunks {
        let out = p.feed(c);
        for (t, b) in out.logs {
            all.log(t, &b);
        }
        all.events.extend(out.events);
    }
    let fin = p.finish();
    for (t, b) in fin.logs {
        all.log(t, &b);
    }
    (all.logs, all.events)
}

fn by_type(logs: &[(LogType, Vec<u8>)], ty: LogType) -> Vec<u8> {
    logs.iter()
        .filter(|(t, _)| *t == ty)
        .flat_map(|(_, b)| b.clone())
        .collect()
}

fn session_stream(stdout: &[u8], code: i32) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"SeaBIOS\r\n[    0.1] Linux\r\nroot@tiny:~# \x1b[6n");
    s.extend_from_slice(b"stty -echo ...\r\n");
    s.extend_from_slice(format!("SQSIM_{TOK}_READY\n").as_bytes());
    s.extend_from_slice(format!("SQSIM_{TOK}_A1\n").as_bytes());
    s.extend_from_slice(format!("SQSIM_{TOK}_GO\n").as_bytes());
    s.extend_from_slice(stdout);
    s.extend_from_slice(format!("SQSIM_{TOK}:{code};").as_bytes());
    s.extend_from_slice(b"\r\nreboot: Power down\r\n");
    s
}

#[test]
fn whole_session_in_one_chunk() {
    let stream = session_stream(b"Hello World\nLinux tiny 6.1\n", 0);
    // The agent types nothing before the prompt, so the prompt always ends a read.
    let at = memchr::memmem::find(&stream, b"# ").unwrap() + 2;
    let (logs, events) = run(&mut parser(), &[&stream[..at], &stream[at..]]);
    assert_eq!(
        events,
        [
            ConsoleEvent::Prompt,
            ConsoleEvent::Ack("READY".into()),
            ConsoleEvent::Ack("A1".into()),
            ConsoleEvent::Ack("GO".into()),
            ConsoleEvent::Exit(0),
        ]
    );
    assert_eq!(
        by_type(&logs, LogType::Stdout),
        b"Hello World\nLinux tiny 6.1\n"
    );
    let boot = by_type(&logs, LogType::Boot);
    assert!(boot.starts_with(b"SeaBIOS") && boot.ends_with(b"_GO\n"));
    let shut = by_type(&logs, LogType::Shutdown);
    assert!(shut.starts_with(format!("SQSIM_{TOK}:0;").as_bytes()));
    // Nothing lost, nothing duplicated.
    let total: usize = logs.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(total, stream.len());
}

#[test]
fn byte_at_a_time_gives_the_same_result() {
    let stream = session_stream(b"a\nSQSIM_ almost SQSIM_0123 a marker\n\xff\x00", 7);
    let at = memchr::memmem::find(&stream, b"# ").unwrap() + 2;
    let (whole_logs, whole_events) = run(&mut parser(), &[&stream[..at], &stream[at..]]);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let (logs, events) = run(&mut parser(), &bytes);
    assert_eq!(events.last(), Some(&ConsoleEvent::Exit(7)));
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == ConsoleEvent::Prompt)
            .count(),
        1
    );
    for ty in [LogType::Boot, LogType::Stdout, LogType::Shutdown] {
        assert_eq!(by_type(&logs, ty), by_type(&whole_logs, ty), "{ty}");
    }
    assert_eq!(events, whole_events);
    assert_eq!(
        by_type(&logs, LogType::Stdout),
        b"a\nSQSIM_ almost SQSIM_0123 a marker\n\xff\x00"
    );
}

#[test]
fn output_without_trailing_newline_is_exact() {
    let (logs, events) = run(&mut parser(), &[&session_stream(b"no newline", 1)]);
    assert_eq!(by_type(&logs, LogType::Stdout), b"no newline");
    assert_eq!(events.last(), Some(&ConsoleEvent::Exit(1)));
}

#[test]
fn echoed_typed_text_never_fakes_a_marker() {
    let s = Session::new(TOK, Some("/dev/ttyS1".into()));
    let mut p = parser();
    let mut echo = Vec::new();
    echo.extend_from_slice(s.setup_line().as_bytes());
    for (line, _) in s.upload_lines(b"echo hi") {
        echo.extend_from_slice(line.as_bytes());
    }
    echo.extend_from_slice(s.run_line().as_bytes());
    let (_, events) = run(&mut p, &[&echo]);
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn login_and_password_prompts() {
    let mut p = parser();
    let (_, ev) = run(
        &mut p,
        &[b"Debian GNU/Linux 12 tiny ttyS0\r\n\r\ntiny login: "],
    );
    assert_eq!(ev, [ConsoleEvent::Login]);
    let (_, ev) = run(&mut p, &[b"root\r\n", b"Password: "]);
    assert_eq!(ev, [ConsoleEvent::Password]);
    let (_, ev) = run(&mut p, &[b"\r\nmotd\r\n\x1b[?2004hroot@tiny:~# "]);
    assert_eq!(ev, [ConsoleEvent::Prompt]);
}

#[test]
fn prompt_must_be_at_the_end() {
    let (_, ev) = run(&mut parser(), &[b"root@tiny:~# but more text follows\r\n"]);
    assert!(ev.is_empty());
}

#[test]
fn last_seen_is_readable() {
    let mut p = parser();
    p.feed(b"\x1b[0;32m[  OK  ]\x1b[0m Started\r\nWaiting for root device /dev/vda\r\n");
    assert_eq!(
        p.last_seen(),
        "[ OK ] Started Waiting for root device /dev/vda"
    );
}

#[test]
fn stderr_split_at_its_marker() {
    let mut p = StreamParser::stderr(TOK);
    let marker = format!("SQSIM_{TOK}_EOF\n");
    let stream = [b"err1\nSQSIM_".as_slice(), b"x\n", marker.as_bytes()].concat();
    let mut got = Vec::new();
    let mut events = Vec::new();
    for c in stream.chunks(3) {
        let out = p.feed(c);
        got.extend(out.logs.into_iter().flat_map(|(_, b)| b));
        events.extend(out.events);
    }
    assert_eq!(got, b"err1\nSQSIM_x\n");
    assert_eq!(events, [ConsoleEvent::StderrEnd]);
}

/// What a real shell's `printf` writes for the upload lines (the acks dropped), run on the
/// host; `None` if there is no such shell here.
pub(crate) fn shell_writes(
    shell: &[&str],
    lines: &[(String, String)],
    file: &str,
) -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script: String = lines
        .iter()
        .map(|(l, _)| {
            let cmd = l.split("; printf 'SQSIM_").next().unwrap();
            format!("{}\n", cmd.replace(file, &out.display().to_string()))
        })
        .collect();
    let status = std::process::Command::new(shell[0])
        .args(&shell[1..])
        .arg("-c")
        .arg(&script)
        .status()
        .ok()?;
    assert!(status.success(), "{shell:?} failed");
    Some(std::fs::read(out).unwrap())
}

#[test]
fn upload_lines_round_trip_and_stay_short() {
    let script: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();
    let s = Session::new(TOK, None);
    let lines = s.upload_lines(&script);
    assert!(lines.len() > 40);
    for (i, (line, word)) in lines.iter().enumerate() {
        assert!(line.len() < 4000, "tty canonical limit");
        assert_eq!(word, &format!("A{}", i + 1));
        assert!(line.ends_with(&format!(" {TOK} {word}\n")));
        assert_eq!(line.matches('\n').count(), 1, "one typed line");
    }
    // The file is not named after the token (the commands can see its path).
    let file = lines[0]
        .0
        .split(" >")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(
        file.starts_with("/tmp/sqsim-") && !file.contains(TOK),
        "{file}"
    );
    assert!(lines[1].0.contains(&format!(" >>{file};")));
    assert!(s.run_line().contains(&format!(" {file} </dev/null")));
    // Every byte value, written by the shells' own printf.
    for shell in [&["sh"][..], &["bash"], &["busybox", "sh"]] {
        if let Some(got) = shell_writes(shell, &lines, &file) {
            assert_eq!(got, script, "{shell:?}");
        } else {
            eprintln!("{shell:?} not installed: not checked");
        }
    }
    // Plain text stays plain: little bigger than the script.
    let text = b"echo hello world; ls -l /tmp\n".repeat(100);
    let typed: usize = s.upload_lines(&text).iter().map(|(l, _)| l.len()).sum();
    assert!(
        typed < text.len() * 12 / 10 + 200,
        "{typed} for {}",
        text.len()
    );
}

#[test]
fn run_line_routes_stderr_only_when_configured() {
    let with = Session::new(TOK, Some("/dev/ttyS1".into())).run_line();
    assert!(with.contains("</dev/null 2>/dev/ttyS1"));
    assert!(with.contains("EOF\\n' 0123456789abcdef >/dev/ttyS1"));
    let without = Session::new(TOK, None).run_line();
    assert!(without.contains("</dev/null 2>&1"));
    assert!(!without.contains("EOF"));
    assert!(
        without.contains("$__sqsim_rc; rm -f /tmp/sqsim-"),
        "{without}"
    );
    assert!(!without.contains("base64"), "no decoding program");
}

#[test]
fn strip_ansi_handles_csi_osc_and_truncation() {
    assert_eq!(strip_ansi(b"a\x1b[6nb\x1b[?2004hc"), b"abc");
    assert_eq!(strip_ansi(b"\x1b]0;title\x07x"), b"x");
    assert_eq!(strip_ansi(b"x\x1b["), b"x");
}

#[test]
fn interrupted_command_keeps_held_bytes_as_stdout_and_the_rest_as_shutdown() {
    let mut p = parser();
    let mut head = session_stream(b"", 0);
    let go = memchr::memmem::find(&head, b"_GO\n").unwrap() + 4;
    head.truncate(go);
    let at = memchr::memmem::find(&head, b"# ").unwrap() + 2;
    let (mut logs, _) = (Vec::new(), ());
    for chunk in [&head[..at], &head[at..], b"partial SQSIM_0123".as_slice()] {
        logs.extend(p.feed(chunk).logs);
    }
    p.interrupt();
    logs.extend(p.feed(b"\r\nreboot: Power down\r\n").logs);
    logs.extend(p.finish().logs);
    assert_eq!(by_type(&logs, LogType::Stdout), b"partial SQSIM_0123");
    assert_eq!(
        by_type(&logs, LogType::Shutdown),
        b"\r\nreboot: Power down\r\n"
    );
}

#[test]
fn kernel_panic_is_reported_once_even_when_split() {
    let msg = b"[ 5.1] Kernel panic - not syncing: sysrq triggered crash\r\n";
    for split in 1..msg.len() {
        let mut p = parser();
        let mut events = p.feed(&msg[..split]).events;
        events.extend(p.feed(&msg[split..]).events);
        events.extend(p.feed(msg).events);
        let panics: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, ConsoleEvent::KernelPanic(_)))
            .collect();
        assert_eq!(panics.len(), 1, "split at {split}");
        // The message is as much of the line as had arrived.
        let ConsoleEvent::KernelPanic(text) = panics[0] else {
            unreachable!()
        };
        assert!(text.starts_with("Kernel panic - not syncing"), "{text}");
        if split >= msg.len() - 2 {
            assert_eq!(text, "Kernel panic - not syncing: sysrq triggered crash");
        }
    }
}

#[test]
fn a_prompt_at_the_end_of_command_output_is_flagged() {
    let mut p = parser();
    let head = session_stream(b"", 0);
    let go = memchr::memmem::find(&head, b"_GO\n").unwrap() + 4;
    let at = memchr::memmem::find(&head, b"# ").unwrap() + 2;
    p.feed(&head[..at]);
    p.feed(&head[at..go]);
    assert!(p.feed(b"working\n").events.is_empty());
    let ev = p.feed(b"\r\nBusyBox v1.35\r\nroot@tiny:~# \x1b[6n").events;
    assert_eq!(ev, [ConsoleEvent::PromptDuringCommand]);
}

#[test]
fn exit_marker_is_exactly_digits_and_a_semicolon() {
    for (after, code) in [("0;", Some(0)), ("255;", Some(255)), ("7;tail", Some(7))] {
        let mut p = parser();
        let mut s = session_stream(b"", 0);
        let go = memchr::memmem::find(&s, b"_GO\n").unwrap() + 4;
        s.truncate(go);
        let at = memchr::memmem::find(&s, b"# ").unwrap() + 2;
        s.extend_from_slice(format!("SQSIM_{TOK}:{after}").as_bytes());
        let (_, events) = run(&mut p, &[&s[..at], &s[at..]]);
        assert_eq!(
            events.last(),
            code.map(ConsoleEvent::Exit).as_ref(),
            "{after}"
        );
    }
    for fake in ["0000;", "1a;", ";", "-1;", "+5;"] {
        let mut s = session_stream(b"", 0);
        let go = memchr::memmem::find(&s, b"_GO\n").unwrap() + 4;
        s.truncate(go);
        let at = memchr::memmem::find(&s, b"# ").unwrap() + 2;
        s.extend_from_slice(format!("SQSIM_{TOK}:{fake}").as_bytes());
        let (logs, events) = run(&mut parser(), &[&s[..at], &s[at..]]);
        assert!(
            !events.iter().any(|e| matches!(e, ConsoleEvent::Exit(_))),
            "{fake}"
        );
        assert_eq!(
            by_type(&logs, LogType::Stdout),
            format!("SQSIM_{TOK}:{fake}").as_bytes()
        );
    }
}

#[test]
fn a_panic_after_the_exit_marker_is_not_reported() {
    let mut s = session_stream(b"out\n", 0);
    s.extend_from_slice(b"Kernel panic - not syncing: at shutdown\r\n");
    let at = memchr::memmem::find(&s, b"# ").unwrap() + 2;
    let (_, events) = run(&mut parser(), &[&s[..at], &s[at..]]);
    assert_eq!(events.last(), Some(&ConsoleEvent::Exit(0)));
    assert!(!events
        .iter()
        .any(|e| matches!(e, ConsoleEvent::KernelPanic(_))));
}

#[test]
fn resume_line_seeds_the_rng_sets_the_clock_and_reports() {
    let s = Session::new(TOK, None);
    let mut seed = [0xab; SEED_BYTES];
    seed[0] = 0;
    seed[1] = b'\'';
    let line = s.resume_line(&seed, 1_700_000_000.6);
    assert!(line.ends_with(&format!(
        "{}\n",
        s.setup_line().rsplit("; ").next().unwrap().trim_end()
    )));
    // Every byte in octal, quotes included, so the shell's printf writes them exactly.
    let octal = format!("\\000\\047{}", "\\253".repeat(SEED_BYTES - 2));
    assert!(
        line.contains(&format!("printf '{octal}' | sqsim-reseed")),
        "{line}"
    );
    assert!(
        line.contains(&format!("printf '{octal}' >/dev/urandom")),
        "{line}"
    );
    // busybox's date takes whole seconds: rounded.
    assert!(line.contains("date -u -s @1700000001 "), "{line}");
    assert!(
        line.contains(&format!(
            "printf 'SQSIM_%s_RNG=%s\\n' {TOK} \"$__sqsim_rng\""
        )),
        "{line}"
    );
    assert_eq!(line.matches('\n').count(), 1, "one typed line");
    // The typed text never forms a marker (it is assembled by printf in the guest).
    assert!(!line.contains(&format!("SQSIM_{TOK}_")));
}

#[test]
fn reports_carry_values_and_are_not_acks() {
    let mut p = parser();
    let got = p.feed(format!("x SQSIM_{TOK}_RNG=reseeded\r\nSQSIM_{TOK}_READY\r\n").as_bytes());
    assert_eq!(
        got.events,
        vec![
            ConsoleEvent::Report {
                key: "RNG".into(),
                value: "reseeded".into()
            },
            ConsoleEvent::Ack("READY".into())
        ]
    );
}

#[test]
fn globs_become_shell_words_that_expand_only_their_wildcards() {
    assert_eq!(glob_word("/root/out/*.xml"), "'/root/out/'*'.xml'");
    assert_eq!(glob_word("/var/log/syslog"), "'/var/log/syslog'");
    assert_eq!(glob_word("/a b/it's/f?[0-9]"), r"'/a b/it'\''s/f'?[0-9]");
    // A bracket that is not a simple class stays literal: nothing else reaches the shell.
    assert_eq!(glob_word("/x/[$(reboot)]"), "'/x/[$(reboot)]'");
    assert_eq!(glob_word("/x/["), "'/x/['");
}

#[test]
fn channel_lines_use_the_ports_and_report() {
    let mut s = Session::new(TOK, None);
    assert!(s
        .setup_line()
        .contains("[ -w /dev/virtio-ports/org.sqlite-sim.stdout ]"));
    assert!(s.setup_line().contains("SQSIM_%s_CHANNEL=%s"));
    s.set_channel(true);
    let run = s.run_line();
    assert!(
        run.contains(
            "3>/dev/virtio-ports/org.sqlite-sim.stdout 4>/dev/virtio-ports/org.sqlite-sim.stderr"
        ),
        "{run}"
    );
    assert!(run.contains("</dev/null >&3 2>&4 3>&- 4>&-"), "{run}");
    assert!(
        run.contains(&format!("printf 'SQSIM_%s_EOF\\n' {TOK} >&3")),
        "{run}"
    );
    let file = s.place_line(2, "/root/my dir/run.sh", false, 0o755, 10);
    assert!(
        file.starts_with("mkdir -p -- '/root/my dir' && dd if=/dev/virtio-ports/org.sqlite-sim.in bs=1048576 count=10 iflag=count_bytes,fullblock status=none >'/root/my dir/run.sh' && chmod 755 '/root/my dir/run.sh';"),
        "{file}"
    );
    assert!(file.contains("SQSIM_%s_UP2=%s"), "{file}");
    let tar = s.place_line(1, "/srv", true, 0, 4096);
    assert!(tar.contains("| tar -x -f - -C '/srv'"), "{tar}");
    let art = s.collect_line(&["/root/out/*.xml".into()]);
    assert!(
        art.contains("for __sqsim_f in '/root/out/'*'.xml'; do"),
        "{art}"
    );
    assert!(
        art.contains(">/dev/virtio-ports/org.sqlite-sim.artifacts"),
        "{art}"
    );
    assert!(art.contains("SQSIM_%s_ART=%s:%s"), "{art}");
    s.set_channel(false);
    let art = s.collect_line(&["/x".into()]);
    assert!(
        art.contains("base64 /tmp/sqsim-") && art.contains("_ARTE=%s:%s"),
        "{art}"
    );
    // Every typed line is one line, and none holds a marker literally.
    for line in [run, file, tar, art] {
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(!line.contains(&format!("SQSIM_{TOK}")), "{line}");
    }
}

#[test]
fn artifacts_over_the_console_are_captured_not_logged() {
    let mut p = parser();
    p.feed(format!("SQSIM_{TOK}_GO\r\nout").as_bytes());
    p.feed(format!("SQSIM_{TOK}:0;").as_bytes());
    let mut got = Parsed::default();
    let stream = format!("noise\r\nSQSIM_{TOK}_ARTB\nQUJD\nREVG\nSQSIM_{TOK}_ARTE=1:0\r\nafter");
    for b in stream.as_bytes().chunks(3) {
        let part = p.feed(b);
        got.logs.extend(part.logs);
        got.events.extend(part.events);
        got.captured.extend(part.captured);
    }
    assert_eq!(got.captured, b"QUJD\nREVG\n");
    assert_eq!(
        got.events,
        vec![
            ConsoleEvent::Ack("ARTB".into()),
            ConsoleEvent::Report {
                key: "ARTE".into(),
                value: "1:0".into()
            }
        ]
    );
    let logged: Vec<u8> = got.logs.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(
        !String::from_utf8_lossy(&logged).contains("QUJD"),
        "not in the logs"
    );
    assert!(String::from_utf8_lossy(&logged).ends_with("after"));
}

#[test]
fn every_ack_word_is_one_the_parser_recognises() {
    let s = Session::new(TOK, None);
    let words: Vec<String> = s
        .chunk_lines(3, 12, &[7u8; 5000])
        .into_iter()
        .chain(s.upload_lines(b"script"))
        .map(|(_, w)| w)
        .collect();
    for w in words {
        let mut p = parser();
        let got = p.feed(format!("SQSIM_{TOK}_{w}\r\n").as_bytes());
        assert_eq!(got.events, vec![ConsoleEvent::Ack(w.clone())], "{w}");
    }
}
