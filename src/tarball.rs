//! Tar archives as a stream: an incremental reader that takes bytes as they arrive (from a
//! guest's channel, or an HTTP body) and says what each entry is, and a writer of ustar headers.
//!
//! Only what the supervisor needs: regular files, directories, symbolic and hard links (so they
//! can be refused or left out), GNU long names (`L`) as busybox writes them, and pax headers
//! (`x`, `g`), whose `path` is honoured and the rest skipped. Names are checked with
//! [`safe_relative`] by callers that put entries anywhere; [`Extraction`] checks a whole archive
//! that is to be extracted into a directory, as it streams.

use std::collections::HashSet;
use thiserror::Error;

const BLOCK: usize = 512;
/// Longest name a GNU long-name entry may carry.
const MAX_LONG_NAME: u64 = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar header at byte {offset} is not a valid header (checksum mismatch)")]
    Checksum { offset: u64 },
    #[error("tar header at byte {offset}: {message}")]
    Header { offset: u64, message: String },
    #[error("the tar archive ends in the middle of an entry")]
    Truncated,
    #[error("the tar archive is empty")]
    Empty,
    /// A member that extracting would put (or point) outside its directory, or that is not a
    /// file, directory or link.
    #[error("tar member {path:?} {why}")]
    Unsafe { path: String, why: String },
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    HardLink,
    /// Devices, FIFOs and anything else.
    Other(u8),
}

/// An entry's header, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub size: u64,
    /// A link's target.
    pub link: String,
}

/// What [`Reader::feed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Entry(Entry),
    /// Bytes of the current entry's content.
    Data(Vec<u8>),
    /// The current entry's content is complete.
    EntryEnd,
    /// The archive's end (two zero blocks).
    End,
}

#[derive(Debug)]
enum State {
    Header,
    /// Content of an entry: bytes left, then padding to the block.
    Data {
        left: u64,
        pad: usize,
    },
    /// A GNU long name or pax header's content, collected.
    Meta {
        kind: u8,
        left: u64,
        pad: usize,
        buf: Vec<u8>,
    },
    Padding {
        left: usize,
    },
    End,
}

/// An incremental tar reader.
#[derive(Debug)]
pub struct Reader {
    state: State,
    /// Bytes of an incomplete header block.
    pending: Vec<u8>,
    offset: u64,
    zero_blocks: u8,
    long_name: Option<String>,
    long_link: Option<String>,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            state: State::Header,
            pending: Vec::new(),
            offset: 0,
            zero_blocks: 0,
            long_name: None,
            long_link: None,
        }
    }
}

