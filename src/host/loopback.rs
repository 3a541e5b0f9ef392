//! Loop devices: attach an image with autoclear (so the last unmount releases the device),
//! retrying the race for a free device, and list which images are attached where.

use crate::error::{Error, IoContext, Result};
use loopdev::{LoopControl, LoopDevice};
use std::path::{Path, PathBuf};

/// An attached loop device. Dropping it closes our handle: with autoclear the device is released
/// as soon as nothing else (a mount) holds it.
pub struct Attached {
    device: LoopDevice,
    path: PathBuf,
}

impl Attached {
    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches explicitly (used when mounting failed).
    pub fn detach(self) {
        let _ = self.device.detach();
    }
}

/// Attaches `image` to a free loop device with autoclear.
pub fn attach(image: &Path, read_only: bool) -> Result<Attached> {
    attach_with(image, read_only, false)
}

/// Attaches `image` with autoclear, and with direct I/O when asked (its data is then cached
/// once, by the filesystem on the device, not a second time as the backing file's pages). A
/// backing filesystem that refuses direct I/O leaves the device buffered, with a log line.
pub fn attach_with(image: &Path, read_only: bool, direct_io: bool) -> Result<Attached> {
    let attached = attach_plain(image, read_only)?;
    if direct_io {
        if let Err(e) = attached.device.set_direct_io(true) {
            tracing::warn!(image = %image.display(), error = %e, "loop device stays buffered: direct I/O refused");
        }
    }
    Ok(attached)
}

fn attach_plain(image: &Path, read_only: bool) -> Result<Attached> {
    let control = LoopControl::open().at("open", Path::new("/dev/loop-control"))?;
    let mut last_err = None;
    // Another process can take the device between LOOP_CTL_GET_FREE and LOOP_SET_FD (EBUSY):
    // ask for the next free one and try again.
    for _ in 0..32 {
        let device = control
            .next_free()
            .ctx(|| "find a free loop device (is the loop module loaded?)".to_string())?;
        match device
            .with()
            .autoclear(true)
            .read_only(read_only)
            .attach(image)
        {
            Ok(()) => {
                let path = device
                    .path()
                    .ok_or_else(|| Error::invalid("attached loop device has no path"))?;
                return Ok(Attached { device, path });
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
            Err(e) => {
                return Err(Error::io(
                    format!("attach {} to a loop device", image.display()),
                    e,
                ))
            }
        }
    }
    Err(Error::io(
        format!(
            "attach {} to a loop device: no free device after 32 tries",
            image.display()
        ),
        last_err.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// A loop device and the file behind it.
#[derive(Debug, Clone)]
pub struct Backing {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The backing file as the kernel reports it (may end in ` (deleted)`).
    pub file: PathBuf,
}

/// Lists attached loop devices from sysfs.
pub fn list() -> Vec<Backing> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(file) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            out.push(Backing {
                device: PathBuf::from("/dev").join(&name),
                file: PathBuf::from(file.trim_end_matches('\n')),
            });
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Detaches `device` (only used on devices no mount holds).
pub fn detach(device: &Path) -> Result<()> {
    LoopDevice::open(device)
        .and_then(|d| d.detach())
        .at("detach loop device", device)
}
