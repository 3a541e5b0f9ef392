//! An EROFS image of a tree's metadata: the metadata base of a metadata squash (issue 31),
//! written directly from the merged view, no tool and no mount in between.
//!
//! Why EROFS and not ext4: the base holds only metadata, read by every lookup of every volume.
//! An ext4 base on a loop device walked at 1.6x the host dir (inode tables spread over block
//! groups, one 4 KiB read per few inodes, 19 MiB for 16k stubs); EROFS packs the inodes of a
//! directory's entries next to each other, with their xattrs and the tails of small directories
//! and symlinks inline, so a cold walk reads a few contiguous MiB. Writing it is one pass over
//! the view plus a few MiB of output: no mkfs, no mount, no per-file syscalls into a scratch fs.
//! Debian's `mkfs.erofs` (1.5) would need a stub tree on disk first and writes every stub's
//! size as zeros; composefs's writer is C. The format (`fs/erofs/erofs_fs.h`) is small for
//! what a metadata base needs:
//!
//! - block 0: the superblock at byte 1024; 4 KiB blocks; the metadata area from block 1.
//! - every inode the 64-byte extended form (32-bit owners, 64-bit size, ns mtime), its xattrs
//!   inline after it, then its inline data; an inode is addressed by its `nid` (offset in the
//!   metadata area / 32) and never crosses a block when it fits in one (inline data must not).
//! - directories: blocks of `erofs_dirent`s (nid, name offset, type) followed by their names,
//!   all names of a directory in byte order across its blocks (lookups bisect), `.` and `..`
//!   included; the last, partial block inline when it fits, the rest in the data area.
//! - a stub: a chunk-based regular file of its exact size whose only chunk is a hole
//!   (`EROFS_NULL_ADDR`): no data at all, st_size right. Its `trusted.overlay.metacopy` and
//!   `trusted.overlay.redirect` send overlayfs to the data layers.
//! - symlinks inline (or in data blocks when long), device nodes by number, fifos, sockets.
//!
//! The image's root holds one directory, `upper`, the view's root: the layout of every layer
//! image (a layer's lower dir is `<mount>/upper`).

use crate::error::{Error, IoContext, Result};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::copy::CopyStats;
use super::manifest::{Entry, Manifest};
use super::OVERLAY_XATTR_PREFIX;
use std::ffi::OsStr;

/// The EROFS superblock's magic, at byte 1024 of the image (`EROFS_SUPER_MAGIC_V1`).
pub const MAGIC: u32 = 0xE0F5_E1E2;

const BLOCK: usize = 4096;
const BLOCK_BITS: u8 = 12;
const SUPER_OFFSET: usize = 1024;
/// The metadata area starts at block 1 (block 0 holds the superblock).
const META_BLKADDR: u32 = 1;
const INODE_SIZE: usize = 64;
const DIRENT_SIZE: usize = 12;
const XATTR_HEADER: usize = 12;
const NULL_ADDR: u32 = u32::MAX;
const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
const INCOMPAT_DEVICE_TABLE: u32 = 0x8;
/// `EROFS_CHUNK_FORMAT_INDEXES`: 8-byte chunk indexes (device id and block) instead of a
/// 4-byte block map.
const CHUNK_INDEXES: u32 = 0x20;
const CHUNK_INDEX_SIZE: usize = 8;
/// A device table slot: a 64-byte tag, the device's blocks, its mapped address, reserved.
const DEVICE_SLOT: usize = 128;
/// The device table starts at block 1 (`devt_slotoff` counts 128-byte slots from byte 0).
const DEVICE_TABLE_BLKADDR: usize = 1;

const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_CHUNK_BASED: u16 = 4;

/// `trusted.` in EROFS's xattr name indexes.
const XATTR_TRUSTED: u8 = 4;

/// The xattr name prefixes EROFS stores by index, and the two whole names it stores so.
const XATTR_PREFIXES: [(&str, u8); 3] =
    [("user.", 1), ("trusted.", XATTR_TRUSTED), ("security.", 6)];
const XATTR_WHOLE: [(&str, u8); 2] = [
    ("system.posix_acl_access", 2),
    ("system.posix_acl_default", 3),
];

/// Whether the file at `path` starts with an EROFS superblock.
pub fn is_erofs(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    f.read_exact_at(&mut magic, SUPER_OFFSET as u64).is_ok() && u32::from_le_bytes(magic) == MAGIC
}

