//! Garbage collection and crash repair. Safe to run at any time, also while volumes are live and
//! other hooks run: every repair takes the lock of what it repairs and skips what is locked.
//!
//! What it repairs: half-made volumes (rolled back), half-deleted volumes (finished), ready
//! volumes whose mounts vanished in a reboot (remounted), unreferenced layers and their mounts,
//! half-built squash images, mounts and loop devices under the state dir that nothing references,
//! and due squashes from the queue.

use super::Engine;
use crate::error::Result;

use crate::host::mounts;
use crate::input::names::CacheId;
use crate::state::fsutil::read_json;
use crate::state::lock;
use crate::state::records::{VolumeRecord, VolumeState};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What one GC run did.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Volumes whose crashed create was rolled back.
    pub rolled_back: Vec<PathBuf>,
    /// Volumes whose crashed delete was finished.
    pub deletes_finished: Vec<PathBuf>,
    /// Ready volumes remounted after their mounts vanished.
    pub remounted: Vec<PathBuf>,
    /// Layer images removed (no generation or volume references them).
    pub layers_removed: Vec<String>,
    /// Stale mounts removed.
    pub mounts_removed: Vec<PathBuf>,
    /// Loop devices detached.
    pub loops_detached: Vec<PathBuf>,
    /// Half-built images removed.
    pub tmp_removed: Vec<PathBuf>,
    /// Caches squashed from the queue.
    pub squashed: Vec<String>,
    /// Caches past the hard depth bound whose newest layers were merged.
    pub merged: Vec<String>,
    /// Scopes removed because no volume used them for `scope_idle`.
    pub scopes_removed: Vec<String>,
    /// Clone caches whose write lease named a volume that is gone.
    pub leases_released: Vec<String>,
    /// Volumes of a `jobcachefs run` that was killed: discarded (what was left of the job
    /// killed first).
    pub runs_repaired: Vec<PathBuf>,
    /// Problems that did not stop the run.
    pub errors: Vec<String>,
}

impl GcReport {
    /// Whether the run changed nothing.
    pub fn is_empty(&self) -> bool {
        self.rolled_back.is_empty()
            && self.deletes_finished.is_empty()
            && self.remounted.is_empty()
            && self.layers_removed.is_empty()
            && self.mounts_removed.is_empty()
            && self.loops_detached.is_empty()
            && self.tmp_removed.is_empty()
            && self.merged.is_empty()
            && self.scopes_removed.is_empty()
            && self.squashed.is_empty()
            && self.leases_released.is_empty()
            && self.runs_repaired.is_empty()
    }
}

impl Engine {
    /// Repairs and collects everything on this node. `drain_queue` also runs due squashes.
    pub fn gc(&self, drain_queue: bool) -> Result<GcReport> {
        self.gc_inner(drain_queue, true)
    }

    /// The cheap part of [`Engine::gc`] that touches only the state dir (layers, half-built
    /// images, stale mounts under it, loop devices), not volumes. The hook runs this: a helper
    /// pod sees only its own volume's folder, so finishing or remounting other volumes from it
    /// would put their mounts where the node does not see them.
    pub fn gc_shared(&self) -> Result<GcReport> {
        self.gc_inner(false, false)
    }

    fn gc_inner(&self, drain_queue: bool, volumes: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        self.gc_root_temps(&mut report);
        if volumes {
            self.gc_volumes(&mut report)?;
            self.gc_run_locks()?;
        }
        for id in self.cache_ids()? {
            if let Err(e) = self.gc_cache(&id, &mut report) {
                report.errors.push(format!("cache {id}: {e}"));
            }
            match self.gc_scopes(&id) {
                Ok(gone) => report.scopes_removed.extend(gone),
                Err(e) => report.errors.push(format!("cache {id}: scopes: {e}")),
            }
            match self.enforce_depth_bound(&id) {
                Ok(Some(_)) => report.merged.push(id.to_string()),
                Ok(None) => {}
                Err(e) => report
                    .errors
                    .push(format!("cache {id}: merge past the depth bound: {e}")),
            }
        }
        self.gc_stale_mounts(&mut report)?;
        self.gc_loops(&mut report)?;
        if drain_queue {
            self.drain_queue(&mut report)?;
        }
        Ok(report)
    }

