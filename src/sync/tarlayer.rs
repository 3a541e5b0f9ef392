//! An overlay upper tree ⇄ an OCI layer tar.
//!
//! Export ([`write_layer`]) walks a layer's upper tree in name order (so the same tree always
//! makes the same bytes, and the same blob digest) and writes a PAX tar: owners and modes,
//! nanosecond mtimes (PAX `mtime`), xattrs (PAX `SCHILY.xattr.*`, minus `trusted.overlay.*`),
//! hardlinks, symlinks, FIFOs and device nodes; overlay whiteouts (char 0/0) become `.wh.<name>`
//! and opaque directories (`trusted.overlay.opaque=y`) get a `.wh..wh..opq` entry, as the OCI
//! image spec says. Sparse files are written in full (holes as zeros, which zstd shrinks to
//! almost nothing) and made sparse again on import.
//!
//! Import is two passes over the same blob: [`scan_layer`] validates every entry and sums what it
//! claims before anything is created (a hostile layer is refused with nothing changed), then
//! [`extract_layer`] writes the tree into a fresh, never-networked ext4 image, turning `.wh.`
//! entries back into overlay whiteouts and runs of zero blocks into holes.
//!
//! Clone-mode caches ([`write_clone_layer`], [`ImportPolicy::clone`]) hold a job's own data,
//! in which whiteout devices and `trusted.overlay.*` xattrs (container storage's overlay layers)
//! are files like any other: there a char 0/0 device is a tar `Char` entry 0/0, an overlay xattr
//! travels under the PAX key `JOBCACHEFS.xattr.<name>` (so tools that read the image as an
//! ordinary one, and the overlay-mode import, never take it for their own), the tree's root
//! is the entry `./`, symlinks may point anywhere (they are never followed: parents must be real
//! directories), and the only OCI whiteouts are `.wh.<name>` entries of a delta layer, which
//! delete what a lower layer had.

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::files::walk::{walk_sorted, Entry, Step};
use crate::files::{is_overlay_xattr, OVERLAY_XATTR_PREFIX};
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const XATTR_PAX: &str = "SCHILY.xattr.";
/// PAX key prefix of a clone layer's `trusted.overlay.*` xattrs (data of the job's).
const CLONE_XATTR_PAX: &str = "JOBCACHEFS.xattr.";
const BLOCK: usize = 4096;

/// What a layer tar holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries (whiteouts included).
    pub entries: u64,
    /// Bytes of regular file content (apparent sizes).
    pub bytes: u64,
}

fn bad(msg: String) -> Error {
    Error::invalid(msg)
}

/// An image refused for what it contains: the message names the entry or field and the reason.
pub(crate) fn refuse(msg: String) -> Error {
    Error::invalid(format!("refusing the image: {msg}"))
}

/// A failure reading the layer's tar: the bytes themselves (refused), or the reading of them —
/// a download cut off or timed out, a full disk under a copy — which a retry may get past.
fn malformed(e: std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::InvalidData | K::InvalidInput | K::UnexpectedEof | K::Other => {
            refuse(format!("a layer is not a well-formed tar ({e})"))
        }
        _ => Error::new(
            ErrorKind::Unavailable,
            format!("reading a layer failed ({e}): try again"),
        ),
    }
}

/// The target of a link entry, or a refusal naming the entry.
fn link_target(entry: &tar::Entry<impl Read>, raw: &Path, what: &str) -> Result<PathBuf> {
    Ok(entry
        .link_name()
        .map_err(malformed)?
        .ok_or_else(|| {
            refuse(format!(
                "{what} {:?} has no target",
                raw.display().to_string()
            ))
        })?
        .into_owned())
}

/// Writes the tree under `root` as an OCI layer tar to `out`.
pub(crate) fn write_layer(root: &Path, out: impl Write) -> Result<LayerStats> {
    let mut b = tar::Builder::new(out);
    let mut w = Writer {
        links: HashMap::new(),
        stats: LayerStats::default(),
        clone: false,
    };
    walk_sorted(root, &mut |step| match step {
        Step::Entry(e) => w.visit(&e, &mut b),
        Step::DirDone(_) => Ok(()),
    })?;
    b.finish().ctx(|| "finish the layer tar".into())?;
    Ok(w.stats)
}

/// Writes a clone cache's tree under `root` as a layer tar (see the module doc): whiteouts for
/// `deleted` (paths a lower layer has), the root, then every entry of the tree, or only those in
/// `include` (a delta: it must hold whole hardlink groups and the parents of what it holds).
pub(crate) fn write_clone_layer(
    root: &Path,
    out: impl Write,
    include: Option<&std::collections::HashSet<PathBuf>>,
    deleted: &[PathBuf],
) -> Result<LayerStats> {
    let mut b = tar::Builder::new(out);
    let mut w = Writer {
        links: HashMap::new(),
        stats: LayerStats::default(),
        clone: true,
    };
    for d in deleted {
        let Some(name) = d.file_name() else { continue };
        let wh = d.with_file_name(format!("{WHITEOUT_PREFIX}{}", name.to_string_lossy()));
        w.marker(&wh, &mut b)?;
    }
    let md = fs::symlink_metadata(root).at("stat", root)?;
    w.entry(root, Path::new(""), &md, &mut b)?;
    walk_sorted(root, &mut |step| match step {
        Step::Entry(e) if include.is_none_or(|i| i.contains(e.rel)) => w.visit(&e, &mut b),
        _ => Ok(()),
    })?;
    b.finish().ctx(|| "finish the layer tar".into())?;
    Ok(w.stats)
}