/// The extra devices of the EROFS image at `path`, by their tags (a mapped base's data layer
/// images: file names next to it); empty for a base without a device table.
pub fn device_tags(path: &Path) -> Result<Vec<String>> {
    let f = fs::File::open(path).at("open", path)?;
    let mut sb = [0u8; 128];
    f.read_exact_at(&mut sb, SUPER_OFFSET as u64)
        .at("read the superblock of", path)?;
    if u32::from_le_bytes(sb[0..4].try_into().expect("4 bytes")) != MAGIC {
        return Ok(Vec::new());
    }
    let incompat = u32::from_le_bytes(sb[80..84].try_into().expect("4 bytes"));
    if incompat & INCOMPAT_DEVICE_TABLE == 0 {
        return Ok(Vec::new());
    }
    let count = u16::from_le_bytes([sb[86], sb[87]]) as usize;
    let start = u16::from_le_bytes([sb[88], sb[89]]) as u64 * DEVICE_SLOT as u64;
    let mut table = vec![0u8; count * DEVICE_SLOT];
    f.read_exact_at(&mut table, start)
        .at("read the device table of", path)?;
    table
        .chunks(DEVICE_SLOT)
        .map(|slot| {
            let tag = &slot[..64];
            let tag = &tag[..tag.iter().position(|&b| b == 0).unwrap_or(64)];
            match std::str::from_utf8(tag) {
                Ok(t) if !t.is_empty() && !t.contains('/') && t != "." && t != ".." => {
                    Ok(t.to_string())
                }
                _ => Err(Error::invalid(format!(
                    "{} names a data layer image {:?} that is no plain file name: remove the cache's damaged metadata base (cache squash NAME --full rebuilds it)",
                    path.display(),
                    String::from_utf8_lossy(tag)
                ))),
            }
        })
        .collect()
}

enum Body {
    /// Entries in name order (`.` and `..` included), each `(name, inode index)`.
    Dir(Vec<(Vec<u8>, usize)>),
    /// A regular file: a hole of its size (a stub, `None`), its chunks mapped onto the data
    /// layers' images, or nothing when empty.
    File(Option<Chunks>),
    Symlink(Vec<u8>),
    /// A device node (its number in the kernel's `new_encode_dev` form), fifo or socket.
    Special(u32),
}

/// A mapped file's chunks: each `2^bits` blocks, the device (1-based: 0 is the base itself)
/// and block where it starts, or [`NULL_ADDR`] for a hole.
#[derive(Debug, Clone)]
struct Chunks {
    bits: u32,
    index: Vec<(u16, u32)>,
}

/// A data layer's image as a mapped base's extra device.
pub(crate) struct Device {
    /// Its layer id, which manifests name.
    pub layer: String,
    /// Its file name, next to the base (the device table's tag: `mount_image` opens it).
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
}

/// How regular files get their data.
enum Data<'a> {
    /// Stubs redirecting overlayfs to the data-only layers.
    Stubs,
    /// Chunks mapped onto these devices.
    Mapped(&'a [Device]),
}

struct Inode {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    size: u64,
    nlink: u32,
    /// The inline xattr body (header and entries), empty without xattrs.
    xattrs: Vec<u8>,
    body: Body,
}

/// Where an inode's data goes: inline after its xattrs, in `blocks` data blocks from the data
/// area (plus an inline tail), or in its chunk map.
#[derive(Clone, Copy, Default)]
struct Placement {
    nid: u64,
    layout: u16,
    /// Bytes after the inode and its xattrs: the inline tail or the chunk map.
    extra: usize,
    /// Data blocks outside the metadata area, and the first of them.
    blocks: usize,
    start: u32,
}

/// Writes the tree of `m` (a merged view's manifest: the job's own `trusted.overlay.*` xattrs
/// stored escaped, overlayfs's own records absent) as a new EROFS image at `image`, each regular
/// file a stub of its size redirecting to its own path (`/` + its path) in the data-only layers
/// mounted below it. Entries of one link group stay hardlinked (one inode, the redirect of its
/// first path). Returns the entries written and the bytes the stubs reference (`bytes` counts
/// nothing: no data).
pub(crate) fn write_stub_image(m: &Manifest, image: &Path) -> Result<CopyStats> {
    write_image(m, Data::Stubs, image)
}

/// Writes the tree of `m` as a new EROFS image at `image` whose regular files read their bytes
/// straight from the data layers' images, `devices` (the image's extra devices, in this
/// order): each file's chunks point at its extents there (`Entry::layer`, `Entry::extents`,
/// which every regular file of `m` must have). No overlay redirect, no data-only layer: the
/// base alone is the whole tree, and a lookup or a read touches nothing else. Mounted from the
/// file itself with each device by path (`mounts::mount_image`).
pub(crate) fn write_mapped_image(
    m: &Manifest,
    devices: &[Device],
    image: &Path,
) -> Result<CopyStats> {
    write_image(m, Data::Mapped(devices), image)
}

