//! A fake [`Host`] for the engine's unit tests: no root, no kernel mounts.
//!
//! - An "image" is a sparse file; its filesystem is a directory under the fake's own root, keyed
//!   by the file's inode so that it follows the image through renames (a commit renames).
//! - Mounting an image moves its tree to the (empty) target directory, which stays a real
//!   directory (the engine canonicalises DIRs), and leaves a symlink at the tree's own path; so
//!   the engine's `upper/` and `work/` land in the image's tree, as on a real host.
//! - A writable overlay does the same with its upperdir: what a test writes into a volume's DIR
//!   lands in the upper, as a job's writes do. A read-only overlay (squash's
//!   merged view) is materialised as a copy of its lowers, bottom first (no whiteouts).
//! - Unmounting puts an empty directory back. The mount table and loop devices live in memory.
//! - `fail_on(op, needle)` makes the next calls of `op` whose path contains `needle` fail, and
//!   `set_space` sets what `fs_space` answers (disk admission).

use super::loopback::Backing;
use super::mounts::MountEntry;
use super::{Host, ImageMount};
use crate::error::{Error, ErrorKind, IoContext, Result};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct State {
    mounts: Vec<MountEntry>,
    /// mount point → the image file a loop device serves there.
    loops: HashMap<PathBuf, PathBuf>,
    /// overlay DIR → the upperdir whose tree was moved there.
    moved: HashMap<PathBuf, PathBuf>,
    failures: Vec<(String, String)>,
    dirty: Vec<PathBuf>,
    space: Option<(u64, u64)>,
    no_reflink: bool,
    calls: Vec<String>,
    /// Loop devices ever attached: device names are never reused while one is live.
    attached: usize,
}

/// The fake host. See the module docs.
#[derive(Debug)]
pub struct FakeHost {
    trees: PathBuf,
    state: Mutex<State>,
}

impl FakeHost {
    /// A fake whose image trees live under `root`.
    pub fn new(root: &Path) -> Self {
        let trees = root.join("fake-trees");
        std::fs::create_dir_all(&trees).unwrap();
        FakeHost {
            trees,
            state: Mutex::new(State::default()),
        }
    }

    /// Makes calls of `op` (a method name, e.g. `mount_overlay`) on a path containing `needle`
    /// fail with EIO until [`FakeHost::heal`].
    pub fn fail_on(&self, op: &str, needle: &str) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((op.into(), needle.into()));
    }

    /// Stops every injected failure.
    pub fn heal(&self) {
        self.state.lock().unwrap().failures.clear();
    }

    /// Makes `image_is_clean` answer false for `image` (a node crash with the image mounted).
    pub fn mark_dirty(&self, image: &Path) {
        self.state.lock().unwrap().dirty.push(image.to_path_buf());
    }

    /// Sets the `(available, total)` bytes every filesystem reports.
    pub fn set_space(&self, free: u64, total: u64) {
        self.state.lock().unwrap().space = Some((free, total));
    }

    /// Makes the state dir unable to clone files (an ext4 node: clones go to the pool).
    pub fn without_reflink(&self) {
        self.state.lock().unwrap().no_reflink = true;
    }

    /// Forgets every mount, as a reboot does (mount points become empty dirs again).
    pub fn reboot(&self) {
        let mut st = self.state.lock().unwrap();
        let mounts: Vec<_> = st.mounts.drain(..).collect();
        for m in mounts.iter().rev() {
            match st.moved.remove(&m.mount_point) {
                Some(upper) => move_back(&m.mount_point, &upper),
                None => restore_dir(&m.mount_point),
            }
        }
        st.loops.clear();
    }

    /// The calls made so far, as `op path` strings.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Whether something is mounted at `path`.
    pub fn is_mounted(&self, path: &Path) -> bool {
        self.state
            .lock()
            .unwrap()
            .mounts
            .iter()
            .any(|m| m.mount_point == path)
    }

    /// Mount points, in mount order.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.state
            .lock()
            .unwrap()
            .mounts
            .iter()
            .map(|m| m.mount_point.clone())
            .collect()
    }

    /// The directory standing for the filesystem inside `image`.
    pub fn tree_of(&self, image: &Path) -> Result<PathBuf> {
        let md = std::fs::metadata(image).at("stat", image)?;
        Ok(self.trees.join(format!("{}-{}", md.dev(), md.ino())))
    }

    fn step(&self, op: &str, path: &Path) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("{op} {}", path.display()));
        let p = path.to_string_lossy();
        if st
            .failures
            .iter()
            .any(|(o, n)| o == op && p.contains(n.as_str()))
        {
            return Err(Error::io(
                format!("{op} {} (injected)", path.display()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    /// Mounts by moving `tree` to `target` (which stays a real directory, as the engine
    /// canonicalises DIRs) and leaving a symlink at the tree's own path; unmount moves it back.
    fn mount_at(&self, target: &Path, tree: &Path, entry: MountEntry) -> Result<()> {
        // Through any symlinked view (an idmapped one), to where the tree really is.
        let tree = &std::fs::canonicalize(tree).at("fake: resolve", tree)?;
        if self.is_mounted(target) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("fake: {} is already mounted", target.display()),
            ));
        }
        std::fs::remove_dir(target).at("fake: mount on", target)?;
        std::fs::rename(tree, target).at("fake: move tree to", target)?;
        std::os::unix::fs::symlink(target, tree).at("fake: symlink", tree)?;
        let mut st = self.state.lock().unwrap();
        st.moved.insert(target.to_path_buf(), tree.to_path_buf());
        st.mounts.push(entry);
        Ok(())
    }
}

