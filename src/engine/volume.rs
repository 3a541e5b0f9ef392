//! Volumes: create (per-volume image + overlay at DIR), delete (unmount, then commit or discard),
//! list. Every step is recorded first so that a retried call or `gc` finishes or undoes it.

use super::Engine;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fault;
use crate::host::image;
use crate::host::{mounts, ImageMount};
use crate::input::names::CacheId;
use crate::input::quantity::human_bytes;
use crate::state::fsutil::{self, ensure_dir, read_json};
use crate::state::layout::{volume_id, Layout};
use crate::state::records::{
    CacheMode, CacheRecord, RootOwner, VolumeKind, VolumeRecord, VolumeState,
};
use crate::state::stats;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// What `volume create` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Where the volume is mounted.
    pub dir: PathBuf,
    /// The cache it reads (and maybe writes back to); `None`: a plain size-limited volume.
    pub cache: Option<CacheId>,
    /// Size of its writable image; the configured default when `None`.
    pub size: Option<u64>,
    /// Commit into the cache on delete.
    pub write_back: bool,
    /// Limit of the cache if this request creates it; the configured default when `None`.
    pub cache_size: Option<u64>,
    /// Owner and mode of the volume's root (default root:root 0755).
    pub root: Option<RootOwner>,
    /// Caller's labels, kept in the record.
    pub labels: BTreeMap<String, String>,
    /// Mode of the cache if this request creates it; a different mode than an existing
    /// cache's is refused. `None`: the existing cache's mode, or overlay for a new cache.
    pub cache_mode: Option<CacheMode>,
    /// Give the volume its own UID and its cache's GID, and its root to them.
    pub unique_ids: bool,
    /// The cache's GID as the cluster allocated it (the hook); `None`: the node allocates.
    pub cache_gid: Option<u32>,
    /// Read the cache with this scope's layers on top, and write back into the scope only.
    pub scope: Option<String>,
    /// Write back only if the job leaves [`crate::state::records::SUCCESS_MARKER`] at the
    /// volume's root (with `write_back`).
    pub on_success: bool,
}

/// What `volume delete` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum DeleteOutcome {
    /// There was no volume at DIR (already deleted): nothing done.
    NotFound,
    /// A half-made volume (crashed create) was rolled back.
    RolledBack,
    /// Discarded: `--discard`, not write-back, or a plain volume.
    Discarded,
    /// A write-back volume whose changes could not be committed, and why (its image was not
    /// cleanly unmounted after a node crash; its filesystem had write errors; another volume
    /// held the cache's write lease).
    /// Reported as `"outcome": "discarded"` with a `reason`.
    #[serde(rename = "discarded")]
    NotCommitted {
        /// Why, for the operator.
        reason: String,
    },
    /// Write-back volume that changed nothing: nothing published.
    Unchanged,
    /// Committed as a new generation (of the cache, or of the scope it names).
    Committed {
        /// The generation published (the scope's own count for a scope).
        generation: u64,
        /// Whether the commit needed a squash (a merge, for a scope) to fit its size limit.
        squashed: bool,
        /// The scope it was committed into; `None`: the cache.
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// A write-back `on-success` volume whose job left no success marker: discarded. Reported
    /// as `"outcome": "discarded"` with a `reason`; not counted as a failed commit.
    #[serde(rename = "discarded")]
    Declined {
        /// Why, for the operator.
        reason: String,
    },
    /// The commit did not fit the cache-size even squashed: the previous generation stays.
    Rejected {
        /// Why, for the operator.
        reason: String,
    },
}

/// What [`Engine::check_request`] found: the request's mode, size, canonical DIR and volume id.
struct Checked {
    mode: CacheMode,
    size: u64,
    dir: PathBuf,
    vol: String,
}

/// A volume as `volume ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// The record.
    #[serde(flatten)]
    pub record: VolumeRecord,
    /// Bytes used in its writable image (when mounted).
    pub used: Option<u64>,
    /// Whether the overlay is mounted at DIR.
    pub mounted: bool,
}

/// Makes `dir` absolute and canonical, resolving the deepest existing ancestor (DIR itself need
/// not exist yet). Rejects `..` after the existing part so the result cannot escape.
pub(crate) fn resolve_dir(dir: &Path) -> Result<PathBuf> {
    if dir.as_os_str().is_empty() {
        return Err(Error::invalid(
            "volume DIR is empty: give the directory to mount the volume at",
        ));
    }
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .at("resolve", Path::new("."))?
            .join(dir)
    };
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        let name = existing.file_name().map(|n| n.to_owned());
        match (name, existing.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n);
                existing = p.to_path_buf();
            }
            _ => break,
        }
    }
    if Path::new(&abs)
        .components()
        .any(|c| c == Component::ParentDir)
        && !rest.is_empty()
    {
        return Err(Error::invalid(format!(
            "volume DIR {:?} contains '..' in a part that does not exist: use a plain absolute path",
            dir.display().to_string()
        )));
    }
    let mut out = existing.canonicalize().at("resolve", &existing)?;
    for n in rest.into_iter().rev() {
        out.push(n);
    }
    Ok(out)
}

