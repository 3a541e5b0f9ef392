//! Copy-on-write clones for clone-mode caches: FICLONE where the state dir supports it (XFS with
//! reflink, btrfs), and otherwise a reflink pool — a sparse XFS image in the state dir, attached
//! with direct I/O (its data is cached once, by the clones' own filesystems) and trimmed so that
//! what clones free goes back to the host.

use super::cmd::{self, Tool};
use super::loopback;
use crate::error::{Error, ErrorKind, IoContext, Result};
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Makes the reflink pool's filesystem.
pub const MKFS_XFS: Tool = Tool {
    name: "mkfs.xfs",
    package: "xfsprogs",
};
/// Gives the blocks a clone freed back to the pool, and the pool's back to the host.
pub const FSTRIM: Tool = Tool {
    name: "fstrim",
    package: "util-linux",
};

/// Clones `src` into a new file `dst` sharing all its blocks (FICLONE); fails, creating
/// nothing, when the filesystem cannot.
pub fn reflink(src: &Path, dst: &Path) -> Result<()> {
    reflink_copy::reflink(src, dst).map_err(|e| {
        let _ = std::fs::remove_file(dst);
        Error::io(
            format!("clone {} to {} (FICLONE)", src.display(), dst.display()),
            e,
        )
    })
}

/// Whether files in `dir` can be cloned: tries it on two small files.
pub fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".reflink-probe-{}.clone", std::process::id()));
    let ok = std::fs::write(&a, b"jobcachefs").is_ok() && reflink_copy::reflink(&a, &b).is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

/// Makes the pool: a sparse file of `size` bytes with an XFS filesystem that can reflink.
pub fn make_pool(path: &Path, size: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .at("create pool image", path)?;
    file.set_len(size / 4096 * 4096)
        .at("size pool image", path)?;
    drop(file);
    let made = cmd::run(
        &MKFS_XFS,
        [
            "-q".as_ref(),
            "-f".as_ref(),
            "-m".as_ref(),
            "reflink=1".as_ref(),
            "-L".as_ref(),
            "jcfs-pool".as_ref(),
            path.as_os_str(),
        ],
    );
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made.map(|_| ())
}

/// Attaches the pool with direct I/O and mounts it at `target` (`nosuid,nodev`).
pub fn mount_pool(image: &Path, target: &Path) -> Result<()> {
    let dev = loopback::attach_with(image, false, true)?;
    match mount(
        Some(dev.path()),
        target,
        Some("xfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    ) {
        Ok(()) => Ok(()),
        Err(e) => {
            dev.detach();
            Err(Error::io(
                format!(
                    "mount the reflink pool {} at {}",
                    image.display(),
                    target.display()
                ),
                e.into(),
            ))
        }
    }
}

/// Discards the free blocks of the filesystem mounted at `mount` (FITRIM).
pub fn trim(mount: &Path) -> Result<()> {
    cmd::run(&FSTRIM, [mount.as_os_str()]).map(|_| ())
}

/// The error for a node whose state dir cannot clone when the config demands it.
pub fn no_reflink(dir: &Path) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "clone_backend = \"reflink\" but the state dir {} cannot clone files (FICLONE): put the state dir on XFS with reflink=1 or btrfs, or set clone_backend = \"pool\" (or \"auto\")",
            dir.display()
        ),
    )
}
