//! A comparable snapshot of a directory tree: what a user would call "the same files" (content,
//! type, mode, owner, symlink target, hardlink groups, xattrs without `trusted.overlay.*`, data
//! extents of sparse files, nanosecond mtimes). Used by the integration tests, with the kernel's
//! merged overlay view as the oracle.

use crate::error::{IoContext, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::is_overlay_xattr;
use super::sparse::data_extents;
use super::walk::{self, walk_sorted, Step};

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
    /// For a hardlinked file: the first path of its link group within the tree (a file whose
    /// other links are outside the tree, or hidden by an overlay's whiteouts, has none: its
    /// `st_nlink` counts names the tree does not show, and no copy keeps those).
    pub link_of: Option<PathBuf>,
}

/// A tree snapshot keyed by path relative to the root (the root itself is not included).
pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Takes a snapshot of the tree under `root`.
pub fn snapshot(root: &Path) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut links = HashMap::new();
    walk_sorted(root, &mut |step| {
        if let Step::Entry(e) = step {
            out.insert(e.rel.to_path_buf(), entry(&e, &mut links)?);
        }
        Ok(())
    })?;
    // A link group of one path is no link group.
    let mut names: HashMap<PathBuf, usize> = HashMap::new();
    for first in out.values().filter_map(|e| e.link_of.clone()) {
        *names.entry(first).or_default() += 1;
    }
    for e in out.values_mut() {
        if e.link_of.as_ref().is_some_and(|f| names[f] < 2) {
            e.link_of = None;
        }
    }
    Ok(out)
}

/// One letter for a file type: `f` file, `d` dir, `l` symlink, `c`/`b` device, `p` fifo,
/// `s` socket (what snapshots and clone manifests record).
pub(crate) fn kind_char(ft: &std::fs::FileType) -> char {
    if ft.is_dir() {
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
    }
}

fn entry(e: &walk::Entry<'_>, links: &mut HashMap<(u64, u64), PathBuf>) -> Result<Entry> {
    let (p, md) = (e.path, e.md);
    let ft = md.file_type();
    let kind = kind_char(&ft);
    let mut xattrs = BTreeMap::new();
    for n in xattr::list(p).at("list xattrs of", p)? {
        if is_overlay_xattr(&n) {
            continue;
        }
        if let Some(v) = xattr::get(p, &n).at("read xattr of", p)? {
            xattrs.insert(n.to_string_lossy().into_owned(), v);
        }
    }
    let link_of = if kind != 'd' && md.nlink() > 1 {
        Some(
            links
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| e.rel.to_path_buf())
                .clone(),
        )
    } else {
        None
    };
    let (digest, extents) = if kind == 'f' {
        file_data(p)?
    } else {
        (None, Vec::new())
    };
    Ok(Entry {
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
            Some(fs::read_link(p).at("read link", p)?)
        } else {
            None
        },
        xattrs,
        digest,
        extents,
        link_of,
    })
}

/// A file's content digest and its data extents.
type FileData = (Option<String>, Vec<(u64, u64)>);

fn file_data(p: &Path) -> Result<FileData> {
    let mut f = File::open(p).at("open", p)?;
    let len = f.metadata().at("stat", p)?.len();
    let extents = data_extents(&f, len, p)?;
    // SEEK_DATA/SEEK_HOLE moved the offset (to the end, for a file without holes): hash from 0.
    f.rewind().at("seek", p)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_covers_the_whole_content() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"one").unwrap();
        std::fs::write(d.path().join("b"), b"two").unwrap();
        let s = snapshot(d.path()).unwrap();
        let (a, b) = (&s[Path::new("a")], &s[Path::new("b")]);
        assert_eq!(
            a.digest.as_deref(),
            Some(&*format!("{:x}", Sha256::digest(b"one")))
        );
        assert_ne!(a.digest, b.digest, "different content, same digest");
        assert!(!diff(&s, &snapshot(d.path()).unwrap()).iter().any(|_| true));
        std::fs::write(d.path().join("b"), b"TWO").unwrap();
        assert_eq!(diff(&s, &snapshot(d.path()).unwrap()).len(), 1);
    }
}
