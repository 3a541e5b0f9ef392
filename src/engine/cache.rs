//! Cache administration: list, show, remove, resize and prune.

use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::input::names::CacheId;
use crate::input::quantity::human_bytes;
use crate::state::fsutil::{self, write_json_atomic};
use crate::state::lock;
use crate::state::records::LayerInfo;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// A cache as `cache ls` / `cache show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct CacheInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `overlay` or `clone`.
    pub mode: crate::state::records::CacheMode,
    /// Current generation number (0: never committed).
    pub generation: u64,
    /// Number of layers in the current generation.
    pub depth: usize,
    /// The layers, base first.
    pub layers: Vec<LayerInfo>,
    /// Allocated bytes of the current layers.
    pub allocated: u64,
    /// The cache-size limit.
    pub cache_size: u64,
    /// Allocated bytes of all layer files on disk, including ones only old volumes still use.
    pub on_disk: u64,
    /// DIRs of the live volumes on this cache.
    pub volumes: Vec<PathBuf>,
    /// Unix seconds of the last volume created on it (or of its creation).
    pub last_used: u64,
    /// Unix seconds of its creation.
    pub created: u64,
    /// Whether a squash is queued.
    pub squash_due: bool,
    /// Its scopes (pull-request and branch layers on top of it).
    pub scopes: Vec<super::ScopeInfo>,
}

/// A cache `prune` would remove, and why.
#[derive(Debug, Clone, Serialize)]
pub struct PruneCandidate {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The scope that goes, when only a scope of the cache goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Bytes it frees.
    pub frees: u64,
    /// Unix seconds of last use.
    pub last_used: u64,
    /// Why it goes.
    pub reason: String,
}

