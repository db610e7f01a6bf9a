//! Property tests of the file paths across the guest boundary: the streaming tar reader (any
//! split of an archive reads as the whole; arbitrary bytes never panic), the extraction check
//! (whatever it accepts stays inside its directory, by an independent lexical model), and the
//! host-side artifact names (nothing accepted can leave the download directory).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use sqlite_sim::cli::artifacts::relative_components;
use sqlite_sim::tarball::{self, EntryKind, Event, Extraction, Reader};

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig::with_cases(cases)
}

/// A path made of hostile and ordinary components, absolute or not.
fn hostile_path() -> impl Strategy<Value = String> {
    let part = select(vec![
        "a", "b", "dir", "..", ".", "", "x.y", "..a", "a..", "a b",
    ]);
    (any::<bool>(), vec(part, 1..6)).prop_map(|(abs, parts)| {
        let p = parts.join("/");
        if abs {
            format!("/{p}")
        } else {
            p
        }
    })
}

/// The model: `path`'s components resolved lexically from the extraction directory; `None`
/// when it is absolute or climbs above the directory at any point.
fn resolve(base: &[String], path: &str) -> Option<Vec<String>> {
    if path.starts_with('/') {
        return None;
    }
    let mut at = base.to_vec();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                at.pop()?;
            }
            c => at.push(c.to_string()),
        }
    }
    Some(at)
}

/// One archive member to build.
#[derive(Debug, Clone)]
enum Member {
    File(String, Vec<u8>),
    Dir(String),
    Link(String, String),
}

fn member() -> impl Strategy<Value = Member> {
    prop_oneof![
        (hostile_path(), vec(any::<u8>(), 0..1500)).prop_map(|(p, d)| Member::File(p, d)),
        hostile_path().prop_map(Member::Dir),
        (hostile_path(), hostile_path()).prop_map(|(p, t)| Member::Link(p, t)),
    ]
}

fn archive(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        match m {
            Member::File(p, d) => {
                out.extend(tarball::header(
                    p,
                    EntryKind::File,
                    0o644,
                    d.len() as u64,
                    0,
                ));
                out.extend(d);
                out.extend(vec![0u8; tarball::padding(d.len() as u64)]);
            }
            Member::Dir(p) => out.extend(tarball::header(p, EntryKind::Directory, 0o755, 0, 0)),
            Member::Link(p, t) => out.extend(tarball::symlink_header(p, t, 0)),
        }
    }
    out.extend(tarball::trailer());
    out
}

/// Every event of `data` fed in pieces cut at `cuts`, data events merged per entry.
fn read_in_pieces(data: &[u8], cuts: &[usize]) -> Result<Vec<Event>, tarball::TarError> {
    let mut r = Reader::new();
    let mut events = Vec::new();
    let mut at = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    for c in cuts.into_iter().chain([data.len()]) {
        for e in r.feed(&data[at..c.max(at)])? {
            match (events.last_mut(), e) {
                (Some(Event::Data(prev)), Event::Data(more)) => prev.extend(more),
                (_, e) => events.push(e),
            }
        }
        at = c.max(at);
    }
    r.finish()?;
    Ok(events)
}

proptest! {
    #![proptest_config(config(300))]

    /// 1. The reader is split-invariant: any cuts of an archive give the same entries and
    /// contents as reading it whole, and each file's bytes come back exactly.
    #[test]
    fn tar_reader_reads_any_split_as_the_whole(
        members in vec(member(), 0..6),
        cuts in vec(any::<usize>(), 0..12),
    ) {
        let data = archive(&members);
        let whole = read_in_pieces(&data, &[]);
        let split = read_in_pieces(&data, &cuts);
        prop_assert_eq!(&whole, &split);
        let events = whole.unwrap();
        let files: Vec<&Vec<u8>> = members.iter().filter_map(|m| match m {
            Member::File(_, d) if !d.is_empty() => Some(d),
            _ => None,
        }).collect();
        let datas: Vec<&Vec<u8>> = events.iter().filter_map(|e| match e {
            Event::Data(d) => Some(d),
            _ => None,
        }).collect();
        prop_assert_eq!(files, datas);
        prop_assert_eq!(events.last(), Some(&Event::End));
    }

    /// 2. Arbitrary bytes, or an archive with bytes flipped, never panic the reader or the
    /// extraction check: they are read or refused.
    #[test]
    fn tar_reader_never_panics(
        members in vec(member(), 0..4),
        flips in vec((any::<usize>(), any::<u8>()), 0..8),
        junk in vec(any::<u8>(), 0..2048),
    ) {
        let mut data = archive(&members);
        for (at, b) in flips {
            let n = data.len();
            data[at % n] ^= b;
        }
        for bytes in [&data, &junk] {
            let _ = read_in_pieces(bytes, &[]);
            let mut x = Extraction::new();
            let _ = x.feed(bytes).and_then(|_| x.finish());
        }
    }

    /// 3. Whatever the extraction check accepts stays inside its directory: every member's
    /// name resolves inside it, every link's target resolves inside it from the link's own
    /// directory, and no member goes through a link of the archive; members that a lexical
    /// model says climb out or are absolute are always refused.
    #[test]
    fn extraction_accepts_only_what_stays_inside(members in vec(member(), 1..6)) {
        let data = archive(&members);
        let mut x = Extraction::new();
        let verdict = x.feed(&data).and_then(|_| x.finish());
        let mut links: Vec<Vec<String>> = Vec::new();
        let mut model_ok = true;
        for m in &members {
            let (path, target) = match m {
                Member::File(p, _) | Member::Dir(p) => (p, None),
                Member::Link(p, t) => (p, Some(t)),
            };
            let Some(at) = resolve(&[], path) else {
                model_ok = false;
                break;
            };
            if at.is_empty() && target.is_some() {
                model_ok = false; // a link that is the directory itself
                break;
            }
            if links.iter().any(|l| at.len() > l.len() && at.starts_with(l)) {
                model_ok = false; // under a symbolic link of the archive
                break;
            }
            if let Some(t) = target {
                let dir = &at[..at.len().saturating_sub(1)];
                if resolve(dir, t).is_none() {
                    model_ok = false;
                    break;
                }
                links.push(at);
            }
        }
        if verdict.is_ok() {
            prop_assert!(model_ok, "accepted what climbs out: {:?}", members);
        }
    }

    /// 4. An artifact name from the guest is either refused or made only of plain
    /// components: joined under the download directory it can never leave it.
    #[test]
    fn artifact_names_never_leave_the_download_directory(
        name in prop_oneof![hostile_path(), any::<String>()],
    ) {
        if let Ok(parts) = relative_components(&name) {
            prop_assert!(!parts.is_empty());
            for p in &parts {
                prop_assert!(!p.is_empty() && *p != "." && *p != ".." && !p.contains('/')
                    && !p.contains('\0'), "{:?} from {:?}", p, name);
            }
            let base = std::path::Path::new("/dl");
            let joined = parts.iter().fold(base.to_path_buf(), |b, p| b.join(p));
            prop_assert!(joined.starts_with(base) && joined != base);
        }
    }
}
