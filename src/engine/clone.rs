//! Clone-mode caches: one ext4 image per generation; a volume is a copy-on-write clone of the
//! current image (FICLONE), mounted at DIR directly — no overlayfs, so container storage's own
//! overlay layers, whiteout devices and `trusted.overlay.*` xattrs are plain data in it. Commit
//! renames the volume's image into the cache as the next generation: O(1).
//!
//! Where clones live (the *clone store*) is chosen once per node and recorded in
//! `<state>/clone-backend`: the state dir itself when it can FICLONE (XFS with reflink, btrfs),
//! otherwise a reflink pool — a sparse XFS image in the state dir, made on first use, attached
//! with direct I/O, mounted at `mnt/pool` and trimmed after deletes.
//!
//! One writer at a time: with `clone_writers = "lease"` the first write-back volume of a cache
//! holds its lease (`caches/<ns>/<name>/lease`, the volume id); one created while the lease is
//! held runs as a discard volume and says so at create and delete. A lease naming a volume
//! whose record is gone is free. With `"last-writer-wins"` every write-back volume commits and a
//! commit that supersedes generations it did not see is logged and counted.
//!
//! Crash points and what they leave:
//! - `clone:cloned`, `clone:mounted` (record `creating`): rolled back by a retry or `gc`.
//! - `clone-delete:unmounted`: the record says `deleting`; a retry or `gc` goes on.
//! - `clone-commit:renamed`: the image is in the cache under the record's `commit_layer` (so gc
//!   keeps it); the retry publishes it. `clone-commit:published`: the retry only cleans up.

use super::volume::{check_mode, DeleteOutcome};
use super::Engine;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fault;
use crate::host::clone::no_reflink;
use crate::host::mounts;
use crate::input::config::CloneBackend;
use crate::input::names::CacheId;
use crate::input::quantity::human_bytes;
use crate::state::fsutil::{self, ensure_dir, read_json};
use crate::state::layout::clone_store;
use crate::state::lock;
use crate::state::records::{
    CacheMode, CacheRecord, LayerInfo, VolumeKind, VolumeRecord, VolumeState,
};
use std::path::{Path, PathBuf};

/// The two places clone images can live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneStoreKind {
    /// FICLONE on the state dir.
    Reflink,
    /// The reflink pool.
    Pool,
}

impl CloneStoreKind {
    /// The name recorded in `clone-backend` and shown by `doctor`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloneStoreKind::Reflink => "reflink",
            CloneStoreKind::Pool => "pool",
        }
    }
}

impl Engine {
    /// The backend this node chose for clones, if it has chosen one.
    pub fn clone_store_kind(&self) -> Option<CloneStoreKind> {
        match std::fs::read_to_string(self.layout.clone_backend())
            .ok()?
            .trim()
        {
            "reflink" => Some(CloneStoreKind::Reflink),
            "pool" => Some(CloneStoreKind::Pool),
            _ => None,
        }
    }

    /// The backend a first clone would choose, and why (for `doctor`).
    pub fn clone_store_choice(&self) -> (Result<CloneStoreKind>, String) {
        let root = self.layout.root();
        let reflink = self.host.supports_reflink(root);
        let pool = format!(
            "a {} reflink pool (sparse XFS image, direct I/O)",
            human_bytes(self.config.clone_pool_size)
        );
        let why = match (self.config.clone_backend, reflink) {
            (CloneBackend::Pool, _) => format!("clone_backend = \"pool\" in the config: clones go to {pool}"),
            (_, true) => format!("{} can clone files (FICLONE)", root.display()),
            (_, false) => format!(
                "{} cannot clone files (no FICLONE on its filesystem, e.g. ext4): clones go to {pool}",
                root.display()
            ),
        };
        let kind = match (self.config.clone_backend, reflink) {
            (CloneBackend::Pool, _) => Ok(CloneStoreKind::Pool),
            (_, true) => Ok(CloneStoreKind::Reflink),
            (CloneBackend::Auto, false) => Ok(CloneStoreKind::Pool),
            (CloneBackend::Reflink, false) => Err(no_reflink(root)),
        };
        (kind, why)
    }

