//! Per-volume identities (`--unique-ids`, StorageClass `jobcachefs.io/unique-ids`): a UID unique
//! among the node's live volumes and one GID per cache, unique in the cluster. A job finds them
//! on its volume's root (`stat`) and switches to them before running its build.
//!
//! UIDs are derived from the volume records and allocated under `locks/admission.lock`, which a
//! create holds until its record (naming the UID) is written: a crash neither loses one (the
//! record is rolled back, which frees it) nor duplicates one. GIDs come from the cluster (the
//! hook allocates them through the API with optimistic concurrency, `k8s/gids.rs`) or, on a
//! plain runner, from `gids.json` on the node; either way the cache's record keeps its GID.

use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::input::names::CacheId;
use crate::state::fsutil::read_json;
use crate::state::lock;
use std::collections::{BTreeMap, HashSet};

/// The mode of a root owned by a volume's identity: only its UID enters (concurrent volumes of
/// the same cache share the GID, not their new files); setgid so new files get the cache's GID.
pub const IDENTITY_ROOT_MODE: u32 = 0o2700;

impl Engine {
    /// The lowest UID of `volume_uids` no live volume record holds. Called with the admission
    /// lock held, which the caller keeps until the record naming the UID is written.
    pub(crate) fn allocate_uid(&self) -> Result<u32> {
        let (records, damaged) = self.volume_records_checked()?;
        if !damaged.is_empty() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "volume record(s) {} cannot be read, so a free UID cannot be proven unused: see `jobcachefs doctor`",
                    damaged.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let used: HashSet<u32> = records
            .iter()
            .filter_map(|r| r.identity.map(|i| i.uid))
            .collect();
        let (first, last) = self.config.volume_uids;
        (first..=last).find(|u| !used.contains(u)).ok_or_else(|| {
            Error::new(
                ErrorKind::Quota,
                format!(
                    "all {} UIDs of volume_uids {first}-{last} are held by live volumes on this node: delete volumes or widen volume_uids in the config",
                    last - first + 1
                ),
            )
        })
    }

    /// The GID of cache `id`: the one its record keeps, else `given` (from the cluster), else one
    /// allocated on this node. Recorded in the cache's record. Called with the cache lock held.
    pub(crate) fn cache_gid(&self, id: &CacheId, given: Option<u32>) -> Result<u32> {
        let mut record = self.require_cache(id)?;
        if let Some(g) = record.gid {
            if given.is_some_and(|c| c != g) {
                tracing::warn!(cache = %id, node = g, cluster = ?given,
                    "the cache's GID on this node differs from the cluster's table: keeping the node's (its files carry it)");
            }
            return Ok(g);
        }
        let gid = match given {
            Some(g) => g,
            None => self.node_gid(id)?,
        };
        record.gid = Some(gid);
        self.write_record(&self.layout.cache_record(id), &record)?;
        Ok(gid)
    }

    /// A GID for `id` from the node's own table (`gids.json`): without a cluster, this node is
    /// the whole "cluster". Entries are never reused, so a GID never moves to another cache.
    fn node_gid(&self, id: &CacheId) -> Result<u32> {
        let _l = lock::lock(&self.layout.root().join("locks").join("gids.lock"))?;
        let path = self.layout.root().join("gids.json");
        let mut table: BTreeMap<String, u32> = read_json(&path)?.unwrap_or_default();
        let key = format!("{}/{}", id.namespace, id.name);
        if let Some(g) = table.get(&key) {
            return Ok(*g);
        }
        let used: HashSet<u32> = table.values().copied().collect();
        let (first, last) = self.config.cache_gids;
        let gid = (first..=last).find(|g| !used.contains(g)).ok_or_else(|| {
            Error::new(
                ErrorKind::Quota,
                format!("all GIDs of cache_gids {first}-{last} are given to caches: widen cache_gids in the config"),
            )
        })?;
        table.insert(key, gid);
        self.write_record(&path, &table)?;
        Ok(gid)
    }
}
