//! Mounting: ext4 images and overlayfs with jobcachefs's fixed options, unmounting, and reading
//! the mount table.
//!
//! Overlays go through the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`), one
//! `lowerdir+` per layer, never through one `mount(2)` option string: the kernel copies one page
//! of that string and mounts whatever the cut leaves — at depth 59 that was the state dir itself
//! as the only lower, read-only, without the upper (issue 30). How each layer reaches the kernel
//! depends on the kernel (probed once per process, [`interface`]):
//! - 6.13+: by an `O_PATH` file descriptor (`fsconfig(FSCONFIG_SET_FD)`): no string at all.
//! - 6.8–6.12: by path (`FSCONFIG_SET_STRING`, which the kernel caps at 256 bytes): a longer
//!   path is refused by name, never cut.
//! - older: one `mount(2)` string, refused when it would not fit in the page.
//!
//! Whatever the interface, every overlay is then checked against `/proc/self/mountinfo`
//! ([`verify_overlay`]): its lowers, upper, work dir and rw/ro must be exactly what was asked,
//! or it is unmounted and the call fails naming the difference.

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::host::loopback;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// Overlay options on every overlay jobcachefs makes (see docs/src/design.md): no index, no
/// redirects, no metacopy, no xino, so that an upper is a self-contained tree that can become a
/// lower layer.
pub const OVERLAY_OPTIONS: &str = "index=off,redirect_dir=off,metacopy=off,xino=off";

/// A line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (a device for ext4).
    pub source: String,
    /// Per-superblock options (overlay's lowerdir/upperdir are here).
    pub super_options: String,
    /// Per-mount options (`rw`/`ro`, `nosuid`, `nodev`).
    pub mount_options: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.splitn(3, ' ');
            let fstype = post.next()?.to_string();
            let source = unescape(post.next()?);
            let super_options = post.next().unwrap_or("").to_string();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                fstype,
                source,
                super_options,
                mount_options: pre.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The current mount table.
pub fn mount_table() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .at("read", Path::new("/proc/self/mountinfo"))?;
    Ok(parse_mountinfo(&text))
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(table: &[MountEntry], path: &Path) -> bool {
    table.iter().any(|m| m.mount_point == path)
}

/// Attaches `image` to a loop device and mounts it at `target` (`nosuid,nodev`, read-only when
/// asked). A writable device does direct I/O (see [`loopback`]) with the image's block size as
/// its logical block size; a read-only one is buffered (see [`loopback::direct_io_for`]). On
/// failure nothing stays attached.
pub fn mount_image(image: &Path, target: &Path, read_only: bool) -> Result<()> {
    // A metadata base written as EROFS (files::erofs) is read-only by nature.
    let erofs = crate::files::erofs::is_erofs(image);
    if erofs && !read_only {
        return Err(Error::invalid(format!(
            "{} is an EROFS metadata base, which only mounts read-only",
            image.display()
        )));
    }
    if erofs {
        // A mapped metadata base reads its files' bytes from the data layers' images: mounted
        // from the file itself (no loop device), each image an extra device by path.
        let tags = crate::files::erofs::device_tags(image)?;
        if !tags.is_empty() {
            let dir = image.parent().unwrap_or(Path::new("."));
            let devices: Vec<PathBuf> = tags.iter().map(|t| dir.join(t)).collect();
            return mount_erofs_file(image, &devices, target).map_err(|(e, log)| {
                Error::io(
                    format!(
                        "mount the metadata base {} at {target}{}",
                        image.display(),
                        if log.is_empty() {
                            String::new()
                        } else {
                            format!(" ({log})")
                        },
                        target = target.display()
                    ),
                    std::io::Error::from_raw_os_error(e.raw_os_error()),
                )
            });
        }
    }
    let direct_io = loopback::direct_io_for(read_only);
    let block_size = if direct_io {
        loopback::block_size_for(image, loopback::ext4_block_size(image))
    } else {
        0
    };
    let dev = loopback::attach_opts(
        image,
        loopback::Options {
            read_only,
            direct_io,
            block_size,
        },
    )?;
    crate::fault::point("loop:attached");
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    // noinit_itable: the images are made with lazy_itable_init; without it the kernel would zero
    // every inode table in the background and fill the sparse file.
    let plain = "noinit_itable";
    let data = if !read_only && crate::host::image::has_journal(image) {
        // A volume's journal (image::create_volume) is there so that ext4 reuses deleted inodes
        // at once, not for crash safety: an image that was not cleanly unmounted is never
        // committed. data=ordered would make each journal commit a flush before the commit block
        // and a FUA write of it, which a loop device turns into two fsyncs of the image on the
        // host: 3,000 flushes for 1,500 fsync'd 4 KiB files against 1,500 without a journal.
        // journal_async_commit writes the commit block with a checksum and flushes once
        // (1,500), and needs data=writeback: data is then not forced out before the metadata
        // that points at it, no weaker than the journal-less images were.
        "noinit_itable,data=writeback,journal_async_commit"
    } else {
        plain
    };
    let mut result = if erofs {
        mount(Some(dev.path()), target, Some("erofs"), flags, None::<&str>)
    } else {
        mount(Some(dev.path()), target, Some("ext4"), flags, Some(data))
    };
    if !erofs && data != plain && result == Err(nix::errno::Errno::EINVAL) {
        tracing::warn!(image = %image.display(), options = data, "ext4 refused the journal's mount options: mounting without them");
        result = mount(Some(dev.path()), target, Some("ext4"), flags, Some(plain));
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            dev.detach();
            Err(Error::io(
                format!("mount {} at {}", image.display(), target.display()),
                e.into(),
            ))
        }
    }
}

