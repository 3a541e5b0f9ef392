//! A layer's manifest: every entry of its tree as the layer holds it — kind, owner, mode, ns
//! mtime, size, allocated bytes, device number, link target, inode number (hardlinks) and every
//! xattr under its stored name. A metadata squash works from manifests: one of the merged view
//! (walked through the kernel's overlay), or, when every layer it folds has one, the layers'
//! own merged here with overlayfs's rules ([`merge`]), which reads no layer at all.
//!
//! Names are as a layer stores them: the job's own `trusted.overlay.X` is
//! `trusted.overlay.overlay.X`; overlayfs's records (`trusted.overlay.opaque`, whiteouts,
//! origins) are other `trusted.overlay.*` names and mean something only in their layer.
//!
//! Written, temp → fsync → rename, as `layers/<id>.manifest` next to the layer image: by a
//! commit under `squash_method = "metadata"` (the upper's tree walked while the page cache
//! still holds it) and by every EROFS metadata base. Absent or unreadable, the squash walks the
//! view instead: a manifest only ever saves time.

use crate::error::{IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::walk::{walk_sorted, Step};
use super::OVERLAY_XATTR_PREFIX;

/// Bytes kept as text when they are UTF-8 (paths, most xattrs), else as numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Bytes {
    /// Valid UTF-8.
    Text(String),
    /// Anything else.
    Raw(Vec<u8>),
}

impl Bytes {
    /// `b`, as text when it is UTF-8.
    pub fn new(b: &[u8]) -> Bytes {
        match std::str::from_utf8(b) {
            Ok(s) => Bytes::Text(s.to_string()),
            Err(_) => Bytes::Raw(b.to_vec()),
        }
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Bytes::Text(s) => s.as_bytes(),
            Bytes::Raw(b) => b,
        }
    }
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path below the tree's root; empty for the root itself.
    pub path: Bytes,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds.
    pub mtime: i64,
    /// Modification time: nanoseconds.
    pub nsec: u32,
    /// Size of a file or a symlink's target; 0 otherwise.
    pub size: u64,
    /// Allocated bytes (`st_blocks` × 512).
    pub allocated: u64,
    /// Device number of a device node.
    #[serde(default)]
    pub rdev: u64,
    /// Entries with the same `link` in one tree are hardlinks of one inode (0: none).
    #[serde(default)]
    pub link: u64,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Bytes>,
    /// Every xattr, by its stored name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(Bytes, Bytes)>,
    /// A regular file: the layer whose image holds its bytes; `None` for the layer this
    /// manifest describes ([`merge`] fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// A regular file: where its bytes lie in that layer's image, `[offset in the file, offset
    /// in the image, length]`, 4 KiB aligned, by file offset (gaps read as zeros). `None` when
    /// not mapped (then a metadata squash maps the file itself, [`super::fiemap`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<[u64; 3]>>,
}

impl Entry {
    /// An entry of `path` and `mode` owned by root, every other field zero or empty.
    pub fn new(path: &[u8], mode: u32) -> Entry {
        Entry {
            path: Bytes::new(path),
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            nsec: 0,
            size: 0,
            allocated: 0,
            rdev: 0,
            link: 0,
            target: None,
            xattrs: Vec::new(),
            layer: None,
            extents: None,
        }
    }
    fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    /// A directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    /// A regular file.
    pub fn is_file(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
    fn xattr(&self, name: &str) -> Option<&[u8]> {
        self.xattrs
            .iter()
            .find(|(n, _)| n.as_bytes() == name.as_bytes())
            .map(|(_, v)| v.as_bytes())
    }
    /// A whiteout of an overlay upper: a 0/0 character device, or an empty file marked
    /// `trusted.overlay.whiteout` (the kernel's xwhiteouts).
    fn is_whiteout(&self) -> bool {
        (self.kind() == libc::S_IFCHR && self.rdev == 0)
            || (self.is_file()
                && self.size == 0
                && self.xattr("trusted.overlay.whiteout").is_some())
    }
    fn is_opaque(&self) -> bool {
        self.is_dir() && self.xattr("trusted.overlay.opaque") == Some(b"y")
    }
}

/// A tree's entries in walk order: the root first, a directory before what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The UUID of the image whose tree this is ([`image_uuid`]): a manifest is used only with
    /// that image (one left by an earlier volume at the same DIR names another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The entries, root first.
    pub entries: Vec<Entry>,
}

