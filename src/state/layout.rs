//! Where everything lives under the state dir. Pure path arithmetic: no I/O.
//!
//! ```text
//! <state>/
//!   caches/<ns>/<name>/
//!     cache.json            limit and creation time                     (temp → fsync → rename)
//!     current.json          the current generation: ordered layer list  (temp → fsync → rename)
//!     history/<gen>.json    every published generation with its provenance (written before
//!                           current.json; entries above the current generation are void)
//!     last-used             mtime = last volume created on this cache
//!     lock                  flock: serialises publish, layer mounts, GC of this cache
//!     squash.lock           flock: held by the one squash running for this cache
//!     layers/<id>.img       committed, immutable layer images (sparse ext4), the cache's and
//!                           its scopes'
//!     scopes/<scope>.json   a scope's own layers, stacked on the cache  (temp → fsync → rename)
//!     scopes/<scope>.lock   flock: held by a merge of the scope's layers
//!     scopes/<scope>.used   mtime = last volume created on the scope (idle scopes go)
//!     scopes/<scope>.tmp/   a scope merge's half-built image
//!     tmp/                  half-built images (squash); removed by gc when no squash runs
//!   volumes/<id>/
//!     volume.json           the volume record: DIR, cache, layers, size, state
//!     upper.img             the volume's writable image (upper/ and work/)
//!   locks/volumes/<id>.lock flock per volume (outside the volume dir so it outlives it)
//!   locks/admission.lock    flock: a create's disk admission until its record is written
//!   locks/runs/<id>.lock    flock held by the `jobcachefs run` that owns the volume, for the
//!                           run's whole life; holds the job's process group (JSON). Free while
//!                           the volume (labelled jobcachefs.io/run) exists: its run died
//!   mnt/layers/<ns>/<name>/<layer>/   read-only layer mounts, shared by all volumes
//!   mnt/uppers/<volume-id>/           the volume image mounts (upperdir/workdir live here)
//!   mnt/squash/<ns>/<name>/{view,new} the squash's read-only overlay and the new base
//!   mnt/sync/<token>/       a layer mounted by export (read-only) or import (being built);
//!                           live while its process holds mnt/sync/<token>.lock
//!   empty/                  an empty read-only lower dir for volumes of an empty cache
//!   queue/<ns>_<name>       a squash is due for this cache (drained by gc / agent)
//!   sync/lock               flock: one export/import at a time on this node
//!   sync/oci/               OCI image layout: layer blobs (zstd tars), records/<layer>.json
//!                           (which blob holds which local layer), the manifest being pushed
//!   sync/tmp/               layer images being built by an import (cleared by the next one)
//!   clone-backend           "reflink" or "pool": where this node's clone images live
//!   clones/ or mnt/pool/    the clone store (a reflink-capable state dir, or the reflink pool
//!                           pool.img, sparse XFS, mounted at mnt/pool):
//!     caches/<ns>/<name>/<layer>.img   a clone cache's generation image (one per generation)
//!     volumes/<id>.img                 a clone volume (a FICLONE of its generation's image)
//!   caches/<ns>/<name>/lease  clone caches: the volume id holding the write lease
//!   ballast                 8 MiB allocated, given up when a delete's record meets a full disk
//!   format                  the state dir's format version (a newer one is refused)
//!   stats.json              counters for the agent's /metrics (commits, squashes, pushes, …)
//! ```
//!
//! The volume id is a hash of the canonical DIR, so a retried create/delete of the same DIR finds
//! the same record.

use crate::input::names::CacheId;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Default state dir.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jobcachefs";