fn write_image(m: &Manifest, data: Data, image: &Path) -> Result<CopyStats> {
    let devices = match data {
        Data::Mapped(d) => d,
        Data::Stubs => &[],
    };
    let (tree, stats) = tree_of(m, &data)?;
    let bytes = layout_and_encode(&tree, devices)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .at("create", image)?;
    file.write_all_at(&bytes, 0).at("write", image)?;
    file.sync_all().at("fsync", image)?;
    Ok(stats)
}

/// The tree of `m` as inodes: 0 the image's root, 1 `upper` (the tree's root).
fn tree_of(m: &Manifest, data: &Data) -> Result<(Vec<Inode>, CopyStats)> {
    let root = m
        .entries
        .first()
        .filter(|e| e.path.as_bytes().is_empty() && e.is_dir())
        .ok_or_else(|| Error::invalid("a manifest without its root directory"))?;
    let mut tree = vec![Inode {
        mode: libc::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: root.mtime,
        mtime_nsec: root.nsec,
        size: 0,
        nlink: 0,
        xattrs: Vec::new(),
        body: Body::Dir(vec![(b"upper".to_vec(), 1)]),
    }];
    let mut dirs: HashMap<&[u8], usize> = HashMap::new();
    let mut links: HashMap<u64, usize> = HashMap::new();
    let mut stats = CopyStats::default();
    for e in &m.entries {
        let path = e.path.as_bytes();
        if path.is_empty() {
            tree.push(inode(e, data)?);
            dirs.insert(path, 1);
            continue;
        }
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let parent = *dirs.get(parent).ok_or_else(|| {
            Error::invalid(format!(
                "manifest entry {} comes before its directory",
                String::from_utf8_lossy(path)
            ))
        })?;
        let index = match (e.link != 0).then(|| links.get(&e.link)).flatten() {
            Some(&i) => i,
            None => {
                tree.push(inode(e, data)?);
                if e.is_file() {
                    stats.referenced += e.allocated;
                }
                if e.link != 0 {
                    links.insert(e.link, tree.len() - 1);
                }
                tree.len() - 1
            }
        };
        if let Body::Dir(entries) = &mut tree[parent].body {
            entries.push((name.to_vec(), index));
        }
        if e.is_dir() {
            dirs.insert(path, index);
        }
        stats.entries += 1;
    }
    link_counts_and_dots(&mut tree);
    Ok((tree, stats))
}

/// One entry's inode; a regular file becomes a stub redirecting to its own path, or its
/// chunks mapped onto the devices. Of the `trusted.overlay.*` names only the job's own (stored
/// escaped, `trusted.overlay.overlay.*`) are kept: the others are overlayfs's records of the
/// layer they came from.
fn inode(e: &Entry, data: &Data) -> Result<Inode> {
    let path = Path::new(OsStr::from_bytes(e.path.as_bytes()));
    let body = match e.mode & libc::S_IFMT {
        libc::S_IFDIR => Body::Dir(Vec::new()),
        libc::S_IFREG => match data {
            Data::Stubs => Body::File(None),
            Data::Mapped(devices) => Body::File(Some(mapped_chunks(path, e, devices)?)),
        },
        libc::S_IFLNK => Body::Symlink(
            e.target
                .as_ref()
                .map(|t| t.as_bytes().to_vec())
                .unwrap_or_default(),
        ),
        _ => Body::Special(encode_dev(e.rdev)),
    };
    let size = match &body {
        Body::File(_) => e.size,
        Body::Symlink(t) => t.len() as u64,
        _ => 0,
    };
    let escaped = [OVERLAY_XATTR_PREFIX.as_bytes(), b"overlay."].concat();
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = e
        .xattrs
        .iter()
        .filter(|(n, _)| {
            let n = n.as_bytes();
            !n.starts_with(OVERLAY_XATTR_PREFIX.as_bytes()) || n.starts_with(&escaped)
        })
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    if matches!(body, Body::File(None)) {
        let metacopy = crate::host::mounts::METACOPY_XATTR.as_bytes().to_vec();
        let redirect = crate::host::mounts::REDIRECT_XATTR.as_bytes().to_vec();
        xattrs.push((metacopy, Vec::new()));
        xattrs.push((
            redirect,
            Path::new("/").join(path).as_os_str().as_bytes().to_vec(),
        ));
    }
    Ok(Inode {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        mtime_nsec: e.nsec,
        size,
        nlink: 0,
        xattrs: encode_xattrs(path, &xattrs)?,
        body,
    })
}

