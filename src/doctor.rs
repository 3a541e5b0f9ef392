//! `jobcachefs doctor`: checks that this node can run jobcachefs — kernel features (loop-control,
//! ext4, overlayfs with the exact mount options, tried for real), the tools and their versions,
//! the state dir's filesystem and free space, and leftovers of crashes — and says what to do
//! about each finding.

use crate::engine::Engine;
use crate::host::cmd::{self, Tool, E2FSCK, MKFS_EXT4, RESIZE2FS, SKOPEO};
use crate::host::loopback;
use crate::host::mounts;
use crate::input::quantity::human_bytes;
use crate::state::fsutil;
use crate::state::records::VolumeState;
use serde::Serialize;
use std::path::Path;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but something deserves attention.
    Warn,
    /// jobcachefs cannot work (or something is broken) until this is fixed.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: String,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do (empty when nothing).
    pub fix: String,
}

fn finding(
    check: &str,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check: check.into(),
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn tool_version(tool: &Tool, args: &[&str]) -> Option<String> {
    let (_, out) = cmd::run_status(tool, args).ok()?;
    out.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// Runs every check against `engine`'s state dir.
pub fn run(engine: &Engine) -> Vec<Finding> {
    let mut out = Vec::new();
    if nix::unistd::geteuid().is_root() {
        out.push(finding("privileges", Status::Ok, "running as root", ""));
    } else {
        out.push(finding(
            "privileges",
            Status::Fail,
            "not running as root",
            "run jobcachefs as root (it attaches loop devices and mounts filesystems)",
        ));
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control") {
        Ok(_) => out.push(finding("loop devices", Status::Ok, "/dev/loop-control is usable", "")),
        Err(e) => out.push(finding("loop devices", Status::Fail, format!("/dev/loop-control: {e}"), "load the loop module (modprobe loop) and, in a container, pass /dev/loop-control and /dev/loop* (privileged)")),
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for fs in ["ext4", "overlay"] {
        if filesystems.split_whitespace().any(|w| w == fs) {
            out.push(finding(
                &format!("kernel {fs}"),
                Status::Ok,
                format!("{fs} is in /proc/filesystems"),
                "",
            ));
        } else {
            out.push(finding(
                &format!("kernel {fs}"),
                Status::Warn,
                format!("{fs} is not in /proc/filesystems (it may load on first mount)"),
                format!("modprobe {fs}"),
            ));
        }
    }
    let mut tools_ok = true;
    for (tool, args, required, purpose) in [
        (MKFS_EXT4, &["-V"][..], true, ""),
        (E2FSCK, &["-V"][..], true, ""),
        (RESIZE2FS, &[][..], true, ""),
        (SKOPEO, &["--version"][..], false, "registry sync"),
        (
            crate::host::clone::MKFS_XFS,
            &["-V"][..],
            false,
            "clone-mode caches on a state dir that cannot clone files (the reflink pool)",
        ),
        (
            crate::host::clone::FSTRIM,
            &["--version"][..],
            false,
            "clone-mode caches (freed blocks back to the host)",
        ),
    ] {
        match cmd::which(&tool) {
            Some(path) => {
                let v = tool_version(&tool, args).unwrap_or_default();
                out.push(finding(
                    &format!("tool {}", tool.name),
                    Status::Ok,
                    format!("{} ({v})", path.display()),
                    "",
                ));
            }
            None => {
                tools_ok &= !required;
                out.push(finding(
                    &format!("tool {}", tool.name),
                    if required { Status::Fail } else { Status::Warn },
                    format!(
                        "{} not found in PATH{}",
                        tool.name,
                        if required {
                            String::new()
                        } else {
                            format!(" (needed for {purpose} only)")
                        }
                    ),
                    format!(
                        "install the {} package: apt-get install {}",
                        tool.package, tool.package
                    ),
                ));
            }
        }
    }
    let root = engine.layout().root();
    match nix::sys::statfs::statfs(root) {
        Ok(st) => {
            let free = fsutil::free_bytes(root).unwrap_or(0);
            let total = st.blocks() * st.block_size() as u64;
            let kind = fs_name(st.filesystem_type().0);
            let low = free < engine.config().default_cache_size;
            out.push(finding(
                "state dir",
                if low { Status::Warn } else { Status::Ok },
                format!("{} on {kind}, {} free of {}", root.display(), human_bytes(free), human_bytes(total)),
                if low { "less free space than one default cache-size: free space, or lower default_cache_size / node_budget".to_string() } else { String::new() },
            ));
            if kind == "overlay" || kind == "tmpfs" {
                out.push(finding("state dir filesystem", Status::Warn, format!("the state dir is on {kind}"), "put the state dir on a disk filesystem (ext4, xfs, btrfs): images there must survive reboots and support holes"));
            }
        }
        Err(e) => out.push(finding(
            "state dir",
            Status::Fail,
            format!("statfs {}: {e}", root.display()),
            "create the state dir or set --state-dir",
        )),
    }
    match engine.disk_budget() {
        Ok(b) => {
            let full = b.promised > b.promisable();
            out.push(finding(
                "disk admission",
                if full { Status::Warn } else { Status::Ok },
                format!(
                    "{} volume(s) may still write {} of the {} the state dir can promise ({} free, {} reserve, overcommit {:.2})",
                    b.volumes,
                    human_bytes(b.promised),
                    human_bytes(b.promisable()),
                    human_bytes(b.free),
                    human_bytes(b.reserve),
                    b.overcommit_percent as f64 / 100.0
                ),
                if full {
                    "more is promised than the disk can back (space was used outside jobcachefs, or overcommit is set): new volumes are refused until volumes are deleted or space is freed".to_string()
                } else {
                    String::new()
                },
            ));
        }
        Err(e) => out.push(finding(
            "disk admission",
            Status::Fail,
            e.to_string(),
            "fix the state dir",
        )),
    }
    let (choice, why) = engine.clone_store_choice();
    out.push(match (engine.clone_store_kind(), choice) {
        (Some(k), _) => finding(
            "clone backend",
            Status::Ok,
            format!(
                "clone-mode volumes use the {} backend (chosen at first use; {why})",
                k.as_str()
            ),
            "",
        ),
        (None, Ok(k)) => finding(
            "clone backend",
            Status::Ok,
            format!(
                "a first clone-mode volume would use the {} backend: {why}",
                k.as_str()
            ),
            "",
        ),
        (None, Err(e)) => finding("clone backend", Status::Warn, e.to_string(), ""),
    });
    match engine.damaged_records() {
        Ok(d) if d.is_empty() => {}
        Ok(d) => {
            for (path, err) in d {
                out.push(finding(
                    "damaged record",
                    Status::Fail,
                    err,
                    format!("restore {} from a backup, or remove it (a volume record: unmount its DIR first; a cache's: `jobcachefs cache rm`); until then gc removes no layer that it could pin", path.display()),
                ));
            }
        }
        Err(e) => out.push(finding("records", Status::Fail, e.to_string(), "")),
    }
    if tools_ok && nix::unistd::geteuid().is_root() {
        out.push(match trial_mount(engine) {
            Ok(()) => finding("overlay stack", Status::Ok, "a sparse ext4 image on a loop device under an overlay with the exact options mounts, writes and unmounts", ""),
            Err(e) => finding("overlay stack", Status::Fail, format!("trial mount failed: {e}"), "the kernel must support loop devices, ext4 and overlayfs with index=off,redirect_dir=off,metacopy=off,xino=off"),
        });
        let method = engine.config().squash_method;
        let mapped = mounts::erofs_mapped_supported(engine.layout().root());
        out.push(if mapped || mounts::data_layers_supported() {
            finding(
                "squash",
                Status::Ok,
                format!(
                    "overlay interface {}; metadata squashes possible, their bases {} ({})",
                    mounts::interface().name(),
                    if mapped { "EROFS images whose files' chunks are the data layers' own blocks, mounted from the file with those images as devices" } else if mounts::erofs_supported() { "EROFS images of stubs over data-only layers (this kernel cannot mount an EROFS file with devices, Linux 6.12+, or JOBCACHEFS_NO_EROFS_MAPPED=1)" } else { "ext4 images of stub files over data-only layers (this kernel does not mount the EROFS base, or JOBCACHEFS_NO_EROFS=1)" },
                    if method == crate::input::config::SquashMethod::Metadata { "squash_method = \"metadata\": due squashes are metadata squashes where no registry syncs the cache" } else { "squash_method = \"full\": `cache squash --metadata` by hand" }
                ),
                "",
            )
        } else {
            finding(
                "squash",
                if method == crate::input::config::SquashMethod::Metadata { Status::Warn } else { Status::Ok },
                format!("overlay interface {}; this kernel neither mounts an EROFS image file with devices (Linux 6.12+) nor serves metadata stubs from data-only layers on metacopy=off mounts (Linux 6.16+): every squash is a full one", mounts::interface().name()),
                if method == crate::input::config::SquashMethod::Metadata { "squash_method = \"metadata\" falls back to full squashes here" } else { "" },
            )
        });
    } else {
        out.push(finding(
            "overlay stack",
            Status::Warn,
            "trial mount skipped (needs root and the e2fsprogs tools)",
            "fix the findings above, then run doctor again",
        ));
    }
    out.extend(leftovers(engine));
    out
}

fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlay".into(),
        m => format!("filesystem magic {m:#x}"),
    }
}

/// Mounts the real stack once in a scratch dir under the state dir and takes it down again.
fn trial_mount(engine: &Engine) -> crate::Result<()> {
    let scratch = engine
        .layout()
        .mnt()
        .join(format!("doctor-{}", std::process::id()));
    let result = (|| {
        let img_dir = scratch.join("img");
        let m = scratch.join("m");
        let ov = scratch.join("ov");
        let lower = scratch.join("lower");
        for d in [&img_dir, &m, &ov, &lower] {
            fsutil::ensure_dir(d)?;
        }
        std::fs::write(lower.join("probe"), b"lower")
            .map_err(|e| crate::Error::io("write probe", e))?;
        let img = img_dir.join("probe.img");
        // A volume's upper as volumes get it: with its journal, mounted with its options.
        crate::host::image::create_volume(&img, 128 << 20, 0, 0)?;
        mounts::mount_image(&img, &m, false)?;
        let r = (|| {
            std::fs::create_dir(m.join("upper")).map_err(|e| crate::Error::io("mkdir", e))?;
            std::fs::create_dir(m.join("work")).map_err(|e| crate::Error::io("mkdir", e))?;
            mounts::mount_overlay(
                std::slice::from_ref(&lower),
                Some((&m.join("upper"), &m.join("work"))),
                &ov,
            )?;
            let r = std::fs::write(ov.join("probe"), b"upper")
                .map_err(|e| crate::Error::io("write through overlay", e));
            mounts::unmount(&ov, true)?;
            r
        })();
        mounts::unmount(&m, true)?;
        r
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Crash leftovers: loop devices nothing mounts, volumes stuck half-way, volumes whose mounts
/// vanished, half-built images.
fn leftovers(engine: &Engine) -> Vec<Finding> {
    let mut out = Vec::new();
    let root = engine.layout().root();
    let table = mounts::mount_table().unwrap_or_default();
    let loose: Vec<String> = loopback::list()
        .into_iter()
        .filter(|b| b.file.starts_with(root))
        .filter(|b| !table.iter().any(|m| Path::new(&m.source) == b.device))
        .map(|b| format!("{} ({})", b.device.display(), b.file.display()))
        .collect();
    let mut issues = Vec::new();
    if !loose.is_empty() {
        issues.push(format!(
            "loop devices attached but not mounted: {}",
            loose.join(", ")
        ));
    }
    for v in engine.volume_records().unwrap_or_default() {
        match v.state {
            VolumeState::Creating | VolumeState::Deleting => issues.push(format!(
                "volume {} is stuck in state {:?}",
                v.dir.display(),
                v.state
            )),
            VolumeState::Ready if !mounts::is_mounted(&table, &v.dir) => issues.push(format!(
                "volume {} is not mounted (node rebooted?)",
                v.dir.display()
            )),
            VolumeState::Ready => {}
        }
    }
    for id in engine.cache_ids().unwrap_or_default() {
        let tmp = engine.layout().cache_tmp(&id);
        if std::fs::read_dir(&tmp)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        {
            issues.push(format!(
                "cache {id} has half-built images in {}",
                tmp.display()
            ));
        }
    }
    if issues.is_empty() {
        out.push(finding(
            "leftovers",
            Status::Ok,
            "no leaked mounts, loop devices or half-done volumes",
            "",
        ));
    } else {
        for i in issues {
            out.push(finding("leftovers", Status::Warn, i, "run `jobcachefs gc` (safe while volumes are live; a running hook may also be mid-way)"));
        }
    }
    out
}