/// Paths under one state dir.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `root` (which must be absolute and canonical).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    /// The state dir itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Parent of all caches.
    pub fn caches(&self) -> PathBuf {
        self.root.join("caches")
    }

    /// One cache's directory.
    pub fn cache_dir(&self, id: &CacheId) -> PathBuf {
        self.caches().join(&id.namespace).join(&id.name)
    }

    /// The cache's settings record.
    pub fn cache_record(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("cache.json")
    }

    /// The cache's current generation manifest.
    pub fn current(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("current.json")
    }

    /// The cache's generation history.
    pub fn history_dir(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("history")
    }

    /// The record of one published generation.
    pub fn history_entry(&self, id: &CacheId, generation: u64) -> PathBuf {
        self.history_dir(id).join(format!("{generation:010}.json"))
    }

    /// The cache's lock file.
    pub fn cache_lock(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("lock")
    }

    /// The lock a running squash holds.
    pub fn squash_lock(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("squash.lock")
    }

    /// File whose mtime is the cache's last use.
    pub fn last_used(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("last-used")
    }

    /// The cache's committed layer images.
    pub fn layers_dir(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("layers")
    }

    /// One committed layer image.
    pub fn layer_image(&self, id: &CacheId, layer: &str) -> PathBuf {
        self.layers_dir(id).join(format!("{layer}.img"))
    }

    /// A layer's manifest (`files::manifest`), when it has one.
    pub fn layer_manifest(&self, id: &CacheId, layer: &str) -> PathBuf {
        self.layers_dir(id).join(format!("{layer}.manifest"))
    }

    /// The cache's scopes: `<scope>.json` records, `<scope>.lock`, `<scope>.used` (mtime: the
    /// last volume made on it), `<scope>.tmp/` (a merge's half-built image).
    pub fn scopes_dir(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("scopes")
    }

    /// A scope's record.
    pub fn scope_record(&self, id: &CacheId, scope: &str) -> PathBuf {
        self.scopes_dir(id).join(format!("{scope}.json"))
    }

    /// A scope's lock: held by a merge of its layers (between the squash and the cache lock).
    pub fn scope_lock(&self, id: &CacheId, scope: &str) -> PathBuf {
        self.scopes_dir(id).join(format!("{scope}.lock"))
    }

    /// File whose mtime is the scope's last use.
    pub fn scope_used(&self, id: &CacheId, scope: &str) -> PathBuf {
        self.scopes_dir(id).join(format!("{scope}.used"))
    }

    /// Half-built images of a scope's merge.
    pub fn scope_tmp(&self, id: &CacheId, scope: &str) -> PathBuf {
        self.scopes_dir(id).join(format!("{scope}.tmp"))
    }

    /// Mount points of a scope's merge (`new`, `extra`).
    pub fn scope_mnt(&self, id: &CacheId, scope: &str) -> PathBuf {
        self.squash_mnt(id).join("scopes").join(scope)
    }

    /// Half-built images of this cache.
    pub fn cache_tmp(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("tmp")
    }

    /// Parent of all volume records.
    pub fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// One volume's directory.
    pub fn volume_dir(&self, vol: &str) -> PathBuf {
        self.volumes().join(vol)
    }

    /// One volume's record.
    pub fn volume_record(&self, vol: &str) -> PathBuf {
        self.volume_dir(vol).join("volume.json")
    }

    /// One volume's writable image.
    pub fn volume_image(&self, vol: &str) -> PathBuf {
        self.volume_dir(vol).join("upper.img")
    }

    /// The manifest of a volume's upper, written before its commit when metadata squashes
    /// will read it (it becomes the layer's).
    pub fn volume_manifest(&self, vol: &str) -> PathBuf {
        self.volume_dir(vol).join("upper.manifest")
    }

    /// One volume's lock file.
    pub fn volume_lock(&self, vol: &str) -> PathBuf {
        self.root
            .join("locks")
            .join("volumes")
            .join(format!("{vol}.lock"))
    }

    /// The lock a `jobcachefs run` holds on its volume for its whole life (and its owner).
    pub fn run_lock(&self, vol: &str) -> PathBuf {
        self.root
            .join("locks")
            .join("runs")
            .join(format!("{vol}.lock"))
    }

    /// Where the run locks live.
    pub fn run_locks(&self) -> PathBuf {
        self.root.join("locks").join("runs")
    }

    /// An allocated file released when a record cannot be written on a full disk.
    pub fn ballast(&self) -> PathBuf {
        self.root.join("ballast")
    }

    /// The node-wide lock held from a create's disk admission until its record (which makes it
    /// count) is written.
    pub fn admission_lock(&self) -> PathBuf {
        self.root.join("locks").join("admission.lock")
    }

    /// The node's clone backend once chosen (`reflink` or `pool`): fixed, so that clone images
    /// never move between backends.
    pub fn clone_backend(&self) -> PathBuf {
        self.root.join("clone-backend")
    }

    /// Clone images on a reflink-capable state dir.
    pub fn clone_dir(&self) -> PathBuf {
        self.root.join("clones")
    }

    /// The reflink pool: a sparse XFS image.
    pub fn pool_image(&self) -> PathBuf {
        self.root.join("pool.img")
    }

    /// Where the reflink pool is mounted.
    pub fn pool_mount(&self) -> PathBuf {
        self.mnt().join("pool")
    }

    /// The lock held while the pool is made, mounted or trimmed.
    pub fn pool_lock(&self) -> PathBuf {
        self.root.join("locks").join("pool.lock")
    }

    /// A clone cache's lease file: the id of the write-back volume that may commit.
    pub fn lease(&self, id: &CacheId) -> PathBuf {
        self.cache_dir(id).join("lease")
    }

    /// Parent of every mount jobcachefs makes besides the volume DIRs themselves.
    pub fn mnt(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// Where a committed layer is mounted read-only.
    pub fn layer_mount(&self, id: &CacheId, layer: &str) -> PathBuf {
        self.mnt()
            .join("layers")
            .join(&id.namespace)
            .join(&id.name)
            .join(layer)
    }

    /// The lowerdir of a mounted layer: layers keep the tree in `upper/` of their image.
    pub fn layer_lowerdir(&self, id: &CacheId, layer: &str) -> PathBuf {
        self.layer_mount(id, layer).join("upper")
    }

    /// Where a volume's image is mounted.
    pub fn upper_mount(&self, vol: &str) -> PathBuf {
        self.mnt().join("uppers").join(vol)
    }

    /// Squash work area of one cache.
    pub fn squash_mnt(&self, id: &CacheId) -> PathBuf {
        self.mnt().join("squash").join(&id.namespace).join(&id.name)
    }

    /// The empty lower dir used by volumes of an empty cache.
    pub fn empty(&self) -> PathBuf {
        self.root.join("empty")
    }

    /// The on-disk queue of deferred work.
    pub fn queue(&self) -> PathBuf {
        self.root.join("queue")
    }

    /// The queue entry saying a squash of `id` is due.
    pub fn squash_due(&self, id: &CacheId) -> PathBuf {
        self.queue()
            .join(format!("squash_{}_{}", id.namespace, id.name))
    }
}