/// The chunks of the regular file `e` over `devices`: the largest chunk (a power of two of
/// blocks, at most the file's size rounded up) at which every extent starts and ends in the
/// file (but the one at the file's end), so that each chunk lies in one extent (contiguous in
/// the image from its start block) or one hole; then each chunk's device and block. Extents
/// must be 4 KiB aligned and within the device.
fn mapped_chunks(path: &Path, e: &Entry, devices: &[Device]) -> Result<Chunks> {
    let unmapped = || {
        Error::invalid(format!(
            "{} has no mapped extents for a metadata base (a bug: every file is mapped first)",
            path.display()
        ))
    };
    let extents = e.extents.as_ref().ok_or_else(unmapped)?;
    let layer = e.layer.as_deref().ok_or_else(unmapped)?;
    let device = devices
        .iter()
        .position(|d| d.layer == layer)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{} lies in layer {layer}, which is not among the metadata base's data layers",
                path.display()
            ))
        })?;
    let device = u16::try_from(device + 1)
        .map_err(|_| Error::invalid("more data layers than a metadata base can name"))?;
    let end = e.size.div_ceil(BLOCK as u64) * BLOCK as u64;
    let size = devices[usize::from(device) - 1].size;
    let mut align = 0u64;
    for &[logical, physical, length] in extents {
        if (logical | physical | length) % BLOCK as u64 != 0
            || physical.checked_add(length).is_none_or(|x| x > size)
        {
            return Err(Error::invalid(format!(
                "{}: extent {logical}+{length} at {physical} of layer {layer} is unaligned or past its image ({size} bytes): the manifest is damaged",
                path.display()
            )));
        }
        align |= logical;
        if logical + length < end {
            align |= length;
        }
    }
    let bits = if align == 0 {
        chunk_bits(e.size)
    } else {
        (align.trailing_zeros().saturating_sub(BLOCK_BITS as u32)).min(chunk_bits(e.size))
    };
    let chunk = (BLOCK as u64) << bits;
    let count = e.size.div_ceil(chunk) as usize;
    let mut index = Vec::with_capacity(count);
    let mut x = extents.iter().peekable();
    for i in 0..count as u64 {
        let at = i * chunk;
        while x.next_if(|&&[l, _, len]| l + len <= at).is_some() {}
        let entry = match x.peek() {
            Some(&&[l, p, _]) if l <= at => {
                let block = (p + (at - l)) / BLOCK as u64;
                let block = u32::try_from(block)
                    .ok()
                    .filter(|&b| b != NULL_ADDR)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{} lies past 16 TiB into its layer's image",
                            path.display()
                        ))
                    })?;
                (device, block)
            }
            _ => (0, NULL_ADDR),
        };
        index.push(entry);
    }
    Ok(Chunks { bits, index })
}

/// The kernel's `new_encode_dev`, which EROFS stores (`new_decode_dev` reads it back).
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The inline xattr body: a 12-byte header (no shared xattrs, no name filter), then each entry
/// (name length, prefix index, value size, name without its prefix, value) padded to 4 bytes.
fn encode_xattrs(path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut body = vec![0u8; XATTR_HEADER];
    for (name, value) in xattrs {
        let (index, suffix) = xattr_index(name).ok_or_else(|| {
            Error::invalid(format!(
                "xattr {} of {} has a namespace a metadata base cannot store (user., trusted., security. and POSIX ACLs): remove it, or make a full squash (`cache squash NAME --full`, or squash_method = \"full\")",
                String::from_utf8_lossy(name),
                path.display()
            ))
        })?;
        if suffix.len() > u8::MAX as usize || value.len() > u16::MAX as usize {
            return Err(Error::invalid(format!(
                "xattr {} of {} is too long for a metadata base: make a full squash (`cache squash NAME --full`, or squash_method = \"full\")",
                String::from_utf8_lossy(name),
                path.display()
            )));
        }
        body.push(suffix.len() as u8);
        body.push(index);
        body.extend_from_slice(&(value.len() as u16).to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    Ok(body)
}

fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    if let Some((_, i)) = XATTR_WHOLE.iter().find(|(n, _)| n.as_bytes() == name) {
        return Some((*i, &[]));
    }
    XATTR_PREFIXES
        .iter()
        .find(|(p, _)| name.starts_with(p.as_bytes()) && name.len() > p.len())
        .map(|(p, i)| (*i, &name[p.len()..]))
}

/// Adds `.` and `..` to every directory (in name order) and counts links: a directory has 2
/// plus one per subdirectory, anything else one per entry naming it.
fn link_counts_and_dots(tree: &mut [Inode]) {
    let mut parents = vec![0usize; tree.len()];
    let mut counts = vec![0u32; tree.len()];
    for (i, node) in tree.iter().enumerate() {
        if let Body::Dir(entries) = &node.body {
            for &(_, child) in entries {
                parents[child] = i;
                counts[child] += 1;
            }
        }
    }
    let is_dir: Vec<bool> = tree
        .iter()
        .map(|n| matches!(n.body, Body::Dir(_)))
        .collect();
    for (i, node) in tree.iter_mut().enumerate() {
        if let Body::Dir(entries) = &mut node.body {
            let subdirs = entries.iter().filter(|(_, c)| is_dir[*c]).count() as u32;
            node.nlink = 2 + subdirs;
            entries.push((b".".to_vec(), i));
            entries.push((b"..".to_vec(), parents[i]));
            entries.sort_by(|a, b| a.0.cmp(&b.0));
        } else {
            node.nlink = counts[i].max(1);
        }
    }
}

/// A directory's entries cut into blocks: each block the range of entries it holds and the
/// bytes it uses (dirents, then names; no name crosses a block).
fn dir_blocks(entries: &[(Vec<u8>, usize)]) -> Vec<(std::ops::Range<usize>, usize)> {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = DIRENT_SIZE + name.len();
        if used + need > BLOCK {
            blocks.push((start..i, used));
            (start, used) = (i, 0);
        }
        used += need;
    }
    blocks.push((start..entries.len(), used));
    blocks
}