fn restore_dir(target: &Path) {
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink()) {
        let _ = std::fs::remove_file(target);
        let _ = std::fs::create_dir(target);
    } else if target.is_dir() {
        // A materialised read-only view: empty it again.
        let _ = std::fs::remove_dir_all(target);
        let _ = std::fs::create_dir(target);
    }
}

fn move_back(target: &Path, upper: &Path) {
    let _ = std::fs::remove_file(upper);
    let _ = std::fs::rename(target, upper);
    let _ = std::fs::create_dir(target);
}

fn copy_into(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            let _ = std::fs::create_dir_all(&dst);
            copy_into(&e.path(), &dst);
        } else {
            let _ = std::fs::copy(e.path(), &dst);
        }
    }
}

impl Host for FakeHost {
    fn mount_table(&self) -> Result<Vec<MountEntry>> {
        Ok(self.state.lock().unwrap().mounts.clone())
    }

    fn mount_image(&self, image: &Path, target: &Path, how: ImageMount) -> Result<()> {
        self.step("mount_image", image)?;
        self.step("mount_image", target)?;
        let tree = self.tree_of(image)?;
        if !tree.exists() {
            return Err(Error::invalid(format!(
                "fake: {} has no filesystem",
                image.display()
            )));
        }
        let dev = {
            let mut st = self.state.lock().unwrap();
            st.attached += 1;
            format!("/dev/loop{}", 99 + st.attached)
        };
        self.mount_at(
            target,
            &tree,
            MountEntry {
                mount_point: target.to_path_buf(),
                fstype: "ext4".into(),
                source: dev,
                super_options: if how.read_only { "ro" } else { "rw" }.into(),
                mount_options: if how.read_only {
                    "ro,nosuid,nodev"
                } else {
                    "rw,nosuid,nodev"
                }
                .into(),
            },
        )?;
        self.state
            .lock()
            .unwrap()
            .loops
            .insert(target.to_path_buf(), image.to_path_buf());
        Ok(())
    }

