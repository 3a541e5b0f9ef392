//! Rebuild of a clone cache's generation image — clone mode's squash. FICLONE time grows with
//! the source's extent count (83k extents took 3.6 s here) and a long-lived image fragments as
//! jobs rewrite it: when a committed image has more than `clone_max_extents` data extents, a
//! rebuild is queued (run by `gc --drain`, the agent, or `cache squash NAME`) that copies the
//! tree into a fresh image with the faithful copier — keeping whiteout devices and
//! `trusted.overlay.*` xattrs, which are the job's data here — and publishes it as the next
//! generation (provenance `rebuild`).
//!
//! Off the job's path: the squash lock is held, the cache lock only to read and to publish.
//! Publishing checks that the generation is still the one copied; a commit meanwhile wins and the
//! rebuild is dropped. Crash points: before `rebuild:renamed` the cache is untouched and the
//! half-built `rebuild-*.tmp` in the clone store is removed by `gc`; after it, the renamed image
//! is unreferenced until the publish, and `gc` removes it if the publish never happened.

use super::squash::SquashOutcome;
use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::fault;
use crate::host::ImageMount;
use crate::input::names::CacheId;
use crate::state::fsutil::{self, ensure_dir};
use crate::state::layout::clone_store;
use crate::state::lock;
use crate::state::records::{LayerInfo, Provenance};
use std::path::{Path, PathBuf};

/// Unmounts the rebuild's mounts and removes its half-built image on every exit path.
struct Scratch<'a> {
    engine: &'a Engine,
    mounts: Vec<PathBuf>,
    image: Option<PathBuf>,
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = self.engine.host.unmount(m, true);
        }
        if let Some(i) = self.image.take() {
            let _ = std::fs::remove_file(i);
        }
    }
}

/// Number of data extents of `image` (its holes excluded): what a FICLONE of it must walk.
pub(crate) fn extent_count(image: &Path) -> Result<usize> {
    use crate::error::IoContext;
    let f = std::fs::File::open(image).at("open", image)?;
    let len = f.metadata().at("stat", image)?.len();
    Ok(crate::files::sparse::data_extents(&f, len, image)?.len())
}

impl Engine {
    /// Queues a rebuild of clone cache `id` when its image `image` is too fragmented to clone
    /// in milliseconds.
    pub(crate) fn queue_rebuild_if_due(&self, id: &CacheId, image: &Path) {
        match extent_count(image) {
            Ok(n) if n > self.config.clone_max_extents => {
                let marker = self.layout.squash_due(id);
                if std::fs::write(&marker, b"").is_ok() {
                    tracing::info!(cache = %id, extents = n, max = self.config.clone_max_extents, "clone image rebuild queued");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(cache = %id, error = %e, "extents of the clone image not counted")
            }
        }
    }

    /// Rebuilds the clone cache's current image into a fresh one (see the module docs).
    pub(crate) fn clone_rebuild(&self, id: &CacheId) -> Result<SquashOutcome> {
        let cache = self.require_cache(id)?;
        let store = self.clone_store()?;
        let _slock = lock::lock(&self.layout.squash_lock(id))?;
        let base = {
            let _clock = self.lock_cache(id)?;
            self.current(id)?
        };
        let Some(layer) = base.layers.last().cloned() else {
            let _ = std::fs::remove_file(self.layout.squash_due(id));
            return Ok(SquashOutcome::NothingToDo);
        };
        let src = clone_store::layer_image(&store, id, &layer.id);
        let work = self.layout.squash_mnt(id);
        let (view, new_mnt) = (work.join("view"), work.join("new"));
        for m in [&new_mnt, &view] {
            self.host.unmount(m, true)?;
            ensure_dir(m)?;
        }
        let dir = clone_store::layers_dir(&store, id);
        let tmp = dir.join(format!("rebuild-{}.tmp", fsutil::random_hex()));
        let mut scratch = Scratch {
            engine: self,
            mounts: Vec::new(),
            image: None,
        };
        // The published image is immutable (volumes are clones of it): mounted read-only as is.
        self.host
            .mount_image(&src, &view, ImageMount { read_only: true })?;
        scratch.mounts.push(view.clone());
        self.host.make_image(&tmp, cache.cache_size, 0, 0)?;
        scratch.image = Some(tmp.clone());
        self.host
            .mount_image(&tmp, &new_mnt, ImageMount { read_only: false })?;
        scratch.mounts.push(new_mnt.clone());
        let stats = crate::files::copy::copy_tree_verbatim(&view, &new_mnt, None)?;
        fault::point("rebuild:copied");
        for m in scratch.mounts.drain(..).rev() {
            self.host.unmount(&m, false)?;
        }
        fsutil::fsync_file(&tmp)?;
        let _clock = self.lock_cache(id)?;
        let now = self.current(id)?;
        if now.layer_ids() != base.layer_ids() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("cache {id} got a new generation during the rebuild: nothing published (the next commit is rebuilt if it is fragmented too)"),
            ));
        }
        let layer_id = format!("rebuilt-{}", fsutil::random_hex());
        let dst = clone_store::layer_image(&store, id, &layer_id);
        std::fs::rename(&tmp, &dst)
            .map_err(|e| Error::io(format!("rename into {}", dst.display()), e))?;
        scratch.image = None;
        fsutil::fsync_dir(&dir)?;
        fault::point("rebuild:renamed");
        let before = fsutil::allocated_bytes(&src).unwrap_or(layer.allocated);
        let allocated = fsutil::allocated_bytes(&dst)?;
        let next = self.publish(
            id,
            vec![LayerInfo {
                data: Vec::new(),
                data_usage: Default::default(),
                id: layer_id,
                created: fsutil::now(),
                source: "rebuild".into(),
                size: std::fs::metadata(&dst)
                    .map_err(|e| Error::io(format!("stat {}", dst.display()), e))?
                    .len(),
                allocated,
                covers: layer.known_ids().cloned().collect(),
            }],
            Provenance::new("rebuild", format!("generation {}", base.generation))
                .with("entries", stats.entries.to_string()),
        )?;
        fault::point("rebuild:published");
        let _ = std::fs::remove_file(self.layout.squash_due(id));
        if let Err(e) = self.collect_layers(id) {
            tracing::warn!(cache = %id, error = %e, "layers not collected after the rebuild");
        }
        tracing::info!(cache = %id, generation = next.generation, entries = stats.entries, "clone image rebuilt");
        Ok(SquashOutcome::Squashed {
            generation: next.generation,
            folded: 1,
            allocated,
            before,
        })
    }
}