impl Engine {
    /// Creates a volume at `req.dir`, or returns the existing one when the same request is
    /// repeated.
    pub fn volume_create(&self, req: &CreateRequest) -> Result<VolumeRecord> {
        let started = std::time::Instant::now();
        let result = self.volume_create_inner(req);
        if result.is_ok() {
            stats::observe(
                &self.layout,
                stats::histograms::VOLUME_CREATE,
                started.elapsed(),
                &[],
            );
        }
        result
    }

    fn volume_create_inner(&self, req: &CreateRequest) -> Result<VolumeRecord> {
        let Checked {
            mode,
            size,
            dir,
            vol,
        } = self.check_request(req)?;
        let _vlock = self.lock_volume(&vol)?;
        if let Some(existing) = read_json::<VolumeRecord>(&self.layout.volume_record(&vol))? {
            match existing.state {
                VolumeState::Ready => return self.repeat_create(existing, req, size),
                VolumeState::Creating if existing.kind == VolumeKind::Clone => {
                    tracing::info!(dir = %dir.display(), "rolling back a half-made clone volume before creating it again");
                    self.clone_rollback(&existing)?;
                }
                VolumeState::Creating => {
                    tracing::info!(dir = %dir.display(), "rolling back a half-made volume before creating it again");
                    self.rollback(&existing)?;
                }
                VolumeState::Deleting => {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "volume {} is being deleted: run `jobcachefs volume delete {}` to finish, then create it again",
                            dir.display(),
                            dir.display()
                        ),
                    ))
                }
            }
        }
        self.check_new_dir(&dir)?;
        if mode == CacheMode::Clone {
            return self.clone_create(req, &dir, &vol, size);
        }
        let mut record = new_record(req, &dir, &vol, size, VolumeKind::Overlay);
        // Admitted until the record is written: from then on it counts in the disk budget (and
        // holds its UID).
        let (admission, uid) = self.admit(size, req.unique_ids)?;
        ensure_dir(&self.layout.volume_dir(&vol))?;
        if let Some(id) = &req.cache {
            // A stack past the hard bound (a lagging agent, a state dir from before the bound)
            // is merged before a volume is made on it; a failure leaves a deep but mountable
            // stack, refused by name only past what one overlay can hold.
            if let Err(e) = self.enforce_depth_bound(id) {
                tracing::error!(cache = %id, error = %e, "merging past the hard depth bound failed");
            }
        }
        let lowers = match &req.cache {
            Some(id) => {
                // Pin the generation: the record names its layers before the lock is released,
                // so no GC or squash can remove them while this volume lives.
                let _clock = self.lock_cache(id)?;
                self.ensure_cache(id, req.cache_size, req.cache_mode)?;
                let current = self.current(id)?;
                record.generation = current.generation;
                record.layers = current.layer_ids();
                record.data_layers = current.data_ids();
                if let Some(scope) = &req.scope {
                    // The scope's layers on top of the cache's: pinned by the record like them.
                    if let Some(s) = self.scope_record(id, scope)? {
                        record.layers.extend(s.layer_ids());
                    }
                    self.touch_scope(id, scope)?;
                }
                if let Some(uid) = uid {
                    let gid = self.cache_gid(id, req.cache_gid)?;
                    set_identity(&mut record, uid, gid);
                }
                self.write_record(&self.layout.volume_record(&vol), &record)?;
                drop(admission);
                touch(&self.layout.last_used(id));
                let data = self.ensure_layers_mounted(
                    id,
                    &self.overlay_data_layers(id, &record.layers, &record.data_layers),
                );
                match data.and_then(|_| self.ensure_layers_mounted(id, &record.layers)) {
                    Ok(l) if l.is_empty() => vec![self.layout.empty()],
                    Ok(l) => l,
                    Err(e) => {
                        drop(_clock);
                        let _ = self.rollback(&record);
                        return Err(e);
                    }
                }
            }
            None => {
                if let Some(uid) = uid {
                    set_identity(&mut record, uid, uid);
                }
                self.write_record(&self.layout.volume_record(&vol), &record)?;
                drop(admission);
                vec![self.layout.empty()]
            }
        };
        fault::point("create:recorded");
        match self.mount_volume(&record, &lowers) {
            Ok(()) => {}
            Err(e) => {
                let _ = self.rollback(&record);
                return Err(e);
            }
        }
        fault::point("create:mounted");
        record.state = VolumeState::Ready;
        self.write_record(&self.layout.volume_record(&vol), &record)?;
        tracing::info!(
            dir = %dir.display(),
            cache = record.cache.as_ref().map(|c| c.to_string()).unwrap_or_default(),
            generation = record.generation,
            layers = record.layers.len(),
            size = record.size,
            write_back = record.write_back,
            "volume created"
        );
        let counter = match (&record.cache, record.layers.is_empty()) {
            (None, _) => crate::state::stats::names::VOLUMES_PLAIN,
            (Some(_), true) => crate::state::stats::names::VOLUMES_COLD,
            (Some(_), false) => crate::state::stats::names::VOLUMES_WARM,
        };
        crate::state::stats::add(&self.layout, &[(counter, 1)]);
        Ok(record)
    }

    /// Checks a create request without changing anything: what `volume_create` refuses first
    /// (`jobcachefs run` asks this of every volume before it makes the first).
    pub fn volume_check(&self, req: &CreateRequest) -> Result<()> {
        self.check_request(req).map(|_| ())
    }

    /// The checks at the start of every create, before any file (not even a lock file) is
    /// made; DIR and the size are checked again under the locks.
    fn check_request(&self, req: &CreateRequest) -> Result<Checked> {
        if let Some(cache_size) = req.cache_size {
            check_cache_size(cache_size)?;
        }
        let (mode, cache) = self.mode_for(req)?;
        let size = match mode {
            CacheMode::Overlay => req.size.unwrap_or(self.config.default_volume_size),
            CacheMode::Clone => self.clone_size(cache.as_ref(), req.size, req.cache_size)?,
        };
        self.check_volume_size(size)?;
        if req.write_back && req.cache.is_none() {
            return Err(Error::invalid(
                "--write-back needs a cache: add --cache NAME",
            ));
        }
        if let Some(scope) = &req.scope {
            crate::input::names::validate_label("scope", scope)?;
            let Some(id) = &req.cache else {
                return Err(Error::invalid(format!(
                    "--scope {scope} needs a cache: add --cache NAME (a scope is a child of a cache)"
                )));
            };
            if mode == CacheMode::Clone {
                return Err(Error::invalid(format!(
                    "cache {id} is a clone cache, and clone caches have no scopes: a clone volume is a copy of one whole image, \
                     so a scope would be a second copy of the cache per branch. Use an overlay cache for scoped builds, or drop --scope {scope}"
                )));
            }
        }
        let dir = resolve_dir(&req.dir)?;
        let root = self.layout.root();
        if dir.starts_with(root) || root.starts_with(&dir) {
            return Err(Error::invalid(format!(
                "volume DIR {:?} overlaps the state dir {:?}: mount volumes outside it",
                dir.display().to_string(),
                root.display().to_string()
            )));
        }
        let vol = volume_id(&dir);
        if !self.layout.volume_record(&vol).exists() {
            self.check_new_dir(&dir)?;
            let budget = self.disk_budget()?;
            if !budget.admits(size) {
                stats::add(&self.layout, &[(stats::names::ADMISSION_REFUSALS, 1)]);
                return Err(budget.refusal("volume", size, self.layout.root()));
            }
        }
        Ok(Checked {
            mode,
            size,
            dir,
            vol,
        })
    }

    /// Refuses a DIR that is a file, a mount point or not empty (a missing DIR is fine).
    fn check_new_dir(&self, dir: &Path) -> Result<()> {
        if dir.exists() {
            let md = std::fs::metadata(dir).at("stat", dir)?;
            if !md.is_dir() {
                return Err(Error::invalid(format!(
                    "volume DIR {:?} is a file: give a directory path (it is created if missing)",
                    dir.display().to_string()
                )));
            }
            let table = self.host.mount_table()?;
            if mounts::is_mounted(&table, dir) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "volume DIR {:?} is already a mount point: unmount it or pick another path",
                        dir.display().to_string()
                    ),
                ));
            }
            if std::fs::read_dir(dir).at("read", dir)?.next().is_some() {
                return Err(Error::invalid(format!(
                    "volume DIR {:?} is not empty: give an empty or missing directory",
                    dir.display().to_string()
                )));
            }
        }
        Ok(())
    }

    fn check_volume_size(&self, size: u64) -> Result<()> {
        if size < image::MIN_IMAGE_SIZE {
            return Err(Error::invalid(format!(
                "volume size {} is below the minimum: use at least {}",
                human_bytes(size),
                human_bytes(image::MIN_IMAGE_SIZE)
            )));
        }
        if size > self.config.max_volume_size {
            return Err(Error::new(
                ErrorKind::Quota,
                format!(
                    "volume size {} is above this node's max_volume_size {}: ask for less or raise max_volume_size in the config",
                    human_bytes(size),
                    human_bytes(self.config.max_volume_size)
                ),
            ));
        }
        Ok(())
    }

    /// Creates the cache's record if it does not exist yet. Called with the cache lock held.
    pub(crate) fn ensure_cache(
        &self,
        id: &CacheId,
        cache_size: Option<u64>,
        mode: Option<CacheMode>,
    ) -> Result<CacheRecord> {
        if let Some(r) = self.cache_record(id)? {
            check_mode(&r, mode)?;
            if let Some(asked) = cache_size {
                if asked != r.cache_size {
                    tracing::warn!(cache = %id, asked, limit = r.cache_size,
                        "cache exists with another size limit; keeping it (use `jobcachefs cache resize`)");
                }
            }
            return Ok(r);
        }
        let cache_size = cache_size.unwrap_or(self.config.default_cache_size);
        check_cache_size(cache_size)?;
        let mode = mode.unwrap_or_default();
        let record = CacheRecord {
            id: id.clone(),
            cache_size,
            mode,
            gid: None,
            created: fsutil::now(),
        };
        ensure_dir(&self.layout.layers_dir(id))?;
        self.write_record(&self.layout.cache_record(id), &record)?;
        tracing::info!(cache = %id, cache_size, mode = %mode, "cache created");
        Ok(record)
    }

    /// A create repeated for a DIR that already has a ready volume: the same request succeeds
    /// without doing anything; another request is a conflict.
    fn repeat_create(
        &self,
        existing: VolumeRecord,
        req: &CreateRequest,
        size: u64,
    ) -> Result<VolumeRecord> {
        if existing.cache != req.cache
            || existing.size != size
            || existing.write_back != req.write_back
            || existing.scope != req.scope
            || existing.on_success != (req.write_back && req.on_success)
            || existing.identity.is_some() != req.unique_ids
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "volume {} already exists with cache {}{}, size {}, write-back {}: delete it first or repeat the same request",
                    existing.dir.display(),
                    existing.cache.as_ref().map(|c| c.to_string()).unwrap_or_else(|| "(none)".into()),
                    existing.scope.as_ref().map(|s| format!(" scope {s}")).unwrap_or_default(),
                    existing.size,
                    match (existing.write_back, existing.on_success) {
                        (true, true) => "on-success",
                        (true, false) => "true",
                        _ => "false",
                    }
                ),
            ));
        }
        let table = self.host.mount_table()?;
        if !mounts::is_mounted(&table, &existing.dir) {
            // The node rebooted: mounts are gone but the record and image survived.
            self.remount(&existing)?;
        }
        Ok(existing)
    }

    /// Mounts a ready volume whose mounts are gone (after a reboot). Its image was not cleanly
    /// unmounted, so it is checked first.
    pub(crate) fn remount(&self, record: &VolumeRecord) -> Result<()> {
        if record.kind == VolumeKind::Clone {
            return self.clone_remount(record);
        }
        let lowers = match &record.cache {
            Some(id) => {
                let _clock = self.lock_cache(id)?;
                self.ensure_layers_mounted(
                    id,
                    &self.overlay_data_layers(id, &record.layers, &record.data_layers),
                )?;
                let l = self.ensure_layers_mounted(id, &record.layers)?;
                if l.is_empty() {
                    vec![self.layout.empty()]
                } else {
                    l
                }
            }
            None => vec![self.layout.empty()],
        };
        let table = self.host.mount_table()?;
        let upper = self.layout.upper_mount(&record.id);
        if !mounts::is_mounted(&table, &upper) {
            self.host
                .check_image(&self.layout.volume_image(&record.id))?;
            self.host.mount_image(
                &self.layout.volume_image(&record.id),
                &upper,
                ImageMount { read_only: false },
            )?;
        }
        self.mount_overlay_for(record, &lowers, &upper)?;
        tracing::info!(dir = %record.dir.display(), "volume remounted");
        Ok(())
    }

    /// Makes the volume's image, mounts it and the overlay. On error, the caller rolls back.
    fn mount_volume(&self, record: &VolumeRecord, lowers: &[std::path::PathBuf]) -> Result<()> {
        let vol = &record.id;
        let image_path = self.layout.volume_image(vol);
        self.host
            .make_volume_image(&image_path, record.size, 0, 0)?;
        fault::point("create:image-made");
        let upper = self.layout.upper_mount(vol);
        ensure_dir(&upper)?;
        self.host
            .mount_image(&image_path, &upper, ImageMount { read_only: false })?;
        let up = upper.join("upper");
        let work = upper.join("work");
        for d in [&up, &work] {
            std::fs::create_dir(d).at("create", d)?;
        }
        if record.root.is_some() {
            self.own_root(record, &up)?;
        } else {
            std::fs::set_permissions(&up, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .at("chmod", &up)?;
        }
        fault::point("create:upper-mounted");
        if !record.dir.exists() {
            std::fs::create_dir_all(&record.dir).at("create volume DIR", &record.dir)?;
        }
        self.mount_overlay_for(record, lowers, &upper)
    }

    /// Undoes a volume that never became ready: unmount, remove image and record.
    pub(crate) fn rollback(&self, record: &VolumeRecord) -> Result<()> {
        if record.kind == VolumeKind::Clone {
            return self.clone_rollback(record);
        }
        let table = self.host.mount_table()?;
        if mounts::is_mounted(&table, &record.dir)
            && self.overlay_of(&table, &record.dir, &record.id)
        {
            self.host.unmount(&record.dir, true)?;
        }
        let upper = self.layout.upper_mount(&record.id);
        if mounts::is_mounted(&table, &upper) {
            self.host.unmount(&upper, true)?;
        }
        let _ = std::fs::remove_dir(&upper);
        self.forget(record)?;
        self.remove_made_dir(record);
        Ok(())
    }

    /// Removes DIR if this volume's create made it and it is empty and unmounted again.
    fn remove_made_dir(&self, record: &VolumeRecord) {
        if !record.made_dir {
            return;
        }
        let mounted = self
            .host
            .mount_table()
            .map(|t| mounts::is_mounted(&t, &record.dir))
            .unwrap_or(true);
        if !mounted {
            let _ = std::fs::remove_dir(&record.dir); // fails, harmlessly, when not empty
        }
    }

    /// Removes a volume's image and record (the last step of delete and rollback), then lets go
    /// of layer mounts nobody uses any more.
    fn forget(&self, record: &VolumeRecord) -> Result<()> {
        let image_path = self.layout.volume_image(&record.id);
        fsutil::remove_file_if_exists(&image_path)?;
        let rec = self.layout.volume_record(&record.id);
        fsutil::remove_file_if_exists(&rec)?;
        fsutil::remove_file_if_exists(&self.layout.volume_manifest(&record.id))?;
        fsutil::fsync_dir(&self.layout.volume_dir(&record.id))?;
        let _ = std::fs::remove_dir(self.layout.volume_dir(&record.id));
        if let Some(id) = &record.cache {
            // Cheap GC on every delete: layers only this volume still held go now.
            let _clock = self.lock_cache(id)?;
            // Best effort: a damaged record elsewhere must not fail this delete.
            if let Err(e) = self.collect_layers(id) {
                tracing::warn!(cache = %id, error = %e, "layers not collected");
            }
            self.remove_cache_dir_if_empty(id);
        }
        Ok(())
    }

    /// Deletes the volume at `dir`: commits it if it was created with write-back and `discard`
    /// is false, discards it otherwise. Repeating the call after success does nothing.
    pub fn volume_delete(&self, dir: &Path, discard: bool) -> Result<DeleteOutcome> {
        let started = std::time::Instant::now();
        let result = self.volume_delete_inner(dir, discard);
        // A repeated delete that found nothing is not a delete: it would pull the latency down.
        let (histogram, outcome) = match &result {
            Ok(DeleteOutcome::NotFound) | Err(_) => return result,
            Ok(DeleteOutcome::Committed { .. }) => (stats::histograms::VOLUME_COMMIT, None),
            Ok(DeleteOutcome::Rejected { .. }) => (
                stats::histograms::VOLUME_DISCARD,
                Some(stats::names::COMMITS_REJECTED),
            ),
            Ok(DeleteOutcome::NotCommitted { .. }) => (
                stats::histograms::VOLUME_DISCARD,
                Some(stats::names::COMMITS_NOT_COMMITTED),
            ),
            Ok(DeleteOutcome::Declined { .. }) => (
                stats::histograms::VOLUME_DISCARD,
                Some(stats::names::COMMITS_DECLINED),
            ),
            Ok(_) => (stats::histograms::VOLUME_DISCARD, None),
        };
        let deltas: Vec<(&str, u64)> = outcome.into_iter().map(|k| (k, 1)).collect();
        stats::observe(&self.layout, histogram, started.elapsed(), &deltas);
        result
    }

    fn volume_delete_inner(&self, dir: &Path, discard: bool) -> Result<DeleteOutcome> {
        let dir = resolve_dir(dir)?;
        let vol = volume_id(&dir);
        let _vlock = self.lock_volume(&vol)?;
        let Some(mut record) = read_json::<VolumeRecord>(&self.layout.volume_record(&vol))? else {
            tracing::info!(dir = %dir.display(), "no volume here (already deleted?): nothing to do");
            return Ok(DeleteOutcome::NotFound);
        };
        match record.state {
            VolumeState::Creating => {
                self.rollback(&record)?;
                return Ok(DeleteOutcome::RolledBack);
            }
            VolumeState::Ready => {
                record.state = VolumeState::Deleting;
                // A clone volume that did not get its cache's write lease never commits.
                record.discard = discard
                    || !record.write_back
                    || record.cache.is_none()
                    || (record.kind == VolumeKind::Clone && !record.lease);
                self.write_record(&self.layout.volume_record(&vol), &record)?;
            }
            VolumeState::Deleting => {
                // A retry: the first decision stands, unless this call asks to discard.
                if discard && !record.discard && record.commit_layer.is_none() {
                    record.discard = true;
                    self.write_record(&self.layout.volume_record(&vol), &record)?;
                }
            }
        }
        fault::point("delete:marked");
        self.finish_delete(record)
    }

    /// Finishes a delete from whatever point a previous run reached. Called with the volume lock.
    pub(crate) fn finish_delete(&self, mut record: VolumeRecord) -> Result<DeleteOutcome> {
        if record.kind == VolumeKind::Clone {
            return self.clone_finish_delete(record);
        }
        let vol = record.id.clone();
        let table = self.host.mount_table()?;
        if mounts::is_mounted(&table, &record.dir) && self.overlay_of(&table, &record.dir, &vol) {
            // A commit needs a clean unmount: a busy volume is an error (the caller retries); a
            // discarded one may be detached lazily.
            self.host.unmount(&record.dir, record.discard)?;
        }
        fault::point("delete:overlay-unmounted");
        let upper = self.layout.upper_mount(&vol);
        let mut not_committed = None;
        if !mounts::is_mounted(&table, &upper) && !record.discard && record.commit_layer.is_none() {
            // The mounts vanished before delete decided (a node reboot): only an image that was
            // unmounted cleanly can be judged; a dirty one is not committed, and says so.
            let image = self.layout.volume_image(&vol);
            if image.exists() && self.host.image_is_clean(&image)? {
                ensure_dir(&upper)?;
                self.host
                    .mount_image(&image, &upper, ImageMount { read_only: false })?;
            } else {
                let reason = format!(
                    "the volume's mounts were gone (node reboot?) and its image {} was not cleanly unmounted: its changes were not committed",
                    image.display()
                );
                tracing::warn!(dir = %record.dir.display(), "{reason}");
                record.discard = true;
                self.write_record(&self.layout.volume_record(&vol), &record)?;
                not_committed = Some(reason);
            }
        }
        let table = self.host.mount_table()?;
        if mounts::is_mounted(&table, &upper) {
            if !record.discard && record.commit_layer.is_none() {
                if let Some(failure) = write_failure(&upper) {
                    // A write of the job's failed (the host disk filled up under the sparse
                    // image): what the volume holds may be files whose data never reached the
                    // disk, which no check can tell from real zeros. A cache that serves them
                    // breaks every later build, so the volume is not committed.
                    not_committed = Some(not_committing(
                        &mut record,
                        format!(
                            "the volume's filesystem had write errors while the job ran ({failure}; was the disk of {} full?): its changes were not committed",
                            self.layout.volume_image(&vol).display()
                        ),
                    ));
                    self.write_record(&self.layout.volume_record(&vol), &record)?;
                }
            }
            if record.on_success && !record.discard && record.commit_layer.is_none() {
                self.judge_success(&mut record, &upper.join("upper"))?;
            }
            if !record.discard && record.commit_layer.is_none() {
                let changed = std::fs::read_dir(upper.join("upper"))
                    .at("read", &upper.join("upper"))?
                    .next()
                    .is_some();
                if changed {
                    record.commit_layer = Some(new_layer_id(&record));
                } else {
                    record.discard = true;
                    record.unchanged = true;
                }
                record.clean = false;
                self.write_record(&self.layout.volume_record(&vol), &record)?;
            }
            // The overlay's work dir is not part of the tree; empty it so the layer is tidy.
            let _ = std::fs::remove_dir_all(upper.join("work").join("work"));
            if record.commit_layer.is_some() {
                // Give back what the job wrote and deleted (the image is sparse and the device
                // passes discards on as holes): the layer then allocates about what its tree
                // holds, not everything ever written. Best effort: an untrimmed layer is only
                // bigger. Repeated by a retried delete, which is harmless.
                if let Err(e) = self.host.trim(&upper) {
                    tracing::warn!(dir = %record.dir.display(), error = %e, "upper image not trimmed before commit");
                }
            }
            // A manifest is this upper's or none: one an earlier volume at the same DIR left
            // (its commit squashed or refused) must not be taken for this one's.
            let _ = std::fs::remove_file(self.layout.volume_manifest(&vol));
            if record.commit_layer.is_some()
                && !record.discard
                && self.config.squash_method == crate::input::config::SquashMethod::Metadata
            {
                // The tree a metadata squash will fold, read while the page cache holds it
                // (files::manifest). Best effort: without it that squash walks the view.
                use crate::files::manifest;
                let m = self.layout.volume_manifest(&vol);
                // Each file's extents too (a mapped metadata base points at them): synced first,
                // so that no block is still waiting for its place (delayed allocation). The
                // unmount below would write the same out.
                let synced = std::fs::File::open(&upper)
                    .map(|f| rustix::fs::syncfs(&f).is_ok())
                    .unwrap_or(false);
                let written = manifest::of_tree_within(
                    &upper.join("upper"),
                    manifest::Names::Stored,
                    manifest::COMMIT_ENTRIES_MAX,
                    synced,
                )
                .and_then(|t| match t {
                    Some(mut t) => {
                        t.image = manifest::image_uuid(&self.layout.volume_image(&vol));
                        manifest::write(&t, &m)
                    }
                    None => {
                        tracing::info!(dir = %record.dir.display(), "no manifest: the upper holds more than {} entries", manifest::COMMIT_ENTRIES_MAX);
                        Ok(())
                    }
                });
                if let Err(e) = written {
                    tracing::warn!(dir = %record.dir.display(), error = %e, "no manifest for the committed layer");
                    let _ = std::fs::remove_file(&m);
                }
            }
            self.host.unmount(&upper, record.discard)?;
            if record.commit_layer.is_some() && !record.discard {
                self.wait_released(&self.layout.volume_image(&vol))?;
                if self.host.image_is_clean(&self.layout.volume_image(&vol))? {
                    record.clean = true;
                } else {
                    // Write errors that showed only at the unmount (the metadata's write-back
                    // from the journal failed): the image needs recovery, and a layer that
                    // cannot be mounted would break every later job.
                    not_committed = Some(not_committing(
                        &mut record,
                        format!(
                            "the volume's filesystem {} was not clean after its unmount (write errors: was its disk full?): its changes were not committed",
                            self.layout.volume_image(&vol).display()
                        ),
                    ));
                }
                self.write_record(&self.layout.volume_record(&vol), &record)?;
            }
        }
        let _ = std::fs::remove_dir(&upper);
        fault::point("delete:upper-unmounted");
        let outcome = match (&record.commit_layer, record.discard) {
            (Some(layer), false) => {
                if !record.clean {
                    self.wait_released(&self.layout.volume_image(&vol))?;
                }
                if !record.clean && !self.host.image_is_clean(&self.layout.volume_image(&vol))? {
                    let reason = "the volume image was not cleanly unmounted (node crash?): its changes were not committed".to_string();
                    tracing::warn!(dir = %record.dir.display(), "{reason}");
                    DeleteOutcome::NotCommitted { reason }
                } else {
                    let layer = layer.clone();
                    self.commit(&record, &layer)?
                }
            }
            (None, false) => DeleteOutcome::Unchanged,
            _ if record.success == Some(false) => DeleteOutcome::Declined {
                reason: no_success_reason(&record),
            },
            _ if record.unchanged => DeleteOutcome::Unchanged,
            // A retry finds the reason in the record.
            _ if not_committed.is_some() || record.note.is_some() => DeleteOutcome::NotCommitted {
                reason: not_committed.or(record.note.clone()).unwrap_or_default(),
            },
            _ => DeleteOutcome::Discarded,
        };
        fault::point("delete:committed");
        self.forget(&record)?;
        self.remove_made_dir(&record);
        tracing::info!(dir = %record.dir.display(), outcome = ?outcome, "volume deleted");
        match (&outcome, &record.cache) {
            (DeleteOutcome::Committed { scope: None, .. }, Some(id)) => self.after_commit(id)?,
            (DeleteOutcome::Committed { scope: Some(s), .. }, Some(id)) => {
                self.after_scope_commit(id, s)?
            }
            _ => {}
        }
        Ok(outcome)
    }

    /// Judges a write-back `on-success` volume by its success marker, in its upper dir `upper`
    /// (the job's own files: the marker is never in a layer). The decision is recorded before
    /// the marker is removed, so a retried delete keeps it; without the marker the volume is
    /// discarded. Called with the volume lock, the upper mounted and the overlay unmounted.
    pub(crate) fn judge_success(&self, record: &mut VolumeRecord, upper: &Path) -> Result<()> {
        let marker = upper.join(crate::state::records::SUCCESS_MARKER);
        if record.success.is_none() {
            let seen = std::fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file());
            record.success = Some(seen);
            if !seen {
                record.discard = true;
                tracing::info!(dir = %record.dir.display(), "{}", no_success_reason(record));
            }
            self.write_record(&self.layout.volume_record(&record.id), record)?;
            fault::point("delete:judged");
        }
        if record.success == Some(true) {
            fsutil::remove_file_if_exists(&marker)?;
        }
        Ok(())
    }

    /// Live volumes with their use.
    pub fn volume_list(&self) -> Result<Vec<VolumeInfo>> {
        let table = self.host.mount_table()?;
        Ok(self
            .volume_records()?
            .into_iter()
            .map(|record| info_of(&table, &self.layout, record))
            .collect())
    }

    /// The record of the volume at `dir`, if there is one: one file read (the CSI plugin asks
    /// this on every publish and unpublish).
    pub fn volume_record_at(&self, dir: &Path) -> Result<Option<VolumeRecord>> {
        let dir = resolve_dir(dir)?;
        read_json(&self.layout.volume_record(&volume_id(&dir)))
    }

    /// One volume by DIR: its record alone, and the mount table. kubelet asks this of every
    /// CSI volume every minute (NodeGetVolumeStats), so neither the other volumes' records nor
    /// their usage are read, and a record elsewhere that cannot be read changes nothing here.
    pub fn volume_show(&self, dir: &Path) -> Result<VolumeInfo> {
        let dir = resolve_dir(dir)?;
        let not_found = || {
            Error::new(
                ErrorKind::NotFound,
                format!("no volume at {}: see `jobcachefs volume ls`", dir.display()),
            )
        };
        // The id is a digest of DIR: the record found must still name DIR.
        let record = self
            .volume_record_at(&dir)?
            .filter(|r| r.dir == dir)
            .ok_or_else(not_found)?;
        Ok(info_of(&self.host.mount_table()?, &self.layout, record))
    }
}

