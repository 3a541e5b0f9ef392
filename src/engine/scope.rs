//! Scopes: a named child of a cache (`(namespace, name, scope)`) holding its own delta layers.
//! A scoped volume mounts the cache's current generation with the scope's layers on top; its
//! commit adds a layer to the scope only, never to the cache, so untrusted builds (pull requests,
//! feature branches) warm their own work without reaching what trusted builds read.
//!
//! Scope layers are upper-format deltas (whiteouts, opaque dirs) kept in the cache's `layers/`
//! dir and named by `scopes/<scope>.json`; they stack on whatever generation the cache has when
//! a volume is made: per path, what the scope wrote or deleted wins, and what the cache gained
//! since shows through everywhere else. A scope never holds a cache layer: only its volumes do,
//! as every volume does.
//!
//! Bounds: `scope_size` (default the cache's cache-size) like the cache-size — an over-size
//! commit is merged with the scope's layers first and rejected if it still does not fit; more
//! than `max_depth` layers are merged into one delta layer (never a copy of the cache: that
//! would put the cache into every scope); idle scopes (`scope_idle`) are removed by gc, the
//! agent and prune.
//!
//! Crash points of a commit (as for the cache's): before the rename the image is the volume's
//! and a retry commits it; after it the volume record names the layer (`commit_layer`, so gc
//! keeps it) and a retry publishes it; after the publish the scope names it. A merge builds its
//! image in `scopes/<scope>.tmp/` (removed by gc under the scope lock) and publishes only if the
//! scope still starts with the layers it folded. Lock order: volume → squash → scope → cache.

use super::squash::Scratch;
use super::volume::DeleteOutcome;
use super::Engine;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fault;
use crate::files::merge::merge_layers;
use crate::host::ImageMount;
use crate::input::names::CacheId;
use crate::input::quantity::human_bytes;
use crate::state::fsutil::{self, ensure_dir, read_json};
use crate::state::lock;
use crate::state::records::{CacheRecord, LayerInfo, ScopeRecord, VolumeRecord};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A scope as `cache show` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ScopeInfo {
    /// Its name.
    pub scope: String,
    /// Its generation (commits and merges).
    pub generation: u64,
    /// Number of its layers.
    pub layers: usize,
    /// Allocated bytes of its layers.
    pub allocated: u64,
    /// Unix seconds of the last volume made on it (or its last publish).
    pub last_used: u64,
    /// DIRs of its live volumes.
    pub volumes: Vec<std::path::PathBuf>,
}

/// How many history entries a scope keeps.
const SCOPE_HISTORY: usize = 20;

impl Engine {
    /// The scope's record, if it has committed anything.
    pub(crate) fn scope_record(&self, id: &CacheId, scope: &str) -> Result<Option<ScopeRecord>> {
        read_json(&self.layout.scope_record(id, scope))
    }