struct Writer {
    links: HashMap<(u64, u64), PathBuf>,
    stats: LayerStats,
    /// A clone cache's tree: whiteout devices and overlay xattrs are data.
    clone: bool,
}

impl Writer {
    /// Writes one entry of the walk (a directory's contents follow as their own steps).
    fn visit<W: Write>(&mut self, e: &Entry<'_>, b: &mut tar::Builder<W>) -> Result<()> {
        let (path, rel, name, md) = (e.path, e.rel, e.name, e.md);
        if name
            .as_encoded_bytes()
            .starts_with(WHITEOUT_PREFIX.as_bytes())
        {
            return Err(bad(format!(
                "{} is named like an OCI whiteout: it cannot be exported; rename or remove it",
                path.display()
            )));
        }
        let ft = md.file_type();
        if ft.is_char_device() && md.rdev() == 0 && !self.clone {
            let wh = rel.with_file_name(format!("{WHITEOUT_PREFIX}{}", name.to_string_lossy()));
            return self.marker(&wh, b);
        }
        if ft.is_socket() {
            tracing::warn!(path = %path.display(), "sockets are not exported");
            return Ok(());
        }
        self.entry(path, rel, md, b)?;
        if ft.is_dir()
            && !self.clone
            && xattr::get(path, OPAQUE_XATTR)
                .at("read xattr of", path)?
                .as_deref()
                == Some(b"y")
        {
            self.marker(&rel.join(OPAQUE), b)?;
        }
        Ok(())
    }

    /// An empty regular file entry: a whiteout or the opaque marker.
    fn marker<W: Write>(&mut self, rel: &Path, b: &mut tar::Builder<W>) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        self.stats.entries += 1;
        append(b, h, rel, None, Vec::new(), std::io::empty())
    }

    fn entry<W: Write>(
        &mut self,
        path: &Path,
        rel: &Path,
        md: &fs::Metadata,
        b: &mut tar::Builder<W>,
    ) -> Result<()> {
        let ft = md.file_type();
        let mut h = tar::Header::new_ustar();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(md.uid() as u64);
        h.set_gid(md.gid() as u64);
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if md.mtime_nsec() != 0 || md.mtime() < 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", md.mtime(), md.mtime_nsec()).into_bytes(),
            ));
        }
        for name in xattr::list(path).at("list xattrs of", path)? {
            let key = match (is_overlay_xattr(&name), self.clone) {
                (true, false) => continue,
                (true, true) => CLONE_XATTR_PAX,
                (false, _) => XATTR_PAX,
            };
            if let Some(v) = xattr::get(path, &name).at("read xattr of", path)? {
                pax.push((format!("{key}{}", name.to_string_lossy()), v));
            }
        }
        self.stats.entries += 1;
        if ft.is_file() && md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                return append(b, h, rel, Some(&first.clone()), pax, std::io::empty());
            }
            self.links.insert((md.dev(), md.ino()), rel.to_path_buf());
        }
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            append(b, h, rel, None, pax, std::io::empty())
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            self.stats.bytes += md.len();
            let f = fs::File::open(path).at("open", path)?;
            append(b, h, rel, None, pax, f.take(md.len()))
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(path).at("read link", path)?;
            append(b, h, rel, Some(&target), pax, std::io::empty())
        } else if ft.is_fifo() {
            h.set_entry_type(tar::EntryType::Fifo);
            append(b, h, rel, None, pax, std::io::empty())
        } else {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            let rdev = md.rdev();
            h.set_device_major(nix::sys::stat::major(rdev) as u32)
                .ctx(|| format!("device number of {}", path.display()))?;
            h.set_device_minor(nix::sys::stat::minor(rdev) as u32)
                .ctx(|| format!("device number of {}", path.display()))?;
            append(b, h, rel, None, pax, std::io::empty())
        }
    }
}

/// Appends one entry; names and link targets that do not fit the ustar fields go in PAX.
fn append<W: Write>(
    b: &mut tar::Builder<W>,
    mut h: tar::Header,
    rel: &Path,
    link: Option<&Path>,
    mut pax: Vec<(String, Vec<u8>)>,
    data: impl Read,
) -> Result<()> {
    let name = rel.as_os_str().as_encoded_bytes().to_vec();
    let is_dir = h.entry_type() == tar::EntryType::Directory;
    let mut name = name;
    if name.is_empty() {
        name.push(b'.'); // the root of a clone layer: `./`
    }
    if is_dir {
        name.push(b'/');
    }
    if name.len() > 100 {
        pax.push(("path".into(), name.clone()));
        name.truncate(100);
    }
    h.as_old_mut().name[..name.len()].copy_from_slice(&name);
    if let Some(l) = link {
        let mut l = l.as_os_str().as_encoded_bytes().to_vec();
        if l.len() > 100 {
            pax.push(("linkpath".into(), l.clone()));
            l.truncate(100);
        }
        h.as_old_mut().linkname[..l.len()].copy_from_slice(&l);
    }
    if !pax.is_empty() {
        pax.sort();
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .ctx(|| "write the layer tar".into())?;
    }
    h.set_cksum();
    b.append(&h, data).ctx(|| "write the layer tar".into())
}