/// A volume's record with what the mount table says of it.
fn info_of(table: &[mounts::MountEntry], layout: &Layout, record: VolumeRecord) -> VolumeInfo {
    let upper = layout.upper_mount(&record.id);
    let used = if mounts::is_mounted(table, &upper) {
        fsutil::fs_usage(&upper).ok().map(|(u, _)| u)
    } else {
        None
    };
    let mounted = mounts::is_mounted(table, &record.dir);
    VolumeInfo {
        record,
        used,
        mounted,
    }
}

impl Engine {
    /// Whether the mount at `dir` is this volume's overlay (not something else mounted there).
    fn overlay_of(&self, table: &[mounts::MountEntry], dir: &Path, vol: &str) -> bool {
        // The upper is the volume's own mount, or its idmapped view (a volume with an identity).
        let uppers = [
            self.layout.upper_mount(vol).join("upper"),
            self.layout
                .mnt()
                .join("idmap")
                .join(vol)
                .join("u")
                .join("upper"),
        ];
        table.iter().any(|m| {
            m.mount_point == dir
                && m.fstype == "overlay"
                && uppers.iter().any(|u| {
                    m.super_options
                        .contains(&format!("upperdir={},", u.display()))
                })
        })
    }
}

/// Gives `record` its identity and its root to it.
pub(crate) fn set_identity(record: &mut VolumeRecord, uid: u32, gid: u32) {
    record.identity = Some(crate::state::records::Identity { uid, gid });
    record.root = Some(RootOwner {
        uid,
        gid,
        mode: super::identity::IDENTITY_ROOT_MODE,
    });
}