/// Where clone images live inside a clone store (`<state>/clones` or the pool's mount).
pub mod clone_store {
    use super::*;

    /// A clone cache's generation images.
    pub fn layers_dir(store: &Path, id: &CacheId) -> PathBuf {
        store.join("caches").join(&id.namespace).join(&id.name)
    }

    /// One generation image of a clone cache.
    pub fn layer_image(store: &Path, id: &CacheId, layer: &str) -> PathBuf {
        layers_dir(store, id).join(format!("{layer}.img"))
    }

    /// A clone volume's image.
    pub fn volume_image(store: &Path, vol: &str) -> PathBuf {
        store.join("volumes").join(format!("{vol}.img"))
    }
}

/// The volume id of a canonical volume DIR.
pub fn volume_id(dir: &Path) -> String {
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    digest[..10].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_are_stable_and_distinct() {
        let a = volume_id(Path::new("/x/a"));
        assert_eq!(a, volume_id(Path::new("/x/a")));
        assert_ne!(a, volume_id(Path::new("/x/b")));
        assert_eq!(a.len(), 20);
    }

    #[test]
    fn layer_lowerdir_is_inside_its_mount() {
        let l = Layout::new("/s");
        let id = CacheId::new("ns", "c").unwrap();
        assert_eq!(
            l.layer_lowerdir(&id, "g1-ab"),
            Path::new("/s/mnt/layers/ns/c/g1-ab/upper")
        );
    }
}
