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
use crate::state::records::VolumeRecord;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The idmap of a volume with an identity on a cache: on disk the cache's files belong to the
/// cache's GID used as a UID too (its canonical owner, the same on every node), and through the
/// volume's mounts they appear as the volume's UID. So each job owns the whole cache — what
/// earlier jobs wrote, whatever their UIDs and mode bits — and what it writes lands on disk as
/// the canonical owner again. Root stays root (overlayfs makes its whiteouts as root).
pub(crate) fn idmap_of(record: &VolumeRecord) -> Option<((u32, u32), (u32, u32))> {
    let id = record.identity?;
    record.cache.as_ref()?;
    Some(((id.gid, id.uid), (id.gid, id.gid)))
}

/// The on-disk owner of a volume's root: the canonical owner under an idmap, else the root's.
pub(crate) fn disk_owner(record: &VolumeRecord) -> Option<(u32, u32)> {
    match idmap_of(record) {
        Some(((disk_uid, _), (disk_gid, _))) => Some((disk_uid, disk_gid)),
        None => record.root.map(|r| (r.uid, r.gid)),
    }
}

/// The mode of a root owned by a volume's identity: only its UID enters (concurrent volumes of
/// the same cache share the GID, not their new files); setgid so new files get the cache's GID.
pub const IDENTITY_ROOT_MODE: u32 = 0o2700;

impl Engine {
    /// Mounts a volume's overlay at its DIR: directly, or — for a volume with an identity — over
    /// idmapped views of its layer mounts and upper mount (overlayfs accepts idmapped layers,
    /// not an idmapped overlay). The views live under `mnt/idmap/<vol>/` only until the overlay
    /// holds its own private clones of them; a crash in between leaves mounts there that `gc`
    /// removes.
    pub(crate) fn mount_overlay_for(
        &self,
        record: &VolumeRecord,
        lowers: &[PathBuf],
        upper_mount: &Path,
    ) -> Result<()> {
        // A metadata base's data-only layers (mounted with the others by the caller).
        let data: Vec<PathBuf> = match &record.cache {
            Some(id) => self
                .overlay_data_layers(id, &record.layers, &record.data_layers)
                .iter()
                .map(|l| self.layout.layer_lowerdir(id, l))
                .collect(),
            None => Vec::new(),
        };
        let Some((uid, gid)) = idmap_of(record) else {
            return self.host.mount_overlay_with_data(
                lowers,
                &data,
                Some((&upper_mount.join("upper"), &upper_mount.join("work"))),
                &record.dir,
            );
        };
        let views = self.layout.mnt().join("idmap").join(&record.id);
        let mut made = Vec::new();
        let result = (|| {
            let mut mapped = Vec::with_capacity(lowers.len() + data.len());
            for (i, lower) in lowers.iter().chain(&data).enumerate() {
                // A layer's lowerdir is `<layer mount>/upper`; the empty dir is no mount.
                match lower.parent().filter(|_| lower.ends_with("upper")) {
                    Some(mount) => {
                        let view = views.join(format!("l{i}"));
                        crate::state::fsutil::ensure_dir(&view)?;
                        self.host.idmap_mount(mount, &view, uid, gid)?;
                        made.push(view.clone());
                        mapped.push(view.join("upper"));
                    }
                    None => mapped.push(lower.clone()),
                }
            }
            let view = views.join("u");
            crate::state::fsutil::ensure_dir(&view)?;
            self.host.idmap_mount(upper_mount, &view, uid, gid)?;
            made.push(view.clone());
            crate::fault::point("create:idmapped");
            let mapped_data = mapped.split_off(lowers.len());
            self.host.mount_overlay_with_data(
                &mapped,
                &mapped_data,
                Some((&view.join("upper"), &view.join("work"))),
                &record.dir,
            )
        })();
        for v in made.iter().rev() {
            if let Err(e) = self.host.unmount(v, true) {
                tracing::warn!(view = %v.display(), error = %e, "idmapped view not unmounted; gc removes it");
            }
        }
        let _ = std::fs::remove_dir_all(&views);
        result
    }

    /// Mounts a clone volume's image at its DIR: directly, or through an idmapped view of a
    /// private mount (then dropped: the view keeps the filesystem) for a volume with an identity.
    pub(crate) fn mount_clone_for(&self, record: &VolumeRecord, image: &Path) -> Result<()> {
        let how = crate::host::ImageMount { read_only: false };
        let Some((uid, gid)) = idmap_of(record) else {
            self.host.mount_image(image, &record.dir, how)?;
            return self.own_root(record, &record.dir);
        };
        let private = self.layout.upper_mount(&record.id);
        crate::state::fsutil::ensure_dir(&private)?;
        self.host.mount_image(image, &private, how)?;
        let mapped = self
            .own_root(record, &private)
            .and_then(|_| self.host.idmap_mount(&private, &record.dir, uid, gid));
        let _ = self.host.unmount(&private, true);
        let _ = std::fs::remove_dir(&private);
        mapped
    }

    /// Gives a volume's root (at `root`, its on-disk view) to its on-disk owner and mode.
    pub(crate) fn own_root(&self, record: &VolumeRecord, root: &Path) -> Result<()> {
        if let (Some((uid, gid)), Some(r)) = (disk_owner(record), record.root) {
            self.host.chown(root, uid, gid)?;
            use crate::error::IoContext;
            std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(r.mode))
                .at("chmod", root)?;
        }
        Ok(())
    }

    /// The lowest UID of `volume_uids` no live volume record holds. Called with the admission
    /// lock held, which the caller keeps until the record naming the UID is written.
    pub(crate) fn free_uid(
        &self,
        records: &[VolumeRecord],
        damaged: &[std::path::PathBuf],
    ) -> Result<u32> {
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
