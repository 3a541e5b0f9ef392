//! A faithful tree copy: contents, modes, owners, symlinks, hardlinks, device nodes, fifos,
//! xattrs, sparse files and nanosecond mtimes. Used by squash (from a read-only overlay's merged
//! view into a new base image). `fs_extra` and `mkfs.ext4 -d` (e2fsprogs 1.47.0 drops sub-second
//! mtimes and adds lost+found) do not keep all of these.

use crate::error::{IoContext, Result};
use nix::fcntl::AtFlags;
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};

use super::is_overlay_xattr;
use super::sparse::data_extents;
use super::walk::{walk_sorted, Entry, Step};

/// Counters of one copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyStats {
    /// Entries created (files, dirs, links, nodes).
    pub entries: u64,
    /// Data bytes copied (holes excluded).
    pub bytes: u64,
    /// For a metadata base: the allocated bytes (`st_blocks`) of the files its stubs reference.
    pub referenced: u64,
}

/// Called after each copied entry with the running totals (progress display).
pub type Progress = Box<dyn FnMut(&CopyStats)>;

/// What a copy does with the overlay's xattrs and with file data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyMode {
    /// Drop `trusted.overlay.*` (a squash's merged view: they never travel with the files).
    Plain,
    /// Keep every xattr (a clone image, where they are the job's data).
    Verbatim,
    /// A metadata layer: each regular file a sparse stub of its size whose metacopy and
    /// redirect xattrs send overlayfs to its own path in the data-only layers; the job's own
    /// `trusted.overlay.*` xattrs (the view shows them unescaped) stored escaped, as data.
    Stubs,
}

struct Ctx {
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
    progress: Option<Progress>,
    mode: CopyMode,
}

/// Copies the contents of `src` into the existing directory `dst`, then gives `dst` the owner,
/// mode, xattrs and times of `src`.
pub(crate) fn copy_tree(src: &Path, dst: &Path, progress: Option<Progress>) -> Result<CopyStats> {
    copy_tree_with(src, dst, progress, CopyMode::Plain)
}

/// The metadata of the merged view `src` into `dst` (directories, links, nodes, owners, modes,
/// xattrs, times, hardlinks), each regular file a sparse stub of its size redirecting to its own
/// path in the data-only layers that will be mounted below `dst`'s layer. Its `bytes` count
/// nothing: no data is copied.
pub(crate) fn stub_tree(src: &Path, dst: &Path, progress: Option<Progress>) -> Result<CopyStats> {
    copy_tree_with(src, dst, progress, CopyMode::Stubs)
}

/// [`copy_tree`] keeping every xattr, `trusted.overlay.*` included: for a clone-mode image,
/// where container storage's overlay xattrs (and whiteout devices) are data, not directives.
pub(crate) fn copy_tree_verbatim(
    src: &Path,
    dst: &Path,
    progress: Option<Progress>,
) -> Result<CopyStats> {
    copy_tree_with(src, dst, progress, CopyMode::Verbatim)
}

fn copy_tree_with(
    src: &Path,
    dst: &Path,
    progress: Option<Progress>,
    mode: CopyMode,
) -> Result<CopyStats> {
    let mut ctx = Ctx {
        links: HashMap::new(),
        stats: CopyStats::default(),
        progress,
        mode,
    };
    walk_sorted(src, &mut |step| ctx.step(dst, step))?;
    let md = fs::symlink_metadata(src).at("stat", src)?;
    apply_metadata(src, dst, &md, mode, None)?;
    Ok(ctx.stats)
}

impl Ctx {
    /// Copies one entry of the walk to the same place under `dst`. A directory gets its
    /// metadata after its contents: creating children changes its mtime.
    fn step(&mut self, dst: &Path, step: Step<'_>) -> Result<()> {
        let e = match step {
            Step::Entry(e) => e,
            Step::DirDone(e) => return self.finish(e, &dst.join(e.rel)),
        };
        let (s, md) = (e.path, e.md);
        let d = dst.join(e.rel);
        let ft = md.file_type();
        self.stats.entries += 1;
        if ft.is_dir() {
            // A fresh ext4 image has its own lost+found: the source's takes its place.
            return match fs::DirBuilder::new().mode(0o700).create(&d) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => Ok(()),
                r => r.at("create directory", &d),
            };
        }
        if md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                return fs::hard_link(first, &d).at("hard-link", &d);
            }
            self.links.insert((md.dev(), md.ino()), d.clone());
        }
        if ft.is_file() && self.mode == CopyMode::Stubs {
            self.stats.referenced += md.blocks() * 512;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&d)
                .and_then(|f| f.set_len(md.len()))
                .at("create stub", &d)?;
        } else if ft.is_file() {
            self.stats.bytes += copy_file_data(s, &d)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(s).at("read link", s)?;
            std::os::unix::fs::symlink(&target, &d).at("create symlink", &d)?;
        } else {
            make_node(&d, md)?;
        }
        self.finish(e, &d)
    }

    /// Gives the copy `d` of entry `e` its metadata and reports progress.
    fn finish(&mut self, e: Entry<'_>, d: &Path) -> Result<()> {
        let redirect =
            (self.mode == CopyMode::Stubs && e.md.is_file()).then(|| Path::new("/").join(e.rel));
        apply_metadata(e.path, d, e.md, self.mode, redirect.as_deref())?;
        if let Some(p) = self.progress.as_mut() {
            p(&self.stats);
        }
        Ok(())
    }
}

