//! Merging delta layers: several layers in overlay *upper* format (whiteouts as 0/0 character
//! devices, opaque directories as `trusted.overlay.opaque=y`) folded into one layer that, placed
//! where they were, shows exactly what they showed over any layers below. The kernel's merged
//! view cannot do this: it resolves whiteouts and opaque dirs against what lies below, so its
//! copy is a base (a squash), not a delta. This is what keeps a stack within its hard depth
//! bound without copying the whole cache, and what folds a scope's layers.
//!
//! The layers are applied bottom first onto the destination, each with overlayfs's lookup rules:
//! - a whiteout replaces whatever the path held with a whiteout;
//! - an opaque directory replaces the path with itself (opaque);
//! - a plain directory merges into a directory the path already holds (keeping that one's
//!   opacity); over a non-directory (a file or a whiteout, which stop the kernel's lookup of
//!   the layers below) it becomes an opaque directory; over nothing it stays plain;
//! - anything else replaces the path.
//!
//! Everything else of an entry is kept: data (sparse), owners, modes, nanosecond times, every
//! xattr (`trusted.overlay.*` included: in a layer they are overlay's own records, and a job's
//! own `trusted.overlay.*` xattrs are stored escaped, so they stay the job's), hardlinks within
//! a layer. A directory's xattrs are those of its topmost version, its opacity as above.

use crate::error::{IoContext, Result};
use nix::fcntl::AtFlags;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::copy::{copy_file_data, make_node, CopyStats};
use super::walk::{walk_sorted, Step};

/// The xattr that makes a directory of an upper layer opaque.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Whether the directory at `path` is opaque.
fn is_opaque(path: &Path) -> Result<bool> {
    Ok(xattr::get(path, OPAQUE_XATTR)
        .at("read xattr of", path)?
        .is_some_and(|v| v == b"y"))
}

/// Folds `layers` (bottom first, each a directory in upper format) into the existing, empty
/// directory `dst`, which then holds one layer equivalent to the stack of them.
pub(crate) fn merge_layers(layers: &[PathBuf], dst: &Path) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    for layer in layers {
        apply_layer(layer, dst, &mut stats)?;
    }
    Ok(stats)
}

/// Applies one upper-format layer `src` onto the merged layer `dst`.
fn apply_layer(src: &Path, dst: &Path, stats: &mut CopyStats) -> Result<()> {
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    // Directories whose result is opaque, decided when entering them.
    let mut opaque: HashMap<PathBuf, bool> = HashMap::new();
    walk_sorted(src, &mut |step| {
        let e = match step {
            Step::Entry(e) => e,
            Step::DirDone(e) => {
                let d = dst.join(e.rel);
                let keep_opaque = opaque.remove(e.rel).unwrap_or(false);
                return apply_metadata(e.path, &d, e.md, Some(keep_opaque));
            }
        };
        let d = dst.join(e.rel);
        let below = fs::symlink_metadata(&d).ok();
        stats.entries += 1;
        if e.md.is_dir() {
            let src_opaque = is_opaque(e.path)?;
            let result_opaque = match &below {
                Some(b) if b.is_dir() && !src_opaque => is_opaque(&d)?,
                Some(_) => {
                    remove_all(&d)?;
                    make_dir(&d)?;
                    // Over a file or whiteout the kernel stopped looking further down.
                    true
                }
                None => {
                    make_dir(&d)?;
                    src_opaque
                }
            };
            opaque.insert(e.rel.to_path_buf(), result_opaque);
            return Ok(());
        }
        if below.is_some() {
            remove_all(&d)?;
        }
        if e.md.nlink() > 1 {
            if let Some(first) = links.get(&(e.md.dev(), e.md.ino())) {
                return fs::hard_link(first, &d).at("hard-link", &d);
            }
            links.insert((e.md.dev(), e.md.ino()), d.clone());
        }
        let ft = e.md.file_type();
        if ft.is_file() {
            stats.bytes += copy_file_data(e.path, &d)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(e.path).at("read link", e.path)?;
            std::os::unix::fs::symlink(&target, &d).at("create symlink", &d)?;
        } else {
            make_node(&d, e.md)?;
        }
        apply_metadata(e.path, &d, e.md, None)
    })?;
    // The layer's root: the topmost version's metadata (a root is never opaque).
    let md = fs::symlink_metadata(src).at("stat", src)?;
    apply_metadata(src, dst, &md, Some(false))
}

fn make_dir(d: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(d)
        .at("create directory", d)
}

fn remove_all(d: &Path) -> Result<()> {
    match fs::symlink_metadata(d) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(d).at("remove", d),
        Ok(_) => fs::remove_file(d).at("remove", d),
        Err(_) => Ok(()),
    }
}

/// Owner, mode, xattrs (exactly `src`'s; for a directory, its opacity as decided), times.
fn apply_metadata(src: &Path, dst: &Path, md: &fs::Metadata, opaque: Option<bool>) -> Result<()> {
    fchownat(
        None,
        dst,
        Some(Uid::from_raw(md.uid())),
        Some(Gid::from_raw(md.gid())),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .at("chown", dst)?;
    if !md.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .at("chmod", dst)?;
    }
    let wanted: Vec<_> = xattr::list(src)
        .at("list xattrs of", src)?
        .filter(|n| opaque.is_none() || n != OPAQUE_XATTR)
        .collect();
    for name in xattr::list(dst).at("list xattrs of", dst)? {
        if !wanted.contains(&name) {
            xattr::remove(dst, &name).at("remove xattr of", dst)?;
        }
    }
    for name in &wanted {
        if let Some(value) = xattr::get(src, name).at("read xattr of", src)? {
            xattr::set(dst, name, &value)
                .ctx(|| format!("set xattr {} on {}", name.to_string_lossy(), dst.display()))?;
        }
    }
    if opaque == Some(true) {
        xattr::set(dst, OPAQUE_XATTR, b"y").at("mark opaque", dst)?;
    }
    let atime = TimeSpec::new(md.atime(), md.atime_nsec());
    let mtime = TimeSpec::new(md.mtime(), md.mtime_nsec());
    utimensat(None, dst, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .at("set times of", dst)?;
    Ok(())
}