    /// Names of the cache's scopes that have a record, sorted.
    pub(crate) fn scope_names(&self, id: &CacheId) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.layout.scopes_dir(id)) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(scope) = name.strip_suffix(".json") {
                if crate::input::names::validate_label("scope", scope).is_ok() {
                    out.push(scope.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Marks the scope used now (a volume was made on it).
    pub(crate) fn touch_scope(&self, id: &CacheId, scope: &str) -> Result<()> {
        ensure_dir(&self.layout.scopes_dir(id))?;
        let p = self.layout.scope_used(id, scope);
        std::fs::write(&p, b"").at("touch", &p)
    }

    fn scope_last_used(&self, id: &CacheId, scope: &str, record: &ScopeRecord) -> u64 {
        std::fs::metadata(self.layout.scope_used(id, scope))
            .map(|m| m.mtime() as u64)
            .unwrap_or(record.published)
            .max(record.published)
    }

    /// The scopes of a cache with their sizes and use.
    pub fn scope_list(&self, id: &CacheId) -> Result<Vec<ScopeInfo>> {
        let records = self.volume_records()?;
        let mut out = Vec::new();
        for scope in self.scope_names(id)? {
            let Some(r) = self.scope_record(id, &scope)? else {
                continue;
            };
            out.push(ScopeInfo {
                generation: r.generation,
                layers: r.layers.len(),
                allocated: r.allocated(),
                last_used: self.scope_last_used(id, &scope, &r),
                volumes: records
                    .iter()
                    .filter(|v| v.cache.as_ref() == Some(id) && v.scope.as_deref() == Some(&scope))
                    .map(|v| v.dir.clone())
                    .collect(),
                scope,
            });
        }
        Ok(out)
    }

    /// The scope's limit: `scope_size`, or the cache's cache-size.
    fn scope_limit(&self, cache: &CacheRecord) -> u64 {
        self.config.scope_size.unwrap_or(cache.cache_size)
    }

    /// Publishes a scoped volume's image as a new top layer of its scope. Called with the volume
    /// lock held.
    pub(crate) fn scope_commit(
        &self,
        record: &VolumeRecord,
        scope: &str,
        layer: &str,
    ) -> Result<DeleteOutcome> {
        let id = record.cache.as_ref().expect("only cache volumes commit");
        let src = self.layout.volume_image(&record.id);
        let dst = self.layout.layer_image(id, layer);
        if src.exists() {
            self.release_journal(&src);
            fsutil::fsync_file(&src)?;
        }
        let clock = self.lock_cache(id)?;
        let Some(cache) = self.cache_record(id)? else {
            tracing::warn!(cache = %id, scope, dir = %record.dir.display(), "the cache was removed while this volume lived: its write-back into the scope is discarded");
            return Ok(DeleteOutcome::Discarded);
        };
        let mut current = self
            .scope_record(id, scope)?
            .unwrap_or_else(|| ScopeRecord {
                scope: scope.to_string(),
                created: fsutil::now(),
                ..Default::default()
            });
        if current.layers.iter().any(|l| l.id == layer) {
            return Ok(committed(current.generation, false, scope));
        }
        let image = if dst.exists() {
            dst.clone()
        } else {
            src.clone()
        };
        let allocated = fsutil::allocated_bytes(&image)?;
        let size = std::fs::metadata(&image).at("stat", &image)?.len();
        let limit = self.scope_limit(&cache);
        let total = current.allocated() + allocated;
        if total > limit {
            drop(clock);
            tracing::info!(cache = %id, scope, total, limit,
                "commit would exceed the scope's size: merging it with the scope's layers first");
            return match self.scope_merge(id, scope, Some((&image, layer, &record.dir))) {
                Ok(Some(generation)) => Ok(committed(generation, true, scope)),
                Ok(None) => Ok(committed(current.generation, true, scope)),
                Err(e) if e.kind() == ErrorKind::Quota => {
                    let reason = format!(
                        "commit of {} into scope {scope} of cache {id} rejected: the scope and this volume's changes allocate {}, over the scope's limit of {}, \
                         and merged they still do not fit ({e}); the scope stays as it was. Raise scope_size (or the cache-size), or write less",
                        record.dir.display(),
                        human_bytes(total),
                        human_bytes(limit)
                    );
                    tracing::error!(cache = %id, scope, "{reason}");
                    Ok(DeleteOutcome::Rejected { reason })
                }
                Err(e) => Err(e),
            };
        }
        if image == src {
            std::fs::rename(&src, &dst).at("rename into the cache", &dst)?;
            fsutil::fsync_dir(&self.layout.layers_dir(id))?;
        }
        fault::point("scope-commit:renamed");
        current.layers.push(LayerInfo {
            data: Vec::new(),
            data_usage: Default::default(),
            id: layer.to_string(),
            created: fsutil::now(),
            source: record.dir.display().to_string(),
            size,
            allocated,
            covers: Vec::new(),
        });
        let generation =
            self.publish_scope(id, current, "commit", &record.dir.display().to_string())?;
        fault::point("scope-commit:published");
        crate::state::stats::add(
            &self.layout,
            &[(crate::state::stats::names::SCOPE_COMMITS, 1)],
        );
        tracing::info!(cache = %id, scope, generation, layer, allocated = %human_bytes(allocated), "commit published into the scope");
        Ok(committed(generation, false, scope))
    }

    /// Writes the scope's next generation (temp → fsync → rename). Called with the cache lock.
    fn publish_scope(
        &self,
        id: &CacheId,
        mut next: ScopeRecord,
        kind: &str,
        source: &str,
    ) -> Result<u64> {
        ensure_dir(&self.layout.scopes_dir(id))?;
        next.generation += 1;
        next.published = fsutil::now();
        next.history.push(crate::state::records::ScopeEvent {
            generation: next.generation,
            published: next.published,
            kind: kind.to_string(),
            source: source.to_string(),
            layers: next.layers.len(),
        });
        let drop_n = next.history.len().saturating_sub(SCOPE_HISTORY);
        next.history.drain(..drop_n);
        let path = self.layout.scope_record(id, &next.scope);
        self.write_record(&path, &next)?;
        Ok(next.generation)
    }

    /// After a scope commit: more than `max_depth` layers are merged into one.
    pub(crate) fn after_scope_commit(&self, id: &CacheId, scope: &str) -> Result<()> {
        let depth = self.scope_record(id, scope)?.map_or(0, |s| s.layers.len());
        if depth > self.config.max_depth {
            if let Err(e) = self.scope_merge(id, scope, None) {
                tracing::warn!(cache = %id, scope, error = %e, "scope merge failed; the next commit tries again");
            }
        }
        if let Some(budget) = self.config.node_budget {
            self.prune_to_budget(budget, Some(id))?;
        }
        Ok(())
    }

    /// Merges all the scope's layers (and, for an over-size commit, the volume's unpublished
    /// image `extra` as layer `extra.1` on top) into one delta layer. `Some(generation)` when
    /// something was published.
    pub(crate) fn scope_merge(
        &self,
        id: &CacheId,
        scope: &str,
        extra: Option<(&Path, &str, &Path)>,
    ) -> Result<Option<u64>> {
        let cache = self.require_cache(id)?;
        ensure_dir(&self.layout.scopes_dir(id))?;
        let _slock = lock::lock(&self.layout.scope_lock(id, scope))?;
        let work = self.layout.scope_mnt(id, scope);
        let (new_mnt, extra_mnt) = (work.join("new"), work.join("extra"));
        for m in [&new_mnt, &extra_mnt] {
            self.host.unmount(m, true)?;
        }
        let tmp = self.layout.scope_tmp(id, scope);
        let _ = std::fs::remove_dir_all(&tmp);
        ensure_dir(&tmp)?;
        let mut scratch = Scratch {
            host: self.host.clone(),
            mounts: Vec::new(),
            image: None,
        };
        let result = (|| {
            let (base, mut lowers) = {
                let _clock = self.lock_cache(id)?;
                let current = self
                    .scope_record(id, scope)?
                    .unwrap_or_else(|| ScopeRecord {
                        scope: scope.to_string(),
                        created: fsutil::now(),
                        ..Default::default()
                    });
                if let Some((_, layer, _)) = extra {
                    if current.layers.iter().any(|l| l.id == layer) {
                        return Ok(None); // a retried commit: already merged in
                    }
                } else if current.layers.len() <= 1 {
                    return Ok(None);
                }
                let lowers = self.ensure_layers_mounted(id, &current.layer_ids())?;
                (current, lowers)
            };
            if let Some((img, _, _)) = extra {
                ensure_dir(&extra_mnt)?;
                self.host
                    .mount_image(img, &extra_mnt, ImageMount { read_only: true })?;
                scratch.mounts.push(extra_mnt.clone());
                lowers.push(extra_mnt.join("upper"));
            }
            let limit = self.scope_limit(&cache);
            let image_path = tmp.join(format!("merge-{}.img", fsutil::random_hex()));
            let (stats, allocated) = self.build_image(
                &mut scratch,
                &image_path,
                limit,
                false,
                &new_mnt,
                "the merged scope",
                |target| {
                    let stats = merge_layers(&lowers, target)?;
                    fault::point("scope-merge:copied");
                    Ok(stats)
                },
            )?;
            if allocated > limit {
                return Err(Error::new(
                    ErrorKind::Quota,
                    format!(
                        "the merged scope allocates {}, over its limit of {}",
                        human_bytes(allocated),
                        human_bytes(limit)
                    ),
                ));
            }

            let _clock = self.lock_cache(id)?;
            if self.cache_record(id)?.is_none() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("cache {id} was removed during the merge of scope {scope}"),
                ));
            }
            let now = self
                .scope_record(id, scope)?
                .unwrap_or_else(|| base.clone());
            let base_ids = base.layer_ids();
            if now.layer_ids().get(..base_ids.len()) != Some(&base_ids[..]) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("scope {scope} of cache {id} changed under the merge (removed meanwhile?): nothing published"),
                ));
            }
            let layer_id = match extra {
                Some((_, l, _)) => l.to_string(),
                None => format!("merge-{}", fsutil::random_hex()),
            };
            let dst = self.layout.layer_image(id, &layer_id);
            std::fs::rename(&image_path, &dst).at("rename into the cache", &dst)?;
            scratch.image = None;
            fsutil::fsync_dir(&self.layout.layers_dir(id))?;
            fault::point("scope-merge:renamed");
            let mut next = now.clone();
            next.layers = vec![LayerInfo {
                data: Vec::new(),
                data_usage: Default::default(),
                id: layer_id,
                created: fsutil::now(),
                source: if extra.is_some() {
                    "commit+merge".into()
                } else {
                    "merge".into()
                },
                size: std::fs::metadata(&dst).at("stat", &dst)?.len(),
                allocated,
                covers: base
                    .layers
                    .iter()
                    .flat_map(|l| l.known_ids().cloned())
                    .collect(),
            }];
            next.layers
                .extend(now.layers[base_ids.len()..].iter().cloned());
            let (kind, source) = match extra {
                Some((_, _, dir)) => ("commit", format!("{} (merged to fit)", dir.display())),
                None => ("merge", format!("{} layers", base_ids.len())),
            };
            let generation = self.publish_scope(id, next, kind, &source)?;
            fault::point("scope-merge:published");
            self.collect_layers(id)?;
            tracing::info!(cache = %id, scope, generation, folded = base_ids.len() + extra.is_some() as usize,
                entries = stats.entries, bytes = stats.bytes, allocated, "scope merge published");
            Ok(Some(generation))
        })();
        drop(scratch);
        let _ = std::fs::remove_dir_all(&tmp);
        if self.cache_record(id)?.is_some() {
            let _clock = self.lock_cache(id)?;
            self.unmount_unused_layers(id)?;
        }
        result
    }

    /// Merges the scope's layers into one now (`cache squash NAME --scope S`); `None` when it
    /// has at most one.
    pub fn scope_squash(&self, id: &CacheId, scope: &str) -> Result<Option<u64>> {
        crate::input::names::validate_label("scope", scope)?;
        if self.scope_record(id, scope)?.is_none() {
            self.require_cache(id)?;
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "cache {id} has no scope {scope:?}: see `jobcachefs cache show {} --namespace {}`",
                    id.name, id.namespace
                ),
            ));
        }
        self.scope_merge(id, scope, None)
    }

    /// Removes a scope: its record goes at once; its layers when no live volume uses them.
    /// Returns the bytes freed now.
    pub fn scope_rm(&self, id: &CacheId, scope: &str) -> Result<u64> {
        crate::input::names::validate_label("scope", scope)?;
        self.require_cache(id)?;
        ensure_dir(&self.layout.scopes_dir(id))?;
        let _slock = lock::lock(&self.layout.scope_lock(id, scope))?;
        let _clock = self.lock_cache(id)?;
        let Some(record) = self.scope_record(id, scope)? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "cache {id} has no scope {scope:?}: see `jobcachefs cache show {} --namespace {}`",
                    id.name, id.namespace
                ),
            ));
        };
        let before: u64 = self.layer_files_allocated(id, &record.layer_ids());
        fsutil::remove_file_if_exists(&self.layout.scope_record(id, scope))?;
        fsutil::fsync_dir(&self.layout.scopes_dir(id))?;
        let _ = std::fs::remove_file(self.layout.scope_used(id, scope));
        self.collect_layers(id)?;
        let after = self.layer_files_allocated(id, &record.layer_ids());
        tracing::info!(cache = %id, scope, freed = before - after.min(before), "scope removed");
        Ok(before - after.min(before))
    }

    /// Allocated bytes of the named layer files that exist.
    fn layer_files_allocated(&self, id: &CacheId, layers: &[String]) -> u64 {
        layers
            .iter()
            .filter_map(|l| std::fs::metadata(self.layout.layer_image(id, l)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// The scope's last publishes, newest first.
    pub fn scope_history(
        &self,
        id: &CacheId,
        scope: &str,
        limit: Option<usize>,
    ) -> Result<Vec<crate::state::records::ScopeEvent>> {
        crate::input::names::validate_label("scope", scope)?;
        self.require_cache(id)?;
        let Some(r) = self.scope_record(id, scope)? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "cache {id} has no scope {scope:?}: see `jobcachefs cache show {} --namespace {}`",
                    id.name, id.namespace
                ),
            ));
        };
        let mut h = r.history;
        h.reverse();
        h.truncate(limit.unwrap_or(usize::MAX));
        Ok(h)
    }

    /// Layer ids every scope of the cache names (kept by gc). None once the cache is removed:
    /// its scopes go with it (their records with its directory).
    pub(crate) fn scope_layers(&self, id: &CacheId) -> Result<std::collections::HashSet<String>> {
        let mut out = std::collections::HashSet::new();
        if !self.layout.cache_record(id).exists() {
            return Ok(out);
        }
        for scope in self.scope_names(id)? {
            if let Some(r) = self.scope_record(id, &scope)? {
                out.extend(r.layer_ids());
            }
        }
        Ok(out)
    }

    /// Scopes idle for `scope_idle` with no live volume: removed. Also what a crashed merge
    /// left (its scratch mounts and half-built image), for scopes whose lock is free.
    pub(crate) fn gc_scopes(&self, id: &CacheId) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let now = fsutil::now();
        for info in self.scope_list(id)? {
            let idle = now.saturating_sub(info.last_used);
            if idle >= self.config.scope_idle_seconds && info.volumes.is_empty() {
                self.scope_rm(id, &info.scope)?;
                tracing::info!(cache = %id, scope = %info.scope, idle, "idle scope removed");
                removed.push(format!("{id}/{}", info.scope));
            }
        }
        let Ok(entries) = std::fs::read_dir(self.layout.scopes_dir(id)) else {
            return Ok(removed);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(scope) = name.strip_suffix(".tmp") else {
                continue;
            };
            if let Some(_l) = lock::try_lock(&self.layout.scope_lock(id, scope))? {
                let work = self.layout.scope_mnt(id, scope);
                for m in [work.join("new"), work.join("extra")] {
                    self.host.unmount(&m, true)?;
                }
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(removed)
    }
}

fn committed(generation: u64, squashed: bool, scope: &str) -> DeleteOutcome {
    DeleteOutcome::Committed {
        generation,
        squashed,
        scope: Some(scope.to_string()),
    }
}