/// The record of a volume about to be made (state `creating`).
pub(crate) fn new_record(
    req: &CreateRequest,
    dir: &Path,
    vol: &str,
    size: u64,
    kind: VolumeKind,
) -> VolumeRecord {
    VolumeRecord {
        id: vol.to_string(),
        kind,
        lease: false,
        identity: None,
        note: None,
        dir: dir.to_path_buf(),
        cache: req.cache.clone(),
        generation: 0,
        layers: Vec::new(),
        size,
        write_back: req.write_back,
        root: req.root,
        created: fsutil::now(),
        state: VolumeState::Creating,
        discard: false,
        clean: false,
        commit_layer: None,
        unchanged: false,
        made_dir: !dir.exists(),
        labels: req.labels.clone(),
        data_layers: Vec::new(),
        scope: req.scope.clone(),
        on_success: req.write_back && req.on_success,
        success: None,
    }
}

/// Refuses a request for another mode than the cache's.
pub(crate) fn check_mode(cache: &CacheRecord, asked: Option<CacheMode>) -> Result<()> {
    match asked {
        Some(m) if m != cache.mode => Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "cache {} has cache mode {}, but the request asks for {}: a cache's mode is fixed when it is created. \
                 Ask for {} (or no mode), use another cache name, or remove the cache (`jobcachefs cache rm {} --namespace {}`) and create it again as {}",
                cache.id, cache.mode, m, cache.mode, cache.id.name, cache.id.namespace, m
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses a cache-size below the smallest image jobcachefs makes.
pub(crate) fn check_cache_size(cache_size: u64) -> Result<()> {
    if cache_size < image::MIN_IMAGE_SIZE {
        return Err(Error::invalid(format!(
            "cache size {} is below the minimum: use at least {}",
            human_bytes(cache_size),
            human_bytes(image::MIN_IMAGE_SIZE)
        )));
    }
    Ok(())
}

/// A layer id: the volume's id and a random suffix, unique across retries and nodes.
pub(crate) fn new_layer_id(record: &VolumeRecord) -> String {
    format!("{}-{}", &record.id[..8], fsutil::random_hex())
}

/// Waits until no loop device is backed by `image` any more. Unmounting our mount point does not
/// end the filesystem if another mount namespace still holds the volume (a pod that was not torn
/// down): committing then would publish an image that is still being written. With autoclear the
/// device goes as soon as the last user does.
impl Engine {
    pub(crate) fn wait_released(&self, image: &Path) -> Result<()> {
        for _ in 0..100 {
            if !self.host.loop_devices().iter().any(|b| b.file == image) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "volume image {} is still in use after unmounting (mounted in another mount namespace, e.g. a pod that still runs?): \
             stop its users and retry the delete",
            image.display()
        ),
    ))
    }
}

