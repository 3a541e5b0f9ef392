//! Commit: a deleted write-back volume's image becomes the top layer of a new generation by a
//! rename (O(1) in the cache size), published by atomically replacing `current.json`.
//!
//! Crash points and what they leave:
//! - before the rename: the image is still the volume's; a retried delete or `gc` commits it.
//! - after the rename, before the publish: `layers/<id>.img` exists, the volume record names it
//!   as `commit_layer` (so GC keeps it); a retry publishes it.
//! - after the publish: the generation contains the layer; a retry sees that and only cleans up.

use super::volume::DeleteOutcome;
use super::Engine;
use crate::error::{ErrorKind, IoContext, Result};
use crate::fault;
use crate::input::config::Config;
use crate::input::names::CacheId;
use crate::input::quantity::human_bytes;
use crate::state::fsutil;
use crate::state::records::{Generation, LayerInfo, VolumeRecord};

impl Engine {
    /// Publishes the volume's image as layer `layer` on top of the cache's current generation.
    /// Called with the volume lock held; takes the cache lock only for the rename and publish.
    pub(crate) fn commit(&self, record: &VolumeRecord, layer: &str) -> Result<DeleteOutcome> {
        if let Some(scope) = &record.scope {
            // A scoped volume commits into its scope, whoever asked: never into the cache.
            return self.scope_commit(record, scope, layer);
        }
        let id = record.cache.as_ref().expect("only cache volumes commit");
        let src = self.layout.volume_image(&record.id);
        let dst = self.layout.layer_image(id, layer);
        if src.exists() {
            self.release_journal(&src);
            // The image's blocks reach the disk before any name points at them.
            fsutil::fsync_file(&src)?;
        }
        let clock = self.lock_cache(id)?;
        let Some(cache) = self.cache_record(id)? else {
            tracing::warn!(cache = %id, dir = %record.dir.display(), "the cache was removed while this volume lived: its write-back is discarded");
            return Ok(DeleteOutcome::Discarded);
        };
        let current = self.current(id)?;
        if current.layers.iter().any(|l| l.id == layer) {
            return Ok(DeleteOutcome::Committed {
                generation: current.generation,
                squashed: false,
                scope: None,
            });
        }
        let image = if dst.exists() {
            dst.clone()
        } else {
            src.clone()
        };
        let allocated = fsutil::allocated_bytes(&image)?;
        let size = std::fs::metadata(&image).at("stat", &image)?.len();
        let total = current.allocated() + allocated;
        if total > cache.cache_size {
            drop(clock);
            tracing::info!(cache = %id, total, limit = cache.cache_size,
                "commit would exceed the cache-size: squashing it with the cache first");
            let image = image.clone();
            return self.commit_squashed(record, &image, layer, total, cache.cache_size);
        }
        if image == src {
            // The upper's manifest, if it has one, becomes the layer's (before the image: a
            // manifest left alone by a crash is gc's, and a layer without one is only slower
            // to metadata-squash).
            let manifest = self.layout.volume_manifest(&record.id);
            if manifest.exists() {
                let to = self.layout.layer_manifest(id, layer);
                if let Err(e) = std::fs::rename(&manifest, &to) {
                    tracing::warn!(layer, error = %e, "the layer's manifest was not kept");
                }
            }
            std::fs::rename(&src, &dst).at("rename into the cache", &dst)?;
            fsutil::fsync_dir(&self.layout.layers_dir(id))?;
        }
        fault::point("commit:renamed");
        let mut layers = current.layers.clone();
        layers.push(LayerInfo {
            data: Vec::new(),
            data_usage: Default::default(),
            id: layer.to_string(),
            created: fsutil::now(),
            source: record.dir.display().to_string(),
            size,
            allocated,
            covers: Vec::new(),
        });
        let next = self.publish(id, layers, super::publish::commit_provenance(record))?;
        fault::point("commit:published");
        crate::state::stats::add(&self.layout, &[(crate::state::stats::names::COMMITS, 1)]);
        tracing::info!(cache = %id, generation = next.generation, layer, allocated = %human_bytes(allocated),
            depth = next.layers.len(), "commit published");
        Ok(DeleteOutcome::Committed {
            generation: next.generation,
            squashed: false,
            scope: None,
        })
    }

    /// Gives the journal of a volume's cleanly unmounted image back to the host before it becomes
    /// a layer (before its size is measured): a layer is only read, and a journal written by a
    /// busy job would otherwise stay allocated in it, up to 64 MiB. Best effort (the layer is
    /// then only bigger); a retried commit does it again, harmlessly.
    pub(crate) fn release_journal(&self, image: &std::path::Path) {
        match self.host.release_journal(image) {
            Ok(bytes) => tracing::debug!(image = %image.display(), bytes, "journal released"),
            Err(e) => {
                tracing::warn!(image = %image.display(), error = %e, "journal not released before commit")
            }
        }
    }

    /// An over-size commit: squash the cache and the volume's tree into one new base; publish it
    /// if it fits, reject (keeping the previous generation) if not.
    fn commit_squashed(
        &self,
        record: &VolumeRecord,
        image: &std::path::Path,
        layer: &str,
        total: u64,
        limit: u64,
    ) -> Result<DeleteOutcome> {
        let id = record.cache.as_ref().expect("only cache volumes commit");
        match self.squash_with(id, Some((image, layer)), None) {
            Ok(outcome) => {
                crate::state::stats::add(&self.layout, &[(crate::state::stats::names::COMMITS, 1)]);
                Ok(DeleteOutcome::Committed {
                    generation: outcome.generation().unwrap_or(0),
                    squashed: true,
                    scope: None,
                })
            }
            Err(e) if e.kind() == ErrorKind::Quota => {
                let reason = rejection(&record.dir, id, total, limit, &e.to_string());
                tracing::error!(cache = %id, "{reason}");
                Ok(DeleteOutcome::Rejected { reason })
            }
            Err(e) => Err(e),
        }
    }

