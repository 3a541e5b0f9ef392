//! The one way a new generation becomes current — commit, clone commit, squash, import and
//! rollback all end here — and the history it leaves.
//!
//! Publishing writes `history/<gen>.json` (the generation with its provenance) and then
//! replaces `current.json`, both temp → fsync → rename. A crash between the two leaves a history
//! entry above the current generation, which no reader shows and the next publish overwrites.
//! The last `keep_generations` generations keep their layers (gc and prune respect them), so a
//! cache can be rolled back; a rollback publishes the old generation's layers as a new one.

use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::fault;
use crate::input::names::CacheId;
use crate::state::fsutil::{self, ensure_dir, read_json};
use crate::state::records::{Generation, LayerInfo, Provenance};
use serde::Serialize;
use std::collections::HashSet;

/// One line of `cache history`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The generation.
    pub generation: u64,
    /// Unix seconds of its publish.
    pub created: u64,
    /// `commit`, `squash`, `import`, `rollback`, `resize` (`unknown` before provenance).
    pub kind: String,
    /// What produced it, for a person.
    pub source: String,
    /// The rest of its provenance (PVC, PV, node, digest, ...).
    pub details: std::collections::BTreeMap<String, String>,
    /// Layers it has that the generation before it did not.
    pub layers_added: Vec<String>,
    /// Allocated bytes of those layers.
    pub bytes_added: u64,
    /// Allocated bytes of all its layers.
    pub bytes: u64,
    /// Whether its layers are still on disk (it can be rolled back to).
    pub restorable: bool,
    /// Whether it is the current generation.
    pub current: bool,
}

impl Engine {
    /// Publishes `layers` (base first) as the cache's next generation. Called with the cache
    /// lock held, after every layer image named is in place.
    pub(crate) fn publish(
        &self,
        id: &CacheId,
        layers: Vec<LayerInfo>,
        provenance: Provenance,
    ) -> Result<Generation> {
        self.publish_undoing(id, layers, provenance, &[])
    }

    /// [`Engine::publish`], adding `undone` to the layer ids the cache's line must never take
    /// back (a rollback's undone layers).
    pub(crate) fn publish_undoing(
        &self,
        id: &CacheId,
        layers: Vec<LayerInfo>,
        provenance: Provenance,
        undone: &[String],
    ) -> Result<Generation> {
        let current = self.current(id)?;
        let mut tombstones = current.undone.clone();
        for u in undone {
            if !tombstones.contains(u) {
                tombstones.push(u.clone());
            }
        }
        // A layer published again (a rollforward) is no longer undone.
        tombstones.retain(|u| !layers.iter().any(|l| &l.id == u));
        let next = Generation {
            generation: current.generation + 1,
            layers,
            published: fsutil::now(),
            provenance: Some(provenance),
            undone: tombstones,
        };
        ensure_dir(&self.layout.history_dir(id))?;
        self.write_record(&self.layout.history_entry(id, next.generation), &next)?;
        fault::point("publish:history-written");
        self.write_record(&self.layout.current(id), &next)?;
        Ok(next)
    }