pub(crate) fn touch(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path);
    let now = nix::sys::time::TimeSpec::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let _ = nix::sys::stat::utimensat(
        None,
        path,
        &now,
        &now,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    );
}

/// Why an `on-success` volume was discarded.
pub(crate) fn no_success_reason(record: &VolumeRecord) -> String {
    format!(
        "write-back on-success: the job left no {} at the root of {}, so its changes were discarded (a failed or cancelled job, or one without the success step)",
        crate::state::records::SUCCESS_MARKER,
        record.dir.display()
    )
}

/// Marks `record` as not committed for `reason` (kept in its note, which a retried delete
/// reports) and returns the reason. The caller writes the record.
fn not_committing(record: &mut VolumeRecord, reason: String) -> String {
    tracing::warn!(dir = %record.dir.display(), "{reason}");
    record.discard = true;
    record.note = Some(reason.clone());
    reason
}

/// Why the filesystem mounted at `dir` had write errors, if it had: ext4 turned it read-only
/// (errors=remount-ro), or a `syncfs` reports a write-back error no one has seen yet (a fresh
/// descriptor samples the superblock's error sequence so that one is reported, data or metadata).
fn write_failure(dir: &Path) -> Option<String> {
    let read_only = nix::sys::statvfs::statvfs(dir)
        .is_ok_and(|st| st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    if read_only {
        return Some("it went read-only".to_string());
    }
    let d = std::fs::File::open(dir).ok()?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d))
        .err()
        .map(|e| format!("syncfs: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_missing_dirs_under_existing_ancestors() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        assert_eq!(resolve_dir(&root.join("a/b")).unwrap(), root.join("a/b"));
        assert!(resolve_dir(&root.join("a/../../x")).is_err());
        assert!(resolve_dir(Path::new("")).is_err());
    }
}