#[cfg(test)]
fn dir_size(blocks: &[(std::ops::Range<usize>, usize)]) -> u64 {
    ((blocks.len() - 1) * BLOCK + blocks.last().map_or(0, |b| b.1)) as u64
}

/// The bytes of a directory's blocks (the last one only as long as it is used).
fn dir_bytes(entries: &[(Vec<u8>, usize)], tree: &[Inode], places: &[Placement]) -> Vec<u8> {
    let blocks = dir_blocks(entries);
    let mut out = Vec::with_capacity(blocks.len() * BLOCK);
    for (n, (range, used)) in blocks.iter().enumerate() {
        let base = n * BLOCK;
        let mut nameoff = range.len() * DIRENT_SIZE;
        for (name, child) in &entries[range.clone()] {
            out.extend_from_slice(&places[*child].nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(file_type(tree[*child].mode));
            out.push(0);
            nameoff += name.len();
        }
        for (name, _) in &entries[range.clone()] {
            out.extend_from_slice(name);
        }
        debug_assert_eq!(out.len() - base, *used);
        if n + 1 < blocks.len() {
            out.resize(base + BLOCK, 0);
        }
    }
    out
}

/// The generic `FT_*` type of a mode, as dirents carry it.
fn file_type(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 1,
        libc::S_IFDIR => 2,
        libc::S_IFCHR => 3,
        libc::S_IFBLK => 4,
        libc::S_IFIFO => 5,
        libc::S_IFSOCK => 6,
        libc::S_IFLNK => 7,
        _ => 0,
    }
}

/// Chunk bits (over the block size) of a stub: one chunk covers any file up to 8 TiB.
fn chunk_bits(size: u64) -> u32 {
    let bits = 64 - size.saturating_sub(1).leading_zeros();
    bits.saturating_sub(BLOCK_BITS as u32).min(31)
}

fn chunk_count(size: u64) -> usize {
    size.div_ceil((BLOCK as u64) << chunk_bits(size)) as usize
}