/// What import allows beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportPolicy {
    /// Accept character and block device nodes (whiteouts are always fine).
    pub allow_devices: bool,
    /// Refuse a layer whose files claim more than this many bytes in all.
    pub max_bytes: u64,
    /// A clone cache's layer (see the module doc): char 0/0 devices and overlay xattrs are
    /// data, symlinks may point anywhere, `.wh.` entries only delete, and the root's metadata is
    /// applied.
    pub clone: bool,
}

/// One validated tar entry.
struct Checked {
    rel: PathBuf,
    kind: Kind,
}

enum Kind {
    Whiteout(PathBuf),
    Opaque(PathBuf),
    Entry,
}

/// A relative, normal path inside the layer, or an error naming the entry.
fn clean(raw: &Path, what: &str) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(format!(
                    "{what} {:?} escapes the layer's root",
                    raw.display().to_string()
                )))
            }
        }
    }
    Ok(out)
}

/// Whether `target`, a symlink in `dir`, stays inside the root when resolved lexically.
fn stays_inside(dir: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = dir.components().count() as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

fn check_entry(
    entry: &mut tar::Entry<impl Read>,
    policy: &ImportPolicy,
    seen: &mut BTreeSet<PathBuf>,
) -> Result<Checked> {
    let raw = entry
        .path()
        .ctx(|| "read a tar entry's path".into())?
        .into_owned();
    let rel = clean(&raw, "entry")?;
    if rel.as_os_str().is_empty() {
        return Ok(Checked {
            rel,
            kind: Kind::Entry,
        });
    }
    let name = rel.file_name().unwrap().to_string_lossy().into_owned();
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let et = entry.header().entry_type();
    if name == OPAQUE {
        if policy.clone {
            return Err(refuse(format!(
                "{:?} is an opaque marker, which a clone cache's layers never hold",
                raw.display().to_string()
            )));
        }
        return Ok(Checked {
            rel,
            kind: Kind::Opaque(parent),
        });
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty()
            || hidden.starts_with(WHITEOUT_PREFIX)
            || hidden == "."
            || hidden == ".."
        {
            return Err(refuse(format!(
                "unknown whiteout entry {:?}",
                raw.display().to_string()
            )));
        }
        return Ok(Checked {
            kind: Kind::Whiteout(parent.join(hidden)),
            rel,
        });
    }
    if let Some(exts) = entry.pax_extensions().ctx(|| "read PAX headers".into())? {
        for e in exts {
            let e = e.ctx(|| "read PAX headers".into())?;
            if let Some(x) = e.key().ok().and_then(|k| k.strip_prefix(XATTR_PAX)) {
                if x.starts_with(OVERLAY_XATTR_PREFIX) {
                    return Err(refuse(format!(
                        "entry {:?} carries the overlayfs xattr {x}",
                        raw.display().to_string()
                    )));
                }
            }
            if let Some(x) = e.key().ok().and_then(|k| k.strip_prefix(CLONE_XATTR_PAX)) {
                if !policy.clone || !x.starts_with(OVERLAY_XATTR_PREFIX) {
                    return Err(refuse(format!(
                        "entry {:?} carries {CLONE_XATTR_PAX}{x}, which only a clone cache's layers hold, and only for {OVERLAY_XATTR_PREFIX}*",
                        raw.display().to_string()
                    )));
                }
            }
        }
    }
    match et {
        tar::EntryType::Regular
        | tar::EntryType::Continuous
        | tar::EntryType::Directory
        | tar::EntryType::Fifo => {}
        tar::EntryType::Symlink => {
            let target = link_target(entry, &raw, "symlink")?;
            if !policy.clone && !stays_inside(&parent, &target) {
                return Err(refuse(format!(
                    "symlink {:?} points outside the cache ({:?})",
                    raw.display().to_string(),
                    target.display().to_string()
                )));
            }
        }
        tar::EntryType::Link => {
            let target = link_target(entry, &raw, "hardlink")?;
            let target = clean(&target, "hardlink target")?;
            if !seen.contains(&target) {
                return Err(refuse(format!(
                    "hardlink {:?} points at {:?}, which is not an earlier file of the layer",
                    raw.display().to_string(),
                    target.display().to_string()
                )));
            }
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            let whiteout_device = et == tar::EntryType::Char
                && entry.header().device_major().ok().flatten() == Some(0)
                && entry.header().device_minor().ok().flatten() == Some(0);
            if !(policy.allow_devices || policy.clone && whiteout_device) {
                return Err(refuse(format!(
                    "{:?} is a device node; set `allow_devices = true` in the registry's config to accept them",
                    raw.display().to_string()
                )));
            }
        }
        tar::EntryType::XGlobalHeader => {}
        other => {
            return Err(refuse(format!(
                "entry {:?} has the unsupported type {other:?}",
                raw.display().to_string()
            )))
        }
    }
    seen.insert(rel.clone());
    Ok(Checked {
        rel,
        kind: Kind::Entry,
    })
}

/// First pass: validates every entry of a layer tar and sums what it claims; creates nothing.
pub(crate) fn scan_layer(input: impl Read, policy: &ImportPolicy) -> Result<LayerStats> {
    let mut archive = tar::Archive::new(input);
    let mut stats = LayerStats::default();
    let mut seen = BTreeSet::new();
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        check_entry(&mut entry, policy, &mut seen)?;
        stats.entries += 1;
        stats.bytes = claimed(stats.bytes, &entry, policy)?;
    }
    Ok(stats)
}