/// Mounts the EROFS image file `image` read-only at `target`, `devices` its extra devices in
/// its device table's order (Linux 6.12+ with `CONFIG_EROFS_FS_BACKED_BY_FILE`: the kernel
/// reads the files through their page cache, no loop device in between).
fn mount_erofs_file(
    image: &Path,
    devices: &[PathBuf],
    target: &Path,
) -> std::result::Result<(), (rustix::io::Errno, String)> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsopen, FsOpenFlags, MountAttrFlags,
    };
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| (e, String::new()))?;
    let with_log = |e: rustix::io::Errno| (e, context_log(&fs));
    fsconfig_set_string(&fs, "source", image).map_err(with_log)?;
    for d in devices {
        fsconfig_set_string(&fs, "device", d).map_err(with_log)?;
    }
    fsconfig_create(&fs).map_err(with_log)?;
    let attrs = MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_RDONLY;
    attach(&fs, attrs, target).map_err(|e| (e, context_log(&fs)))
}

/// Checks that a path can appear in overlay options (`:` and `,` separate them).
pub fn check_option_path(what: &str, path: &Path) -> Result<()> {
    let s = path.to_string_lossy();
    if s.contains([':', ',', '\\', '\n']) || path.to_str().is_none() {
        return Err(Error::invalid(format!(
            "{what} {s:?} contains ':', ',', '\\' or non-UTF-8 bytes, which overlayfs options cannot carry: choose a plain path"
        )));
    }
    Ok(())
}

/// Most lower layers jobcachefs puts under one overlay. overlayfs itself allows 500
/// (`OVL_MAX_STACK`); every lookup of a name walks the layers that hold its directory, so
/// Docker's overlay2 caps images at 128 layers, and so do we. The depth bounds of the engine
/// (`max_depth_hard`, scope layers on top) are validated to stay below it.
pub const MAX_OVERLAY_LOWERS: usize = 128;

/// Bytes of `mount(2)`'s data string the kernel reads: one page, its NUL included
/// (`copy_mount_options`). A longer string is cut, and the cut string may still mount.
pub const MOUNT_DATA_MAX: usize = 4095;

/// Bytes of an `fsconfig(FSCONFIG_SET_STRING)` value the kernel reads (`strndup_user(value,
/// 256)`, its NUL included); a longer value is refused with EINVAL by the kernel, and here first.
pub const FSCONFIG_STRING_MAX: usize = 255;

/// How the layers of an overlay reach the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayInterface {
    /// `fsconfig(FSCONFIG_SET_FD)` with an `O_PATH` descriptor per layer (Linux 6.13+).
    LayerFds,
    /// `fsconfig(FSCONFIG_SET_STRING)` of `lowerdir+` per layer, each path ≤ 255 bytes (6.8+).
    LayerPaths,
    /// One `mount(2)` data string, at most one page (older kernels).
    MountData,
}

impl OverlayInterface {
    /// The name used in logs and in `JOBCACHEFS_OVERLAY_INTERFACE`.
    pub fn name(self) -> &'static str {
        match self {
            OverlayInterface::LayerFds => "fds",
            OverlayInterface::LayerPaths => "paths",
            OverlayInterface::MountData => "mount-data",
        }
    }
}

/// The interface this kernel offers, probed once per process. `JOBCACHEFS_OVERLAY_INTERFACE`
/// (`paths` or `mount-data`) selects an older one, so that the tests exercise every interface
/// on one kernel; it can never select one the kernel lacks.
pub fn interface() -> OverlayInterface {
    static PROBED: std::sync::OnceLock<OverlayInterface> = std::sync::OnceLock::new();
    let probed = *PROBED.get_or_init(probe_interface);
    let asked = match std::env::var("JOBCACHEFS_OVERLAY_INTERFACE").as_deref() {
        Ok("paths") => OverlayInterface::LayerPaths,
        Ok("mount-data") => OverlayInterface::MountData,
        _ => return probed,
    };
    let rank = |i| match i {
        OverlayInterface::LayerFds => 2,
        OverlayInterface::LayerPaths => 1,
        OverlayInterface::MountData => 0,
    };
    if rank(asked) < rank(probed) {
        asked
    } else {
        probed
    }
}

