//! Idmapped mounts: a view of a directory whose owners are translated through a user
//! namespace's uid/gid maps (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)` +
//! `move_mount`). This is what a pod with `hostUsers: false` needs of its volumes: the kubelet
//! idmaps each volume mount into the pod's user namespace, so files owned by 0 on disk appear
//! owned by the pod's root. ext4 (a clone volume) supports it; overlayfs (an overlay volume)
//! does not — `mount_setattr` returns EINVAL on an overlay mount.
//!
//! util-linux 2.38 has no `X-mount.idmap`, and rustix has `open_tree`/`move_mount` but not
//! `mount_setattr`: that one is a small documented `unsafe` syscall wrapper below.

use crate::error::{Error, ErrorKind, IoContext, Result};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// `MOUNT_ATTR_IDMAP` (linux/mount.h).
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` (linux/mount.h), `MOUNT_ATTR_SIZE_VER0` (32 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(2)` on the detached mount `fd` itself (`AT_EMPTY_PATH`).
fn mount_setattr(fd: BorrowedFd<'_>, attr: &MountAttr) -> std::io::Result<()> {
    // SAFETY: the path is a valid NUL-terminated empty string, `attr` points to a live,
    // properly aligned `struct mount_attr` whose size we pass, and the kernel only reads it;
    // `fd` is a valid open file descriptor for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts an idmapped view of the mount at `src` (the whole mount: `src` must be a mount
/// point, such as a volume's DIR) at `target`, owners translated through the user namespace
/// `userns` (an fd of `/proc/<pid>/ns/user`). Refused with kind `InvalidInput` when the
/// filesystem cannot be idmapped (overlayfs: EINVAL).
pub fn idmap_mount(src: &Path, target: &Path, userns: BorrowedFd<'_>) -> Result<()> {
    use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
    let tree = open_tree(
        rustix::fs::CWD,
        src,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(std::io::Error::from)
    .at("open_tree", src)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        userns_fd: userns.as_raw_fd() as u64,
        ..Default::default()
    };
    mount_setattr(tree.as_fd(), &attr).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} cannot be idmapped (EINVAL from mount_setattr(MOUNT_ATTR_IDMAP)): overlayfs mounts cannot; a clone-mode volume (ext4) can",
                    src.display()
                ),
            )
        } else {
            Error::io(format!("idmap {}", src.display()), e)
        }
    })?;
    move_mount(
        tree.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(std::io::Error::from)
    .at("move_mount to", target)
}

/// A user namespace with the given maps (`/proc/<pid>/uid_map` lines, e.g. `"0 100000 65536"`),
/// as an fd that keeps it alive: a child process unshares `CLONE_NEWUSER` and waits, this
/// process writes its maps (`setgroups` denied, as an unprivileged writer would need), opens
/// `/proc/<child>/ns/user`, and ends the child.
pub fn userns_fd(uid_map: &str, gid_map: &str) -> Result<OwnedFd> {
    use nix::sys::wait::waitpid;
    use nix::unistd::{fork, pipe, read, write, ForkResult};
    let (ready_r, ready_w) = pipe().at("pipe", Path::new("userns"))?;
    let (go_r, go_w) = pipe().at("pipe", Path::new("userns"))?;
    // SAFETY: between fork and _exit the child only makes raw syscalls (unshare, write, read,
    // _exit) on fds it owns: no allocation, no locks, nothing another thread could hold.
    match unsafe { fork() }.at("fork", Path::new("userns"))? {
        ForkResult::Child => {
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = write(&ready_w, &[ok as u8]);
            let mut b = [0u8; 1];
            let _ = read(go_r.as_raw_fd(), &mut b);
            // SAFETY: _exit ends the child without running the parent's atexit handlers or
            // destructors, which must not run twice.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(go_r);
            let mut b = [0u8; 1];
            let got = read(ready_r.as_raw_fd(), &mut b);
            let result = (|| {
                if got != Ok(1) || b[0] != 1 {
                    return Err(Error::new(
                        ErrorKind::Io,
                        "unshare(CLONE_NEWUSER) failed in the helper process",
                    ));
                }
                let proc = std::path::PathBuf::from(format!("/proc/{child}"));
                for (file, text) in [
                    ("uid_map", uid_map),
                    ("setgroups", "deny"),
                    ("gid_map", gid_map),
                ] {
                    let p = proc.join(file);
                    std::fs::write(&p, text).at("write", &p)?;
                }
                let ns = proc.join("ns/user");
                Ok(OwnedFd::from(std::fs::File::open(&ns).at("open", &ns)?))
            })();
            let _ = write(&go_w, &[1]);
            drop(go_w);
            let _ = waitpid(child, None);
            result
        }
    }
}