    fn gc_volumes(&self, report: &mut GcReport) -> Result<()> {
        let table = self.host.mount_table()?;
        for record in self.volume_records()? {
            if record.labels.contains_key(super::runs::RUN_LABEL) {
                // A run's volume is its run's until the run dies (its run lock comes first).
                match self.gc_run_volume(&record) {
                    Ok(true) => report.runs_repaired.push(record.dir.clone()),
                    Ok(false) => {}
                    Err(e) => report
                        .errors
                        .push(format!("volume {}: {e}", record.dir.display())),
                }
                continue;
            }
            let Some(_vlock) = lock::try_lock(&self.layout.volume_lock(&record.id))? else {
                continue; // a hook is working on it right now
            };
            // Re-read under the lock: the record may have changed since the listing.
            let Some(record) = read_json::<VolumeRecord>(&self.layout.volume_record(&record.id))?
            else {
                continue;
            };
            let result = match record.state {
                VolumeState::Creating => self
                    .rollback(&record)
                    .map(|_| report.rolled_back.push(record.dir.clone())),
                VolumeState::Deleting => self
                    .finish_delete(record.clone())
                    .map(|_| report.deletes_finished.push(record.dir.clone())),
                VolumeState::Ready if !mounts::is_mounted(&table, &record.dir) => self
                    .remount(&record)
                    .map(|_| report.remounted.push(record.dir.clone())),
                VolumeState::Ready => Ok(()),
            };
            if let Err(e) = result {
                report
                    .errors
                    .push(format!("volume {}: {e}", record.dir.display()));
            }
        }
        Ok(())
    }