fn probe_interface() -> OverlayInterface {
    use rustix::mount::{fsconfig_set_fd, fsconfig_set_string, fsopen, FsOpenFlags};
    let open = || fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).ok();
    let Some(fs) = open() else {
        return OverlayInterface::MountData;
    };
    if let Ok(root) = rustix::fs::open(
        "/",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        if fsconfig_set_fd(&fs, "lowerdir+", &root).is_ok() {
            return OverlayInterface::LayerFds;
        }
    }
    match open() {
        Some(fs) if fsconfig_set_string(&fs, "lowerdir+", "/").is_ok() => {
            OverlayInterface::LayerPaths
        }
        _ => OverlayInterface::MountData,
    }
}

/// The legacy `mount(2)` option string for `lowers` (bottom first) and an optional
/// `(upperdir, workdir)`; [`plan_overlay`] refuses it when the kernel would cut it.
pub fn overlay_options(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> String {
    overlay_options_with_data(lowers, &[], upper)
}

/// [`overlay_options`] with data-only layers (`::` before each, in mount order).
pub fn overlay_options_with_data(
    lowers: &[PathBuf],
    data: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> String {
    // overlayfs lists the uppermost lower first.
    let lower: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let mut opts = format!("lowerdir={}", lower.join(":"));
    for d in data {
        opts.push_str("::");
        opts.push_str(&d.display().to_string());
    }
    if let Some((u, w)) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    opts.push(',');
    opts.push_str(OVERLAY_OPTIONS);
    opts
}

/// What is handed to the kernel for one overlay, decided before any syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayPlan {
    /// Each layer by descriptor.
    Fds,
    /// Each layer by path, every one within [`FSCONFIG_STRING_MAX`].
    Paths,
    /// One `mount(2)` string within [`MOUNT_DATA_MAX`].
    Data(String),
}

/// Decides how to mount an overlay of `lowers` (bottom first) over `upper`, or refuses with the
/// reason and the fix: nothing that reaches the kernel can be cut.
pub fn plan_overlay(
    iface: OverlayInterface,
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> Result<OverlayPlan> {
    plan_overlay_with_data(iface, lowers, &[], upper)
}

/// [`plan_overlay`] with data-only layers below the lowers.
pub fn plan_overlay_with_data(
    iface: OverlayInterface,
    lowers: &[PathBuf],
    data: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> Result<OverlayPlan> {
    if lowers.is_empty() || lowers.len() + data.len() > MAX_OVERLAY_LOWERS {
        return Err(Error::invalid(format!(
            "an overlay of {} lower layers was asked; jobcachefs mounts 1 to {MAX_OVERLAY_LOWERS}: \
             squash the cache (`jobcachefs cache squash NAME`)",
            lowers.len() + data.len()
        )));
    }
    let all: Vec<&Path> = lowers
        .iter()
        .chain(data)
        .map(PathBuf::as_path)
        .chain(upper.into_iter().flat_map(|(u, w)| [u, w]))
        .collect();
    for p in &all {
        check_option_path("overlay layer", p)?;
        if !p.is_absolute() {
            return Err(Error::invalid(format!(
                "overlay layer {} is not an absolute path",
                p.display()
            )));
        }
        if p.as_os_str().len() >= libc::PATH_MAX as usize {
            return Err(Error::invalid(format!(
                "overlay layer {}… is {} bytes, over PATH_MAX: use a shorter --state-dir",
                p.display().to_string().chars().take(64).collect::<String>(),
                p.as_os_str().len()
            )));
        }
    }
    match iface {
        OverlayInterface::LayerFds => Ok(OverlayPlan::Fds),
        OverlayInterface::LayerPaths => {
            if let Some(p) = all
                .iter()
                .find(|p| p.as_os_str().len() > FSCONFIG_STRING_MAX)
            {
                return Err(Error::invalid(format!(
                    "overlay layer {} is {} bytes; this kernel takes layer paths of at most \
                     {FSCONFIG_STRING_MAX} bytes (Linux 6.13+ takes any): use a shorter --state-dir \
                     or shorter namespace and cache names",
                    p.display(),
                    p.as_os_str().len()
                )));
            }
            Ok(OverlayPlan::Paths)
        }
        OverlayInterface::MountData => {
            let opts = overlay_options_with_data(lowers, data, upper);
            if opts.len() > MOUNT_DATA_MAX {
                return Err(Error::invalid(format!(
                    "an overlay of {} layers needs {} bytes of mount options; this kernel reads \
                     {MOUNT_DATA_MAX} (Linux 6.8+ has no such limit): squash the cache \
                     (`jobcachefs cache squash NAME`), lower max_depth_hard, or use a shorter --state-dir",
                    lowers.len(),
                    opts.len()
                )));
            }
            Ok(OverlayPlan::Data(opts))
        }
    }
}

/// The xattr that makes a lower layer's regular file a metadata-only stub.
pub const METACOPY_XATTR: &str = "trusted.overlay.metacopy";
/// The xattr naming where a stub's data is (an absolute path, looked up in data-only layers).
pub const REDIRECT_XATTR: &str = "trusted.overlay.redirect";

/// Whether this kernel serves a metacopy stub of a lower layer from a data-only layer on an
/// overlay mounted with `metacopy=off` (Linux 6.16, "relax redirect/metacopy requirements for
/// lower -> data redirect"): found out once per process by a trial mount of such a pair in a
/// scratch dir, with the data read back. `JOBCACHEFS_NO_DATA_LAYERS=1` answers no (the tests of
/// the fallback).
pub fn data_layers_supported() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    probed_once(
        &PROBED,
        "JOBCACHEFS_NO_DATA_LAYERS",
        probe_data_layers,
        "data-only layers unavailable: metadata squash off",
    )
}

/// A trial's answer, found once per process: no when `off` is set to 1 (the tests of the
/// fallbacks), and when the trial fails (`failed` is logged with why).
fn probed_once(
    cell: &std::sync::OnceLock<bool>,
    off: &str,
    trial: impl FnOnce() -> Result<bool>,
    failed: &str,
) -> bool {
    if std::env::var_os(off).is_some_and(|v| v == "1") {
        return false;
    }
    *cell.get_or_init(|| {
        trial().unwrap_or_else(|e| {
            tracing::info!(error = %e, "{failed}");
            false
        })
    })
}

fn probe_data_layers() -> Result<bool> {
    let dir = std::env::temp_dir().join(format!("jobcachefs-probe-{}", std::process::id()));
    let (meta, data, view) = (dir.join("m"), dir.join("d"), dir.join("v"));
    let result = (|| {
        for d in [&meta, &data, &view] {
            std::fs::create_dir_all(d).at("create", d)?;
        }
        std::fs::write(data.join("f"), b"data").at("write", &data)?;
        let stub = meta.join("f");
        std::fs::File::create(&stub)
            .and_then(|f| f.set_len(4))
            .at("create", &stub)?;
        xattr::set(&stub, METACOPY_XATTR, b"").at("set xattr on", &stub)?;
        xattr::set(&stub, REDIRECT_XATTR, b"/f").at("set xattr on", &stub)?;
        mount_overlay_with_data(
            std::slice::from_ref(&meta),
            std::slice::from_ref(&data),
            None,
            &view,
        )?;
        let read = std::fs::read(view.join("f"));
        unmount(&view, true)?;
        Ok(read.map(|b| b == b"data").unwrap_or(false))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Whether metadata bases can be EROFS images ([`crate::files::erofs`]): probed once by
/// writing one with a stub, mounting it from a loop device as an overlay's lower layer over a
/// data-only layer, and reading the stub's data back. `JOBCACHEFS_NO_EROFS=1` answers no (the
/// tests of the ext4 fallback); so does a kernel without EROFS, which then gets ext4 bases.
pub fn erofs_supported() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    probed_once(
        &PROBED,
        "JOBCACHEFS_NO_EROFS",
        probe_erofs,
        "EROFS metadata bases unavailable: ext4 ones instead",
    )
}

fn probe_erofs() -> Result<bool> {
    let dir = std::env::temp_dir().join(format!("jobcachefs-erofs-{}", std::process::id()));
    let (tree, data, mnt, view) = (dir.join("t"), dir.join("d"), dir.join("m"), dir.join("v"));
    // A read-only overlay needs a second lower (not inside another layer: overlapping layers
    // are refused).
    let top = dir.join("e");
    let image = dir.join("meta.img");
    let result = (|| {
        for d in [&tree, &data, &mnt, &view, &top] {
            std::fs::create_dir_all(d).at("create", d)?;
        }
        std::fs::write(tree.join("f"), b"data").at("write", &tree)?;
        std::fs::write(data.join("f"), b"data").at("write", &data)?;
        let m = crate::files::manifest::of_tree(&tree, crate::files::manifest::Names::View)?;
        crate::files::erofs::write_stub_image(&m, &image)?;
        mount_image(&image, &mnt, true)?;
        let read = (|| {
            mount_overlay_with_data(
                &[mnt.join("upper"), top.clone()],
                std::slice::from_ref(&data),
                None,
                &view,
            )?;
            let read = std::fs::read(view.join("f"));
            unmount(&view, true)?;
            Ok::<_, Error>(read.map(|b| b == b"data").unwrap_or(false))
        })();
        unmount(&mnt, true)?;
        read
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Whether metadata bases can be mapped EROFS images ([`crate::files::erofs`]'s
/// `write_mapped_image`): probed once by writing one whose file maps a block of a scratch
/// image, mounting it from the file with that image as its device, and reading the file back
/// through an overlay over it. The scratch files go in a dir under `state_dir`: the layer
/// images' filesystem must serve file-backed mounts (tmpfs, for one, does not).
/// `JOBCACHEFS_NO_EROFS_MAPPED=1` (or `JOBCACHEFS_NO_EROFS=1`) answers no (the tests of the
/// stub bases); so does a kernel before 6.12 or without `CONFIG_EROFS_FS_BACKED_BY_FILE`.
pub fn erofs_mapped_supported(state_dir: &Path) -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // No EROFS at all (`JOBCACHEFS_NO_EROFS=1`) means no mapped base either.
    if std::env::var_os("JOBCACHEFS_NO_EROFS").is_some_and(|v| v == "1") {
        return false;
    }
    probed_once(
        &PROBED,
        "JOBCACHEFS_NO_EROFS_MAPPED",
        || probe_erofs_mapped(state_dir),
        "mapped EROFS metadata bases unavailable: stub bases over data-only layers instead",
    )
}

fn probe_erofs_mapped(state_dir: &Path) -> Result<bool> {
    use crate::files::manifest::{Entry, Manifest};
    // What a probe killed midway left (its process gone): unmounted and removed.
    for e in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("probe-mapped-")) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            for m in ["v", "m"] {
                let _ = unmount(&e.path().join(m), true);
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let dir = state_dir.join(format!("probe-mapped-{}", std::process::id()));
    let (data, image, mnt) = (dir.join("d.img"), dir.join("m.img"), dir.join("m"));
    let (top, view) = (dir.join("e"), dir.join("v"));
    let result = (|| {
        for d in [&mnt, &top, &view] {
            std::fs::create_dir_all(d).at("create", d)?;
        }
        let mut block = vec![0u8; 8192];
        block[4096..4100].copy_from_slice(b"data");
        std::fs::write(&data, &block).at("write", &data)?;
        let entry = |path: &str, mode: u32, size: u64| Entry {
            size,
            layer: Some("d".into()),
            extents: Some(vec![[0, 4096, 4096]]),
            ..Entry::new(path.as_bytes(), mode)
        };
        let m = Manifest {
            image: None,
            entries: vec![
                entry("", libc::S_IFDIR | 0o755, 0),
                entry("f", libc::S_IFREG | 0o644, 4),
            ],
        };
        let device = crate::files::erofs::Device {
            layer: "d".into(),
            file: "d.img".into(),
            size: 8192,
        };
        crate::files::erofs::write_mapped_image(&m, &[device], &image)?;
        mount_image(&image, &mnt, true)?;
        // As volumes use it: an overlay's lower layer (a read-only one needs two).
        let read = (|| {
            mount_overlay(&[mnt.join("upper"), top.clone()], None, &view)?;
            let read = std::fs::read(view.join("f"));
            unmount(&view, true)?;
            Ok::<_, Error>(read.map(|b| b == b"data").unwrap_or(false))
        })();
        unmount(&mnt, true)?;
        read
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// An overlay as `/proc/self/mountinfo` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayView {
    /// Lower layers, bottom first.
    pub lowers: Vec<PathBuf>,
    /// Data-only lower layers (`datadir+`), in mount order.
    pub data: Vec<PathBuf>,
    /// `upperdir`.
    pub upper: Option<PathBuf>,
    /// `workdir`.
    pub work: Option<PathBuf>,
    /// The superblock is read-only.
    pub read_only: bool,
}

/// Parses an overlay's per-superblock options (either form: one `lowerdir=` list, top first,
/// or one `lowerdir+=` per layer, top first). Values are octal-escaped by the kernel.
pub fn parse_overlay(super_options: &str) -> OverlayView {
    let mut view = OverlayView::default();
    let mut top_first = Vec::new();
    for (i, opt) in super_options.split(',').enumerate() {
        let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
        match key {
            "ro" if i == 0 => view.read_only = true,
            "lowerdir" => {
                // `A:B::D1::D2`: data-only layers after the first `::`.
                let (normal, data) = value.split_once("::").unwrap_or((value, ""));
                top_first.extend(normal.split(':').map(|v| PathBuf::from(unescape(v))));
                view.data.extend(
                    data.split("::")
                        .filter(|d| !d.is_empty())
                        .map(|v| PathBuf::from(unescape(v))),
                );
            }
            "lowerdir+" => top_first.push(PathBuf::from(unescape(value))),
            "datadir+" => view.data.push(PathBuf::from(unescape(value))),
            "upperdir" => view.upper = Some(PathBuf::from(unescape(value))),
            "workdir" => view.work = Some(PathBuf::from(unescape(value))),
            _ => {}
        }
    }
    top_first.reverse();
    view.lowers = top_first;
    view
}

/// Checks that the mount `entry` is exactly the overlay asked for: the same lowers in the same
/// order, the same upper and work dir, read-only exactly when there is no upper, `nosuid` and
/// `nodev`. The error names the first difference.
pub fn verify_overlay(
    entry: &MountEntry,
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> Result<()> {
    verify_overlay_with_data(entry, lowers, &[], upper)
}

/// [`verify_overlay`] with the data-only layers asked for, in mount order.
pub fn verify_overlay_with_data(
    entry: &MountEntry,
    lowers: &[PathBuf],
    data: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> Result<()> {
    let at = entry.mount_point.display();
    let fail = |what: String| {
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "the overlay mounted at {at} is not the one asked for: {what}; it was unmounted"
            ),
        ))
    };
    if entry.fstype != "overlay" {
        return fail(format!("it is {} (asked overlay)", entry.fstype));
    }
    let view = parse_overlay(&entry.super_options);
    if view.lowers.len() != lowers.len() {
        return fail(format!(
            "it has {} lower layers (asked {})",
            view.lowers.len(),
            lowers.len()
        ));
    }
    for (i, (got, asked)) in view.lowers.iter().zip(lowers).enumerate() {
        if got != asked {
            return fail(format!(
                "lower layer {i} (from the bottom) is {} (asked {})",
                got.display(),
                asked.display()
            ));
        }
    }
    if view.data != data {
        return fail(format!(
            "its data-only layers are {:?} (asked {:?})",
            view.data, data
        ));
    }
    let asked_upper = upper.map(|(u, _)| u.to_path_buf());
    let asked_work = upper.map(|(_, w)| w.to_path_buf());
    if view.upper != asked_upper || view.work != asked_work {
        return fail(format!(
            "its upper and work dir are {:?} and {:?} (asked {:?} and {:?})",
            view.upper, view.work, asked_upper, asked_work
        ));
    }
    let mount_opts: Vec<&str> = entry.mount_options.split(',').collect();
    let mount_ro = mount_opts.first() == Some(&"ro");
    if view.read_only != upper.is_none() || mount_ro != upper.is_none() {
        return fail(format!(
            "it is {} (asked {})",
            if view.read_only || mount_ro {
                "read-only"
            } else {
                "read-write"
            },
            if upper.is_none() {
                "read-only"
            } else {
                "read-write"
            }
        ));
    }
    for flag in ["nosuid", "nodev"] {
        if !mount_opts.contains(&flag) {
            return fail(format!("it lacks {flag}"));
        }
    }
    Ok(())
}

/// Mounts an overlay at `target`: read-only when `upper` is `None`. The mount is verified
/// against the mount table before this returns; a mount that differs is unmounted again.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> Result<()> {
    mount_overlay_with_data(lowers, &[], upper, target)
}

/// [`mount_overlay`] with data-only layers below the lowers (newest first: the first that
/// holds a regular file at a stub's redirect serves its data). Since Linux 6.16 a lower layer's
/// metacopy stub may redirect into a data-only layer without `metacopy=on`, so volumes keep
/// `metacopy=off`: their copy-ups are whole files, as always.
pub fn mount_overlay_with_data(
    lowers: &[PathBuf],
    data: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> Result<()> {
    let iface = interface();
    let plan = plan_overlay_with_data(iface, lowers, data, upper)?;
    let describe = || {
        format!(
            "mount an overlay of {} layers at {} (interface {})",
            lowers.len(),
            target.display(),
            iface.name()
        )
    };
    match plan {
        OverlayPlan::Data(opts) => {
            let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            if upper.is_none() {
                flags |= MsFlags::MS_RDONLY;
            }
            mount(
                Some("jobcachefs"),
                target,
                Some("overlay"),
                flags,
                Some(opts.as_str()),
            )
            .map_err(|e| Error::io(describe(), e.into()))?;
        }
        OverlayPlan::Fds | OverlayPlan::Paths => {
            mount_overlay_new_api(plan == OverlayPlan::Fds, lowers, data, upper, target).map_err(
                |(e, log)| {
                    let what = if log.is_empty() {
                        describe()
                    } else {
                        format!("{} ({log})", describe())
                    };
                    Error::io(what, e.into())
                },
            )?;
        }
    }
    crate::fault::point("overlay:mounted");
    let verified = mount_table().and_then(|table| {
        match table.iter().rev().find(|m| m.mount_point == target) {
            Some(entry) => verify_overlay_with_data(entry, lowers, data, upper),
            None => Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the overlay mounted at {} is not in the mount table",
                    target.display()
                ),
            )),
        }
    });
    if let Err(e) = verified {
        if let Err(u) = unmount(target, true) {
            tracing::error!(target = %target.display(), error = %u, "a refused overlay could not be unmounted");
        }
        return Err(e);
    }
    Ok(())
}

/// The new mount API: an fs context per overlay, one `lowerdir+` per layer (top first, as the
/// kernel appends them), by descriptor or by path. On failure: the errno and the messages the
/// kernel left in the context's log.
fn mount_overlay_new_api(
    by_fd: bool,
    lowers: &[PathBuf],
    data: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> std::result::Result<(), (rustix::io::Errno, String)> {
    use rustix::fs::{open, Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_fd, fsconfig_set_string, fsopen, FsOpenFlags, MountAttrFlags,
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| (e, String::new()))?;
    let with_log = |e: rustix::io::Errno| (e, context_log(&fs));
    let layer = |key: &str, path: &Path| -> rustix::io::Result<()> {
        if by_fd {
            let fd = open(
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            fsconfig_set_fd(&fs, key, &fd)
        } else {
            fsconfig_set_string(&fs, key, path)
        }
    };
    let naming = |key: &str, path: &Path| {
        let fs = &fs;
        let what = format!("{key} {}", path.display());
        move |e: rustix::io::Errno| {
            let log = context_log(fs);
            (
                e,
                if log.is_empty() {
                    what
                } else {
                    format!("{what}: {log}")
                },
            )
        }
    };
    fsconfig_set_string(&fs, "source", "jobcachefs").map_err(with_log)?;
    for lower in lowers.iter().rev() {
        layer("lowerdir+", lower).map_err(naming("lowerdir+", lower))?;
    }
    for d in data {
        layer("datadir+", d).map_err(naming("datadir+", d))?;
    }
    if let Some((u, w)) = upper {
        layer("upperdir", u).map_err(naming("upperdir", u))?;
        layer("workdir", w).map_err(naming("workdir", w))?;
    }
    for opt in OVERLAY_OPTIONS.split(',') {
        let (k, v) = opt.split_once('=').expect("key=value");
        fsconfig_set_string(&fs, k, v).map_err(with_log)?;
    }
    fsconfig_create(&fs).map_err(with_log)?;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
    if upper.is_none() {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    attach(&fs, attrs, target).map_err(|e| (e, context_log(&fs)))
}

/// Makes the created superblock of the fs context `fs` a mount with `attrs` and attaches it at
/// `target`.
fn attach(
    fs: &std::os::fd::OwnedFd,
    attrs: rustix::mount::MountAttrFlags,
    target: &Path,
) -> rustix::io::Result<()> {
    use rustix::mount::{fsmount, move_mount, FsMountFlags, MoveMountFlags};
    let mnt = fsmount(fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

/// The messages the kernel logged in an fs context (`e overlayfs: ...`), joined.
fn context_log(fs: &std::os::fd::OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match rustix::io::read(fs, &mut buf) {
            Ok(n) if n > 0 => out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            _ => break,
        }
    }
    out.join("; ")
}

/// Unmounts `target`. A busy mount is retried briefly; with `lazy` it is then detached lazily,
/// otherwise the error says who to stop.
pub fn unmount(target: &Path, lazy: bool) -> Result<()> {
    for attempt in 0..20 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if attempt < 19 => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(nix::errno::Errno::EBUSY) if lazy => {
                return umount2(target, MntFlags::MNT_DETACH).at("lazily unmount", target)
            }
            Err(nix::errno::Errno::EBUSY) => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} is busy: stop the processes using it (fuser -vm {}) and retry",
                        target.display(),
                        target.display()
                    ),
                ))
            }
            Err(e) => return Err(e).at("unmount", target),
        }
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 1 0:50 / /v rw,nosuid,nodev shared:2 - overlay jobcachefs rw,lowerdir=/a:/b,upperdir=/u\n";
        let t = parse_mountinfo(text);
        assert_eq!(t[0].mount_point, Path::new("/mnt/with space"));
        assert_eq!(t[0].fstype, "ext3");
        assert_eq!(t[1].source, "jobcachefs");
        assert!(t[1].super_options.contains("lowerdir=/a:/b"));
        assert!(is_mounted(&t, Path::new("/v")));
    }

    #[test]
    fn overlay_options_list_top_layer_first() {
        let o = overlay_options(
            &[PathBuf::from("/base"), PathBuf::from("/top")],
            Some((Path::new("/u"), Path::new("/w"))),
        );
        assert_eq!(
            o,
            "lowerdir=/top:/base,upperdir=/u,workdir=/w,index=off,redirect_dir=off,metacopy=off,xino=off"
        );
    }

    fn layers(n: usize, len: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let stem = format!("/s/l{i:03}/");
                PathBuf::from(format!(
                    "{stem}{}",
                    "x".repeat(len.saturating_sub(stem.len()))
                ))
            })
            .collect()
    }

    #[test]
    fn the_plan_never_hands_the_kernel_a_string_it_would_cut() {
        // The depth-59 case of issue 30: 59 layers of ~70 bytes overflow one page.
        let deep = layers(59, 70);
        let u = (Path::new("/s/u/upper"), Path::new("/s/u/work"));
        let e = plan_overlay(OverlayInterface::MountData, &deep, Some(u)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("bytes of mount options"), "{e}");
        assert_eq!(
            plan_overlay(OverlayInterface::LayerFds, &deep, Some(u)).unwrap(),
            OverlayPlan::Fds
        );
        assert_eq!(
            plan_overlay(OverlayInterface::LayerPaths, &deep, Some(u)).unwrap(),
            OverlayPlan::Paths
        );
        let long = layers(2, 256);
        let e = plan_overlay(OverlayInterface::LayerPaths, &long, None).unwrap_err();
        assert!(e.to_string().contains("256 bytes"), "{e}");
        assert!(plan_overlay(OverlayInterface::LayerPaths, &layers(2, 255), None).is_ok());
        let e = plan_overlay(OverlayInterface::LayerFds, &layers(129, 10), None).unwrap_err();
        assert!(e.to_string().contains("129 lower layers"), "{e}");
        assert!(plan_overlay(OverlayInterface::LayerFds, &[], None).is_err());
        assert!(plan_overlay(OverlayInterface::LayerFds, &layers(128, 10), None).is_ok());
    }

    proptest::proptest! {
        /// Whatever the depth and path lengths: a planned mount(2) string fits in the page and
        /// says exactly the layers asked for; planned paths fit fsconfig's 255 bytes.
        #[test]
        fn planned_mounts_are_never_cut(n in 1usize..200, len in 6usize..400, with_upper: bool) {
            let lowers = layers(n, len);
            let (u, w) = (PathBuf::from("/s/u/upper"), PathBuf::from("/s/u/work"));
            let upper = with_upper.then_some((u.as_path(), w.as_path()));
            for iface in [OverlayInterface::LayerFds, OverlayInterface::LayerPaths, OverlayInterface::MountData] {
                match plan_overlay(iface, &lowers, upper) {
                    Ok(OverlayPlan::Data(s)) => {
                        proptest::prop_assert!(s.len() <= MOUNT_DATA_MAX);
                        let view = parse_overlay(&format!("rw,{s}"));
                        proptest::prop_assert_eq!(&view.lowers, &lowers);
                        proptest::prop_assert_eq!(view.upper.as_deref(), upper.map(|x| x.0));
                    }
                    Ok(OverlayPlan::Paths) => {
                        proptest::prop_assert!(lowers.iter().all(|p| p.as_os_str().len() <= FSCONFIG_STRING_MAX));
                    }
                    Ok(OverlayPlan::Fds) => proptest::prop_assert!(n <= MAX_OVERLAY_LOWERS),
                    Err(e) => proptest::prop_assert_eq!(e.kind(), ErrorKind::InvalidInput),
                }
            }
        }
    }

    fn entry(super_options: &str, mount_options: &str) -> MountEntry {
        MountEntry {
            mount_point: PathBuf::from("/v"),
            fstype: "overlay".into(),
            source: "jobcachefs".into(),
            super_options: super_options.into(),
            mount_options: mount_options.into(),
        }
    }

    #[test]
    fn parses_both_forms_of_overlay_options() {
        let old = parse_overlay("rw,lowerdir=/top:/base,upperdir=/u,workdir=/w,index=off");
        let new = parse_overlay(
            "rw,lowerdir+=/top,lowerdir+=/base,upperdir=/u,workdir=/w,redirect_dir=off",
        );
        assert_eq!(old, new);
        assert_eq!(
            old.lowers,
            vec![PathBuf::from("/base"), PathBuf::from("/top")]
        );
        assert_eq!(old.upper.as_deref(), Some(Path::new("/u")));
        assert!(!old.read_only);
        let ro = parse_overlay("ro,lowerdir+=/a\\054b\\040c,lowerdir+=/d,datadir+=/e");
        assert!(ro.read_only);
        assert_eq!(ro.lowers[1], PathBuf::from("/a,b c"));
        assert_eq!(ro.data, vec![PathBuf::from("/e")]);
    }

    #[test]
    fn verification_names_the_first_difference() {
        let lowers = [PathBuf::from("/base"), PathBuf::from("/top")];
        let up = Some((Path::new("/u"), Path::new("/w")));
        let good = "rw,lowerdir+=/top,lowerdir+=/base,upperdir=/u,workdir=/w";
        verify_overlay(&entry(good, "rw,nosuid,nodev,relatime"), &lowers, up).unwrap();
        let cases = [
            // The issue-30 mount: the state dir as the only lower, no upper, read-only.
            (
                "ro,lowerdir=/var/lib/",
                "ro,nosuid,nodev",
                "1 lower layers (asked 2)",
            ),
            (
                "rw,lowerdir+=/base,lowerdir+=/top,upperdir=/u,workdir=/w",
                "rw,nosuid,nodev",
                "lower layer 0 (from the bottom) is /top (asked /base)",
            ),
            (
                "rw,lowerdir+=/top,lowerdir+=/base",
                "rw,nosuid,nodev",
                "upper and work dir",
            ),
            (
                "ro,lowerdir+=/top,lowerdir+=/base,upperdir=/u,workdir=/w",
                "ro,nosuid,nodev",
                "read-only (asked read-write)",
            ),
            (good, "rw,nodev", "lacks nosuid"),
            (
                "rw,lowerdir+=/top,lowerdir+=/base,datadir+=/d,upperdir=/u,workdir=/w",
                "rw,nosuid,nodev",
                "data-only",
            ),
        ];
        for (sup, mnt, want) in cases {
            let e = verify_overlay(&entry(sup, mnt), &lowers, up).unwrap_err();
            assert!(e.to_string().contains(want), "{sup}: {e}");
        }
        let mut other = entry(good, "rw,nosuid,nodev");
        other.fstype = "ext4".into();
        assert!(verify_overlay(&other, &lowers, up).is_err());
        // Read-only views: no upper, read-only both ways.
        verify_overlay(
            &entry("ro,lowerdir+=/top,lowerdir+=/base", "ro,nosuid,nodev"),
            &lowers,
            None,
        )
        .unwrap();
        assert!(verify_overlay(
            &entry("ro,lowerdir+=/top,lowerdir+=/base", "rw,nosuid,nodev"),
            &lowers,
            None
        )
        .is_err());
    }

    #[test]
    fn rejects_paths_overlay_cannot_carry() {
        assert!(check_option_path("state dir", Path::new("/var/lib/a:b")).is_err());
        assert!(check_option_path("state dir", Path::new("/var/lib/jobcachefs")).is_ok());
    }
}