/// The filesystem UUID in the superblock of the ext4 or EROFS image at `path`, as hex: what
/// ties a manifest to its layer's image. `None` for anything else or an unreadable file.
pub fn image_uuid(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut sb = [0u8; 256];
    f.read_exact_at(&mut sb, 1024).ok()?;
    let uuid = if u32::from_le_bytes(sb[0..4].try_into().ok()?) == super::erofs::MAGIC {
        &sb[48..64]
    } else if u16::from_le_bytes([sb[0x38], sb[0x39]]) == 0xEF53 {
        &sb[0x68..0x78]
    } else {
        return None;
    };
    Some(uuid.iter().map(|b| format!("{b:02x}")).collect())
}

/// The manifest at `path` if it describes the image at `image` (see [`Manifest::image`]).
pub fn read_for(path: &Path, image: &Path) -> Option<Manifest> {
    let m = read(path)?;
    if m.image.is_some() && m.image == image_uuid(image) {
        Some(m)
    } else {
        tracing::warn!(manifest = %path.display(), image = %image.display(), "a layer manifest of another image: the squash walks the view instead");
        None
    }
}

/// How [`of_tree`] names xattrs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// As the tree stores them (a layer's upper dir).
    Stored,
    /// A merged overlay view, which shows the job's `trusted.overlay.X` unescaped: escaped.
    View,
}

/// The manifest of the tree at `root`.
pub fn of_tree(root: &Path, names: Names) -> Result<Manifest> {
    of_tree_within(root, names, usize::MAX, false).map(|m| m.unwrap_or_default())
}

/// Entries a commit walks for its layer's manifest at most: the walk is on the delete's path
/// (about 20 µs an entry), and past this a commit's latency matters more than the squash's
/// (which then walks the view).
pub const COMMIT_ENTRIES_MAX: usize = 250_000;

/// [`of_tree`], or `None` as soon as the tree has more than `max` entries. With `extents`, each
/// regular file's extents too (`root` is on the filesystem of an image whose blocks stay where
/// they are: a committed upper, synced first; a file whose extents cannot be mapped has none).
pub fn of_tree_within(
    root: &Path,
    names: Names,
    max: usize,
    extents: bool,
) -> Result<Option<Manifest>> {
    let mut links: HashMap<(u64, u64), u64> = HashMap::new();
    let mut entries = vec![entry(
        root,
        Path::new(""),
        &std::fs::symlink_metadata(root).at("stat", root)?,
        names,
        &mut links,
        false,
    )?];
    let walked = walk_sorted(root, &mut |step| {
        if let Step::Entry(e) = step {
            if entries.len() > max {
                return Err(crate::error::Error::invalid("too many entries"));
            }
            entries.push(entry(e.path, e.rel, e.md, names, &mut links, extents)?);
        }
        Ok(())
    });
    if entries.len() > max {
        return Ok(None);
    }
    walked?;
    Ok(Some(Manifest {
        image: None,
        entries,
    }))
}