/// Orders the inodes so that a directory's entries sit next to each other (a walk stats them
/// in a row), places each in the metadata area and its outside data after it, and encodes the
/// whole image.
fn layout_and_encode(tree: &[Inode], devices: &[Device]) -> Result<Vec<u8>> {
    // The device table (a mapped base's data layers) in the blocks before the metadata area.
    let table_blocks = (devices.len() * DEVICE_SLOT).div_ceil(BLOCK);
    let meta_blkaddr = META_BLKADDR as usize + table_blocks;
    // Inline data and outside blocks, before any nid is known (they depend only on sizes).
    let mut places = vec![Placement::default(); tree.len()];
    for (node, place) in tree.iter().zip(places.iter_mut()) {
        let fixed = INODE_SIZE + node.xattrs.len();
        let (tail, full) = match &node.body {
            Body::Dir(entries) => {
                let blocks = dir_blocks(entries);
                (blocks.last().map_or(0, |b| b.1), blocks.len() - 1)
            }
            Body::Symlink(t) => (t.len() % BLOCK, t.len() / BLOCK),
            Body::File(None) if node.size > 0 => {
                place.layout = LAYOUT_CHUNK_BASED;
                place.extra = 4 * chunk_count(node.size);
                continue;
            }
            Body::File(Some(chunks)) if node.size > 0 => {
                // Chunk indexes start 8-byte aligned after the inode and its xattrs.
                place.layout = LAYOUT_CHUNK_BASED;
                place.extra =
                    node.xattrs.len() % CHUNK_INDEX_SIZE + CHUNK_INDEX_SIZE * chunks.index.len();
                continue;
            }
            _ => continue,
        };
        if tail > 0 && fixed + tail <= BLOCK {
            (place.layout, place.extra, place.blocks) = (LAYOUT_FLAT_INLINE, tail, full);
        } else {
            place.layout = LAYOUT_FLAT_PLAIN;
            place.blocks = full + (tail > 0) as usize;
        }
    }

    // The order: the root, then, directory by directory (depth first), its entries not yet
    // placed, in name order.
    let mut order = Vec::with_capacity(tree.len());
    let mut placed = vec![false; tree.len()];
    placed[0] = true;
    order.push(0);
    let mut dirs = vec![0usize];
    while let Some(d) = dirs.pop() {
        let Body::Dir(entries) = &tree[d].body else {
            continue;
        };
        let mut subdirs = Vec::new();
        for (name, child) in entries {
            if name == b"." || name == b".." || placed[*child] {
                continue;
            }
            placed[*child] = true;
            order.push(*child);
            if matches!(tree[*child].body, Body::Dir(_)) {
                subdirs.push(*child);
            }
        }
        dirs.extend(subdirs.into_iter().rev());
    }

    // nids: an inode (with its xattrs and inline data) never crosses a block when it fits in
    // one; a larger one starts a block. nid 0 stays unused: the kernel makes a nid the inode
    // number, and glibc's readdir skips entries whose inode number is 0 (the root's `.` and
    // `..` would vanish).
    let mut pos = 32usize;
    for &i in &order {
        let len = (INODE_SIZE + tree[i].xattrs.len() + places[i].extra).next_multiple_of(32);
        if len > BLOCK || pos % BLOCK + len > BLOCK {
            pos = pos.next_multiple_of(BLOCK);
        }
        places[i].nid = (pos / 32) as u64;
        pos += len;
    }
    let meta_blocks = pos.div_ceil(BLOCK);
    let mut next = meta_blkaddr + meta_blocks;
    for &i in &order {
        if places[i].blocks > 0 {
            places[i].start = u32::try_from(next).map_err(|_| {
                Error::invalid("the metadata base would pass 16 TiB: use squash_method = \"full\"")
            })?;
            next += places[i].blocks;
        }
    }
    let total_blocks =
        u32::try_from(next).map_err(|_| Error::invalid("the metadata base would pass 16 TiB"))?;
    // The superblock holds the root's nid in 16 bits: the root is placed first.
    debug_assert_eq!(places[0].nid, 1);

    let mut image = vec![0u8; total_blocks as usize * BLOCK];
    let meta = meta_blkaddr * BLOCK;
    let mut chunked = false;
    for (i, node) in tree.iter().enumerate() {
        let place = places[i];
        let at = meta + place.nid as usize * 32;
        let data = match &node.body {
            Body::Dir(entries) => dir_bytes(entries, tree, &places),
            Body::Symlink(t) => t.clone(),
            _ => Vec::new(),
        };
        let size = match &node.body {
            Body::Dir(_) => data.len() as u64,
            _ => node.size,
        };
        let i_u = match &node.body {
            Body::Special(rdev) => *rdev,
            Body::File(None) if place.layout == LAYOUT_CHUNK_BASED => {
                chunked = true;
                chunk_bits(size)
            }
            Body::File(Some(c)) if place.layout == LAYOUT_CHUNK_BASED => {
                chunked = true;
                CHUNK_INDEXES | c.bits
            }
            _ if place.blocks > 0 => place.start,
            _ => 0,
        };
        let icount = if node.xattrs.is_empty() {
            0
        } else {
            (node.xattrs.len() - XATTR_HEADER) / 4 + 1
        };
        let icount = u16::try_from(icount).map_err(|_| {
            Error::invalid(
                "an entry's xattrs are too large for a metadata base: use squash_method = \"full\"",
            )
        })?;
        let ino = &mut image[at..at + INODE_SIZE];
        put16(ino, 0, 1 | (place.layout << 1));
        put16(ino, 2, icount);
        put16(ino, 4, node.mode as u16);
        ino[8..16].copy_from_slice(&size.to_le_bytes());
        put32(ino, 16, i_u);
        put32(ino, 20, i as u32 + 1);
        put32(ino, 24, node.uid);
        put32(ino, 28, node.gid);
        ino[32..40].copy_from_slice(&node.mtime.to_le_bytes());
        put32(ino, 40, node.mtime_nsec);
        put32(ino, 44, node.nlink);
        let mut p = at + INODE_SIZE;
        image[p..p + node.xattrs.len()].copy_from_slice(&node.xattrs);
        p += node.xattrs.len();
        match place.layout {
            LAYOUT_CHUNK_BASED => match &node.body {
                Body::File(Some(c)) => {
                    p += node.xattrs.len() % CHUNK_INDEX_SIZE;
                    for &(device, block) in &c.index {
                        // startblk_hi 0 (32-bit blocks), device id, startblk_lo.
                        put16(&mut image, p + 2, device);
                        put32(&mut image, p + 4, block);
                        p += CHUNK_INDEX_SIZE;
                    }
                }
                _ => {
                    for _ in 0..chunk_count(size) {
                        put32(&mut image, p, NULL_ADDR);
                        p += 4;
                    }
                }
            },
            LAYOUT_FLAT_INLINE => {
                let full = place.blocks * BLOCK;
                let start = place.start as usize * BLOCK;
                image[start..start + full].copy_from_slice(&data[..full]);
                image[p..p + data.len() - full].copy_from_slice(&data[full..]);
            }
            _ if place.blocks > 0 => {
                let start = place.start as usize * BLOCK;
                image[start..start + data.len()].copy_from_slice(&data);
            }
            _ => {}
        }
    }

    let sb = &mut image[SUPER_OFFSET..SUPER_OFFSET + 128];
    put32(sb, 0, MAGIC);
    sb[12] = BLOCK_BITS;
    put16(sb, 14, places[0].nid as u16);
    sb[16..24].copy_from_slice(&(tree.len() as u64).to_le_bytes());
    put32(sb, 36, total_blocks);
    put32(sb, 40, meta_blkaddr as u32);
    // A filesystem UUID of its own, as mkfs gives one: overlayfs tells lower filesystems apart
    // by it (a null or shared UUID turns off features of an overlay with an upper dir).
    sb[48..64].copy_from_slice(&uuid());
    sb[64..74].copy_from_slice(b"jobcachefs");
    let mut incompat = if chunked { INCOMPAT_CHUNKED_FILE } else { 0 };
    if !devices.is_empty() {
        incompat |= INCOMPAT_DEVICE_TABLE;
        put16(sb, 86, devices.len() as u16);
        put16(sb, 88, (DEVICE_TABLE_BLKADDR * BLOCK / DEVICE_SLOT) as u16);
    }
    put32(sb, 80, incompat);
    for (i, d) in devices.iter().enumerate() {
        let at = DEVICE_TABLE_BLKADDR * BLOCK + i * DEVICE_SLOT;
        let tag = d.file.as_bytes();
        if tag.is_empty() || tag.len() >= 64 || tag.contains(&b'/') {
            return Err(Error::invalid(format!(
                "data layer image {:?} cannot be a metadata base's device tag",
                d.file
            )));
        }
        image[at..at + tag.len()].copy_from_slice(tag);
        let blocks = u32::try_from(d.size / BLOCK as u64).unwrap_or(u32::MAX);
        put32(&mut image, at + 64, blocks);
    }
    Ok(image)
}