/// `so_far` plus what `entry` claims (its size as the archive states it: a PAX `size`
/// overrides the header's), refused past the cache-size.
fn claimed(so_far: u64, entry: &tar::Entry<impl Read>, policy: &ImportPolicy) -> Result<u64> {
    let total = so_far.saturating_add(entry.size());
    if total > policy.max_bytes {
        return Err(Error::new(
            ErrorKind::Quota,
            format!(
                "refusing the image: its files claim more than the cache-size of {} bytes; raise the cache's limit if it is genuine",
                policy.max_bytes
            ),
        ));
    }
    Ok(total)
}

/// Writes the layer into `dest` (the new layer's empty upper dir, on a fresh local image),
/// checking each entry as [`scan_layer`] does before it is written: after a failure, `dest`
/// holds part of the layer and must be thrown away.
pub(crate) fn extract_layer(
    input: impl Read,
    dest: &Path,
    policy: &ImportPolicy,
) -> Result<LayerStats> {
    let mut archive = tar::Archive::new(input);
    let mut stats = LayerStats::default();
    let mut seen = BTreeSet::new();
    // Directory times are set last: creating their children changes them.
    let mut dir_times: Vec<(PathBuf, TimeSpec)> = Vec::new();
    let mut claims = 0;
    for entry in archive.entries().map_err(malformed)? {
        let mut entry = entry.map_err(malformed)?;
        let checked = check_entry(&mut entry, policy, &mut seen)?;
        claims = claimed(claims, &entry, policy)?;
        stats.entries += 1;
        let target = dest.join(&checked.rel);
        if !checked.rel.as_os_str().is_empty() {
            real_parent_dirs(dest, &checked.rel)?;
        }
        match checked.kind {
            Kind::Opaque(dir) => {
                let d = dest.join(dir);
                xattr::set(&d, OPAQUE_XATTR, b"y").at("mark opaque", &d)?;
            }
            Kind::Whiteout(hidden) => {
                let p = dest.join(hidden);
                remove_existing(&p)?;
                if !policy.clone {
                    mknod(&p, SFlag::S_IFCHR, Mode::empty(), 0).at("make whiteout", &p)?;
                }
            }
            Kind::Entry => {
                let mtime = entry_mtime(&mut entry)?;
                let h = entry.header().clone();
                let et = h.entry_type();
                if checked.rel.as_os_str().is_empty() {
                    if policy.clone && et == tar::EntryType::Directory {
                        // A clone layer's root is the image's root: its metadata is the tree's.
                        clear_xattrs(&target)?;
                        apply_metadata(&mut entry, &h, &target, true)?;
                        dir_times.push((target, mtime));
                    }
                    continue; // otherwise the root itself: the caller owns it
                }
                if et != tar::EntryType::Directory || !target.is_dir() {
                    remove_existing(&target)?;
                }
                match et {
                    tar::EntryType::Directory => {
                        if !target.is_dir() {
                            fs::create_dir(&target).at("create", &target)?;
                        }
                    }
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        stats.bytes += write_sparse(&mut entry, &target)?;
                    }
                    tar::EntryType::Symlink => {
                        let l = entry
                            .link_name()
                            .ctx(|| "read a link".into())?
                            .unwrap()
                            .into_owned();
                        std::os::unix::fs::symlink(&l, &target).at("create symlink", &target)?;
                    }
                    tar::EntryType::Link => {
                        let l = entry
                            .link_name()
                            .ctx(|| "read a link".into())?
                            .unwrap()
                            .into_owned();
                        let l = clean(&l, "hardlink target")?;
                        // The target was a file when it was extracted, but a later entry may
                        // have replaced one of its parents with a symlink (which may resolve
                        // outside through other symlinks: the scan's check is lexical), and
                        // link(2) follows the parents: it would link an outside file in.
                        only_real_dirs_above(dest, &l)?;
                        let src = dest.join(l);
                        fs::hard_link(&src, &target).at("create hardlink", &target)?;
                        continue; // metadata is the first name's
                    }
                    tar::EntryType::Fifo => {
                        mknod(&target, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)
                            .at("create fifo", &target)?;
                    }
                    tar::EntryType::Char | tar::EntryType::Block => {
                        let kind = if et == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        let dev = nix::sys::stat::makedev(
                            h.device_major().ok().flatten().unwrap_or(0) as u64,
                            h.device_minor().ok().flatten().unwrap_or(0) as u64,
                        );
                        mknod(&target, kind, Mode::from_bits_truncate(0o600), dev)
                            .at("create device", &target)?;
                    }
                    _ => continue,
                }
                if policy.clone && et == tar::EntryType::Directory {
                    // A directory a lower layer had keeps its children, not its xattrs.
                    clear_xattrs(&target)?;
                }
                apply_metadata(&mut entry, &h, &target, policy.clone)?;
                if et == tar::EntryType::Directory {
                    dir_times.push((target, mtime));
                } else {
                    set_mtime(&target, mtime)?;
                }
            }
        }
    }
    for (d, t) in dir_times.into_iter().rev() {
        set_mtime(&d, t)?;
    }
    Ok(stats)
}

