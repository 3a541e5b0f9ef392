//! The privileged shell: everything that touches the kernel or runs an external tool — loop
//! devices, mounts and the mount table, ext4 images and the tools that make and check them.
//!
//! The engine reaches the host only through the [`Host`] trait: [`RealHost`] does it for real,
//! and the unit tests use a fake (`fake.rs`) that simulates mounts with directories and symlinks,
//! fails at any named step on request, and runs as an unprivileged user. Everything the engine
//! decides (outcomes of a delete, rollback of a half-made create, what `gc` repairs, admission)
//! is therefore tested without root; the real syscalls are tested by the integration tests.

pub mod clone;
pub mod cmd;
#[cfg(test)]
pub(crate) mod fake;
pub mod idmap;
pub mod image;
pub mod loopback;
pub mod mounts;

use crate::error::{IoContext, Result};
use mounts::MountEntry;
use std::path::{Path, PathBuf};

/// How an ext4 image is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageMount {
    /// Read-only (layers, export).
    pub read_only: bool,
}

/// What the engine asks of the host. Every method is one privileged step; each is idempotent
/// where the engine's crash repair relies on it (unmounting what is not mounted succeeds).
pub trait Host: Send + Sync + std::fmt::Debug {
    /// The mount table of this mount namespace.
    fn mount_table(&self) -> Result<Vec<MountEntry>>;
    /// Attaches `image` to a loop device (autoclear, direct I/O) and mounts it at `target`
    /// (`nosuid,nodev`). On failure nothing stays attached.
    fn mount_image(&self, image: &Path, target: &Path, how: ImageMount) -> Result<()>;
    /// Mounts an overlay of `lowers` (bottom first) at `target`, read-only without `upper`.
    fn mount_overlay(
        &self,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<()> {
        self.mount_overlay_with_data(lowers, &[], upper, target)
    }
    /// [`Host::mount_overlay`] with data-only layers below the lowers, newest first.
    fn mount_overlay_with_data(
        &self,
        lowers: &[PathBuf],
        data: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<()>;
    /// Whether this kernel serves a lower layer's metacopy stub from a data-only layer with
    /// `metacopy=off` (Linux 6.16+): the metadata squash's gate.
    fn data_layers_supported(&self) -> bool {
        false
    }
    /// Whether a metadata base is written as an EROFS image ([`crate::files::erofs`]) rather
    /// than as stub files in an ext4 image: probed once ([`mounts::erofs_supported`]).
    fn erofs_metadata(&self) -> bool {
        false
    }
    /// Whether a metadata base is a mapped EROFS image, its files' chunks on the data layers'
    /// images, mounted from the file: probed once, with scratch files under `state_dir`
    /// ([`mounts::erofs_mapped_supported`]).
    fn erofs_mapped(&self, _state_dir: &Path) -> bool {
        false
    }
    /// Unmounts `target` (nothing mounted there is success); `lazy` detaches a busy mount.
    fn unmount(&self, target: &Path, lazy: bool) -> Result<()>;
    /// Loop devices and their backing files.
    fn loop_devices(&self) -> Vec<loopback::Backing>;
    /// Detaches a loop device no mount holds.
    fn detach(&self, device: &Path) -> Result<()>;
    /// Makes a sparse ext4 image of `size` bytes whose root is owned by `uid:gid`.
    fn make_image(&self, path: &Path, size: u64, uid: u32, gid: u32) -> Result<()>;
    /// Makes a volume's upper image: [`Host::make_image`] with a small journal (a job deletes
    /// and writes again; see [`image::create_volume`]).
    fn make_volume_image(&self, path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
        self.make_image(path, size, uid, gid)
    }
    /// Makes a metadata base's image: [`Host::make_image`] with inodes large enough to hold a
    /// stub's overlay xattrs ([`image::create_metadata`]).
    fn make_metadata_image(&self, path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
        self.make_image(path, size, uid, gid)
    }
    /// Punches the journal of a cleanly unmounted image out of its sparse file, all but the
    /// journal's superblock; the bytes given back (0 without a journal to give back).
    fn release_journal(&self, _image: &Path) -> Result<u64> {
        Ok(0)
    }
    /// Checks and repairs an unmounted image (e2fsck -p); the exit code (0 clean, 1 repaired).
    fn check_image(&self, path: &Path) -> Result<i32>;
    /// Whether an unmounted image's superblock says it was cleanly unmounted.
    fn image_is_clean(&self, path: &Path) -> Result<bool>;
    /// Grows or shrinks an unmounted image.
    fn resize_image(&self, path: &Path, size: u64) -> Result<()>;
    /// Sets the owner of `path`.
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()>;
    /// `(available, total)` bytes of the filesystem holding `path` (available: what an
    /// unprivileged user may still write, as df's Avail).
    fn fs_space(&self, path: &Path) -> Result<(u64, u64)>;
    /// Clones `src` into the new file `dst` sharing its blocks (FICLONE).
    fn reflink(&self, src: &Path, dst: &Path) -> Result<()>;
    /// Whether files in `dir` can be cloned.
    fn supports_reflink(&self, dir: &Path) -> bool;
    /// Makes the reflink pool image.
    fn make_pool(&self, path: &Path, size: u64) -> Result<()>;
    /// Mounts the reflink pool image at `target`.
    fn mount_pool(&self, image: &Path, target: &Path) -> Result<()>;
    /// Discards the free blocks of the filesystem mounted at `mount`.
    fn trim(&self, mount: &Path) -> Result<()>;
    /// Mounts an idmapped view of the mount at `src` at `target`: root stays root, on-disk
    /// owner `disk` appears as `shown` (uid and gid maps `0 0 1` + `disk shown 1`).
    fn idmap_mount(
        &self,
        src: &Path,
        target: &Path,
        uid: (u32, u32),
        gid: (u32, u32),
    ) -> Result<()>;
}

/// The real host: syscalls and the tools of [`cmd`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RealHost;

impl Host for RealHost {
    fn mount_table(&self) -> Result<Vec<MountEntry>> {
        mounts::mount_table()
    }
    fn mount_image(&self, image: &Path, target: &Path, how: ImageMount) -> Result<()> {
        mounts::mount_image(image, target, how.read_only)
    }
    fn mount_overlay_with_data(
        &self,
        lowers: &[PathBuf],
        data: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<()> {
        mounts::mount_overlay_with_data(lowers, data, upper, target)
    }
    fn data_layers_supported(&self) -> bool {
        mounts::data_layers_supported()
    }
    fn erofs_metadata(&self) -> bool {
        mounts::erofs_supported()
    }
    fn erofs_mapped(&self, state_dir: &Path) -> bool {
        mounts::erofs_mapped_supported(state_dir)
    }
    fn unmount(&self, target: &Path, lazy: bool) -> Result<()> {
        mounts::unmount(target, lazy)
    }
    fn loop_devices(&self) -> Vec<loopback::Backing> {
        loopback::list()
    }
    fn detach(&self, device: &Path) -> Result<()> {
        loopback::detach(device)
    }
    fn make_image(&self, path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
        image::create(path, size, uid, gid)
    }
    fn make_volume_image(&self, path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
        image::create_volume(path, size, uid, gid)
    }
    fn make_metadata_image(&self, path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
        image::create_metadata(path, size, uid, gid)
    }
    fn release_journal(&self, image: &Path) -> Result<u64> {
        image::release_journal(image)
    }
    fn check_image(&self, path: &Path) -> Result<i32> {
        image::check(path)
    }
    fn image_is_clean(&self, path: &Path) -> Result<bool> {
        image::is_clean(path)
    }
    fn resize_image(&self, path: &Path, size: u64) -> Result<()> {
        image::resize(path, size)
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .at("chown", path)
    }
    fn fs_space(&self, path: &Path) -> Result<(u64, u64)> {
        let free = crate::state::fsutil::free_bytes(path)?;
        let (_, total) = crate::state::fsutil::fs_usage(path)?;
        Ok((free, total))
    }
    fn reflink(&self, src: &Path, dst: &Path) -> Result<()> {
        clone::reflink(src, dst)
    }
    fn supports_reflink(&self, dir: &Path) -> bool {
        clone::supports_reflink(dir)
    }
    fn make_pool(&self, path: &Path, size: u64) -> Result<()> {
        clone::make_pool(path, size)
    }
    fn mount_pool(&self, image: &Path, target: &Path) -> Result<()> {
        clone::mount_pool(image, target)
    }
    fn trim(&self, mount: &Path) -> Result<()> {
        clone::trim(mount)
    }
    fn idmap_mount(
        &self,
        src: &Path,
        target: &Path,
        uid: (u32, u32),
        gid: (u32, u32),
    ) -> Result<()> {
        let map = |(disk, shown): (u32, u32)| {
            if disk == 0 || shown == 0 {
                "0 0 1".to_string()
            } else {
                format!("0 0 1\n{disk} {shown} 1")
            }
        };
        let ns = idmap::userns_fd(&map(uid), &map(gid))?;
        idmap::idmap_mount(src, target, std::os::fd::AsFd::as_fd(&ns))
    }
}