fn entry(
    path: &Path,
    rel: &Path,
    md: &std::fs::Metadata,
    names: Names,
    links: &mut HashMap<(u64, u64), u64>,
    extents: bool,
) -> Result<Entry> {
    let ft = md.file_type();
    let extents = if extents && ft.is_file() {
        super::fiemap::extents_of(path, md.len())?
    } else {
        None
    };
    let link = if !ft.is_dir() && md.nlink() > 1 {
        let next = links.len() as u64 + 1;
        *links.entry((md.dev(), md.ino())).or_insert(next)
    } else {
        0
    };
    let mut xattrs = Vec::new();
    for name in xattr::list(path).at("list xattrs of", path)? {
        let Some(value) = xattr::get(path, &name).at("read xattr of", path)? else {
            continue;
        };
        let name = name.as_bytes();
        let stored = match names {
            Names::View if name.starts_with(OVERLAY_XATTR_PREFIX.as_bytes()) => {
                let rest = &name[OVERLAY_XATTR_PREFIX.len()..];
                [OVERLAY_XATTR_PREFIX.as_bytes(), b"overlay.", rest].concat()
            }
            _ => name.to_vec(),
        };
        xattrs.push((Bytes::new(&stored), Bytes::new(&value)));
    }
    Ok(Entry {
        path: Bytes::new(rel.as_os_str().as_bytes()),
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        nsec: md.mtime_nsec() as u32,
        size: if ft.is_symlink() || ft.is_file() {
            md.len()
        } else {
            0
        },
        allocated: md.blocks() * 512,
        rdev: if ft.is_char_device() || ft.is_block_device() {
            md.rdev()
        } else {
            0
        },
        link,
        target: if ft.is_symlink() {
            Some(Bytes::new(
                std::fs::read_link(path)
                    .at("read link", path)?
                    .as_os_str()
                    .as_bytes(),
            ))
        } else {
            None
        },
        xattrs,
        layer: None,
        extents,
    })
}

/// Writes `m` at `path` (temp → fsync → rename: `fsutil::write_json_atomic`).
pub fn write(m: &Manifest, path: &Path) -> Result<()> {
    crate::state::fsutil::write_json_atomic(path, m)
}

/// The manifest at `path`, if there is a readable one (a damaged one only costs the squash a
/// walk of the view).
pub fn read(path: &Path) -> Option<Manifest> {
    crate::state::fsutil::read_json(path).unwrap_or_else(|e| {
        tracing::warn!(manifest = %path.display(), error = %e, "unreadable layer manifest: the squash walks the view instead");
        None
    })
}

/// What the layers `layers` (bottom first, each an upper as overlayfs writes it) show stacked,
/// as one tree (a base: no whiteouts, no opacity), by overlayfs's rules, applied bottom first
/// (those of [`super::merge`]): a whiteout removes what the path held; an opaque directory
/// replaces it; a plain directory over a directory takes its place and keeps what it holds,
/// over anything else replaces it; anything else replaces the path. Hardlinks stay linked
/// within the layer that holds them. Each layer comes with its id: a regular file it holds
/// itself (no `layer` of its own) is named as that layer's; an empty id names none (a stub
/// base's files, whose bytes are in its data layers).
pub fn merge(layers: &[(&str, Manifest)]) -> Manifest {
    let mut tree: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    // Link groups of different layers are different inodes: renumbered per (layer, group).
    let mut groups: HashMap<(usize, u64), u64> = HashMap::new();
    for (n, (id, layer)) in layers.iter().enumerate() {
        for e in &layer.entries {
            let path = e.path.as_bytes().to_vec();
            let keeps_below =
                e.is_dir() && !e.is_opaque() && tree.get(&path).is_some_and(|o| o.is_dir());
            if !keeps_below {
                remove_below(&mut tree, &path);
            }
            if e.is_whiteout() {
                tree.remove(&path);
                continue;
            }
            let mut e = e.clone();
            if e.is_file() && e.layer.is_none() && !id.is_empty() {
                e.layer = Some(id.to_string());
            }
            if e.link != 0 {
                let next = groups.len() as u64 + 1;
                e.link = *groups.entry((n, e.link)).or_insert(next);
            }
            tree.insert(path, e);
        }
    }
    Manifest {
        image: None,
        entries: tree.into_values().collect(),
    }
}