    /// The recorded generations of `id` up to the current one, newest first (at most `limit`).
    pub fn generations(&self, id: &CacheId, limit: Option<usize>) -> Result<Vec<Generation>> {
        let current = self.current(id)?;
        let mut out = Vec::new();
        let dir = self.layout.history_dir(id);
        let mut gens: Vec<u64> = std::fs::read_dir(&dir)
            .map(|r| {
                r.flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        gens.retain(|g| *g <= current.generation);
        gens.sort_unstable_by(|a, b| b.cmp(a));
        if gens.first() != Some(&current.generation) && current.generation > 0 {
            // Published before history was recorded: the current one is still known.
            out.push(current.clone());
        }
        for g in gens {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            match read_json::<Generation>(&self.layout.history_entry(id, g)) {
                Ok(Some(gen)) => out.push(gen),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(cache = %id, generation = g, error = %e, "unreadable history entry skipped")
                }
            }
        }
        if let Some(l) = limit {
            out.truncate(l);
        }
        Ok(out)
    }

    /// `cache history`: the generations with what produced them, newest first.
    pub fn cache_history(&self, id: &CacheId, limit: Option<usize>) -> Result<Vec<HistoryEntry>> {
        self.require_cache(id)?;
        // One more than asked, to tell what the oldest shown added.
        let gens = self.generations(id, limit.map(|l| l + 1))?;
        let kept = self.kept_layers(id)?;
        let current = self.current(id)?.generation;
        let layer_exists = |l: &LayerInfo| kept.contains(&l.id);
        let mut out = Vec::new();
        for (i, g) in gens.iter().enumerate() {
            if limit.is_some_and(|l| i >= l) {
                break;
            }
            let before: HashSet<&String> = gens
                .get(i + 1)
                .map(|p| p.layers.iter().map(|l| &l.id).collect())
                .unwrap_or_default();
            let added: Vec<&LayerInfo> = g
                .layers
                .iter()
                .filter(|l| !before.contains(&l.id))
                .collect();
            let p = g.provenance.clone().unwrap_or_else(|| {
                Provenance::new(
                    "unknown",
                    g.layers
                        .last()
                        .map(|l| l.source.clone())
                        .unwrap_or_default(),
                )
            });
            out.push(HistoryEntry {
                generation: g.generation,
                created: g.published,
                kind: p.kind,
                source: p.source,
                details: p.details,
                layers_added: added.iter().map(|l| l.id.clone()).collect(),
                bytes_added: added.iter().map(|l| l.allocated).sum(),
                bytes: g.allocated(),
                restorable: g.layers.iter().all(layer_exists),
                current: g.generation == current,
            });
        }
        Ok(out)
    }

    /// Layer ids the last `keep_generations` generations use: gc and prune keep them.
    pub(crate) fn kept_layers(&self, id: &CacheId) -> Result<HashSet<String>> {
        let current = self.current(id)?;
        let mut keep: HashSet<String> = current.layer_ids().into_iter().collect();
        keep.extend(current.data_ids());
        for g in self.generations(id, Some(self.config.keep_generations))? {
            keep.extend(g.layer_ids());
            keep.extend(g.data_ids());
        }
        Ok(keep)
    }

    /// Publishes generation `to`'s content as a new generation: atomic, live volumes keep what
    /// they were created on, and the history shows it.
    pub fn cache_rollback(&self, id: &CacheId, to: u64) -> Result<Generation> {
        self.require_cache(id)?;
        // No squash lock: a squash running meanwhile publishes only if the generation still
        // starts with the layers it folded, which keeps the rolled-back content either way.
        let _clock = self.lock_cache(id)?;
        let current = self.current(id)?;
        let target = if to == current.generation {
            Some(current.clone())
        } else if to < current.generation {
            read_json::<Generation>(&self.layout.history_entry(id, to))?
        } else {
            None
        };
        let Some(target) = target else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "cache {id} has no generation {to} to roll back to (current: {}): see `jobcachefs cache history {}`",
                    current.generation, id.name
                ),
            ));
        };
        let clone = self
            .cache_record(id)?
            .is_some_and(|c| c.mode == crate::state::records::CacheMode::Clone);
        let missing: Vec<&str> = target
            .layers
            .iter()
            .filter(|l| {
                !self
                    .layer_image_of(id, clone, &l.id)
                    .is_some_and(|p| p.exists())
            })
            .map(|l| l.id.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "generation {to} of cache {id} can no longer be restored: its layers {} are gone (only the last keep_generations = {} generations keep theirs); \
                     roll back to a newer one (`jobcachefs cache history {}`) or raise keep_generations",
                    missing.join(", "),
                    self.config.keep_generations,
                    id.name
                ),
            ));
        }
        // What the rollback undoes: the current layers (and what they fold) that the target
        // does not have. Registry sync must never merge them back.
        let keep: std::collections::HashSet<&String> =
            target.layers.iter().flat_map(|l| l.known_ids()).collect();
        // A squashed base undone also undoes what it folds (less what the target keeps), so a
        // node that still has those layers unsquashed drops them too.
        let mut undone: Vec<String> = Vec::new();
        for l in current.layers.iter().filter(|l| !keep.contains(&l.id)) {
            for u in l.known_ids().filter(|u| !keep.contains(u)) {
                if !undone.contains(u) {
                    undone.push(u.clone());
                }
            }
        }
        let next = self.publish_undoing(
            id,
            target.layers.clone(),
            Provenance::new("rollback", format!("generation {to}"))
                .with("to", to.to_string())
                .with("from", current.generation.to_string()),
            &undone,
        )?;
        fault::point("rollback:published");
        tracing::info!(cache = %id, to, generation = next.generation, "rolled back");
        Ok(next)
    }

    /// Where layer `layer` of `id` lives (`None`: a clone store that is not available).
    pub(crate) fn layer_image_of(
        &self,
        id: &CacheId,
        clone: bool,
        layer: &str,
    ) -> Option<std::path::PathBuf> {
        if clone {
            self.clone_store_if_ready()
                .map(|s| crate::state::layout::clone_store::layer_image(&s, id, layer))
        } else {
            Some(self.layout.layer_image(id, layer))
        }
    }
}

/// The provenance of a commit from `record`: its DIR and, when it came through the hook, the
/// PVC, PV and node its labels name.
pub(crate) fn commit_provenance(record: &crate::state::records::VolumeRecord) -> Provenance {
    let mut p = Provenance::new("commit", record.dir.display().to_string());
    for (k, v) in &record.labels {
        let key = k.strip_prefix("jobcachefs.io/").unwrap_or(k);
        p.details.insert(key.to_string(), v.clone());
    }
    if let Ok(node) =
        std::env::var("NODE_NAME").or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
    {
        p.details
            .entry("node".into())
            .or_insert_with(|| node.trim().to_string());
    }
    p.details.insert("volume".into(), record.id.clone());
    p
}
