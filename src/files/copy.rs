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
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// What to copy besides the tree itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// Keep `trusted.overlay.*` xattrs (needed when copying an upper-format tree; dropped when
    /// copying a merged view, where the kernel has already applied them).
    pub keep_overlay_xattrs: bool,
}

/// Counters of one copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyStats {
    /// Entries created (files, dirs, links, nodes).
    pub entries: u64,
    /// Data bytes copied (holes excluded).
    pub bytes: u64,
}

/// Called after each copied entry with the running totals (progress display).
pub type Progress = Box<dyn FnMut(&CopyStats)>;

struct Ctx {
    opts: CopyOptions,
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
    progress: Option<Progress>,
}

/// Copies the contents of `src` into the existing directory `dst`, then gives `dst` the owner,
/// mode, xattrs and times of `src`.
pub fn copy_tree(
    src: &Path,
    dst: &Path,
    opts: CopyOptions,
    progress: Option<Progress>,
) -> Result<CopyStats> {
    let mut ctx = Ctx {
        opts,
        links: HashMap::new(),
        stats: CopyStats::default(),
        progress,
    };
    copy_dir(src, dst, &mut ctx)?;
    let md = fs::symlink_metadata(src).at("stat", src)?;
    apply_metadata(src, dst, &md, &ctx.opts)?;
    Ok(ctx.stats)
}

fn copy_dir(src: &Path, dst: &Path, ctx: &mut Ctx) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(src)
        .at("read directory", src)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .at("read directory", src)?;
    names.sort();
    for name in names {
        let s = src.join(&name);
        let d = dst.join(&name);
        let md = fs::symlink_metadata(&s).at("stat", &s)?;
        let ft = md.file_type();
        ctx.stats.entries += 1;
        if ft.is_dir() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .at("create directory", &d)?;
            copy_dir(&s, &d, ctx)?;
        } else {
            if md.nlink() > 1 {
                if let Some(first) = ctx.links.get(&(md.dev(), md.ino())) {
                    fs::hard_link(first, &d).at("hard-link", &d)?;
                    continue;
                }
                ctx.links.insert((md.dev(), md.ino()), d.clone());
            }
            if ft.is_file() {
                ctx.stats.bytes += copy_file_data(&s, &d)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&s).at("read link", &s)?;
                std::os::unix::fs::symlink(&target, &d).at("create symlink", &d)?;
            } else {
                let kind = if ft.is_char_device() {
                    SFlag::S_IFCHR
                } else if ft.is_block_device() {
                    SFlag::S_IFBLK
                } else if ft.is_fifo() {
                    SFlag::S_IFIFO
                } else {
                    SFlag::S_IFSOCK
                };
                mknod(&d, kind, Mode::from_bits_truncate(0o600), md.rdev())
                    .at("create node", &d)?;
            }
        }
        apply_metadata(&s, &d, &md, &ctx.opts)?;
        if let Some(p) = ctx.progress.as_mut() {
            p(&ctx.stats);
        }
    }
    Ok(())
}

/// Copies the data ranges of `src` to a new file `dst`, keeping holes. Returns data bytes.
fn copy_file_data(src: &Path, dst: &Path) -> Result<u64> {
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
    let mut offset: i64 = 0;
    let fd = input.as_raw_fd();
    while (offset as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(crate::error::Error::io(
                format!("seek data in {}", src.display()),
                e,
            ));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut pos = data as u64;
        while pos < end as u64 {
            let want = ((end as u64 - pos) as usize).min(buf.len());
            let n = input.read_at(&mut buf[..want], pos).at("read", src)?;
            if n == 0 {
                break;
            }
            output.write_all_at(&buf[..n], pos).at("write", dst)?;
            pos += n as u64;
            copied += n as u64;
        }
        offset = end;
    }
    Ok(copied)
}

fn is_overlay_xattr(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"trusted.overlay.")
}

/// Owner, then mode (chown clears setuid bits), then xattrs (chown clears capabilities), then
/// times (everything before changes ctime only, but creating children changes a dir's mtime).
fn apply_metadata(src: &Path, dst: &Path, md: &fs::Metadata, opts: &CopyOptions) -> Result<()> {
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
        if !opts.keep_overlay_xattrs && is_overlay_xattr(&name) {
            continue;
        }
        if let Some(value) = xattr::get(src, &name).at("read xattr of", src)? {
            xattr::set(dst, &name, &value)
                .ctx(|| format!("set xattr {} on {}", name.to_string_lossy(), dst.display()))?;
        }
    }
    let atime = TimeSpec::new(md.atime(), md.atime_nsec());
    let mtime = TimeSpec::new(md.mtime(), md.mtime_nsec());
    utimensat(None, dst, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .at("set times of", dst)?;
    Ok(())
}