/// Removes everything strictly below `path` (and `path` is replaced by the caller).
fn remove_below(tree: &mut BTreeMap<Vec<u8>, Entry>, path: &[u8]) {
    let prefix: Vec<u8> = if path.is_empty() {
        Vec::new()
    } else {
        [path, b"/"].concat()
    };
    let doomed: Vec<Vec<u8>> = tree
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        tree.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, mode: u32) -> Entry {
        Entry::new(path.as_bytes(), mode)
    }
    const D: u32 = libc::S_IFDIR | 0o755;
    const F: u32 = libc::S_IFREG | 0o644;
    const WHITEOUT: u32 = libc::S_IFCHR;

    fn paths(m: &Manifest) -> Vec<String> {
        m.entries
            .iter()
            .map(|e| String::from_utf8_lossy(e.path.as_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn layers_merge_as_overlayfs_shows_them() {
        let lower = Manifest {
            image: None,
            entries: vec![
                e("", D),
                e("a", D),
                e("a/x", F),
                e("a/y", F),
                e("b", D),
                e("b/z", F),
                e("c", F),
                e("d", D),
                e("d/w", F),
            ],
        };
        let mut opaque = e("b", D);
        opaque
            .xattrs
            .push((Bytes::new(b"trusted.overlay.opaque"), Bytes::new(b"y")));
        let upper = Manifest {
            image: None,
            entries: vec![
                e("", D),
                e("a", D),
                e("a/x", WHITEOUT),
                e("a/new", F),
                opaque,
                e("b/fresh", F),
                e("c", D),
                e("c/inside", F),
                e("d", WHITEOUT),
            ],
        };
        let m = merge(&[("l0", lower), ("l1", upper)]);
        assert_eq!(
            paths(&m),
            ["", "a", "a/new", "a/y", "b", "b/fresh", "c", "c/inside"]
        );
        // A dir named like a file's prefix is not below it.
        let m = merge(&[
            (
                "l0",
                Manifest {
                    image: None,
                    entries: vec![
                        e("", D),
                        e("a", D),
                        e("a/f", F),
                        e("a-b", F),
                        e("a.c", D),
                        e("a.c/g", F),
                    ],
                },
            ),
            (
                "l1",
                Manifest {
                    image: None,
                    entries: vec![e("", D), e("a", WHITEOUT)],
                },
            ),
        ]);
        assert_eq!(paths(&m), ["", "a-b", "a.c", "a.c/g"]);
        // Each file names the layer that holds it.
        let layers: Vec<Option<&str>> = m.entries.iter().map(|e| e.layer.as_deref()).collect();
        assert_eq!(layers, [None, Some("l0"), None, Some("l0")]);
    }

    #[test]
    fn link_groups_of_different_layers_stay_apart() {
        let linked = |p: &str, link| Entry { link, ..e(p, F) };
        let m = merge(&[
            (
                "l0",
                Manifest {
                    image: None,
                    entries: vec![e("", D), linked("a", 1), linked("b", 1), linked("c", 2)],
                },
            ),
            (
                "l1",
                Manifest {
                    image: None,
                    entries: vec![e("", D), linked("d", 1), linked("e", 1), e("b", WHITEOUT)],
                },
            ),
        ]);
        let links: Vec<u64> = m.entries.iter().map(|e| e.link).collect();
        // a (group 1 of layer 0), c (group 2 of layer 0), d and e (group 1 of layer 1).
        assert_eq!(paths(&m), ["", "a", "c", "d", "e"]);
        assert_eq!(links, [0, 1, 2, 3, 3]);
    }

    #[test]
    fn a_tree_past_the_bound_has_no_manifest() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(d.path().join(format!("f{i}")), b"x").unwrap();
        }
        let m = of_tree_within(d.path(), Names::Stored, 6, false)
            .unwrap()
            .unwrap();
        assert_eq!(m.entries.len(), 6, "the root and 5 files");
        assert_eq!(
            of_tree_within(d.path(), Names::Stored, 5, false).unwrap(),
            None
        );
    }

    #[test]
    fn non_utf8_names_and_values_round_trip() {
        let mut x = e("caf\u{e9}", F);
        x.path = Bytes::new(b"bad-\xff");
        x.xattrs
            .push((Bytes::new(b"user.v"), Bytes::new(&[0, 159, 146, 150])));
        let m = Manifest {
            image: None,
            entries: vec![x],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
    }
}