/// Refuses to create through a symlink: every parent of `rel` below `dest` must be a directory.
fn real_parent_dirs(dest: &Path, rel: &Path) -> Result<()> {
    let mut p = dest.to_path_buf();
    let parents: Vec<_> = rel
        .parent()
        .map(|x| x.components().collect())
        .unwrap_or_default();
    for c in parents {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(refuse(format!(
                    "{:?} is used as a directory but is not one",
                    p.strip_prefix(dest).unwrap_or(&p).display().to_string()
                )))
            }
            Err(_) => fs::create_dir(&p).at("create", &p)?,
        }
    }
    Ok(())
}

/// Refuses a path below `dest` whose parents are not all real directories (a symlink among
/// them could lead anywhere).
fn only_real_dirs_above(dest: &Path, rel: &Path) -> Result<()> {
    let mut p = dest.to_path_buf();
    for c in rel.parent().into_iter().flat_map(Path::components) {
        p.push(c);
        if !fs::symlink_metadata(&p).is_ok_and(|md| md.is_dir()) {
            return Err(refuse(format!(
                "{:?} is used as a directory but is not one",
                p.strip_prefix(dest).unwrap_or(&p).display().to_string()
            )));
        }
    }
    Ok(())
}

fn remove_existing(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p).at("replace", p),
        Ok(_) => fs::remove_file(p).at("replace", p),
        Err(_) => Ok(()),
    }
}

fn entry_mtime(entry: &mut tar::Entry<impl Read>) -> Result<TimeSpec> {
    if let Some(exts) = entry.pax_extensions().ctx(|| "read PAX headers".into())? {
        for e in exts.flatten() {
            if e.key() == Ok("mtime") {
                if let Ok(v) = e.value() {
                    let (s, ns) = v.split_once('.').unwrap_or((v, "0"));
                    let ns = format!("{ns:0<9}");
                    if let (Ok(s), Ok(ns)) = (s.parse::<i64>(), ns[..9].parse::<i64>()) {
                        return Ok(TimeSpec::new(s, ns));
                    }
                }
            }
        }
    }
    Ok(TimeSpec::new(entry.header().mtime().unwrap_or(0) as i64, 0))
}

fn set_mtime(p: &Path, t: TimeSpec) -> Result<()> {
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).at("set times of", p)
}

/// Removes every xattr of `p` (a directory a delta layer replaces the metadata of).
fn clear_xattrs(p: &Path) -> Result<()> {
    for name in xattr::list(p).at("list xattrs of", p)? {
        xattr::remove(p, &name).ctx(|| format!("remove xattr {name:?} of {}", p.display()))?;
    }
    Ok(())
}

