//! The engine: caches of immutable ext4 layers, per-volume overlay volumes, O(1) commit, squash,
//! quotas and crash repair, on top of the on-disk layout in [`crate::state::layout`].
//!
//! Lock order (never taken the other way round): run lock → volume lock → squash lock → cache
//! lock (→ pool lock). Nothing
//! holds a cache lock for longer than a few mounts or a rename: squash copies without it.

mod admission;
mod cache;
mod clone;
mod commit;
mod gc;
mod identity;
mod merge;
pub mod progress;
mod publish;
mod rebuild;
mod release;
mod runs;
mod scope;
mod squash;
mod volume;

pub use admission::DiskBudget;
pub use cache::{CacheInfo, PruneCandidate};
pub use clone::CloneStoreKind;
pub use gc::GcReport;
pub use progress::{Progress, ProgressFn, ProgressHook};
pub use publish::HistoryEntry;
pub use release::ReleaseReport;
pub use runs::{process_start, RunClaim, RunOwner, RUN_LABEL};
pub use scope::ScopeInfo;
pub use squash::SquashOutcome;
pub use volume::{CreateRequest, DeleteOutcome, VolumeInfo};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::host::{mounts, Host, ImageMount, RealHost};
use crate::input::config::Config;
use crate::input::names::CacheId;
use crate::state::fsutil::{ensure_dir, read_json};
use crate::state::layout::Layout;
use crate::state::lock::{self, Lock};
use crate::state::records::{CacheRecord, Generation, VolumeRecord};
use std::path::{Path, PathBuf};

/// The on-disk format this version writes and reads. A state dir written by a newer one is
/// refused (it may hold records this version would misread and gc would misjudge).
pub const STATE_FORMAT: u32 = 1;

/// Size of the ballast: room for the records of many deletes on a full disk.
const BALLAST_SIZE: i64 = 8 << 20;

/// Makes the ballast file if it is missing and there is room (best effort).
fn make_ballast(layout: &Layout) {
    let path = layout.ballast();
    if path.exists() {
        return;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let made = std::fs::File::create(&tmp).and_then(|f| {
        nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FallocateFlags::empty(),
            0,
            BALLAST_SIZE,
        )
        .map_err(std::io::Error::from)
    });
    match made {
        Ok(()) => {
            let _ = std::fs::rename(&tmp, &path);
        }
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

fn check_format(layout: &Layout) -> Result<()> {
    let path = layout.root().join("format");
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(v) if v <= STATE_FORMAT => Ok(()),
            Ok(v) => Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "state dir {} was written by a newer jobcachefs (format {v}; this one reads up to {STATE_FORMAT}): upgrade jobcachefs on this node, or point --state-dir elsewhere",
                    layout.root().display()
                ),
            )),
            Err(_) => Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} is damaged ({:?} is not a format number): write {STATE_FORMAT} into it if this state dir is jobcachefs's",
                    path.display(),
                    text.trim()
                ),
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written aside and renamed: processes opening a new state dir at once must never
            // read a half-written file.
            crate::state::fsutil::ensure_dir(layout.root())?;
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            std::fs::write(&tmp, format!("{STATE_FORMAT}\n")).at("write", &tmp)?;
            std::fs::rename(&tmp, &path).at("rename", &path)
        }
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// The engine over one state dir.
#[derive(Debug, Clone)]
pub struct Engine {
    layout: Layout,
    host: std::sync::Arc<dyn Host>,
    config: Config,
    progress: Option<ProgressHook>,
}

impl Engine {
    /// Opens (and creates, if needed) the state dir. It must be an absolute path that overlayfs
    /// options can carry.
    pub fn open(state_dir: &Path, config: Config) -> Result<Self> {
        Self::open_on(state_dir, config, std::sync::Arc::new(RealHost))
    }