    /// The clone store's root, choosing the backend on first use and mounting the pool if it
    /// is not (a reboot or a crash unmounted it).
    pub(crate) fn clone_store(&self) -> Result<PathBuf> {
        let kind = match self.clone_store_kind() {
            Some(k) => k,
            None => {
                let _plock = lock::lock(&self.layout.pool_lock())?;
                match self.clone_store_kind() {
                    Some(k) => k,
                    None => {
                        let kind = self.clone_store_choice().0?;
                        let path = self.layout.clone_backend();
                        let tmp = path.with_extension("tmp");
                        std::fs::write(&tmp, kind.as_str()).at("write", &tmp)?;
                        fsutil::fsync_file(&tmp)?;
                        std::fs::rename(&tmp, &path).at("rename", &path)?;
                        fsutil::fsync_dir(self.layout.root())?;
                        tracing::info!(backend = kind.as_str(), "clone backend chosen");
                        kind
                    }
                }
            }
        };
        match kind {
            CloneStoreKind::Reflink => {
                let dir = self.layout.clone_dir();
                ensure_dir(&dir)?;
                Ok(dir)
            }
            CloneStoreKind::Pool => self.ensure_pool(),
        }
    }

    /// The clone store if it is available without mounting anything (gc's cheap paths).
    pub(crate) fn clone_store_if_ready(&self) -> Option<PathBuf> {
        match self.clone_store_kind()? {
            CloneStoreKind::Reflink => Some(self.layout.clone_dir()),
            CloneStoreKind::Pool => {
                let mnt = self.layout.pool_mount();
                let table = self.host.mount_table().ok()?;
                mounts::is_mounted(&table, &mnt).then_some(mnt)
            }
        }
    }

    /// Makes and mounts the reflink pool if needed.
    fn ensure_pool(&self) -> Result<PathBuf> {
        let mnt = self.layout.pool_mount();
        if mounts::is_mounted(&self.host.mount_table()?, &mnt) {
            return Ok(mnt);
        }
        let _plock = lock::lock(&self.layout.pool_lock())?;
        if mounts::is_mounted(&self.host.mount_table()?, &mnt) {
            return Ok(mnt);
        }
        let image = self.layout.pool_image();
        if !image.exists() {
            // Made under another name and renamed: a crash leaves no half-made pool.
            let tmp = image.with_extension("img.tmp");
            let _ = std::fs::remove_file(&tmp);
            let (free, total) = self.host.fs_space(self.layout.root())?;
            let reserve = self
                .config
                .disk_reserve
                .unwrap_or(super::admission::default_reserve(total));
            if self.config.clone_pool_size > free.saturating_sub(reserve) {
                tracing::info!(
                    pool = %human_bytes(self.config.clone_pool_size),
                    free = %human_bytes(free),
                    "the reflink pool (sparse) is larger than the free space: clones are admitted only as far as the disk can back them"
                );
            }
            self.host.make_pool(&tmp, self.config.clone_pool_size)?;
            std::fs::rename(&tmp, &image).at("rename", &image)?;
            fsutil::fsync_dir(self.layout.root())?;
            tracing::info!(pool = %image.display(), size = %human_bytes(self.config.clone_pool_size), "reflink pool made");
        }
        ensure_dir(&mnt)?;
        self.host.mount_pool(&image, &mnt)?;
        for d in [mnt.join("caches"), mnt.join("volumes")] {
            ensure_dir(&d)?;
        }
        Ok(mnt)
    }