/// Owner, mode, then xattrs (a chown clears file capabilities); `clone`: a clone layer's
/// overlay xattrs too.
fn apply_metadata(
    entry: &mut tar::Entry<impl Read>,
    h: &tar::Header,
    p: &Path,
    clone: bool,
) -> Result<()> {
    let uid = h.uid().unwrap_or(0) as u32;
    let gid = h.gid().unwrap_or(0) as u32;
    fchownat(
        None,
        p,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .at("chown", p)?;
    if h.entry_type() != tar::EntryType::Symlink {
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).at("chmod", p)?;
    }
    if let Some(exts) = entry.pax_extensions().ctx(|| "read PAX headers".into())? {
        for e in exts.flatten() {
            let key = e.key().ok();
            let name = key.and_then(|k| k.strip_prefix(XATTR_PAX)).or_else(|| {
                key.and_then(|k| k.strip_prefix(CLONE_XATTR_PAX))
                    .filter(|_| clone)
            });
            if let Some(name) = name {
                xattr::set(p, name, e.value_bytes())
                    .ctx(|| format!("set xattr {name} on {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// Writes a file's data, seeking over whole zero blocks so they become holes.
fn write_sparse(data: &mut impl Read, p: &Path) -> Result<u64> {
    let mut f = fs::File::create(p).at("create", p)?;
    let mut buf = vec![0u8; 64 * BLOCK];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = data
                .read(&mut buf[filled..])
                .ctx(|| format!("read data of {}", p.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for chunk in buf[..filled].chunks(BLOCK) {
            if chunk.iter().all(|b| *b == 0) {
                f.seek(SeekFrom::Current(chunk.len() as i64))
                    .at("seek", p)?;
            } else {
                f.write_all(chunk).at("write", p)?;
            }
        }
        len += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    f.set_len(len).at("set length of", p)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_lists_the_tree_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("b/y")).unwrap();
        fs::write(d.path().join("b/x"), b"12345").unwrap();
        fs::write(d.path().join("a"), b"").unwrap();
        let mut tar = Vec::new();
        let stats = write_layer(d.path(), &mut tar).unwrap();
        assert_eq!(
            stats,
            LayerStats {
                entries: 4,
                bytes: 5
            }
        );
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a", "b/", "b/x", "b/y/"]);
    }

    #[test]
    fn symlink_targets_must_stay_inside() {
        for (dir, t, ok) in [
            ("", "a", true),
            ("a/b", "../c", true),
            ("a/b", "../../c", true),
            ("a/b", "../../../c", false),
            ("", "../x", false),
            ("a", "/etc/passwd", false),
            ("a", "b/../../..", false),
        ] {
            assert_eq!(stays_inside(Path::new(dir), Path::new(t)), ok, "{dir} {t}");
        }
    }

    #[test]
    fn entry_paths_are_cleaned_or_refused() {
        assert_eq!(
            clean(Path::new("./a/b"), "e").unwrap(),
            PathBuf::from("a/b")
        );
        for badp in ["../a", "a/../../b", "/etc/passwd"] {
            let e = clean(Path::new(badp), "entry").unwrap_err();
            assert!(e.to_string().contains("escapes"), "{badp}: {e}");
        }
    }

    fn tar_of(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, et, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*et);
            h.set_size(0);
            h.set_mode(if *et == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            // Our own ids: extraction chowns, which an unprivileged test run may only do to itself.
            h.set_uid(nix::unistd::geteuid().as_raw().into());
            h.set_gid(nix::unistd::getegid().as_raw().into());
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn scan_refuses_hostile_entries() {
        let policy = ImportPolicy {
            allow_devices: false,
            max_bytes: 1 << 30,
            clone: false,
        };
        use tar::EntryType::*;
        for (entries, needle) in [
            (vec![("../evil", Regular, None)], "escapes"),
            (vec![("a", Symlink, Some("/etc"))], "points outside"),
            (vec![("a/b", Symlink, Some("../../x"))], "points outside"),
            (vec![("null", Char, None)], "device node"),
            (vec![("h", Link, Some("nope"))], "not an earlier file"),
            (vec![("x/.wh..wh.foo", Regular, None)], "unknown whiteout"),
        ] {
            let e = scan_layer(&tar_of(&entries)[..], &policy).unwrap_err();
            assert!(e.to_string().contains(needle), "{entries:?}: {e}");
        }
        let ok = tar_of(&[
            ("d/", Directory, None),
            ("d/f", Regular, None),
            ("d/h", Link, Some("d/f")),
            ("d/l", Symlink, Some("f")),
            ("d/.wh.gone", Regular, None),
            ("d/.wh..wh..opq", Regular, None),
        ]);
        assert_eq!(scan_layer(&ok[..], &policy).unwrap().entries, 6);
    }

    #[test]
    fn a_hardlink_cannot_reach_out_through_a_replaced_parent() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::create_dir(base.path().join("outside")).unwrap();
        fs::write(base.path().join("outside/secret"), b"keep").unwrap();
        use tar::EntryType::*;
        // Each symlink stays inside lexically, but r resolves to the target's parent; s/ is
        // then replaced by a symlink to r, and h links to an "earlier file" through it.
        let t = tar_of(&[
            ("a/b/", Directory, None),
            ("a/b/q", Symlink, Some("../..")),
            ("r", Symlink, Some("a/b/q/..")),
            ("s/outside/", Directory, None),
            ("s/outside/secret", Regular, None),
            ("s", Symlink, Some("r")),
            ("h", Link, Some("s/outside/secret")),
        ]);
        let policy = ImportPolicy {
            allow_devices: false,
            max_bytes: u64::MAX,
            clone: false,
        };
        let e = extract_layer(&t[..], &target, &policy).unwrap_err();
        assert!(
            e.to_string().contains("\"s\" is used as a directory"),
            "{e}"
        );
        let md = fs::metadata(base.path().join("outside/secret")).unwrap();
        assert_eq!(md.nlink(), 1, "an outside file was linked into the layer");
        assert!(fs::symlink_metadata(target.join("h")).is_err());
    }

    #[test]
    fn scan_refuses_a_claim_beyond_the_limit() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1 << 20);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big", &vec![0u8; 1 << 20][..])
            .unwrap();
        let t = b.into_inner().unwrap();
        let policy = ImportPolicy {
            allow_devices: false,
            max_bytes: 1000,
            clone: false,
        };
        assert_eq!(
            scan_layer(&t[..], &policy).unwrap_err().kind(),
            ErrorKind::Quota
        );
    }
}

#[cfg(test)]
mod properties {
    //! Layer tars come from a registry: whatever they hold, import must not panic, must write
    //! nothing outside its target (the target's parent is compared before and after), and what
    //! export writes must import back to the same tree. Runs as root or not: as an unprivileged
    //! user the privileged parts (chown to others, device nodes, trusted xattrs) just fail.
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Modest case counts; nothing written into the source tree on failure.
    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Everything under `dir`, not following symlinks, except the subtree `skip` (its root
    /// included: its times change as entries are made in it): type, mode,
    /// owner, links, size, mtime, and the content of files and links.
    fn snapshot(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(p) = todo.pop() {
            if p == skip {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let content = if ft.is_file() {
                format!("{:?}", fs::read(&p).unwrap())
            } else if ft.is_symlink() {
                format!("{:?}", fs::read_link(&p).unwrap())
            } else {
                String::new()
            };
            let what = format!(
                "{:o} {}:{} n{} {}b {}.{} {content}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.nlink(),
                md.len(),
                md.mtime(),
                md.mtime_nsec()
            );
            if ft.is_dir() {
                for e in fs::read_dir(&p).unwrap() {
                    todo.push(e.unwrap().path());
                }
            }
            out.insert(p, what);
        }
        out
    }

    /// Makes a tree removable by its owner again (an imported directory may be mode 0).
    fn unlock(dir: &Path) {
        let Ok(md) = fs::symlink_metadata(dir) else {
            return;
        };
        if md.is_dir() {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                unlock(&e.path());
            }
        }
    }

    /// One raw tar entry, as hostile as a generator can make it.
    #[derive(Debug, Clone)]
    struct Raw {
        name: String,
        kind: u8,
        link: String,
        data: Vec<u8>,
        /// The header's size field, when it lies about the data.
        size: Option<u64>,
        mode: u32,
        pax: Vec<(String, String)>,
    }

    /// Path components that matter: escapes, whiteouts, names that collide.
    fn name() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            Just(".."),
            Just("."),
            Just(""),
            Just("a"),
            Just("b"),
            Just("outside"),
            Just(".wh.a"),
            Just(".wh..wh..opq"),
            Just(".wh.."),
            Just(".wh..wh.x"),
        ];
        (
            prop::option::of(Just("/")),
            prop::collection::vec(part, 1..5),
            prop::option::of(Just("/")),
        )
            .prop_map(|(lead, parts, trail)| {
                format!(
                    "{}{}{}",
                    lead.unwrap_or(""),
                    parts.join("/"),
                    trail.unwrap_or("")
                )
            })
    }

    fn raw_entry() -> impl Strategy<Value = Raw> {
        let kind = prop_oneof![
            Just(b'0'),
            Just(b'5'),
            Just(b'2'),
            Just(b'1'),
            Just(b'3'),
            Just(b'4'),
            Just(b'6'),
            Just(b'g'),
            Just(b'L'),
            Just(b'K'),
            any::<u8>(),
        ];
        let pax = prop::collection::vec(
            prop_oneof![
                (
                    Just("size"),
                    "(99999999999999999999|18446744073709551615|4096|-1|x)"
                ),
                (Just("path"), "(\\.\\./x|/etc/x|a/b|[a/.]{90,120})"),
                (Just("linkpath"), "(\\.\\./x|/etc|a|outside/secret)"),
                (
                    Just("mtime"),
                    "(-1\\.5|1\\.123456789012|x|99999999999999999999)"
                ),
                (Just("SCHILY.xattr.user.t"), "[a-z]{0,3}"),
                (Just("SCHILY.xattr.trusted.overlay.opaque"), "y"),
            ]
            .prop_map(|(k, v)| (k.to_string(), v)),
            0..3,
        );
        (
            name(),
            kind,
            prop_oneof![
                name(),
                "(\\.\\./outside/secret|a|\\.\\./\\.\\.|a/b/\\.\\.|b/outside/secret|\\.\\./target)",
            ],
            prop::collection::vec(any::<u8>(), 0..600),
            prop::option::of(prop_oneof![0u64..2000, Just(u64::MAX >> 2)]),
            0u32..0o10000,
            pax,
        )
            .prop_map(|(name, kind, link, data, size, mode, pax)| Raw {
                name,
                kind,
                link,
                data,
                size,
                mode,
                pax,
            })
    }

    /// A tar of the entries, then perhaps cut short or with some bytes changed.
    fn hostile_tar() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(raw_entry(), 0..8),
            any::<prop::sample::Index>(),
            0u8..4,
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        )
            .prop_map(|(entries, cut, how, flips)| {
                let mut b = tar::Builder::new(Vec::new());
                for e in entries {
                    if !e.pax.is_empty() {
                        b.append_pax_extensions(
                            e.pax.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
                        )
                        .unwrap();
                    }
                    let mut h = tar::Header::new_ustar();
                    h.set_entry_type(tar::EntryType::new(e.kind));
                    h.set_mode(e.mode);
                    h.set_uid(nix::unistd::geteuid().as_raw().into());
                    h.set_gid(nix::unistd::getegid().as_raw().into());
                    h.set_size(e.size.unwrap_or(e.data.len() as u64));
                    let n = e.name.as_bytes();
                    h.as_old_mut().name[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
                    let l = e.link.as_bytes();
                    h.as_old_mut().linkname[..l.len().min(100)]
                        .copy_from_slice(&l[..l.len().min(100)]);
                    h.set_cksum();
                    b.append(&h, &e.data[..]).unwrap();
                }
                let mut t = b.into_inner().unwrap();
                match how {
                    0 => t.truncate(cut.index(t.len() + 1)),
                    1 if !t.is_empty() => {
                        for (at, v) in flips {
                            let i = at.index(t.len());
                            t[i] = v;
                        }
                    }
                    _ => {}
                }
                t
            })
    }

    proptest! {
        #![proptest_config(config(192))]

        /// Hostile layers: no panic, and the target's parent (a sibling with a file in it
        /// included) is exactly as before, whether or not the scan accepted the layer. Extract
        /// runs even after a refused scan: it must hold on its own.
        #[test]
        fn hostile_layers_write_nothing_outside_the_target(
            tar in prop_oneof![
                hostile_tar(),
                prop::collection::vec(any::<u8>(), 0..2048),
            ],
            allow_devices in any::<bool>(),
            max_bytes in prop_oneof![Just(u64::MAX), 0u64..4096],
        ) {
            let base = tempfile::tempdir().unwrap();
            let target = base.path().join("target");
            fs::create_dir(&target).unwrap();
            fs::create_dir(base.path().join("outside")).unwrap();
            fs::write(base.path().join("outside/secret"), b"keep").unwrap();
            let before = snapshot(base.path(), &target);
            let policy = ImportPolicy {
                allow_devices,
                max_bytes,
                clone: false,
            };
            let scanned = scan_layer(&tar[..], &policy);
            let extracted = extract_layer(&tar[..], &target, &policy);
            if scanned.is_ok() {
                // The scan is the gate: whatever it accepts, extraction reaches the end of.
                if let (Ok(s), Ok(x)) = (&scanned, &extracted) {
                    prop_assert_eq!(s.entries, x.entries);
                }
            }
            let after = snapshot(base.path(), &target);
            unlock(&target);
            prop_assert_eq!(before, after);
        }
    }

    /// One node of a generated tree.
    #[derive(Debug, Clone)]
    enum Node {
        Dir,
        File(Vec<u8>),
        Symlink(String),
        /// A hardlink to the n-th file made before it (modulo their count).
        Hardlink(usize),
        Fifo,
        /// An overlay whiteout (made as root only).
        Whiteout,
    }

    fn node() -> impl Strategy<Value = Node> {
        // Contents with whole zero blocks (holes on import) and partial ones.
        let content = prop::collection::vec(
            prop_oneof![
                Just(vec![0u8; BLOCK]),
                prop::collection::vec(any::<u8>(), 0..BLOCK + 7),
            ],
            0..4,
        )
        .prop_map(|c| c.concat());
        prop_oneof![
            2 => Just(Node::Dir),
            3 => content.prop_map(Node::File),
            1 => "(x|d0/x|\\./y|d1/\\.\\./d0)".prop_map(Node::Symlink),
            1 => any::<usize>().prop_map(Node::Hardlink),
            1 => Just(Node::Fifo),
            1 => Just(Node::Whiteout),
        ]
    }

    /// Up to 12 nodes at paths of up to 3 levels (parents made as directories on the way).
    fn tree() -> impl Strategy<Value = Vec<(String, Node, u32, i64, u32)>> {
        prop::collection::vec(
            (
                "(d0|d1|f[0-3])(/(d0|d1|f[0-3])){0,2}",
                node(),
                0u32..0o10000,
                0i64..4_000_000_000,
                prop_oneof![Just(0u32), 0u32..1_000_000_000],
            ),
            1..12,
        )
    }

    /// Makes the tree under `root`; paths that collide with an earlier node are skipped.
    fn materialise(root: &Path, nodes: &[(String, Node, u32, i64, u32)]) {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut made: Vec<(PathBuf, TimeSpec)> = Vec::new();
        for (rel, node, mode, secs, nanos) in nodes {
            let p = root.join(rel);
            if fs::symlink_metadata(&p).is_ok()
                || !p
                    .parent()
                    .unwrap()
                    .ancestors()
                    .all(|a| fs::symlink_metadata(a).map(|m| m.is_dir()).unwrap_or(true))
            {
                continue;
            }
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            match node {
                Node::Dir => fs::create_dir(&p).unwrap(),
                Node::File(data) => {
                    fs::write(&p, data).unwrap();
                    files.push(p.clone());
                }
                Node::Symlink(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
                Node::Hardlink(n) if !files.is_empty() => {
                    fs::hard_link(&files[n % files.len()], &p).unwrap()
                }
                Node::Hardlink(_) => continue,
                Node::Fifo => {
                    mknod(&p, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0).unwrap()
                }
                Node::Whiteout if is_root() => mknod(&p, SFlag::S_IFCHR, Mode::empty(), 0).unwrap(),
                Node::Whiteout => continue,
            }
            // Readable and searchable by the owner, so that an unprivileged export can read it.
            let keep = if matches!(node, Node::Dir) {
                0o700
            } else {
                0o600
            };
            if !matches!(node, Node::Symlink(_) | Node::Hardlink(_) | Node::Whiteout) {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode | keep)).unwrap();
            }
            made.push((p, TimeSpec::new(*secs, i64::from(*nanos))));
        }
        // Deepest first, so that a directory's time is set after its children are made.
        made.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, t) in made {
            set_mtime(&p, t).unwrap();
        }
    }

    proptest! {
        #![proptest_config(config(96))]

        /// Export, scan, import, export again: the same bytes (owners, modes, nanosecond
        /// times, holes, hardlinks, symlinks, fifos and, as root, whiteouts all survive).
        #[test]
        fn exported_layers_import_to_the_same_tree(nodes in tree()) {
            let src = tempfile::tempdir().unwrap();
            let dst = tempfile::tempdir().unwrap();
            materialise(src.path(), &nodes);
            let mut first = Vec::new();
            let stats = write_layer(src.path(), &mut first).unwrap();
            let policy = ImportPolicy { allow_devices: false, max_bytes: u64::MAX, clone: false };
            prop_assert_eq!(&scan_layer(&first[..], &policy).unwrap(), &stats);
            let imported = extract_layer(&first[..], dst.path(), &policy).unwrap();
            prop_assert_eq!(imported.entries, stats.entries);
            let mut second = Vec::new();
            write_layer(dst.path(), &mut second).unwrap();
            unlock(src.path());
            unlock(dst.path());
            prop_assert!(first == second, "the re-export differs");
        }
    }
}