    fn mount_overlay_with_data(
        &self,
        lowers: &[PathBuf],
        _data: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<()> {
        self.step("mount_overlay", target)?;
        let opts = super::mounts::overlay_options(lowers, upper);
        let entry = MountEntry {
            mount_point: target.to_path_buf(),
            fstype: "overlay".into(),
            source: "jobcachefs".into(),
            super_options: format!("rw,{opts}"),
            mount_options: "rw,nosuid,nodev".into(),
        };
        match upper {
            // The DIR must stay a real directory (the engine canonicalises it): the upper's
            // tree moves there and the upper's path points at it until the unmount.
            Some((u, _)) => self.mount_at(target, u, entry),
            None => {
                for l in lowers {
                    copy_into(l, target);
                }
                self.state.lock().unwrap().mounts.push(entry);
                Ok(())
            }
        }
    }

    fn unmount(&self, target: &Path, _lazy: bool) -> Result<()> {
        self.step("unmount", target)?;
        let mut st = self.state.lock().unwrap();
        if let Some(i) = st.mounts.iter().rposition(|m| m.mount_point == target) {
            st.mounts.remove(i);
            st.loops.remove(target);
            match st.moved.remove(target) {
                Some(upper) => move_back(target, &upper),
                None => restore_dir(target),
            }
        }
        Ok(())
    }

    fn loop_devices(&self) -> Vec<Backing> {
        let st = self.state.lock().unwrap();
        st.mounts
            .iter()
            .filter_map(|m| {
                st.loops.get(&m.mount_point).map(|f| Backing {
                    device: PathBuf::from(&m.source),
                    file: f.clone(),
                })
            })
            .collect()
    }

    fn detach(&self, device: &Path) -> Result<()> {
        self.step("detach", device)
    }

    fn make_image(&self, path: &Path, size: u64, _uid: u32, _gid: u32) -> Result<()> {
        self.step("make_image", path)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .at("fake: create image", path)?;
        f.set_len(size).at("fake: size image", path)?;
        let tree = self.tree_of(path)?;
        let _ = std::fs::remove_dir_all(&tree); // a reused inode number
        std::fs::create_dir_all(&tree).at("fake: create tree", &tree)
    }

    fn check_image(&self, path: &Path) -> Result<i32> {
        self.step("check_image", path)?;
        Ok(0)
    }

    fn image_is_clean(&self, path: &Path) -> Result<bool> {
        self.step("image_is_clean", path)?;
        Ok(!self.state.lock().unwrap().dirty.iter().any(|d| d == path))
    }

    fn resize_image(&self, path: &Path, size: u64) -> Result<()> {
        self.step("resize_image", path)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .at("fake: resize", path)
    }

    fn chown(&self, path: &Path, _uid: u32, _gid: u32) -> Result<()> {
        self.step("chown", path)
    }

    fn reflink(&self, src: &Path, dst: &Path) -> Result<()> {
        self.step("reflink", dst)?;
        std::fs::copy(src, dst).at("fake: clone", dst)?;
        let (from, to) = (self.tree_of(src)?, self.tree_of(dst)?);
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(&to).at("fake: clone tree", &to)?;
        copy_into(&from, &to);
        Ok(())
    }

    fn supports_reflink(&self, _dir: &Path) -> bool {
        !self.state.lock().unwrap().no_reflink
    }

    fn make_pool(&self, path: &Path, size: u64) -> Result<()> {
        self.make_image(path, size, 0, 0)
    }

    fn mount_pool(&self, image: &Path, target: &Path) -> Result<()> {
        self.mount_image(image, target, ImageMount { read_only: false })
    }

    fn trim(&self, mount: &Path) -> Result<()> {
        self.step("trim", mount)
    }

    /// An idmapped view: a mount moved from `src` to `target` when `src` is one of the fake's
    /// moved mounts (what the engine does with a clone's private mount), else a symlink (a
    /// per-volume view of a shared layer under the state dir).
    fn idmap_mount(
        &self,
        src: &Path,
        target: &Path,
        _uid: (u32, u32),
        _gid: (u32, u32),
    ) -> Result<()> {
        self.step("idmap_mount", target)?;
        let mut st = self.state.lock().unwrap();
        let entry = MountEntry {
            mount_point: target.to_path_buf(),
            fstype: "idmapped".into(),
            source: st
                .mounts
                .iter()
                .find(|m| m.mount_point == src)
                .map(|m| m.source.clone())
                .unwrap_or_default(),
            super_options: "rw".into(),
            mount_options: "rw,nosuid,nodev".into(),
        };
        if let Some(tree) = st.moved.remove(src) {
            // The tree moves on; the private mount point is an empty dir again.
            std::fs::remove_dir(target).at("fake: idmap on", target)?;
            std::fs::rename(src, target).at("fake: idmap move", target)?;
            std::fs::create_dir(src).at("fake: idmap src", src)?;
            let _ = std::fs::remove_file(&tree);
            std::os::unix::fs::symlink(target, &tree).at("fake: symlink", &tree)?;
            st.mounts.retain(|m| m.mount_point != src);
            if let Some(image) = st.loops.remove(src) {
                st.loops.insert(target.to_path_buf(), image);
            }
            st.moved.insert(target.to_path_buf(), tree);
        } else {
            let _ = std::fs::remove_dir(target);
            std::os::unix::fs::symlink(src, target).at("fake: idmap symlink", target)?;
        }
        st.mounts.push(entry);
        Ok(())
    }

    fn fs_space(&self, _path: &Path) -> Result<(u64, u64)> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .space
            .unwrap_or((1 << 40, 1 << 41)))
    }
}