    /// The size of a clone volume: its cache's cache-size. A request above it is refused.
    pub(crate) fn clone_size(
        &self,
        cache: Option<&CacheRecord>,
        asked: Option<u64>,
        cache_size: Option<u64>,
    ) -> Result<u64> {
        let size = cache
            .map(|c| c.cache_size)
            .or(cache_size)
            .unwrap_or(self.config.default_cache_size);
        if let Some(a) = asked {
            if a > size {
                return Err(Error::new(
                    ErrorKind::Quota,
                    format!(
                        "a clone volume is its cache's size: {} asked, but the cache-size is {}. Ask for at most {} (or no size), or resize the cache",
                        human_bytes(a),
                        human_bytes(size),
                        human_bytes(size)
                    ),
                ));
            }
        }
        Ok(size)
    }

    /// Pool admission: every live clone may come to hold its whole size of blocks of its own,
    /// and the caches' images are there already; together they must fit the pool (less 5% for
    /// XFS's own metadata). A full pool would abort the ext4 inside a clone (an I/O error in the
    /// job): refuse the create up front instead.
    fn admit_clone_in_pool(&self, store: &Path, size: u64) -> Result<()> {
        let (_, total) = self.host.fs_space(store)?;
        let mut promised = 0u64;
        let mut clones = 0;
        for r in self.volume_records()? {
            if r.kind == VolumeKind::Clone {
                promised += r.size;
                clones += 1;
            }
        }
        for id in self.cache_ids()? {
            if self
                .cache_record(&id)?
                .is_some_and(|c| c.mode == CacheMode::Clone)
            {
                promised += self.current(&id)?.allocated();
            }
        }
        let usable = total / 20 * 19;
        if promised.saturating_add(size) > usable {
            return Err(Error::new(
                ErrorKind::Quota,
                format!(
                    "clone volume of {} refused: the reflink pool {} holds {} usable, and the caches' images plus {} live clone(s) at full size already take {}. \
                     Delete clone volumes, remove or shrink clone caches, or raise clone_pool_size in the config",
                    human_bytes(size),
                    self.layout.pool_image().display(),
                    human_bytes(usable),
                    clones,
                    human_bytes(promised)
                ),
            ));
        }
        Ok(())
    }

    /// Creates a clone volume; called with the volume lock held and the record absent.
    pub(crate) fn clone_create(
        &self,
        req: &super::CreateRequest,
        dir: &Path,
        vol: &str,
        size: u64,
    ) -> Result<VolumeRecord> {
        let Some(id) = req.cache.clone() else {
            return Err(Error::invalid(
                "--cache-mode clone needs a cache: add --cache NAME",
            ));
        };
        let store = self.clone_store()?;
        if self.clone_store_kind() == Some(CloneStoreKind::Pool) {
            self.admit_clone_in_pool(&store, size)?;
        }
        let (admission, uid) = self.admit(size, req.unique_ids)?;
        let mut record = super::volume::new_record(req, dir, vol, size, VolumeKind::Clone);
        let image = clone_store::volume_image(&store, vol);
        ensure_dir(&self.layout.volume_dir(vol))?;
        {
            let _clock = self.lock_cache(&id)?;
            let cache = self.ensure_cache(&id, Some(size), Some(CacheMode::Clone))?;
            let current = self.current(&id)?;
            record.generation = current.generation;
            if let Some(uid) = uid {
                let gid = self.cache_gid(&id, req.cache_gid)?;
                super::volume::set_identity(&mut record, uid, gid);
            }
            if req.write_back {
                self.take_lease(&id, &mut record)?;
            }
            self.write_record(&self.layout.volume_record(vol), &record)?;
            drop(admission);
            super::volume::touch(&self.layout.last_used(&id));
            // Cloned under the cache lock: the generation's image cannot be collected meanwhile.
            let made = ensure_dir(&store.join("volumes")).and_then(|_| {
                let _ = std::fs::remove_file(&image);
                match current.layers.last() {
                    Some(l) => self
                        .host
                        .reflink(&clone_store::layer_image(&store, &id, &l.id), &image),
                    None => {
                        let (uid, gid) = super::identity::disk_owner(&record).unwrap_or((0, 0));
                        self.host.make_image(&image, cache.cache_size, uid, gid)
                    }
                }
            });
            if let Err(e) = made {
                drop(_clock);
                let _ = self.clone_rollback(&record);
                return Err(e);
            }
        }
        fault::point("clone:cloned");
        let mounted = (|| {
            if !dir.exists() {
                std::fs::create_dir_all(dir).at("create volume DIR", dir)?;
            }
            self.mount_clone_for(&record, &image)
        })();
        if let Err(e) = mounted {
            let _ = self.clone_rollback(&record);
            return Err(e);
        }
        fault::point("clone:mounted");
        record.state = VolumeState::Ready;
        self.write_record(&self.layout.volume_record(vol), &record)?;
        if let Some(note) = &record.note {
            tracing::warn!(dir = %dir.display(), "{note}");
        }
        tracing::info!(dir = %dir.display(), cache = %id, generation = record.generation, size = record.size,
            write_back = record.write_back, lease = record.lease, "clone volume created");
        let counter = if record.generation == 0 {
            crate::state::stats::names::VOLUMES_COLD
        } else {
            crate::state::stats::names::VOLUMES_WARM
        };
        crate::state::stats::add(&self.layout, &[(counter, 1)]);
        Ok(record)
    }