impl Engine {
    /// Everything about one cache.
    pub fn cache_show(&self, id: &CacheId) -> Result<CacheInfo> {
        let record = self.require_cache(id)?;
        let current = self.current(id)?;
        let volumes = self
            .volume_records()?
            .into_iter()
            .filter(|v| v.cache.as_ref() == Some(id))
            .map(|v| v.dir)
            .collect();
        let last_used = std::fs::metadata(self.layout.last_used(id))
            .map(|m| m.mtime() as u64)
            .unwrap_or(record.created);
        let mut on_disk = 0;
        let mut dirs = vec![self.layout.layers_dir(id)];
        if let Some(store) = self.clone_store_if_ready() {
            dirs.push(crate::state::layout::clone_store::layers_dir(&store, id));
        }
        for dir in dirs {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    on_disk += e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                }
            }
        }
        Ok(CacheInfo {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            mode: record.mode,
            generation: current.generation,
            depth: current.layers.len(),
            allocated: current.allocated(),
            layers: current.layers,
            cache_size: record.cache_size,
            on_disk,
            volumes,
            last_used,
            created: record.created,
            squash_due: self.layout.squash_due(id).exists(),
            scopes: self.scope_list(id)?,
        })
    }

    /// All caches on this node.
    pub fn cache_list(&self) -> Result<Vec<CacheInfo>> {
        self.cache_ids()?
            .iter()
            .map(|id| self.cache_show(id))
            .collect()
    }

    /// Unpublishes a cache at once. Live volumes keep their layers (and keep working); the space
    /// is freed when the last of them is deleted. Their write-back is discarded.
    pub fn cache_rm(&self, id: &CacheId) -> Result<u64> {
        self.require_cache(id)?;
        let _slock = lock::lock(&self.layout.squash_lock(id))?;
        let _clock = self.lock_cache(id)?;
        let before = self.cache_show(id)?.on_disk;
        // The record goes first: a crash after it leaves a cache nobody lists, which gc cleans.
        for p in [self.layout.cache_record(id), self.layout.current(id)] {
            fsutil::remove_file_if_exists(&p)?;
        }
        fsutil::fsync_dir(&self.layout.cache_dir(id))?;
        let _ = std::fs::remove_file(self.layout.squash_due(id));
        self.collect_layers(id)?;
        let after = self.dir_allocated(id);
        self.remove_cache_dir_if_empty(id);
        tracing::info!(cache = %id, freed = before - after.min(before), "cache removed");
        Ok(before - after.min(before))
    }

    fn dir_allocated(&self, id: &CacheId) -> u64 {
        std::fs::read_dir(self.layout.layers_dir(id))
            .map(|es| {
                es.flatten()
                    .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Removes the directory of a removed cache once no layer file is left.
    pub(crate) fn remove_cache_dir_if_empty(&self, id: &CacheId) {
        if self.layout.cache_record(id).exists() {
            return;
        }
        let layers_left = std::fs::read_dir(self.layout.layers_dir(id))
            .map(|mut es| es.next().is_some())
            .unwrap_or(false);
        if !layers_left {
            let _ = std::fs::remove_dir_all(self.layout.cache_dir(id));
        }
    }

    /// Changes a cache's size limit. Growing only rewrites the limit (nothing in use is touched).
    /// Shrinking below the current base's size rebuilds the generation into a smaller base, and
    /// fails, changing nothing, when the data does not fit.
    pub fn cache_resize(
        &self,
        id: &CacheId,
        size: u64,
    ) -> Result<crate::state::records::CacheRecord> {
        let mut record = self.require_cache(id)?;
        super::volume::check_cache_size(size)?;
        let current = self.current(id)?;
        if size >= record.cache_size || current.layers.is_empty() {
            let _clock = self.lock_cache(id)?;
            record.cache_size = size;
            write_json_atomic(&self.layout.cache_record(id), &record)?;
            return Ok(record);
        }
        // Shrink: the stack must be rebuilt into a base of the new size. The squash works on
        // its own copy; the record changes only once the new base is published.
        let outcome = self.squash_into(id, size).map_err(|e| {
            if e.kind() == ErrorKind::Quota {
                Error::new(
                    ErrorKind::Quota,
                    format!(
                        "cache {id} cannot shrink to {}: {e}; the cache is unchanged. Choose a larger size or prune its data",
                        human_bytes(size)
                    ),
                )
            } else {
                e
            }
        })?;
        tracing::info!(cache = %id, ?outcome, "cache rebuilt into a smaller base");
        let _clock = self.lock_cache(id)?;
        let mut record = self.require_cache(id)?;
        record.cache_size = size;
        write_json_atomic(&self.layout.cache_record(id), &record)?;
        Ok(record)
    }

    /// Caches that `prune` would remove: unused for `unused_for` seconds, and/or least recently
    /// used ones until the node total is at most `max_total`. Caches with live volumes stay.
    pub fn prune_plan(
        &self,
        unused_for: Option<u64>,
        max_total: Option<u64>,
    ) -> Result<Vec<PruneCandidate>> {
        self.prune_plan_except(unused_for, max_total, None)
    }

    fn prune_plan_except(
        &self,
        unused_for: Option<u64>,
        max_total: Option<u64>,
        keep: Option<&CacheId>,
    ) -> Result<Vec<PruneCandidate>> {
        Ok(plan_prune(
            &self.cache_list()?,
            fsutil::now(),
            Limits {
                unused_for,
                max_total,
                scope_idle: self.config.scope_idle_seconds,
            },
            keep,
        ))
    }

    /// Removes what [`Engine::prune_plan`] lists (unless `dry_run`), returning it.
    pub fn prune(
        &self,
        unused_for: Option<u64>,
        max_total: Option<u64>,
        dry_run: bool,
    ) -> Result<Vec<PruneCandidate>> {
        let plan = self.prune_plan(unused_for, max_total)?;
        if !dry_run {
            for c in &plan {
                self.remove_candidate(c)?;
            }
        }
        Ok(plan)
    }

    fn remove_candidate(&self, c: &PruneCandidate) -> Result<()> {
        let id = CacheId::new(&c.namespace, &c.name)?;
        match &c.scope {
            Some(scope) => self.scope_rm(&id, scope).map(|_| ()),
            None => self.cache_rm(&id).map(|_| ()),
        }
    }

    /// Prunes least recently used caches until the node total fits `budget`, never `keep` (the
    /// cache that was just committed to).
    pub(crate) fn prune_to_budget(
        &self,
        budget: u64,
        keep: Option<&CacheId>,
    ) -> Result<Vec<PruneCandidate>> {
        let pruned = self.prune_plan_except(None, Some(budget), keep)?;
        for c in &pruned {
            self.remove_candidate(c)?;
            tracing::info!(cache = %format!("{}/{}", c.namespace, c.name), scope = c.scope.as_deref().unwrap_or(""), frees = c.frees, "pruned to the node budget");
        }
        Ok(pruned)
    }
}

/// What a prune goes by.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Remove caches unused for at least this many seconds.
    pub unused_for: Option<u64>,
    /// Remove, least recently used first, until the node total is at most this.
    pub max_total: Option<u64>,
    /// Remove scopes unused for at least this many seconds (`scope_idle`).
    pub scope_idle: u64,
}

/// Decides what a prune removes, without I/O. Scopes first: those idle for `scope_idle`, then,
/// least recently used first, scopes until the node total (`on_disk`, scopes included) is at
/// most `max_total`; then caches unused for at least `unused_for` seconds and, least recently
/// used first, caches until the total fits. Whatever has live volumes, and `keep` (with its
/// scopes), is never chosen.
pub fn plan_prune(
    caches: &[CacheInfo],
    now: u64,
    limits: Limits,
    keep: Option<&CacheId>,
) -> Vec<PruneCandidate> {
    let Limits {
        unused_for,
        max_total,
        scope_idle,
    } = limits;
    let mut caches: Vec<&CacheInfo> = caches.iter().collect();
    caches.sort_by_key(|c| (c.last_used, c.namespace.clone(), c.name.clone()));
    let mut total: u64 = caches.iter().map(|c| c.on_disk).sum();
    let mut out = Vec::new();
    let kept = |c: &CacheInfo| keep.is_some_and(|k| k.namespace == c.namespace && k.name == c.name);
    let mut scopes: Vec<(&CacheInfo, &super::ScopeInfo)> = caches
        .iter()
        .flat_map(|c| c.scopes.iter().map(move |s| (*c, s)))
        .collect();
    scopes.sort_by_key(|(c, s)| {
        (
            s.last_used,
            c.namespace.clone(),
            c.name.clone(),
            s.scope.clone(),
        )
    });
    // What removing a whole cache frees once some of its scopes already went.
    let mut gone: std::collections::HashMap<(String, String), u64> = Default::default();
    for (c, s) in scopes {
        if kept(c) || !s.volumes.is_empty() {
            continue;
        }
        let idle = now.saturating_sub(s.last_used);
        let reason = match max_total {
            _ if idle >= scope_idle => format!("scope unused for {idle}s"),
            Some(budget) if total > budget => format!(
                "node total {} is over the budget {} (scopes go before caches)",
                human_bytes(total),
                human_bytes(budget)
            ),
            _ => continue,
        };
        total = total.saturating_sub(s.allocated);
        *gone
            .entry((c.namespace.clone(), c.name.clone()))
            .or_default() += s.allocated;
        out.push(PruneCandidate {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            scope: Some(s.scope.clone()),
            frees: s.allocated,
            last_used: s.last_used,
            reason,
        });
    }
    for c in caches {
        if !c.volumes.is_empty() || kept(c) {
            continue;
        }
        let idle = now.saturating_sub(c.last_used);
        let reason = match (unused_for, max_total) {
            (Some(age), _) if idle >= age => format!("unused for {idle}s"),
            (_, Some(budget)) if total > budget => format!(
                "node total {} is over the budget {}",
                human_bytes(total),
                human_bytes(budget)
            ),
            _ => continue,
        };
        let frees = c.on_disk.saturating_sub(
            gone.get(&(c.namespace.clone(), c.name.clone()))
                .copied()
                .unwrap_or(0),
        );
        total = total.saturating_sub(frees);
        out.push(PruneCandidate {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            scope: None,
            frees,
            last_used: c.last_used,
            reason,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(name: &str, last_used: u64, on_disk: u64, live: usize) -> CacheInfo {
        CacheInfo {
            namespace: "ns".into(),
            name: name.into(),
            mode: Default::default(),
            generation: 1,
            depth: 1,
            layers: Vec::new(),
            allocated: on_disk,
            cache_size: 1 << 30,
            on_disk,
            volumes: (0..live).map(|i| PathBuf::from(format!("/v{i}"))).collect(),
            last_used,
            created: 0,
            squash_due: false,
            scopes: Vec::new(),
        }
    }

    /// `plan_prune` with these limits (scopes idle for a week go).
    fn plan(
        cs: &[CacheInfo],
        unused_for: Option<u64>,
        max_total: Option<u64>,
        keep: Option<&CacheId>,
    ) -> Vec<PruneCandidate> {
        let limits = Limits {
            unused_for,
            max_total,
            scope_idle: 604_800,
        };
        plan_prune(cs, 1000, limits, keep)
    }

    /// A scope unused since 0 is idle at 1000 when scope_idle is 1000.
    fn plan_idle(
        cs: &[CacheInfo],
        keep: Option<&CacheId>,
        max_total: Option<u64>,
    ) -> Vec<PruneCandidate> {
        let limits = Limits {
            unused_for: None,
            max_total,
            scope_idle: 1000,
        };
        plan_prune(cs, 1000, limits, keep)
    }

    fn names(p: &[PruneCandidate]) -> Vec<&str> {
        p.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn prunes_by_age_but_never_live_caches() {
        let cs = [
            cache("old", 100, 10, 0),
            cache("busy", 50, 10, 1),
            cache("new", 990, 10, 0),
        ];
        assert_eq!(names(&plan(&cs, Some(500), None, None)), ["old"]);
        assert!(plan(&cs, Some(5000), None, None).is_empty());
    }

    #[test]
    fn prunes_least_recently_used_first_until_the_budget_fits() {
        let cs = [
            cache("c", 300, 30, 0),
            cache("a", 100, 10, 0),
            cache("b", 200, 20, 0),
        ];
        assert_eq!(names(&plan(&cs, None, Some(60), None)), Vec::<&str>::new());
        assert_eq!(names(&plan(&cs, None, Some(59), None)), ["a"]);
        assert_eq!(names(&plan(&cs, None, Some(30), None)), ["a", "b"]);
        assert_eq!(names(&plan(&cs, None, Some(0), None)), ["a", "b", "c"]);
        let keep = CacheId::new("ns", "a").unwrap();
        assert_eq!(names(&plan(&cs, None, Some(30), Some(&keep))), ["b", "c"]);
    }

    #[test]
    fn age_and_budget_combine() {
        let cs = [
            cache("a", 100, 10, 0),
            cache("b", 900, 50, 0),
            cache("c", 950, 50, 0),
        ];
        // a is old; after it goes the total is 100, over 60: b (next least recent) goes too.
        assert_eq!(names(&plan(&cs, Some(500), Some(60), None)), ["a", "b"]);
    }

    fn scope(name: &str, last_used: u64, allocated: u64, live: usize) -> crate::engine::ScopeInfo {
        crate::engine::ScopeInfo {
            scope: name.into(),
            generation: 1,
            layers: 1,
            allocated,
            last_used,
            volumes: (0..live).map(|i| PathBuf::from(format!("/s{i}"))).collect(),
        }
    }

    fn what(p: &[PruneCandidate]) -> Vec<String> {
        p.iter()
            .map(|c| match &c.scope {
                Some(s) => format!("{}/{s}", c.name),
                None => c.name.clone(),
            })
            .collect()
    }

    #[test]
    fn scopes_go_before_caches_least_recently_used_first() {
        // a's 100 bytes on disk hold its scopes' 90; pr-3 has a live volume (so a has one).
        let mut a = cache("a", 100, 100, 1);
        a.scopes = vec![
            scope("pr-1", 900, 30, 0),
            scope("pr-2", 200, 20, 0),
            scope("pr-3", 50, 40, 1),
        ];
        let b = cache("b", 300, 50, 0);
        // 150 on disk: pr-2 (older) then pr-1 bring it to 100; pr-3 is in use and stays.
        assert_eq!(
            what(&plan(&[a.clone(), b.clone()], None, Some(100), None)),
            ["a/pr-2", "a/pr-1"]
        );
        // Below what scopes can free: then caches, least recently used first (a is in use).
        let p = plan(&[a.clone(), b.clone()], None, Some(40), None);
        assert_eq!(what(&p), ["a/pr-2", "a/pr-1", "b"]);
        // A whole cache frees what its scopes did not already.
        let mut c = cache("c", 100, 100, 0);
        c.scopes = vec![scope("pr-9", 200, 60, 0)];
        let p = plan(std::slice::from_ref(&c), None, Some(0), None);
        assert_eq!(what(&p), ["c/pr-9", "c"]);
        assert_eq!(p.iter().map(|c| c.frees).collect::<Vec<_>>(), [60, 40]);
        a.volumes.clear();
        // A scope idle for scope_idle goes whatever the budget; the kept cache's never.
        a.scopes = vec![scope("stale", 0, 5, 0), scope("fresh", 999, 5, 0)];
        let cs = [a.clone()];
        assert_eq!(what(&plan_idle(&cs, None, None)), ["a/stale"]);
        assert!(
            plan(&cs, None, None, None).is_empty(),
            "a week has not passed"
        );
        let keep = CacheId::new("ns", "a").unwrap();
        assert!(plan_idle(&cs, Some(&keep), Some(0)).is_empty());
    }
}