    /// After a publish (a commit or an import): merge the newest layers when the generation is
    /// past the hard depth bound, queue (or run) a squash when it is too deep or its deltas too
    /// large, and prune to the node budget.
    pub(crate) fn after_commit(&self, id: &CacheId) -> Result<()> {
        if let Err(e) = self.enforce_depth_bound(id) {
            // The commit stands; the next create, commit or gc merges again.
            tracing::error!(cache = %id, error = %e, "merging past the hard depth bound failed");
        }
        let current = self.current(id)?;
        // Under squash_method = "metadata", a metadata squash is due sooner (it costs
        // milliseconds from manifests) where the cache and the kernel allow one.
        let metadata_due = self.config.squash_method
            == crate::input::config::SquashMethod::Metadata
            && current.layers.len() > self.config.metadata_squash_depth
            && self.metadata_squash_refusal(id)?.is_none();
        if metadata_due || squash_due(&self.config, &current) {
            let marker = self.layout.squash_due(id);
            std::fs::write(&marker, b"").at("queue squash", &marker)?;
            if self.config.squash_inline {
                if let Err(e) = self.squash(id) {
                    tracing::warn!(cache = %id, error = %e, "squash failed; it stays queued for gc or the agent");
                }
            } else {
                tracing::info!(cache = %id, depth = current.layers.len(), "squash queued");
            }
        }
        if let Some(budget) = self.config.node_budget {
            self.prune_to_budget(budget, Some(id))?;
        }
        Ok(())
    }
}

/// Why an over-size commit was rejected: the sizes, what squashing found, and the fixes.
pub(crate) fn rejection(
    dir: &std::path::Path,
    id: &CacheId,
    total: u64,
    limit: u64,
    squash_error: &str,
) -> String {
    format!(
        "commit of {} into cache {id} rejected: the cache and this volume's changes allocate {}, over the cache-size of {}, \
         and squashed they still do not fit ({squash_error}); the previous generation stays. \
         Raise the limit (`jobcachefs cache resize {} SIZE`) or write less",
        dir.display(),
        human_bytes(total),
        human_bytes(limit),
        id.name
    )
}

/// Whether `g` needs a squash under `config`: deeper than `max_depth`, its layers above the
/// base allocate more than `squash_delta_size`, or its base is a metadata base whose data
/// layers are mostly shadowed bytes ([`crate::state::records::DataUsage::too_shadowed`]).
pub fn squash_due(config: &Config, g: &Generation) -> bool {
    g.layers.len() > config.max_depth
        || (g.layers.len() > 1 && g.delta_allocated() > config.squash_delta_size)
        || g.layers
            .first()
            .is_some_and(|b| b.data_usage.too_shadowed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(allocs: &[u64]) -> Generation {
        Generation {
            generation: 1,
            layers: allocs
                .iter()
                .enumerate()
                .map(|(i, a)| LayerInfo {
                    data: Vec::new(),
                    data_usage: Default::default(),
                    id: format!("l{i}"),
                    created: 0,
                    source: String::new(),
                    size: 0,
                    allocated: *a,
                    covers: vec![],
                })
                .collect(),
            published: 0,
            provenance: None,
            undone: Vec::new(),
        }
    }

    #[test]
    fn a_rejected_commit_says_sizes_cause_and_fix() {
        let id = CacheId::new("default", "q").unwrap();
        assert_eq!(
            rejection(
                std::path::Path::new("/v/over"),
                &id,
                50 << 20,
                48 << 20,
                "the merged tree does not fit in 48.0 MiB"
            ),
            "commit of /v/over into cache default/q rejected: the cache and this volume's changes allocate 50.0 MiB, over the cache-size of 48.0 MiB, \
             and squashed they still do not fit (the merged tree does not fit in 48.0 MiB); the previous generation stays. \
             Raise the limit (`jobcachefs cache resize q SIZE`) or write less"
        );
    }

    #[test]
    fn squash_is_due_past_the_depth_or_the_delta_size() {
        let c = Config {
            max_depth: 3,
            squash_delta_size: 100,
            ..Config::default()
        };
        assert!(!squash_due(&c, &gen(&[])));
        assert!(
            !squash_due(&c, &gen(&[1000])),
            "a lone base is never squashed"
        );
        assert!(!squash_due(&c, &gen(&[1000, 50, 50])));
        assert!(
            squash_due(&c, &gen(&[1000, 50, 51])),
            "deltas over 100 bytes"
        );
        assert!(squash_due(&c, &gen(&[1, 1, 1, 1])), "deeper than 3");
        // A metadata base alone: due once its data layers are mostly shadowed bytes.
        let mut g = gen(&[1]);
        let usage = |allocated, live| crate::state::records::DataUsage { allocated, live };
        g.layers[0].data_usage = usage(200 << 20, 150 << 20);
        assert!(!squash_due(&c, &g), "a quarter shadowed");
        g.layers[0].data_usage = usage(400 << 20, 150 << 20);
        assert!(squash_due(&c, &g), "more shadowed than live");
        g.layers[0].data_usage = usage(60 << 20, 1 << 20);
        assert!(!squash_due(&c, &g), "below the floor");
    }
}