    /// Takes the cache's write lease for `record`, or notes who holds it. Cache lock held.
    fn take_lease(&self, id: &CacheId, record: &mut VolumeRecord) -> Result<()> {
        if self.config.clone_writers == crate::input::config::CloneWriters::LastWriterWins {
            record.lease = true;
            return Ok(());
        }
        let path = self.layout.lease(id);
        if let Ok(holder) = std::fs::read_to_string(&path) {
            let holder = holder.trim();
            if holder != record.id {
                if let Some(h) = read_json::<VolumeRecord>(&self.layout.volume_record(holder))? {
                    record.note = Some(format!(
                        "the write lease of cache {id} is held by the volume at {}: this volume runs as a discard volume and will not commit \
                         (one writer at a time; set clone_writers = \"last-writer-wins\" to let every volume commit)",
                        h.dir.display()
                    ));
                    return Ok(());
                }
            }
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &record.id).at("write", &tmp)?;
        fsutil::fsync_file(&tmp)?;
        std::fs::rename(&tmp, &path).at("rename", &path)?;
        fsutil::fsync_dir(&self.layout.cache_dir(id))?;
        record.lease = true;
        Ok(())
    }

    /// Releases the lease if `record` holds it.
    fn release_lease(&self, id: &CacheId, record: &VolumeRecord) {
        let path = self.layout.lease(id);
        if std::fs::read_to_string(&path).is_ok_and(|h| h.trim() == record.id) {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Whether the mount at `dir` is this clone volume's (its loop device serves `image`).
    fn clone_mounted_at(&self, dir: &Path, image: &Path) -> Result<bool> {
        let table = self.host.mount_table()?;
        let loops = self.host.loop_devices();
        Ok(table.iter().any(|m| {
            m.mount_point == dir
                && loops
                    .iter()
                    .any(|b| b.file == image && b.device.to_string_lossy() == m.source)
        }))
    }

    /// Unmounts what the job left mounted under DIR (container storage leaves its overlays),
    /// deepest first.
    fn unmount_below(&self, dir: &Path) -> Result<()> {
        let mut below: Vec<PathBuf> = self
            .host
            .mount_table()?
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p != dir && p.starts_with(dir))
            .collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        below.dedup();
        for p in below {
            tracing::info!(mount = %p.display(), "unmounting what the job left mounted in its volume");
            self.host.unmount(&p, true)?;
        }
        Ok(())
    }

    /// Undoes a clone volume that never became ready.
    pub(crate) fn clone_rollback(&self, record: &VolumeRecord) -> Result<()> {
        let store = self.clone_store()?;
        let image = clone_store::volume_image(&store, &record.id);
        self.unmount_below(&record.dir)?;
        if self.clone_mounted_at(&record.dir, &image)? {
            self.host.unmount(&record.dir, true)?;
        }
        self.clone_forget(record, &store)
    }

    /// Mounts a ready clone volume whose mount is gone (a reboot), after checking its image.
    pub(crate) fn clone_remount(&self, record: &VolumeRecord) -> Result<()> {
        let store = self.clone_store()?;
        let image = clone_store::volume_image(&store, &record.id);
        self.host.check_image(&image)?;
        ensure_dir(&record.dir)?;
        self.mount_clone_for(record, &image)?;
        tracing::info!(dir = %record.dir.display(), "clone volume remounted");
        Ok(())
    }

    /// Finishes the delete of a clone volume from wherever a previous run stopped.
    pub(crate) fn clone_finish_delete(&self, mut record: VolumeRecord) -> Result<DeleteOutcome> {
        let store = self.clone_store()?;
        let vol = record.id.clone();
        let image = clone_store::volume_image(&store, &vol);
        self.unmount_below(&record.dir)?;
        let mounted = self.clone_mounted_at(&record.dir, &image)?;
        if record.on_success && !record.discard && record.commit_layer.is_none() {
            if mounted {
                let root = record.dir.clone();
                self.judge_success(&mut record, &root)?;
            } else if record.success.is_none() {
                // Its mount is gone (a reboot): the marker cannot be read, so the job is not
                // known to have succeeded.
                record.success = Some(false);
                record.discard = true;
                self.write_record(&self.layout.volume_record(&vol), &record)?;
            }
        }
        if mounted {
            if !record.discard {
                // Freed blocks go back before the image becomes the cache's generation.
                if let Err(e) = self.host.trim(&record.dir) {
                    tracing::warn!(dir = %record.dir.display(), error = %e, "trim before commit failed; committing untrimmed");
                }
            }
            self.host.unmount(&record.dir, record.discard)?;
        }
        fault::point("clone-delete:unmounted");
        let mut reason = record.note.clone();
        if !record.discard && record.commit_layer.is_none() && image.exists() {
            self.wait_released(&image)?;
            let clean = self.host.image_is_clean(&image)? && self.host.check_image(&image)? == 0;
            if clean {
                record.commit_layer = Some(super::volume::new_layer_id(&record));
                record.clean = true;
            } else {
                let r = format!(
                    "the clone's filesystem {} was not clean after unmounting (node crash?): its changes were not committed",
                    image.display()
                );
                tracing::warn!(dir = %record.dir.display(), "{r}");
                reason = Some(r);
                record.discard = true;
            }
            self.write_record(&self.layout.volume_record(&vol), &record)?;
        }
        let outcome = match (&record.commit_layer, record.discard) {
            (Some(layer), false) => {
                let layer = layer.clone();
                self.clone_commit(&record, &layer, &store)?
            }
            _ if record.success == Some(false) => DeleteOutcome::Declined {
                reason: super::volume::no_success_reason(&record),
            },
            _ => match reason {
                Some(reason) => DeleteOutcome::NotCommitted { reason },
                None => DeleteOutcome::Discarded,
            },
        };
        fault::point("delete:committed");
        self.clone_forget(&record, &store)?;
        tracing::info!(dir = %record.dir.display(), outcome = ?outcome, "clone volume deleted");
        Ok(outcome)
    }

    /// Publishes the clone's image as the cache's next generation.
    fn clone_commit(
        &self,
        record: &VolumeRecord,
        layer: &str,
        store: &Path,
    ) -> Result<DeleteOutcome> {
        let id = record.cache.as_ref().expect("only cache volumes commit");
        let src = clone_store::volume_image(store, &record.id);
        let dst = clone_store::layer_image(store, id, layer);
        if src.exists() {
            fsutil::fsync_file(&src)?;
        }
        let _clock = self.lock_cache(id)?;
        let Some(_cache) = self.cache_record(id)? else {
            return Ok(DeleteOutcome::NotCommitted {
                reason: format!("cache {id} was removed while this volume lived"),
            });
        };
        let current = self.current(id)?;
        if current.layers.iter().any(|l| l.id == layer) {
            return Ok(DeleteOutcome::Committed {
                generation: current.generation,
                squashed: false,
                scope: None,
            });
        }
        if src.exists() {
            ensure_dir(&clone_store::layers_dir(store, id))?;
            std::fs::rename(&src, &dst).at("rename into the cache", &dst)?;
            fsutil::fsync_dir(&clone_store::layers_dir(store, id))?;
        }
        fault::point("clone-commit:renamed");
        if current.generation != record.generation {
            let superseded = current.generation - record.generation;
            tracing::warn!(cache = %id, dir = %record.dir.display(), from = record.generation, superseded,
                "clone commit supersedes generations this volume did not start from (last writer wins): their changes are not in the new generation");
            crate::state::stats::add(
                &self.layout,
                &[(crate::state::stats::names::CLONE_SUPERSEDED, superseded)],
            );
        }
        let next = self.publish(
            id,
            vec![LayerInfo {
                data: Vec::new(),
                data_usage: Default::default(),
                id: layer.to_string(),
                created: fsutil::now(),
                source: record.dir.display().to_string(),
                size: std::fs::metadata(&dst).at("stat", &dst)?.len(),
                allocated: fsutil::allocated_bytes(&dst)?,
                covers: Vec::new(),
            }],
            super::publish::commit_provenance(record),
        )?;
        fault::point("clone-commit:published");
        self.queue_rebuild_if_due(id, &dst);
        crate::state::stats::add(&self.layout, &[(crate::state::stats::names::COMMITS, 1)]);
        tracing::info!(cache = %id, generation = next.generation, layer, "clone commit published");
        Ok(DeleteOutcome::Committed {
            generation: next.generation,
            squashed: false,
            scope: None,
        })
    }

    /// Removes a clone volume's image and record, its lease, and collects the cache.
    fn clone_forget(&self, record: &VolumeRecord, store: &Path) -> Result<()> {
        let image = clone_store::volume_image(store, &record.id);
        fsutil::remove_file_if_exists(&image)?;
        let rec = self.layout.volume_record(&record.id);
        fsutil::remove_file_if_exists(&rec)?;
        fsutil::fsync_dir(&self.layout.volume_dir(&record.id))?;
        let _ = std::fs::remove_dir(self.layout.volume_dir(&record.id));
        if let Some(id) = &record.cache {
            let _clock = self.lock_cache(id)?;
            self.release_lease(id, record);
            // Best effort: a damaged record elsewhere must not fail this delete.
            if let Err(e) = self.collect_layers(id) {
                tracing::warn!(cache = %id, error = %e, "layers not collected");
            }
            self.remove_cache_dir_if_empty(id);
        }
        if self.clone_store_kind() == Some(CloneStoreKind::Pool) {
            if let Err(e) = self.host.trim(store) {
                tracing::warn!(error = %e, "trimming the reflink pool failed: its freed blocks stay allocated on the host until the next trim");
            }
        }
        if record.made_dir {
            let mounted = self
                .host
                .mount_table()
                .map(|t| mounts::is_mounted(&t, &record.dir))
                .unwrap_or(true);
            if !mounted {
                let _ = std::fs::remove_dir(&record.dir);
            }
        }
        Ok(())
    }

    /// The mode a create runs in: the existing cache's (a different one asked for is refused)
    /// or the one asked for a new cache.
    pub(crate) fn mode_for(
        &self,
        req: &super::CreateRequest,
    ) -> Result<(CacheMode, Option<CacheRecord>)> {
        let Some(id) = &req.cache else {
            if req.cache_mode == Some(CacheMode::Clone) {
                return Err(Error::invalid(
                    "--cache-mode clone needs a cache: add --cache NAME",
                ));
            }
            return Ok((CacheMode::Overlay, None));
        };
        match self.cache_record(id)? {
            Some(c) => {
                check_mode(&c, req.cache_mode)?;
                Ok((c.mode, Some(c)))
            }
            None => Ok((req.cache_mode.unwrap_or_default(), None)),
        }
    }
}
