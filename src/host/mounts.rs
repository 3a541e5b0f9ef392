//! Mounting: ext4 images and overlayfs with jobcachefs's fixed options, unmounting, and reading
//! the mount table.

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
    match mount(
        Some(dev.path()),
        target,
        Some("ext4"),
        flags,
        Some("noinit_itable"),
    ) {
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

/// The overlay option string for `lowers` (bottom first) and an optional `(upperdir, workdir)`.
pub fn overlay_options(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> String {
    // overlayfs lists the uppermost lower first.
    let lower: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let mut opts = format!("lowerdir={}", lower.join(":"));
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

/// Mounts an overlay at `target`: read-only when `upper` is `None`.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> Result<()> {
    let opts = overlay_options(lowers, upper);
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
    .map_err(|e| {
        Error::io(
            format!("mount overlay at {} ({opts})", target.display()),
            e.into(),
        )
    })
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

    #[test]
    fn rejects_paths_overlay_cannot_carry() {
        assert!(check_option_path("state dir", Path::new("/var/lib/a:b")).is_err());
        assert!(check_option_path("state dir", Path::new("/var/lib/jobcachefs")).is_ok());
    }
}
