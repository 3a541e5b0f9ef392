//! A comparable snapshot of a directory tree: what a user would call "the same files" (content,
//! type, mode, owner, symlink target, hardlink groups, xattrs without `trusted.overlay.*`, data
//! extents of sparse files, nanosecond mtimes). Used by the tests with the kernel's merged overlay
//! view as the oracle, and by `jobcachefs cache verify`-style checks.

use crate::error::{IoContext, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// One entry of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `f` file, `d` dir, `l` symlink, `c`/`b` device, `p` fifo, `s` socket.
    pub kind: char,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (files only; 0 otherwise).
    pub size: u64,
    /// mtime in nanoseconds (directories included).
    pub mtime_ns: i128,
    /// Device number of device nodes.
    pub rdev: u64,
    /// Symlink target.
    pub target: Option<PathBuf>,
    /// xattrs, minus the overlay's private ones.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// SHA-256 of file content.
    pub digest: Option<String>,
    /// Data extents (offset, end) of files, as SEEK_DATA/SEEK_HOLE report them.
    pub extents: Vec<(u64, u64)>,
    /// For a hardlinked file: the first path of its link group.
    pub link_of: Option<PathBuf>,
}

/// A tree snapshot keyed by path relative to the root (the root itself is not included).
pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Takes a snapshot of the tree under `root`.
pub fn snapshot(root: &Path) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut links = HashMap::new();
    walk(root, Path::new(""), &mut out, &mut links)?;
    Ok(out)
}

fn walk(
    root: &Path,
    rel: &Path,
    out: &mut Snapshot,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .at("read directory", &dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        let r = rel.join(&name);
        let p = root.join(&r);
        let md = fs::symlink_metadata(&p).at("stat", &p)?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            's'
        };
        let mut xattrs = BTreeMap::new();
        for n in xattr::list(&p).at("list xattrs of", &p)? {
            if n.as_encoded_bytes().starts_with(b"trusted.overlay.") {
                continue;
            }
            if let Some(v) = xattr::get(&p, &n).at("read xattr of", &p)? {
                xattrs.insert(n.to_string_lossy().into_owned(), v);
            }
        }
        let link_of = if kind != 'd' && md.nlink() > 1 {
            Some(
                links
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| r.clone())
                    .clone(),
            )
        } else {
            None
        };
        let (digest, extents) = if kind == 'f' {
            file_data(&p)?
        } else {
            (None, Vec::new())
        };
        out.insert(
            r.clone(),
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if kind == 'f' { md.len() } else { 0 },
                mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
                rdev: if kind == 'c' || kind == 'b' {
                    md.rdev()
                } else {
                    0
                },
                target: if kind == 'l' {
                    Some(fs::read_link(&p).at("read link", &p)?)
                } else {
                    None
                },
                xattrs,
                digest,
                extents,
                link_of,
            },
        );
        if kind == 'd' {
            walk(root, &r, out, links)?;
        }
    }
    Ok(())
}

/// A file's content digest and its data extents.
type FileData = (Option<String>, Vec<(u64, u64)>);

fn file_data(p: &Path) -> Result<FileData> {
    let mut f = File::open(p).at("open", p)?;
    let len = f.metadata().at("stat", p)?.len() as i64;
    let mut extents = Vec::new();
    let mut off = 0i64;
    while off < len {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole };
        extents.push((data as u64, end as u64));
        off = end;
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).at("read", p)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((Some(digest), extents))
}

/// Human-readable differences between two snapshots (empty when equal).
pub fn diff(expected: &Snapshot, actual: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => out.push(format!("missing: {}", p.display())),
            Some(a) if a != e => out.push(format!(
                "differs: {}\n  expected {e:?}\n  actual   {a:?}",
                p.display()
            )),
            _ => {}
        }
    }
    for p in actual.keys() {
        if !expected.contains_key(p) {
            out.push(format!("unexpected: {}", p.display()));
        }
    }
    out
}