impl Reader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the archive's end was read.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Feeds bytes; the events they complete, in order. Bytes after the end are ignored.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Vec<Event>, TarError> {
        let mut out = Vec::new();
        while !data.is_empty() {
            match &mut self.state {
                State::End => break,
                State::Header => {
                    let need = BLOCK - self.pending.len();
                    let take = need.min(data.len());
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.pending.len() == BLOCK {
                        let block = std::mem::take(&mut self.pending);
                        self.header(&block, &mut out)?;
                        self.offset += BLOCK as u64;
                    }
                }
                State::Data { left, pad } => {
                    let take = (*left).min(data.len() as u64) as usize;
                    if take > 0 {
                        out.push(Event::Data(data[..take].to_vec()));
                        *left -= take as u64;
                        data = &data[take..];
                        self.offset += take as u64;
                    }
                    if *left == 0 {
                        out.push(Event::EntryEnd);
                        let pad = *pad;
                        self.state = State::Padding { left: pad };
                    }
                }
                State::Meta {
                    kind,
                    left,
                    pad,
                    buf,
                } => {
                    let take = (*left).min(data.len() as u64) as usize;
                    buf.extend_from_slice(&data[..take]);
                    *left -= take as u64;
                    data = &data[take..];
                    self.offset += take as u64;
                    if *left == 0 {
                        let (kind, pad, buf) = (*kind, *pad, std::mem::take(buf));
                        self.meta(kind, &buf);
                        self.state = State::Padding { left: pad };
                    }
                }
                State::Padding { left } => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    data = &data[take..];
                    self.offset += take as u64;
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        // An entry of size 0 ends at once; so does a zero pad.
        loop {
            match &self.state {
                State::Data { left: 0, pad } => {
                    out.push(Event::EntryEnd);
                    self.state = State::Padding { left: *pad };
                }
                State::Padding { left: 0 } => self.state = State::Header,
                _ => break,
            }
        }
        Ok(out)
    }

    /// The stream ended: an error unless the archive was complete (two zero blocks, or at
    /// least the end of the last entry, as some writers stop there).
    pub fn finish(&self) -> Result<(), TarError> {
        match &self.state {
            State::End => Ok(()),
            State::Header if self.pending.is_empty() => Ok(()),
            _ => Err(TarError::Truncated),
        }
    }

    fn header(&mut self, b: &[u8], out: &mut Vec<Event>) -> Result<(), TarError> {
        if b.iter().all(|&x| x == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks == 2 {
                self.state = State::End;
                out.push(Event::End);
            }
            return Ok(());
        }
        self.zero_blocks = 0;
        let offset = self.offset;
        let bad = |message: &str| TarError::Header {
            offset,
            message: message.into(),
        };
        let stored = octal(&b[148..156]).ok_or_else(|| bad("unreadable checksum"))?;
        let sum: u64 = b
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if (148..156).contains(&i) {
                    b' ' as u64
                } else {
                    x as u64
                }
            })
            .sum();
        if stored != sum {
            return Err(TarError::Checksum { offset });
        }
        let size = octal(&b[124..136]).ok_or_else(|| bad("unreadable size"))?;
        let typeflag = b[156];
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        match typeflag {
            b'L' | b'K' | b'x' | b'g' => {
                if size > MAX_LONG_NAME * 4 {
                    return Err(bad("oversized extended header"));
                }
                self.state = State::Meta {
                    kind: typeflag,
                    left: size,
                    pad,
                    buf: Vec::new(),
                };
                return Ok(());
            }
            _ => {}
        }
        let mut path = match self.long_name.take() {
            Some(p) => p,
            None => {
                let name = cstr(&b[0..100]);
                let prefix = if &b[257..262] == b"ustar" {
                    cstr(&b[345..500])
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let link = self.long_link.take().unwrap_or_else(|| cstr(&b[157..257]));
        let kind = match typeflag {
            b'0' | 0 | b'7' => EntryKind::File,
            b'5' => EntryKind::Directory,
            b'2' => EntryKind::Symlink,
            b'1' => EntryKind::HardLink,
            other => EntryKind::Other(other),
        };
        if kind == EntryKind::Directory {
            while path.len() > 1 && path.ends_with('/') {
                path.pop();
            }
        }
        let mode = octal(&b[100..108]).unwrap_or(0o644) as u32 & 0o7777;
        // Only regular files carry content; other types' sizes are ignored as tar says.
        let size = if kind == EntryKind::File { size } else { 0 };
        out.push(Event::Entry(Entry {
            path,
            kind,
            mode,
            size,
            link,
        }));
        self.state = State::Data {
            left: size,
            pad: (BLOCK - (size % BLOCK as u64) as usize) % BLOCK,
        };
        Ok(())
    }

    fn meta(&mut self, kind: u8, buf: &[u8]) {
        match kind {
            b'L' => self.long_name = Some(cstr(buf)),
            b'K' => self.long_link = Some(cstr(buf)),
            b'x' => {
                // `LEN key=value\n` records; only `path` and `linkpath` matter here.
                for rec in pax_records(buf) {
                    match rec.0.as_str() {
                        "path" => self.long_name = Some(rec.1),
                        "linkpath" => self.long_link = Some(rec.1),
                        _ => {}
                    }
                }
            }
            _ => {} // global pax headers: nothing we use
        }
    }
}

fn pax_records(buf: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(buf);
    text.split('\n')
        .filter_map(|rec| {
            let (_, kv) = rec.split_once(' ')?;
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A tar number: octal digits (space- or NUL-terminated), or GNU base-256.
fn octal(b: &[u8]) -> Option<u64> {
    if b.first().is_some_and(|&x| x & 0x80 != 0) {
        let mut n: u64 = (b[0] & 0x7f) as u64;
        for &x in &b[1..] {
            n = n.checked_mul(256)?.checked_add(x as u64)?;
        }
        return Some(n);
    }
    let s: String = b
        .iter()
        .map(|&x| x as char)
        .take_while(|c| *c != '\0')
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// `path` as a relative path with no `..`, no empty or `.` components (leading `/` and `./`
/// stripped); `None` if it would leave its directory.
pub fn safe_relative(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c if c.contains('\0') => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Whether a link at `at` (relative) to `target` stays inside its archive's directory.
pub fn link_stays_inside(at: &str, target: &str) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut depth: i64 = at.split('/').filter(|c| !c.is_empty()).count() as i64 - 1;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Checks an archive that is to be extracted into a directory, member by member as its bytes
/// arrive, so that nothing it holds lands or points outside that directory: no absolute names,
/// no `..`, no member under a symbolic link of the archive, symbolic links whose targets stay
/// inside (leading `..` only, never deeper than the link), hard links only to regular files met
/// earlier, and no devices, FIFOs or other special files.
#[derive(Debug, Default)]
pub struct Extraction {
    reader: Reader,
    /// Regular files and symbolic links so far, by normalised name.
    files: HashSet<String>,
    symlinks: HashSet<String>,
    fed: u64,
}

impl Extraction {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the archive's next bytes; the first refused member (or format error) ends it.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), TarError> {
        self.fed += data.len() as u64;
        for ev in self.reader.feed(data)? {
            if let Event::Entry(e) = ev {
                self.check(&e)?;
            }
        }
        Ok(())
    }

    /// The archive ended: an error if it was empty or stopped inside an entry.
    pub fn finish(&self) -> Result<(), TarError> {
        if self.fed == 0 {
            return Err(TarError::Empty);
        }
        self.reader.finish()
    }

    /// Checks one member, in archive order.
    pub fn check(&mut self, e: &Entry) -> Result<(), TarError> {
        let refuse = |why: String| TarError::Unsafe {
            path: e.path.clone(),
            why,
        };
        if e.path.starts_with('/') {
            return Err(refuse("has an absolute name".into()));
        }
        let Some(rel) = safe_relative(&e.path) else {
            // `.` or `./` is the directory itself, which GNU tar puts first.
            if e.kind == EntryKind::Directory && e.path.split('/').all(|c| c.is_empty() || c == ".")
            {
                return Ok(());
            }
            let why = if e.path.split('/').any(|c| c == "..") {
                "has a .. component"
            } else if e.path.contains('\0') {
                "holds a NUL byte"
            } else {
                "has an empty name"
            };
            return Err(refuse(why.into()));
        };
        // A member under a link the archive made could be written anywhere the link points.
        let mut prefix = String::new();
        for c in rel.split('/') {
            if !prefix.is_empty() && self.symlinks.contains(&prefix) {
                return Err(refuse(format!("lies under the symbolic link {prefix:?}")));
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
        }
        match e.kind {
            EntryKind::File => {
                self.files.insert(rel);
            }
            EntryKind::Directory => {}
            EntryKind::Symlink => {
                if !symlink_stays_inside(&rel, &e.link) {
                    return Err(refuse(format!(
                        "is a symbolic link to {:?}, which leaves its directory",
                        e.link
                    )));
                }
                self.symlinks.insert(rel);
            }
            EntryKind::HardLink => {
                let target = (!e.link.starts_with('/'))
                    .then(|| safe_relative(&e.link))
                    .flatten();
                if !target.is_some_and(|t| self.files.contains(&t)) {
                    return Err(refuse(format!(
                        "is a hard link to {:?}, which is not a regular file earlier in the archive",
                        e.link
                    )));
                }
                self.files.insert(rel);
            }
            EntryKind::Other(t) => {
                return Err(refuse(format!(
                    "is a device, FIFO or other special file (tar type {:?})",
                    t as char
                )));
            }
        }
        Ok(())
    }
}

/// [`link_stays_inside`], and no `..` after a named component: `a/..` would be resolved through
/// `a`, which may itself be a link.
fn symlink_stays_inside(at: &str, target: &str) -> bool {
    let mut named = false;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." if named => return false,
            ".." => {}
            c if c.contains('\0') => return false,
            _ => named = true,
        }
    }
    link_stays_inside(at, target)
}

/// Header of a symbolic link at `path` to `target` (a GNU `K` entry carries a long target, an
/// `L` entry a long name).
pub fn symlink_header(path: &str, target: &str, mtime: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if target.len() > 99 {
        out.extend(long_entry(b'K', target));
    }
    out.extend(named(path, b'2', 0o777, 0, mtime, target));
    out
}

/// Header (and for long names a GNU `L` entry before it) of a regular file or directory.
pub fn header(path: &str, kind: EntryKind, mode: u32, size: u64, mtime: u64) -> Vec<u8> {
    let typeflag = match kind {
        EntryKind::Directory => b'5',
        _ => b'0',
    };
    named(path, typeflag, mode, size, mtime, "")
}

/// A header under `path`, preceded by a GNU `L` entry when the name is too long for it.
fn named(path: &str, typeflag: u8, mode: u32, size: u64, mtime: u64, link: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let name = path.as_bytes();
    if name.len() > 99 {
        out.extend(long_entry(b'L', path));
    }
    let short = String::from_utf8_lossy(&name[..name.len().min(99)]).into_owned();
    out.extend(raw_header(&short, typeflag, mode, size, mtime, link));
    out
}

/// A GNU long-name (`L`) or long-link (`K`) entry carrying `text`.
fn long_entry(kind: u8, text: &str) -> Vec<u8> {
    let mut long = text.as_bytes().to_vec();
    long.push(0);
    let mut out = raw_header("././@LongLink", kind, 0o644, long.len() as u64, 0, "");
    out.extend_from_slice(&long);
    out.extend(std::iter::repeat_n(0u8, padding(long.len() as u64)));
    out
}

/// Zero bytes that pad `size` bytes of content to a whole block.
pub fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// The end of an archive.
pub fn trailer() -> Vec<u8> {
    vec![0u8; 2 * BLOCK]
}

fn raw_header(name: &str, typeflag: u8, mode: u32, size: u64, mtime: u64, link: &str) -> Vec<u8> {
    let mut h = vec![0u8; BLOCK];
    let put = |h: &mut Vec<u8>, at: usize, s: &[u8]| h[at..at + s.len()].copy_from_slice(s);
    put(&mut h, 0, &name.as_bytes()[..name.len().min(100)]);
    put(&mut h, 100, format!("{:07o}\0", mode & 0o7777).as_bytes());
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, format!("{:011o}\0", mtime).as_bytes());
    h[156] = typeflag;
    put(&mut h, 157, &link.as_bytes()[..link.len().min(99)]);
    put(&mut h, 257, b"ustar\x0000");
    put(&mut h, 148, b"        ");
    let sum: u64 = h.iter().map(|&x| x as u64).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, EntryKind, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data) in entries {
            out.extend(header(path, *kind, 0o640, data.len() as u64, 0));
            out.extend_from_slice(data);
            out.extend(std::iter::repeat_n(0u8, padding(data.len() as u64)));
        }
        out.extend(trailer());
        out
    }

    /// Entries with their whole content, feeding `data` in pieces of `step` bytes.
    fn read(data: &[u8], step: usize) -> Result<Vec<(Entry, Vec<u8>)>, TarError> {
        let mut r = Reader::new();
        let mut got: Vec<(Entry, Vec<u8>)> = Vec::new();
        let mut ended = false;
        for piece in data.chunks(step.max(1)) {
            for ev in r.feed(piece)? {
                match ev {
                    Event::Entry(e) => got.push((e, Vec::new())),
                    Event::Data(d) => got.last_mut().unwrap().1.extend(d),
                    Event::EntryEnd => {}
                    Event::End => ended = true,
                }
            }
        }
        r.finish()?;
        assert!(ended && r.is_done());
        Ok(got)
    }

    #[test]
    fn round_trip_however_the_bytes_arrive() {
        let long = format!("d/{}", "n".repeat(150));
        let tar = archive(&[
            ("a.txt", EntryKind::File, b"hello"),
            ("d", EntryKind::Directory, b""),
            (&long, EntryKind::File, &[7u8; 1500]),
            ("empty", EntryKind::File, b""),
        ]);
        for step in [1, 7, 511, 512, 513, 100_000] {
            let got = read(&tar, step).unwrap();
            assert_eq!(got.len(), 4, "step {step}");
            assert_eq!(
                (got[0].0.path.as_str(), got[0].1.as_slice()),
                ("a.txt", &b"hello"[..])
            );
            assert_eq!(got[0].0.mode, 0o640);
            assert_eq!(got[1].0.kind, EntryKind::Directory);
            assert_eq!(got[2].0.path, long);
            assert_eq!(got[2].1, vec![7u8; 1500]);
            assert_eq!((got[3].0.size, got[3].1.len()), (0, 0));
        }
    }

    #[test]
    fn system_tar_archives_are_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("src/sub")).unwrap();
        std::fs::write(d.path().join("src/sub/f"), b"content").unwrap();
        std::os::unix::fs::symlink("../x", d.path().join("src/link")).unwrap();
        let out = std::process::Command::new("tar")
            .args(["-c", "-f", "-", "-C"])
            .arg(d.path())
            .arg("src")
            .output()
            .unwrap();
        assert!(out.status.success());
        let got = read(&out.stdout, 333).unwrap();
        let f = got.iter().find(|(e, _)| e.path == "src/sub/f").unwrap();
        assert_eq!(f.1, b"content");
        let l = got.iter().find(|(e, _)| e.path == "src/link").unwrap();
        assert_eq!((l.0.kind, l.0.link.as_str()), (EntryKind::Symlink, "../x"));
    }

    #[test]
    fn corrupt_and_truncated_archives_are_errors() {
        let mut tar = archive(&[("a", EntryKind::File, b"12345")]);
        tar[10] ^= 1;
        assert!(matches!(
            read(&tar, 512),
            Err(TarError::Checksum { offset: 0 })
        ));
        let tar = archive(&[("a", EntryKind::File, &[1u8; 2000])]);
        assert_eq!(read(&tar[..1000], 64).unwrap_err(), TarError::Truncated);
        assert!(Reader::new().feed(&[b'x'; 512]).is_err(), "garbage");
    }

    #[test]
    fn names_and_links_that_leave_their_directory() {
        assert_eq!(safe_relative("/abs/x").as_deref(), Some("abs/x"));
        assert_eq!(safe_relative("./a//b/").as_deref(), Some("a/b"));
        for bad in ["../x", "a/../../x", "a/..", "", "/", "."] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
        assert!(link_stays_inside("a/b", "c"));
        assert!(link_stays_inside("a/b", "../c"));
        assert!(!link_stays_inside("a/b", "../../c"));
        assert!(!link_stays_inside("a", "/etc/passwd"));
        assert!(!link_stays_inside("a", "../x"));
    }

    fn member(path: &str, kind: EntryKind, link: &str) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            size: 0,
            link: link.into(),
        }
    }

    #[test]
    fn extraction_refuses_what_would_leave_its_directory() {
        let ok = |entries: &[Entry]| {
            let mut x = Extraction::new();
            entries.iter().try_for_each(|e| x.check(e))
        };
        use EntryKind::*;
        assert!(ok(&[
            member("./", Directory, ""),
            member("a", Directory, ""),
            member("a/f", File, ""),
            member("a/l", Symlink, "f"),
            member("a/up", Symlink, "../b"),
            member("h", HardLink, "a/f"),
            member("./b/", Directory, ""),
        ])
        .is_ok());
        for (bad, why) in [
            (vec![member("/etc/passwd", File, "")], "absolute"),
            (vec![member("a/../../x", File, "")], ".."),
            (vec![member("..", Directory, "")], ".."),
            (vec![member("", File, "")], "empty"),
            (vec![member("l", Symlink, "/etc")], "leaves"),
            (vec![member("l", Symlink, "..")], "leaves"),
            (vec![member("a/l", Symlink, "../..")], "leaves"),
            (vec![member("l", Symlink, "x/..")], "leaves"),
            (
                vec![member("l", Symlink, "."), member("l/x", File, "")],
                "under",
            ),
            (
                vec![member("s", Symlink, "."), member("t", Symlink, "s/..")],
                "leaves",
            ),
            (vec![member("h", HardLink, "/etc/shadow")], "hard link"),
            (vec![member("h", HardLink, "missing")], "hard link"),
            (
                vec![member("s", Symlink, "x"), member("h", HardLink, "s")],
                "hard link",
            ),
            (vec![member("dev", Other(b'3'), "")], "special"),
            (vec![member("fifo", Other(b'6'), "")], "special"),
        ] {
            let e = ok(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn extraction_reads_the_stream_and_wants_a_whole_archive() {
        let tar = archive(&[("a", EntryKind::File, b"12345")]);
        let mut x = Extraction::new();
        for piece in tar.chunks(100) {
            x.feed(piece).unwrap();
        }
        x.finish().unwrap();
        assert_eq!(Extraction::new().finish(), Err(TarError::Empty));
        let mut x = Extraction::new();
        x.feed(&tar[..600]).unwrap();
        assert_eq!(x.finish(), Err(TarError::Truncated));
        let mut evil = header("../x", EntryKind::File, 0o644, 0, 0);
        evil.extend(trailer());
        assert!(matches!(
            Extraction::new().feed(&evil),
            Err(TarError::Unsafe { .. })
        ));
    }

    #[test]
    fn symlink_headers_read_back_with_long_names_and_targets() {
        let long = "t/".repeat(80);
        for (path, target) in [("l", "a/b"), (&*"n".repeat(120), &*long)] {
            let mut tar = symlink_header(path, target, 0);
            tar.extend(trailer());
            let got = read(&tar, 99).unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(
                (
                    got[0].0.path.as_str(),
                    got[0].0.kind,
                    got[0].0.link.as_str()
                ),
                (path, EntryKind::Symlink, target)
            );
        }
    }

    #[test]
    fn system_tar_archives_of_a_directory_pass_and_escaping_links_do_not() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink("sub/f", d.path().join("inside")).unwrap();
        let tar_of = |dir: &std::path::Path| {
            let out = std::process::Command::new("tar")
                .args(["-c", "-f", "-", "-C"])
                .arg(dir)
                .arg(".")
                .output()
                .unwrap();
            assert!(out.status.success());
            let mut x = Extraction::new();
            x.feed(&out.stdout).and_then(|()| x.finish())
        };
        tar_of(d.path()).unwrap();
        std::os::unix::fs::symlink("../../etc", d.path().join("sub/out")).unwrap();
        let e = tar_of(d.path()).unwrap_err().to_string();
        assert!(e.contains("./sub/out") && e.contains("leaves"), "{e}");
    }
}
