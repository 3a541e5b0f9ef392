//! Merge: the newest layers of a generation folded into one delta layer (see
//! [`crate::files::merge`]), published atomically. This is the hard depth bound: a squash copies
//! the whole cache (O(cache bytes), too slow for a CSI unpublish inside kubelet's two minutes, or
//! for a hook inside the provisioner's timeout), a merge copies only the layers it folds, and a
//! stack that grew past `max_depth_hard` — the agent lagging, squashes failing, a deep line
//! pulled from a registry, or a state dir from before the bound — is brought back to
//! `max_depth` layers by it on the next create, commit, import or gc. The queued squash still
//! runs later and makes one base.
//!
//! Crash points: as for a squash. Before the publish the cache is untouched and `tmp/` holds a
//! half-built image that `gc` removes; after it, the folded layers are unreferenced (unless a
//! volume still names them) and `gc` removes them.

use super::squash::{Scratch, SquashOutcome};
use super::Engine;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fault;
use crate::files::merge::merge_layers;
use crate::input::names::CacheId;
use crate::state::fsutil::{self, ensure_dir};
use crate::state::lock;
use crate::state::records::{LayerInfo, Provenance};

impl Engine {
    /// Keeps the cache's generation within `max_depth_hard` layers: a deeper one has its layers
    /// above the first `max_depth - 1` merged into one, leaving `max_depth`. `None` when it was
    /// within the bound (or is not an overlay cache).
    pub(crate) fn enforce_depth_bound(&self, id: &CacheId) -> Result<Option<SquashOutcome>> {
        match self.cache_record(id)? {
            Some(c) if c.mode == crate::state::records::CacheMode::Overlay => {}
            _ => return Ok(None),
        }
        let depth = self.current(id)?.layers.len();
        if depth <= self.config.max_depth_hard {
            return Ok(None);
        }
        tracing::warn!(cache = %id, depth, bound = self.config.max_depth_hard,
            "the cache's stack is past its hard depth bound: merging its newest layers now");
        self.merge_top(id, self.config.max_depth - 1).map(Some)
    }

    /// Merges the layers of the cache's current generation above its first `keep` into one
    /// delta layer. Layers committed meanwhile stay on top; if the merged layers are no longer
    /// where they were (a squash, rollback or removal meanwhile), nothing is published.
    pub fn merge_top(&self, id: &CacheId, keep: usize) -> Result<SquashOutcome> {
        let result = self.merge_inner(id, keep);
        if self.cache_record(id)?.is_some() {
            let _clock = self.lock_cache(id)?;
            self.unmount_unused_layers(id)?;
        }
        result
    }

    fn merge_inner(&self, id: &CacheId, keep: usize) -> Result<SquashOutcome> {
        let cache = self.require_cache(id)?;
        let started = std::time::Instant::now();
        let _slock = lock::lock(&self.layout.squash_lock(id))?;
        let new_mnt = self.layout.squash_mnt(id).join("new");
        // A squash or merge that crashed left these; we hold the squash lock.
        self.host.unmount(&new_mnt, true)?;
        let tmp = self.layout.cache_tmp(id);
        let _ = std::fs::remove_dir_all(&tmp);
        ensure_dir(&tmp)?;
        let mut scratch = Scratch {
            host: self.host.clone(),
            mounts: Vec::new(),
            image: None,
        };
        let (base, lowers) = {
            let _clock = self.lock_cache(id)?;
            let current = self.current(id)?;
            if current.layers.len() <= keep + 1 {
                return Ok(SquashOutcome::NothingToDo);
            }
            let ids = current.layer_ids();
            let lowers = self.ensure_layers_mounted(id, &ids[keep..])?;
            (current, lowers)
        };
        fault::point("merge:layers-mounted");
        let image_path = tmp.join(format!("merge-{}.img", fsutil::random_hex()));
        let (stats, allocated) = self.build_image(
            &mut scratch,
            &image_path,
            cache.cache_size,
            false,
            &new_mnt,
            "the merged layers",
            |target| {
                let stats = merge_layers(&lowers, target)?;
                fault::point("merge:copied");
                Ok(stats)
            },
        )?;

        let _clock = self.lock_cache(id)?;
        if self.cache_record(id)?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("cache {id} was removed during the merge"),
            ));
        }
        let now = self.current(id)?;
        let base_ids = base.layer_ids();
        if now.layer_ids().get(..base_ids.len()) != Some(&base_ids[..]) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("cache {id} changed under the merge (squashed or rolled back meanwhile): nothing published"),
            ));
        }
        let layer_id = format!("merge-{}", fsutil::random_hex());
        let dst = self.layout.layer_image(id, &layer_id);
        std::fs::rename(&image_path, &dst).at("rename into the cache", &dst)?;
        scratch.image = None;
        fsutil::fsync_dir(&self.layout.layers_dir(id))?;
        fault::point("merge:renamed");
        let folded = &base.layers[keep..];
        let mut layers: Vec<LayerInfo> = now.layers[..keep].to_vec();
        layers.push(LayerInfo {
            data: Vec::new(),
            data_usage: Default::default(),
            id: layer_id,
            created: fsutil::now(),
            source: "merge".into(),
            size: std::fs::metadata(&dst).at("stat", &dst)?.len(),
            allocated,
            covers: folded.iter().flat_map(|l| l.known_ids().cloned()).collect(),
        });
        layers.extend(now.layers[base_ids.len()..].iter().cloned());
        let before: u64 = folded.iter().map(|l| l.allocated).sum();
        let provenance = Provenance::new("merge", format!("generation {}", now.generation))
            .with("folded", folded.len().to_string());
        let next = self.publish(id, layers, provenance)?;
        fault::point("merge:published");
        self.collect_layers(id)?;
        tracing::info!(cache = %id, generation = next.generation, folded = folded.len(),
            depth = next.layers.len(), entries = stats.entries, bytes = stats.bytes, allocated,
            secs = started.elapsed().as_secs_f64(), "merge published");
        Ok(SquashOutcome::Squashed {
            generation: next.generation,
            folded: folded.len(),
            allocated,
            before,
        })
    }
}