    fn gc_cache(&self, id: &CacheId, report: &mut GcReport) -> Result<()> {
        if let Some(_slock) = lock::try_lock(&self.layout.squash_lock(id))? {
            let work = self.layout.squash_mnt(id);
            for m in ["new", "extra", "view"] {
                let p = work.join(m);
                if mounts::is_mounted(&self.host.mount_table()?, &p) {
                    self.host.unmount(&p, true)?;
                    report.mounts_removed.push(p);
                }
            }
            let tmp = self.layout.cache_tmp(id);
            if let Ok(entries) = std::fs::read_dir(&tmp) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                    report.tmp_removed.push(e.path());
                }
            }
            // A clone rebuild's half-built image.
            if let Some(store) = self.clone_store_if_ready() {
                let dir = crate::state::layout::clone_store::layers_dir(&store, id);
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("rebuild-") && name.ends_with(".tmp") {
                        let _ = std::fs::remove_file(e.path());
                        report.tmp_removed.push(e.path());
                    }
                }
            }
        }
        let _clock = self.lock_cache(id)?;
        // A clone cache's lease whose volume is gone is released.
        let lease = self.layout.lease(id);
        if let Ok(holder) = std::fs::read_to_string(&lease) {
            if !self.layout.volume_record(holder.trim()).exists() {
                let _ = std::fs::remove_file(&lease);
                report.leases_released.push(id.to_string());
            }
        }
        report.layers_removed.extend(self.collect_layers(id)?);
        Ok(())
    }

    /// The state root's own files written aside and renamed (`format`, `ballast`) by a process
    /// that died before the rename: `<name>.tmp-<pid>` whose process is gone.
    fn gc_root_temps(&self, report: &mut GcReport) {
        for e in std::fs::read_dir(self.layout.root())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((_, pid)) = name.split_once(".tmp-") else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(e.path());
                report.tmp_removed.push(e.path());
            }
        }
    }

    /// Removes layer images no generation and no volume references, and unmounts layers no
    /// volume uses. Called with the cache lock held.
    pub(crate) fn collect_layers(&self, id: &CacheId) -> Result<Vec<String>> {
        self.unmount_unused_layers(id)?;
        let mut keep: HashSet<String> = self.layers_in_use(id)?;
        keep.extend(self.kept_layers(id)?);
        keep.extend(self.scope_layers(id)?);
        let mut removed = Vec::new();
        let mut dirs = vec![self.layout.layers_dir(id)];
        // A clone cache's generation images live in the clone store (if it is mounted: gc
        // mounts the pool first when volumes need it; an unmounted pool is left alone).
        if let Some(store) = self.clone_store_if_ready() {
            let dir = crate::state::layout::clone_store::layers_dir(&store, id);
            if !self.layout.cache_record(id).exists() {
                let _ = std::fs::remove_dir(&dir); // the last of a removed cache (below)
            }
            dirs.push(dir);
        }
        let entries = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|r| r.flatten());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            // A manifest goes with its layer (or alone, left by a crash before its layer).
            let manifest = name.strip_suffix(".manifest");
            let Some(layer) = name.strip_suffix(".img").or(manifest) else {
                continue;
            };
            if keep.contains(layer) {
                continue;
            }
            if manifest.is_some() {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            std::fs::remove_file(e.path()).map_err(|err| {
                crate::error::Error::io(format!("remove {}", e.path().display()), err)
            })?;
            tracing::info!(cache = %id, layer, "unreferenced layer removed");
            removed.push(format!("{id}/{layer}"));
        }
        if let (Some(store), false) = (
            self.clone_store_if_ready(),
            self.layout.cache_record(id).exists(),
        ) {
            let _ = std::fs::remove_dir(crate::state::layout::clone_store::layers_dir(&store, id));
        }
        Ok(removed)
    }

    /// Mounts under the state dir (and overlays using its uppers) that no record explains.
    fn gc_stale_mounts(&self, report: &mut GcReport) -> Result<()> {
        let uppers = self.layout.mnt().join("uppers");
        let layers = self.layout.mnt().join("layers");
        let sync = self.layout.mnt().join("sync");
        for m in self.host.mount_table()? {
            // An overlay at some volume DIR whose upper belongs to a volume with no record.
            if m.fstype == "overlay" {
                let idmapped = self.layout.mnt().join("idmap");
                if let Some(vol) = upper_volume_of(&m.super_options, &uppers)
                    .or_else(|| upper_volume_of(&m.super_options, &idmapped))
                {
                    if !self.layout.volume_record(&vol).exists() {
                        if let Some(_l) = lock::try_lock(&self.layout.volume_lock(&vol))? {
                            if !self.layout.volume_record(&vol).exists() {
                                self.host.unmount(&m.mount_point, true)?;
                                report.mounts_removed.push(m.mount_point.clone());
                            }
                        }
                    }
                }
                continue;
            }
            if let Ok(rest) = m.mount_point.strip_prefix(self.layout.mnt().join("idmap")) {
                // An idmapped view lives only while its create holds the volume lock.
                let vol = rest.iter().next().map(|v| v.to_string_lossy().into_owned());
                if let Some(vol) = vol {
                    if let Some(_l) = lock::try_lock(&self.layout.volume_lock(&vol))? {
                        self.host.unmount(&m.mount_point, true)?;
                        let _ = std::fs::remove_dir(&m.mount_point);
                        report.mounts_removed.push(m.mount_point.clone());
                    }
                }
            } else if let Ok(rest) = m.mount_point.strip_prefix(&uppers) {
                let vol = rest.to_string_lossy().into_owned();
                if let Some(_l) = lock::try_lock(&self.layout.volume_lock(&vol))? {
                    if !self.layout.volume_record(&vol).exists() {
                        self.host.unmount(&m.mount_point, true)?;
                        let _ = std::fs::remove_dir(&m.mount_point);
                        report.mounts_removed.push(m.mount_point.clone());
                    }
                }
            } else if let Ok(rest) = m.mount_point.strip_prefix(&sync) {
                // A registry sync's private mount: live while its process holds `<token>.lock`.
                let token = rest.iter().next().map(|t| t.to_string_lossy().into_owned());
                if let Some(token) = token {
                    if let Some(_l) = lock::try_lock(&sync.join(format!("{token}.lock")))? {
                        self.host.unmount(&m.mount_point, true)?;
                        let _ = std::fs::remove_dir(&m.mount_point);
                        let _ = std::fs::remove_file(sync.join(format!("{token}.lock")));
                        report.mounts_removed.push(m.mount_point.clone());
                    }
                }
            } else if let Ok(rest) = m.mount_point.strip_prefix(&layers) {
                // Layer mounts of a cache that no longer exists.
                let parts: Vec<_> = rest
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                if parts.len() == 3 {
                    if let Ok(id) = CacheId::new(&parts[0], &parts[1]) {
                        if self.cache_record(&id)?.is_none()
                            && !self.layers_in_use(&id)?.contains(&parts[2])
                        {
                            self.host.unmount(&m.mount_point, true)?;
                            let _ = std::fs::remove_dir(&m.mount_point);
                            report.mounts_removed.push(m.mount_point.clone());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Loop devices backed by files under the state dir that no mount uses (a crash between
    /// attach and mount, or a file deleted under an attached device).
    fn gc_loops(&self, report: &mut GcReport) -> Result<()> {
        let root = self.layout.root().to_path_buf();
        for b in self.host.loop_devices() {
            let file = PathBuf::from(b.file.to_string_lossy().trim_end_matches(" (deleted)"));
            if !file.starts_with(&root) {
                continue;
            }
            // Hold the owner's lock so that nobody is between attach and mount right now.
            let _guard = match self.owner_lock(&file)? {
                Some(g) => g,
                None => continue,
            };
            let table = self.host.mount_table()?;
            let dev = b.device.display().to_string();
            if table.iter().any(|m| m.source == dev) {
                continue;
            }
            match self.host.detach(&b.device) {
                Ok(()) => report.loops_detached.push(b.device.clone()),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        Ok(())
    }

    /// The locks that serialise attaching `file` (a layer, a volume image or a squash image).
    fn owner_lock(&self, file: &Path) -> Result<Option<Vec<lock::Lock>>> {
        let rel = match file.strip_prefix(self.layout.root()) {
            Ok(r) => r
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            Err(_) => return Ok(None),
        };
        match rel.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["volumes", vol, ..] => {
                Ok(lock::try_lock(&self.layout.volume_lock(vol))?.map(|l| vec![l]))
            }
            ["caches", ns, name, ..] => {
                let Ok(id) = CacheId::new(ns, name) else {
                    return Ok(None);
                };
                let Some(s) = lock::try_lock(&self.layout.squash_lock(&id))? else {
                    return Ok(None);
                };
                let Some(c) = lock::try_lock(&self.layout.cache_lock(&id))? else {
                    return Ok(None);
                };
                Ok(Some(vec![s, c]))
            }
            _ => Ok(None),
        }
    }

    fn drain_queue(&self, report: &mut GcReport) -> Result<()> {
        let queue = self.layout.queue();
        let Ok(entries) = std::fs::read_dir(&queue) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("squash_") else {
                continue;
            };
            let Some((ns, cache)) = rest.split_once('_') else {
                continue;
            };
            let Ok(id) = CacheId::new(ns, cache) else {
                let _ = std::fs::remove_file(e.path());
                continue;
            };
            if self.cache_record(&id)?.is_none() {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            match self.squash(&id) {
                Ok(o) => {
                    let _ = std::fs::remove_file(e.path());
                    if o.generation().is_some() {
                        report.squashed.push(id.to_string());
                    }
                }
                Err(err) => report.errors.push(format!("squash {id}: {err}")),
            }
        }
        self.squash_idle(report)
    }

    /// Squashes overlay caches of more than one layer that no volume was created on for
    /// `squash_idle_seconds`: a cold lookup through a volume pays for every layer (measured in
    /// docs/src/design.md, "Reads through layers"), so an idle cache is folded while no job waits,
    /// and the next job reads one layer. Commits stay a rename; the copy happens here, off every
    /// job's path and without the cache lock (see [`Engine::squash`]).
    fn squash_idle(&self, report: &mut GcReport) -> Result<()> {
        let idle_for = self.config.squash_idle_seconds;
        if idle_for == 0 {
            return Ok(());
        }
        let now = crate::state::fsutil::now();
        for id in self.cache_ids()? {
            let Some(record) = self.cache_record(&id)? else {
                continue;
            };
            if record.mode != crate::state::records::CacheMode::Overlay
                || report.squashed.contains(&id.to_string())
            {
                continue;
            }
            let last_used = std::fs::metadata(self.layout.last_used(&id))
                .map(|m| std::os::unix::fs::MetadataExt::mtime(&m) as u64)
                .unwrap_or(record.created);
            if !idle_due(idle_for, now, last_used, self.current(&id)?.layers.len()) {
                continue;
            }
            match self.squash(&id) {
                Ok(o) if o.generation().is_some() => {
                    tracing::info!(cache = %id, idle = now.saturating_sub(last_used), "idle cache squashed");
                    report.squashed.push(id.to_string());
                }
                Ok(_) => {}
                Err(err) => report.errors.push(format!("squash {id} (idle): {err}")),
            }
        }
        Ok(())
    }
}

/// Whether a cache of `depth` layers last used at `last_used` is due an idle squash at `now`.
fn idle_due(idle_for: u64, now: u64, last_used: u64, depth: usize) -> bool {
    idle_for > 0 && depth > 1 && now.saturating_sub(last_used) >= idle_for
}

/// The volume id whose upper an overlay's options name, if it is one of ours.
fn upper_volume_of(options: &str, uppers: &Path) -> Option<String> {
    let prefix = format!("upperdir={}/", uppers.display());
    let start = options.find(&prefix)? + prefix.len();
    let rest = &options[start..];
    let end = rest.find('/')?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_squash_needs_depth_and_idleness() {
        assert!(idle_due(600, 1_000, 400, 2));
        assert!(!idle_due(600, 1_000, 401, 2), "used 599 s ago");
        assert!(!idle_due(600, 1_000, 0, 1), "one layer: nothing to fold");
        assert!(!idle_due(0, 1_000, 0, 8), "0 turns it off");
        assert!(
            !idle_due(600, 100, 500, 3),
            "a clock that went back is not idleness"
        );
    }

    #[test]
    fn finds_the_volume_of_an_overlay() {
        let o = "rw,lowerdir=/s/empty,upperdir=/s/mnt/uppers/abc123/upper,workdir=/s/mnt/uppers/abc123/work";
        assert_eq!(
            upper_volume_of(o, Path::new("/s/mnt/uppers")),
            Some("abc123".into())
        );
        assert_eq!(upper_volume_of(o, Path::new("/t/mnt/uppers")), None);
    }
}