    /// Opens the state dir with `host` doing every privileged step (the unit tests pass a fake).
    pub fn open_on(
        state_dir: &Path,
        config: Config,
        host: std::sync::Arc<dyn Host>,
    ) -> Result<Self> {
        if !state_dir.is_absolute() {
            return Err(Error::invalid(format!(
                "state dir {:?} is relative: use an absolute path (--state-dir or JOBCACHEFS_STATE_DIR)",
                state_dir.display().to_string()
            )));
        }
        ensure_dir(state_dir)?;
        let root = state_dir
            .canonicalize()
            .at("resolve state dir", state_dir)?;
        mounts::check_option_path("state dir", &root)?;
        check_state_dir_length(&root)?;
        // The state dir is root's alone: volumes' identities must not read other volumes'
        // images, records or mounts through it (the kernel reaches layers and uppers with the
        // mounter's credentials, so nothing else needs access).
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = std::fs::metadata(&root).at("stat", &root)?.mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                .at("chmod 0700", &root)?;
        }
        let layout = Layout::new(root);
        check_format(&layout)?;
        for d in [
            layout.caches(),
            layout.volumes(),
            layout.mnt(),
            layout.queue(),
        ] {
            ensure_dir(&d)?;
        }
        // The node-wide admission lock exists from the start, so that a refused create leaves
        // no file behind.
        ensure_dir(&layout.root().join("locks"))?;
        let admission = layout.admission_lock();
        if !admission.exists() {
            std::fs::write(&admission, b"").at("create", &admission)?;
        }
        make_ballast(&layout);
        let empty = layout.empty();
        if !empty.exists() {
            ensure_dir(&empty)?;
            std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .at("chmod", &empty)?;
        }
        Ok(Engine {
            layout,
            host,
            config,
            progress: None,
        })
    }

    /// Writes a record (temp → fsync → rename). On a full disk the ballast file goes first, so
    /// that deletes and commits — which free space — can always write their records.
    pub(crate) fn write_record<T: serde::Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        match crate::state::fsutil::write_json_atomic(path, value) {
            Err(e) if e.is_enospc() => {
                self.release_ballast(&format!("the record {}", path.display()));
                crate::state::fsutil::write_json_atomic(path, value)
            }
            other => other,
        }
    }

    /// Removes the ballast file (if it is there) so that `what` finds room on a full disk.
    pub(crate) fn release_ballast(&self, what: &str) {
        if std::fs::remove_file(self.layout.ballast()).is_ok() {
            tracing::warn!("the state dir's disk is full: the ballast was released so that {what} can be written; it is made again when space allows");
        }
    }

    /// Reports progress of long operations to `hook`.
    pub fn with_progress(mut self, hook: ProgressHook) -> Self {
        self.progress = Some(hook);
        self
    }

    /// The meter of a transfer of about `total` bytes named `what`: drawn by the hook, if one
    /// is set, else logged (see [`progress`]).
    pub(crate) fn meter(&self, what: impl Into<String>, total: u64) -> progress::Meter {
        progress::Meter::new(what, total, self.progress.clone())
    }

    /// The paths of this state dir.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The host the engine runs on.
    pub fn host(&self) -> &dyn Host {
        self.host.as_ref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn lock_cache(&self, id: &CacheId) -> Result<Lock> {
        lock::lock(&self.layout.cache_lock(id))
    }

    fn lock_volume(&self, vol: &str) -> Result<Lock> {
        lock::lock(&self.layout.volume_lock(vol))
    }

    /// A cache's settings, if it exists.
    pub fn cache_record(&self, id: &CacheId) -> Result<Option<CacheRecord>> {
        read_json(&self.layout.cache_record(id))
    }

    /// A cache's current generation (generation 0 with no layers for a new cache).
    pub fn current(&self, id: &CacheId) -> Result<Generation> {
        Ok(read_json(&self.layout.current(id))?.unwrap_or_default())
    }

    /// The cache's record, or a NotFound error naming it.
    fn require_cache(&self, id: &CacheId) -> Result<CacheRecord> {
        self.cache_record(id)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "cache {:?} does not exist in namespace {:?}: see `jobcachefs cache ls`",
                    id.name, id.namespace
                ),
            )
        })
    }

    /// All readable volume records on this node. A damaged one is skipped with a log line
    /// (other volumes keep working); [`Engine::damaged_records`] names it.
    pub fn volume_records(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self.volume_records_checked()?.0)
    }

    /// The readable volume records, and the paths of the damaged ones.
    pub(crate) fn volume_records_checked(&self) -> Result<(Vec<VolumeRecord>, Vec<PathBuf>)> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        let dir = self.layout.volumes();
        for e in std::fs::read_dir(&dir).at("read", &dir)? {
            let e = e.at("read", &dir)?;
            let id = e.file_name().to_string_lossy().into_owned();
            let path = self.layout.volume_record(&id);
            match read_json::<VolumeRecord>(&path) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(err) if err.kind() == ErrorKind::Corrupt => {
                    tracing::error!(record = %path.display(), "{err}");
                    damaged.push(path);
                }
                Err(err) => return Err(err),
            }
        }
        out.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok((out, damaged))
    }

    /// Records under the state dir that cannot be read (`doctor` reports each).
    pub fn damaged_records(&self) -> Result<Vec<(PathBuf, String)>> {
        let mut out = Vec::new();
        let dir = self.layout.volumes();
        for e in std::fs::read_dir(&dir).at("read", &dir)?.flatten() {
            let p = self.layout.volume_record(&e.file_name().to_string_lossy());
            if let Err(err) = read_json::<VolumeRecord>(&p) {
                out.push((p, err.to_string()));
            }
        }
        for id in self.cache_ids()? {
            if let Err(err) = read_json::<CacheRecord>(&self.layout.cache_record(&id)) {
                out.push((self.layout.cache_record(&id), err.to_string()));
            }
            if let Err(err) = read_json::<Generation>(&self.layout.current(&id)) {
                out.push((self.layout.current(&id), err.to_string()));
            }
        }
        Ok(out)
    }

    /// All caches that have a record, sorted.
    pub fn cache_ids(&self) -> Result<Vec<CacheId>> {
        let mut out = Vec::new();
        let caches = self.layout.caches();
        for ns in std::fs::read_dir(&caches).at("read", &caches)? {
            let ns = ns.at("read", &caches)?;
            if !ns.path().is_dir() {
                continue;
            }
            for c in std::fs::read_dir(ns.path()).at("read", &ns.path())? {
                let c = c.at("read", &ns.path())?;
                let (ns_name, name) = (ns.file_name(), c.file_name());
                if let Ok(id) = CacheId::new(&ns_name.to_string_lossy(), &name.to_string_lossy()) {
                    if self.layout.cache_record(&id).exists() {
                        out.push(id);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Layers of `id` that live volumes (in any state) still use, plus layers they are being
    /// committed as. Read from the volume records: a crash cannot make this wrong.
    fn layers_in_use(&self, id: &CacheId) -> Result<std::collections::HashSet<String>> {
        let mut used = std::collections::HashSet::new();
        let (records, damaged) = self.volume_records_checked()?;
        if !damaged.is_empty() {
            // A damaged record may pin any layer: nothing can be proven unused.
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "volume record(s) {} cannot be read, so no layer of cache {id} can be proven unused: nothing is removed until they are repaired or removed (see `jobcachefs doctor`)",
                    damaged.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for r in records {
            if r.cache.as_ref() == Some(id) {
                used.extend(r.layers.iter().cloned());
                used.extend(r.data_layers.iter().cloned());
                if let Some(l) = &r.commit_layer {
                    used.insert(l.clone());
                }
            }
        }
        Ok(used)
    }

    /// Makes sure each layer of `layers` is mounted read-only at its shared mount point. Called
    /// with the cache lock held.
    fn ensure_layers_mounted(&self, id: &CacheId, layers: &[String]) -> Result<Vec<PathBuf>> {
        let mut table = self.host.mount_table()?;
        let mut loops = None;
        let mut lowers = Vec::with_capacity(layers.len());
        for layer in layers {
            let target = self.layout.layer_mount(id, layer);
            let image = self.layout.layer_image(id, layer);
            // A mount found at a layer's mount point must be that layer: its image on a loop
            // device, read-only. Anything else (a mount left by hand, a swapped image) is
            // replaced rather than handed to an overlay.
            if let Some(found) = table.iter().rev().find(|m| m.mount_point == target) {
                let loops = loops.get_or_insert_with(|| self.host.loop_devices());
                if let Err(why) = layer_mount_matches(found, &image, loops) {
                    tracing::warn!(layer = %target.display(), why, "the mount at a layer's mount point is not that layer: replacing it");
                    self.host.unmount(&target, true)?;
                    table = self.host.mount_table()?;
                }
            }
            if !mounts::is_mounted(&table, &target) {
                ensure_dir(&target)?;
                let image = self.layout.layer_image(id, layer);
                self.host
                    .mount_image(&image, &target, ImageMount { read_only: true })?;
            }
            lowers.push(self.layout.layer_lowerdir(id, layer));
        }
        Ok(lowers)
    }

    /// The data-only layers an overlay over `layers` (bottom first) mounts below them: those
    /// of a stub metadata base (`data`); none for a mapped one, which reads its data layers'
    /// images itself, nor for any other base.
    pub(crate) fn overlay_data_layers(
        &self,
        id: &CacheId,
        layers: &[String],
        data: &[String],
    ) -> Vec<String> {
        let mapped = |base: &String| {
            crate::files::erofs::device_tags(&self.layout.layer_image(id, base))
                .is_ok_and(|t| !t.is_empty())
        };
        match layers.first() {
            Some(base) if !data.is_empty() && !mapped(base) => data.to_vec(),
            _ => Vec::new(),
        }
    }

    /// Layers of `id` whose mounts stay after their last volume: the current generation's,
    /// while the cache's last create is less than `layer_keep_seconds` old, so that the next
    /// create on a busy cache finds them mounted; likewise the layers of each scope whose last
    /// create is that recent. Bounded: one generation per cache and per scope, for that long; the first delete or gc after it releases them, and a removed cache (`cache rm`,
    /// `prune`: no record) keeps none.
    fn layers_kept_mounted(&self, id: &CacheId) -> std::collections::HashSet<String> {
        let keep = std::time::Duration::from_secs(self.config.layer_keep_seconds);
        let recent = std::fs::metadata(self.layout.last_used(id))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < keep);
        if !recent || !matches!(self.cache_record(id), Ok(Some(_))) {
            return Default::default();
        }
        let mut kept: std::collections::HashSet<String> = self
            .current(id)
            .map(|g| g.layer_ids().into_iter().chain(g.data_ids()).collect())
            .unwrap_or_default();
        // And the layers of its scopes used as recently: a PR's next push finds them mounted.
        for scope in self.scope_names(id).unwrap_or_default() {
            let used = std::fs::metadata(self.layout.scope_used(id, &scope))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < keep);
            if used {
                if let Ok(Some(s)) = self.scope_record(id, &scope) {
                    kept.extend(s.layer_ids());
                }
            }
        }
        kept
    }

    /// Unmounts the layer mounts of `id` that no volume uses any more. Called with the cache lock
    /// held. Overlays that still use a layer keep their own reference: the kernel clones the
    /// layer mounts privately, so this never pulls a layer from under a live volume.
    fn unmount_unused_layers(&self, id: &CacheId) -> Result<()> {
        let used = self.layers_in_use(id)?;
        let base = self
            .layout
            .mnt()
            .join("layers")
            .join(&id.namespace)
            .join(&id.name);
        let Ok(entries) = std::fs::read_dir(&base) else {
            return Ok(());
        };
        let kept = self.layers_kept_mounted(id);
        for e in entries.flatten() {
            let layer = e.file_name().to_string_lossy().into_owned();
            if used.contains(&layer) || kept.contains(&layer) {
                continue;
            }
            self.host.unmount(&e.path(), true)?;
            let _ = std::fs::remove_dir(e.path());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Whether the mount `found` is the layer image `image`, read-only on a loop device; else why not.
fn layer_mount_matches(
    found: &mounts::MountEntry,
    image: &Path,
    loops: &[crate::host::loopback::Backing],
) -> std::result::Result<(), String> {
    // Layers are ext4; a metadata base may be EROFS (files::erofs). The loop device below
    // ties the mount to the image either way, or, for a mapped base, the image itself.
    if found.fstype == "erofs" && Path::new(&found.source) == image {
        return if found.mount_options.starts_with("ro") {
            Ok(())
        } else {
            Err("it is writable".into())
        };
    }
    if found.fstype != "ext4" && found.fstype != "erofs" {
        return Err(format!("it is {}, not ext4 or erofs", found.fstype));
    }
    if !found.mount_options.starts_with("ro") {
        return Err("it is writable".into());
    }
    match loops.iter().find(|l| Path::new(&found.source) == l.device) {
        // A mapped base on a loop device was mounted without its devices (by hand, or by a
        // jobcachefs before mapped bases): its files would read the base's own blocks.
        Some(l)
            if l.file == image
                && crate::files::erofs::device_tags(image).is_ok_and(|t| !t.is_empty()) =>
        {
            Err("it is a mapped metadata base mounted without its data layers' images".into())
        }
        Some(l) if l.file == image => Ok(()),
        Some(l) => Err(format!(
            "its device {} backs {}",
            found.source,
            l.file.display()
        )),
        None => Err(format!("its source {} is no loop device", found.source)),
    }
}

/// Longest state dir path. Every path jobcachefs derives from it adds at most ~200 bytes (a
/// layer's `mnt/layers/<namespace>/<name>/<id>/upper` with 63-character names), so they all
/// stay far below `PATH_MAX` (4096) and below the one page in which sysfs reports a loop
/// device's backing file: nothing is cut where the kernel reads or reports these paths.
pub const STATE_DIR_MAX: usize = 1024;

fn check_state_dir_length(root: &Path) -> Result<()> {
    let len = root.as_os_str().len();
    if len > STATE_DIR_MAX {
        return Err(Error::invalid(format!(
            "state dir {}… is {len} bytes long (resolved): use one of at most {STATE_DIR_MAX} bytes (--state-dir or JOBCACHEFS_STATE_DIR)",
            root.display().to_string().chars().take(60).collect::<String>()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod length_tests {
    use super::*;

    #[test]
    fn a_state_dir_too_long_for_its_derived_paths_is_refused() {
        let ok = PathBuf::from(format!("/{}", "s".repeat(STATE_DIR_MAX - 1)));
        check_state_dir_length(&ok).unwrap();
        let long = PathBuf::from(format!("/{}", "s".repeat(STATE_DIR_MAX)));
        let e = check_state_dir_length(&long).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("1025 bytes"), "{e}");
        // The longest derived path (a layer's lowerdir with the longest names) stays below
        // PATH_MAX with room to spare.
        let layout = Layout::new(ok);
        let id = CacheId::new(&"n".repeat(63), &"c".repeat(63)).unwrap();
        let lower = layout.layer_lowerdir(&id, &format!("merge-{}", "f".repeat(16)));
        assert!(
            lower.as_os_str().len() < 1300,
            "{}",
            lower.as_os_str().len()
        );
    }
}