/// Makes at `d` a device node, fifo or socket of the type and device number of `md` (mode and
/// owner come after, with the rest of the metadata).
pub(crate) fn make_node(d: &Path, md: &fs::Metadata) -> Result<()> {
    let ft = md.file_type();
    let kind = if ft.is_char_device() {
        SFlag::S_IFCHR
    } else if ft.is_block_device() {
        SFlag::S_IFBLK
    } else if ft.is_fifo() {
        SFlag::S_IFIFO
    } else {
        SFlag::S_IFSOCK
    };
    mknod(d, kind, Mode::from_bits_truncate(0o600), md.rdev()).at("create node", d)
}

/// Copies the data ranges of `src` to a new file `dst`, keeping holes. Returns data bytes.
pub(crate) fn copy_file_data(src: &Path, dst: &Path) -> Result<u64> {
    let input = File::open(src).at("open", src)?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .at("create", dst)?;
    let len = input.metadata().at("stat", src)?.len();
    output.set_len(len).at("size", dst)?;
    let mut copied = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (data, end) in data_extents(&input, len, src)? {
        let mut pos = data;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = input.read_at(&mut buf[..want], pos).at("read", src)?;
            if n == 0 {
                break;
            }
            output.write_all_at(&buf[..n], pos).at("write", dst)?;
            pos += n as u64;
            copied += n as u64;
        }
    }
    Ok(copied)
}

/// Owner, then mode (chown clears setuid bits), then xattrs (chown clears capabilities), then
/// times (everything before changes ctime only, but creating children changes a dir's mtime).
/// A stub (`redirect`) gets its metacopy and redirect xattrs with the others, before its times.
fn apply_metadata(
    src: &Path,
    dst: &Path,
    md: &fs::Metadata,
    mode: CopyMode,
    redirect: Option<&Path>,
) -> Result<()> {
    fchownat(
        None,
        dst,
        Some(Uid::from_raw(md.uid())),
        Some(Gid::from_raw(md.gid())),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .at("chown", dst)?;
    let is_link = md.file_type().is_symlink();
    if !is_link {
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .at("chmod", dst)?;
    }
    let names = xattr::list(src).at("list xattrs of", src)?;
    for name in names {
        let stored = match mode {
            CopyMode::Plain if is_overlay_xattr(&name) => continue,
            // overlayfs shows a layer's `trusted.overlay.overlay.X` as the job's
            // `trusted.overlay.X`: store it so.
            CopyMode::Stubs if is_overlay_xattr(&name) => {
                let rest = &name.as_encoded_bytes()[super::OVERLAY_XATTR_PREFIX.len()..];
                let mut n =
                    std::ffi::OsString::from(format!("{}overlay.", super::OVERLAY_XATTR_PREFIX));
                n.push(std::ffi::OsStr::from_bytes(rest));
                n
            }
            _ => name.clone(),
        };
        if let Some(value) = xattr::get(src, &name).at("read xattr of", src)? {
            xattr::set(dst, &stored, &value).ctx(|| {
                format!(
                    "set xattr {} on {}",
                    stored.to_string_lossy(),
                    dst.display()
                )
            })?;
        }
    }
    if let Some(r) = redirect {
        xattr::set(dst, crate::host::mounts::METACOPY_XATTR, b"").at("mark stub", dst)?;
        xattr::set(
            dst,
            crate::host::mounts::REDIRECT_XATTR,
            r.as_os_str().as_bytes(),
        )
        .at("set the stub's redirect", dst)?;
    }
    let atime = TimeSpec::new(md.atime(), md.atime_nsec());
    let mtime = TimeSpec::new(md.mtime(), md.mtime_nsec());
    utimensat(None, dst, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .at("set times of", dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::tree::{diff, snapshot};

    #[test]
    fn a_copy_has_the_same_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        fs::create_dir_all(src.join("b/c")).unwrap();
        fs::create_dir(&dst).unwrap();
        fs::write(src.join("a"), b"hello").unwrap();
        fs::hard_link(src.join("a"), src.join("b/a-link")).unwrap();
        std::os::unix::fs::symlink("../a", src.join("b/s")).unwrap();
        let sparse = File::create(src.join("b/c/sparse")).unwrap();
        sparse.set_len(4 << 20).unwrap();
        sparse.write_all_at(b"x", 2 << 20).unwrap();
        fs::set_permissions(src.join("b"), fs::Permissions::from_mode(0o750)).unwrap();
        let stats = copy_tree(&src, &dst, None).unwrap();
        assert_eq!(stats.entries, 6);
        assert!(stats.bytes >= 6, "{stats:?}");
        let problems = diff(&snapshot(&src).unwrap(), &snapshot(&dst).unwrap());
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