/// 16 random bytes, a version-4 UUID.
fn uuid() -> [u8; 16] {
    use std::io::Read;
    let mut u = [0u8; 16];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        u.copy_from_slice(&(t ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_cut_into_blocks_without_splitting_a_name() {
        let entries: Vec<(Vec<u8>, usize)> = (0..400)
            .map(|i| (format!("name-{i:05}").into_bytes(), 0))
            .collect();
        let blocks = dir_blocks(&entries);
        // 22 bytes an entry: 186 fit a block.
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0], (0..186, 186 * 22));
        assert_eq!(blocks[2].0.end, 400);
        assert_eq!(dir_size(&blocks), (2 * BLOCK + 28 * 22) as u64);
    }

    #[test]
    fn a_stub_is_one_hole_chunk_whatever_its_size() {
        assert_eq!((chunk_bits(1), chunk_count(1)), (0, 1));
        assert_eq!((chunk_bits(4096), chunk_count(4096)), (0, 1));
        assert_eq!((chunk_bits(4097), chunk_count(4097)), (1, 1));
        assert_eq!(chunk_count(1 << 30), 1);
        assert_eq!(chunk_bits(1 << 43), 31);
        assert_eq!(chunk_count((1 << 43) + 1), 2, "past 8 TiB, two chunks");
    }

    #[test]
    fn a_mapped_file_takes_the_largest_chunk_its_extents_allow() {
        let devices = [
            Device {
                layer: "a".into(),
                file: "a.img".into(),
                size: 1 << 30,
            },
            Device {
                layer: "b".into(),
                file: "b.img".into(),
                size: 1 << 30,
            },
        ];
        let file = |size: u64, extents: Vec<[u64; 3]>| Entry {
            size,
            layer: Some("b".into()),
            extents: Some(extents),
            ..Entry::new(b"f", libc::S_IFREG | 0o644)
        };
        let map = |e: &Entry| mapped_chunks(Path::new("f"), e, &devices).unwrap();
        // 1 MiB contiguous at 2 MiB into b's image: one chunk, device 2.
        let c = map(&file(1 << 20, vec![[0, 2 << 20, 1 << 20]]));
        assert_eq!((c.bits, c.index.clone()), (8, vec![(2, 512)]));
        // Two extents 64 KiB apart in the file, the second ending the file unaligned: 16 KiB
        // chunks (the first extent's length), a hole between them.
        let c = map(&file(
            (64 << 10) + 5000,
            vec![[0, 1 << 20, 16 << 10], [64 << 10, 4 << 20, 8192]],
        ));
        assert_eq!(c.bits, 2);
        assert_eq!(
            c.index,
            vec![
                (2, 256),
                (0, NULL_ADDR),
                (0, NULL_ADDR),
                (0, NULL_ADDR),
                (2, 1024)
            ]
        );
        // Where it starts in the image does not matter: one chunk from block 1.
        let c = map(&file(8192, vec![[0, 4096, 8192]]));
        assert_eq!((c.bits, c.index.clone()), (1, vec![(2, 1)]));
        // Extents the image cannot hold, or unaligned: a damaged manifest.
        for bad in [[0, 1 << 30, 4096], [0, 100, 4096]] {
            assert!(mapped_chunks(Path::new("f"), &file(10, vec![bad]), &devices).is_err());
        }
        // A layer the base has no device for.
        let mut e = file(10, vec![[0, 4096, 4096]]);
        e.layer = Some("c".into());
        assert!(mapped_chunks(Path::new("f"), &e, &devices).is_err());
    }

    #[test]
    fn xattr_names_map_to_erofs_indexes_or_are_refused() {
        assert_eq!(
            xattr_index(b"trusted.overlay.redirect"),
            Some((4, &b"overlay.redirect"[..]))
        );
        assert_eq!(xattr_index(b"user.x"), Some((1, &b"x"[..])));
        assert_eq!(xattr_index(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(xattr_index(b"system.other"), None);
        assert_eq!(xattr_index(b"user."), None);
        let body =
            encode_xattrs(Path::new("f"), &[(b"user.ab".to_vec(), b"xyz".to_vec())]).unwrap();
        // Header, then 4 + 2 + 3 bytes padded to 12.
        assert_eq!(body.len(), XATTR_HEADER + 12);
        assert_eq!(&body[12..18], &[2, 1, 3, 0, b'a', b'b']);
        assert!(
            encode_xattrs(Path::new("f"), &[(b"system.x".to_vec(), vec![])])
                .unwrap_err()
                .to_string()
                .contains("system.x of f")
        );
    }

    #[test]
    fn device_numbers_are_stored_as_the_kernel_encodes_them() {
        assert_eq!(encode_dev(libc::makedev(1, 3)), 0x103);
        assert_eq!(encode_dev(libc::makedev(259, 0x12345)), 0x1231_0345);
    }

    #[test]
    fn an_image_has_the_superblock_and_every_inode_within_its_block() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        for i in 0..300 {
            fs::write(src.join(format!("d/file-with-a-long-name-{i:04}")), b"x").unwrap();
        }
        // Too long to sit inline after its inode: a data block of its own.
        std::os::unix::fs::symlink("ab/".repeat(1350), src.join("long-link")).unwrap();
        fs::hard_link(src.join("d/file-with-a-long-name-0000"), src.join("hl")).unwrap();
        let img = d.path().join("m.img");
        let m = crate::files::manifest::of_tree(&src, crate::files::manifest::Names::View).unwrap();
        let stats = write_stub_image(&m, &img).unwrap();
        assert_eq!(stats.entries, 303, "the hardlink is an entry too");
        assert!(is_erofs(&img));
        let bytes = fs::read(&img).unwrap();
        assert_eq!(bytes.len() % BLOCK, 0);
        let blocks = u32::from_le_bytes(bytes[1024 + 36..1024 + 40].try_into().unwrap());
        assert_eq!(blocks as usize * BLOCK, bytes.len());
        assert_eq!(bytes[1024 + 80] as u32, INCOMPAT_CHUNKED_FILE);
        // The root's nid (its inode number) is not 0; the UUID is not null.
        assert_eq!(u16::from_le_bytes([bytes[1024 + 14], bytes[1024 + 15]]), 1);
        assert_ne!(&bytes[1024 + 48..1024 + 64], &[0u8; 16]);
    }
}
